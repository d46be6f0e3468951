"""The replication controller: observe each step's expert loads, forecast, re-plan, install within a budget.

Any model whose MoE layers can report and swap their replica table can be driven (see
:class:`ReplicatedModel`). Each step, the caller dispatches the jitted step and hands the controller the
step's per-layer expert counts ``[L, E]``; every ``rebalance_interval`` observed steps the controller

1. asks its :class:`~moeless_jax.replication.forecast.Forecaster` for the next step's loads ``[L, E]``,
2. lets the policy (:mod:`moeless_jax.plan.policies`) propose tables ``[L, P]`` from that forecast,
3. cuts each layer's proposal to ``max_moves_per_layer`` weight copies (:func:`moeless_jax.plan.limit_moves`),
4. calls ``layer.set_table`` for the layers whose table changed, then ``on_moves(layer_index, plan)``.

Asynchrony. JAX dispatches a step and returns before the device finishes it, and the controller must not
stall that pipeline. :meth:`ReplicationController.observe` starts a device-to-host copy of the counts
(``copy_to_host_async``) and queues them. Queued counts are read in order: the newest step's only once its
arrays are ready (``is_ready()``), any older step's at the latest on the next :meth:`observe` (by then its
successor has been dispatched, so at most one step of lag and the read rarely waits). Planning thus runs on
the host while the device computes the step already dispatched; new tables serve the next step dispatched
after they are installed. :meth:`ReplicationController.flush` reads everything queued (it may block).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.moe.replica_table import ReplicaTable
from moeless_jax.moe.slot_weights import MovePlan
from moeless_jax.plan.budget import limit_moves
from moeless_jax.plan.config import SlotLayout
from moeless_jax.plan.metrics import balancedness, tokens_per_device
from moeless_jax.plan.policies import EPLB, Policy, make_policy
from moeless_jax.replication.config import ControllerConfig
from moeless_jax.replication.forecast import Forecaster

__all__ = [
    "LayerConfig",
    "ReplicatedLayer",
    "ReplicatedModel",
    "ReplicationController",
    "ReplicationLog",
    "StepRecord",
]


# ---------------------------------------------------------------------------------------------- protocols
@runtime_checkable
class LayerConfig(Protocol):
    """What the controller reads of a layer's config (``moeless_jax.moe.MoEConfig`` has it)."""

    num_experts: int
    num_devices: int
    slots_per_device: int
    split: str


@runtime_checkable
class ReplicatedLayer(Protocol):
    """An MoE layer with a swappable replica table (``moeless_jax.moe.MoELayer`` is one)."""

    config: LayerConfig

    def replica_table(self) -> ReplicaTable:
        """The table the layer's slot weights hold now."""
        ...

    def set_table(self, table: ReplicaTable, *, current: ReplicaTable | None = None) -> MovePlan:
        """Move slot weights to ``table`` and adopt it; return what was copied. ``current``: the table the
        layer holds, as the controller knows it (so the layer need not read it back from the device, which
        would wait for the step in flight)."""
        ...


@runtime_checkable
class ReplicatedModel(Protocol):
    """A model that exposes its MoE layers, in order."""

    def moe_layers(self) -> Sequence[ReplicatedLayer]: ...


# ---------------------------------------------------------------------------------------------- the log
@dataclass(frozen=True)
class StepRecord:
    """One observed step (all tuples are per layer, ``[L]``).

    balancedness: mean / max tokens per device under the tables that served the step; peak_tokens: the max.
    measured: True when they come from the layers' ``slot_counts`` (what the devices computed), False when
    computed from ``expert_counts`` and the tables (:func:`moeless_jax.plan.tokens_per_device`).
    rebalanced: a re-plan ran after this step; slots_moved / bytes_moved: weight copies it installed (from
    each layer's :class:`~moeless_jax.moe.MovePlan`); planning_seconds: forecast + policy + budget;
    install_seconds: the ``set_table`` calls.
    """

    step: int
    balancedness: tuple[float, ...]
    peak_tokens: tuple[float, ...]
    measured: bool
    rebalanced: bool
    slots_moved: tuple[int, ...]
    bytes_moved: tuple[int, ...]
    planning_seconds: float
    install_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class ReplicationLog(Sequence[StepRecord]):
    """The controller's per-step records, oldest first (read-only to callers)."""

    def __init__(self) -> None:
        self._records: list[StepRecord] = []

    def __getitem__(self, index):
        return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self._records)

    def _append(self, record: StepRecord) -> None:
        self._records.append(record)

    def summary(self) -> dict[str, Any]:
        """Totals and balancedness over the logged steps (``None`` where no step was logged)."""
        records = self._records
        balance = np.array([r.balancedness for r in records], np.float64)  # [steps, L]
        return {
            "steps": len(records),
            "rebalances": sum(r.rebalanced for r in records),
            "slots_moved": sum(sum(r.slots_moved) for r in records),
            "bytes_moved": sum(sum(r.bytes_moved) for r in records),
            "planning_seconds": sum(r.planning_seconds for r in records),
            "install_seconds": sum(r.install_seconds for r in records),
            "balancedness_mean": float(balance.mean()) if records else None,
            "balancedness_min": float(balance.min()) if records else None,
            "balancedness_per_layer": balance.mean(0).tolist() if records else None,
        }

    def to_json(self, indent: int | None = None) -> str:
        """``{"summary": ..., "steps": [record, ...]}`` as JSON."""
        return json.dumps(
            {"summary": self.summary(), "steps": [r.to_dict() for r in self._records]}, indent=indent
        )


# ---------------------------------------------------------------------------------------------- controller
@dataclass(frozen=True)
class _Queued:
    """A dispatched step's counts (device arrays being copied, or numpy) and the tables that served it."""

    step: int
    expert_counts: Any  # [L, E]
    slot_counts: Any  # [L, P] or None
    tables: np.ndarray  # [L, P], never mutated (the controller replaces its array on every install)

    def ready(self) -> bool:
        return all(_is_ready(a) for a in (self.expert_counts, self.slot_counts) if a is not None)


def _is_device_array(value) -> bool:
    return hasattr(value, "copy_to_host_async") and hasattr(value, "is_ready")


def _is_ready(value) -> bool:
    return not _is_device_array(value) or bool(value.is_ready())


class ReplicationController:
    """Re-plans and installs the replica tables of ``model``'s MoE layers from the loads it observes.

    model: a :class:`ReplicatedModel`; all its layers must share ``(E, D, S)`` and the config's ``split``.
    forecaster: defaults to ``config.forecaster()`` (history window or EMA). on_moves: called as
    ``on_moves(layer_index, plan)`` after each ``set_table``, e.g. to move optimizer state with the weights.
    The policy starts from the tables the layers hold. tables_change_in_step: something else changes the
    layers' tables inside steps too (layer-ahead replication); the controller then reads the tables back from
    the layers before each re-plan (which waits for the step in flight) instead of trusting its own record,
    so its copies always start from what the layers hold.
    """

    def __init__(
        self,
        model: ReplicatedModel,
        config: ControllerConfig,
        forecaster: Forecaster | None = None,
        on_moves: Callable[[int, MovePlan], None] | None = None,
        *,
        tables_change_in_step: bool = False,
    ):
        if not isinstance(config, ControllerConfig):
            raise InputError(f"config: expected a ControllerConfig, got {type(config).__name__}")
        if not isinstance(model, ReplicatedModel):
            raise InputError(
                f"model: {type(model).__name__} has no moe_layers(); expose the MoE layers to replicate"
            )
        layers = list(model.moe_layers())
        if not layers:
            raise InputError("model: moe_layers() returned no layers; there is nothing to replicate")
        for index, layer in enumerate(layers):
            if not isinstance(layer, ReplicatedLayer):
                raise InputError(
                    f"layer {index}: {type(layer).__name__} lacks config, replica_table() or set_table()"
                )
        forecaster = config.forecaster() if forecaster is None else forecaster
        if not isinstance(forecaster, Forecaster):
            raise InputError(f"forecaster: {type(forecaster).__name__} lacks observe, forecast or reset")
        self.model, self.config, self.layers = model, config, layers
        self.layout = _shared_layout(layers)
        _check_split(layers, config.split)
        self.forecaster, self.on_moves = forecaster, on_moves
        self.tables_change_in_step = tables_change_in_step
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget observed steps, queued counts, the forecaster's history and the log; start again from the
        tables the layers hold now (nothing is moved)."""
        layout, config = self.layout, self.config
        self._read_tables()
        self.policy: Policy = make_policy(
            config.policy,
            layout,
            len(self.layers),
            moeless=config.moeless,
            eplb=config.eplb,
            split=config.split,
        )
        self.policy.adopt(self._slot_to_expert)
        self.forecaster.reset()
        self._queue: deque[_Queued] = deque()
        self._log = ReplicationLog()
        self._dispatched = 0
        self._observed = 0

    def _read_tables(self) -> None:
        """Take the tables the layers hold as the controller's record."""
        self._tables = [layer.replica_table() for layer in self.layers]
        for index, table in enumerate(self._tables):
            if (table.num_experts, table.num_devices, table.slots_per_device) != _layout_key(self.layout):
                raise InputError(f"layer {index}: replica_table() has layout {table!r}, not the layer's")
        self._slot_to_expert = np.stack([t.slot_to_expert for t in self._tables]).astype(np.int64)

    @property
    def tables(self) -> list[ReplicaTable]:
        """The tables installed in the layers, ``[L]``."""
        return list(self._tables)

    @property
    def log(self) -> ReplicationLog:
        return self._log

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def redundant_slots(self) -> int:
        """Slots per layer beyond one per expert (``D * S - E``): room for replicas, fixed by the layers."""
        return self.layout.num_slots - self.layout.num_experts

    @property
    def queued(self) -> int:
        """Steps handed to :meth:`observe` whose counts have not been read yet."""
        return len(self._queue)

    @property
    def steps_observed(self) -> int:
        """Steps whose counts have been read (logged and fed to the forecaster)."""
        return self._observed

    def summary(self) -> dict[str, Any]:
        """The log's summary plus the layout and schedule it ran with."""
        layout, config = self.layout, self.config
        return {
            "policy": config.policy,
            "layers": self.num_layers,
            "experts": layout.num_experts,
            "devices": layout.num_devices,
            "slots_per_device": layout.slots_per_device,
            "redundant_slots": self.redundant_slots,
            "rebalance_interval": config.rebalance_interval,
            "max_moves_per_layer": config.max_moves_per_layer,
            "split": config.split,
            **self._log.summary(),
        }

    # ------------------------------------------------------------------ stepping
    def observe(self, expert_counts, slot_counts=None) -> tuple[StepRecord, ...]:
        """Queue the counts of the step just dispatched; read what is due; re-plan when due.

        expert_counts: ``[L, E]`` tokens per expert of each layer (a jax array, read without blocking; or
        numpy). slot_counts: optional ``[L, P]`` tokens per slot, for the true tokens per device in the log.
        Returns the records of the steps read during this call (possibly none, never blocking on this step).
        """
        layers, experts, slots = self.num_layers, self.layout.num_experts, self.layout.num_slots
        counts = _queue_array(expert_counts, "expert_counts", (layers, experts), "(layers, experts)")
        if slot_counts is None:
            if self.config.split == "balanced" and np.dtype(counts.dtype).kind not in "iu":
                raise InputError(
                    f"expert_counts: split 'balanced' divides token counts; got dtype {counts.dtype} "
                    "(pass integer counts, or slot_counts)"
                )
        else:
            slot_counts = _queue_array(slot_counts, "slot_counts", (layers, slots), "(layers, slots)")
        self._queue.append(_Queued(self._dispatched, counts, slot_counts, self._slot_to_expert))
        self._dispatched += 1
        return self._drain(wait_newest=False)

    def flush(self) -> tuple[StepRecord, ...]:
        """Read every queued step (blocking until its counts arrive), re-planning where due."""
        return self._drain(wait_newest=True)

    def _drain(self, *, wait_newest: bool) -> tuple[StepRecord, ...]:
        records = []
        while self._queue:
            newest = len(self._queue) == 1
            if newest and not wait_newest and not self._queue[0].ready():
                break
            records.append(self._read(self._queue.popleft()))
        return tuple(records)

    def _read(self, queued: _Queued) -> StepRecord:
        counts = _host(queued.expert_counts, "expert_counts")
        tokens = self._device_tokens(queued, counts)  # [L, D]
        self.forecaster.observe(counts)
        self._observed += 1
        moved = np.zeros((2, self.num_layers), np.int64)  # slots, bytes
        planning = install = 0.0
        rebalanced = self._observed % self.config.rebalance_interval == 0
        if rebalanced:
            rebalanced, planning, install = self._rebalance(moved)
        record = StepRecord(
            step=queued.step,
            balancedness=tuple(balancedness(tokens).tolist()),
            peak_tokens=tuple(tokens.max(-1).astype(np.float64).tolist()),
            measured=queued.slot_counts is not None,
            rebalanced=rebalanced,
            slots_moved=tuple(moved[0].tolist()),
            bytes_moved=tuple(moved[1].tolist()),
            planning_seconds=planning,
            install_seconds=install,
        )
        self._log._append(record)
        return record

    def _device_tokens(self, queued: _Queued, counts: np.ndarray) -> np.ndarray:
        """``[L, D]`` tokens per device of the step, under the tables that served it."""
        num_devices = self.layout.num_devices
        if queued.slot_counts is not None:
            slots = _host(queued.slot_counts, "slot_counts")
            return slots.reshape(self.num_layers, num_devices, -1).sum(-1)
        return tokens_per_device(queued.tables, counts, num_devices, self.config.split)

    # ------------------------------------------------------------------ planning
    def _rebalance(self, moved: np.ndarray) -> tuple[bool, float, float]:
        """Forecast -> policy -> budget -> install; fills ``moved [2, L]`` (slots, bytes). Returns (planned,
        planning seconds, install seconds)."""
        start = time.perf_counter()
        forecast = self.forecaster.forecast()
        if forecast is None:
            return False, 0.0, 0.0
        forecast = self.policy.check(np.asarray(forecast, np.float64), "forecast")
        if self.tables_change_in_step:
            self._read_tables()
            self.policy.adopt(self._slot_to_expert)
        proposed = self._propose(forecast)
        current = self._slot_to_expert
        layout = self.layout
        budgeted = np.stack(
            [
                limit_moves(
                    current[layer],
                    proposed[layer],
                    forecast[layer],
                    num_experts=layout.num_experts,
                    num_devices=layout.num_devices,
                    slots_per_device=layout.slots_per_device,
                    max_moves=self.config.max_moves_per_layer,
                )
                for layer in range(self.num_layers)
            ]
        )
        planning = time.perf_counter() - start
        install = 0.0
        try:
            for layer in np.flatnonzero((budgeted != current).any(-1)).tolist():
                table = ReplicaTable.from_slot_to_expert(
                    budgeted[layer],
                    num_experts=layout.num_experts,
                    num_devices=layout.num_devices,
                    slots_per_device=layout.slots_per_device,
                )
                start = time.perf_counter()
                plan = self.layers[layer].set_table(table, current=self._tables[layer])
                install += time.perf_counter() - start
                self._install(layer, table)
                moved[:, layer] = len(plan.moves), plan.bytes_total
                if self.on_moves is not None:
                    self.on_moves(layer, plan)
        finally:  # the policy plans next from what the layers really hold
            self.policy.adopt(self._slot_to_expert)
        return True, planning, install

    def _propose(self, forecast: np.ndarray) -> np.ndarray:
        """``[L, P]`` tables the policy wants for ``forecast [L, E]``."""
        if isinstance(self.policy, EPLB):  # EPLB on the forecaster's history (its summed window)
            return self.policy.rebalance(forecast)[0]
        return self.policy.plan(forecast).slot_to_expert

    def _install(self, layer: int, table: ReplicaTable) -> None:
        self._tables[layer] = table
        tables = self._slot_to_expert.copy()  # a new array: queued steps keep the tables that served them
        tables[layer] = table.slot_to_expert
        self._slot_to_expert = tables


def _layout_key(layout: SlotLayout) -> tuple[int, int, int]:
    return layout.num_experts, layout.num_devices, layout.slots_per_device


def _shared_layout(layers: Sequence[ReplicatedLayer]) -> SlotLayout:
    keys = [(c.num_experts, c.num_devices, c.slots_per_device) for c in (layer.config for layer in layers)]
    for index, key in enumerate(keys):
        if key != keys[0]:
            raise InputError(
                f"layer {index} has (experts, devices, slots_per_device) = {key} but layer 0 has {keys[0]}; "
                "the controller plans one layout for all layers"
            )
    return SlotLayout(*keys[0])


def _check_split(layers: Sequence[ReplicatedLayer], split: str) -> None:
    for index, layer in enumerate(layers):
        if layer.config.split != split:
            raise InputError(
                f"split: the controller plans for '{split}' but layer {index} splits '{layer.config.split}'; "
                f"set ControllerConfig.split to '{layer.config.split}'"
            )


def _queue_array(value, name: str, shape: tuple[int, int], axes: str):
    """A device array with its host copy started, or a numpy copy; checked for shape without reading it."""
    if not _is_device_array(value):
        value = np.array(value, copy=True)
    if tuple(value.shape) != shape:
        raise InputError(f"{name}: has shape {tuple(value.shape)}, expected {shape} = {axes}")
    kind = np.dtype(value.dtype).kind
    if kind not in "iuf":
        raise InputError(f"{name}: expected numbers, got dtype {value.dtype}")
    if _is_device_array(value):
        value.copy_to_host_async()
    return value


def _host(value, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InputError(f"{name}: holds NaN or inf")
    if np.any(array < 0):
        raise InputError(f"{name}: holds negative counts")
    return array
