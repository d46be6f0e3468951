"""Expert-placement policies behind one interface.

A policy holds the current replica table of every layer (``slot_to_expert [L, P]``) and is driven batch by
batch:

- ``plan(forecast)`` before a batch: maybe new tables (a :class:`Decision`). ``forecast [L, E]`` is the
  predicted load of the coming batch; only MoEless uses it (a perfect forecast is the batch's true loads).
- ``observe(loads)`` for the batch: serve its true loads ``[L, E]`` with the current tables and return what
  each device computed (an :class:`Outcome`); history-based policies also record the loads here.

=============  ========================================================================  ===============
policy         tables                                                                    outputs change
=============  ========================================================================  ===============
``static``     one replica per expert, round-robin (expert e on device e % D); never      no
               changes
``eplb``       DeepSeek EPLB over the summed loads of the last ``window`` batches, every   no
               ``period`` batches; fills every slot
``moeless``    forecast -> scaler (CV rule) -> placer (warm reuse) every batch             no
``oracle``     static tables, but tokens are spread perfectly over devices (ignores the   yes
               gate's expert choice)
``tokendrop``  static tables; each expert computes at most ``ceil(gamma * tokens / E)``    yes
               tokens, the rest are dropped and counted
``replicate``  every expert replicated ``k`` times, placed once; never changes            no
=============  ========================================================================  ===============

Every policy serves its tables with the layer's ``split`` (``even``: each expert's tokens divided equally
over its replicas, as vLLM and SGLang do; ``balanced``: the layer's in-step quotas that level the devices,
:func:`moeless_jax.moe.split.balanced_quotas`). The split changes no output, only which device computes
what; it matters for the replicating policies (``moeless``, ``eplb``, ``replicate``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.plan.config import EPLBConfig, MoElessConfig, ReplicateConfig, SlotLayout, TokenDropConfig
from moeless_jax.plan.eplb import rebalance_experts
from moeless_jax.plan.loads import check_loads
from moeless_jax.plan.metrics import balancedness, check_split, spread_evenly, tokens_per_device
from moeless_jax.plan.placer import place_checked, place_replicas
from moeless_jax.plan.scaler import cv_counts
from moeless_jax.plan.tables import align_slots, repair_anti_affinity, static_slot_to_expert
from moeless_jax.plan.topology import Topology

if TYPE_CHECKING:
    from moeless_jax.moe.replica_table import ReplicaTable


@dataclass(frozen=True)
class Decision:
    """Tables for the next batch.

    slot_to_expert: ``[L, P]``; changed: ``[L]`` whether a layer's table differs from the one before;
    moved_slots: ``[L]`` slots that receive a weight copy; seconds: planning wall time; fallbacks: layers
    whose plan was replaced by a safer one (MoEless: the static-EP guard; EPLB: anti-affinity repairs).
    """

    slot_to_expert: np.ndarray
    changed: np.ndarray
    moved_slots: np.ndarray
    seconds: float
    fallbacks: int = 0

    @property
    def slots_used(self) -> np.ndarray:
        """``[L]`` filled slots per layer."""
        return (self.slot_to_expert >= 0).sum(-1)


@dataclass(frozen=True)
class Outcome:
    """What a batch cost: ``tokens_per_device [L, D]`` computed and ``dropped_tokens [L]`` skipped."""

    tokens_per_device: np.ndarray
    dropped_tokens: np.ndarray

    @property
    def balancedness(self) -> np.ndarray:
        """``[L]`` mean / max tokens per device."""
        return balancedness(self.tokens_per_device)


class Policy:
    """Base: static tables that never change, served with ``split`` (``even`` or ``balanced``)."""

    name: ClassVar[str]
    changes_outputs: ClassVar[bool] = False

    def __init__(self, layout: SlotLayout, num_layers: int, *, split: str = "even"):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise InputError(f"num_layers must be a positive integer, got {num_layers!r}")
        self.layout, self.num_layers = layout, num_layers
        self.split = check_split(split)
        self.static = static_slot_to_expert(layout.num_experts, layout.num_devices, layout.slots_per_device)
        self.slot_to_expert = np.tile(self.static, (num_layers, 1))  # [L, P], the tables in use

    def plan(self, forecast: np.ndarray | None = None) -> Decision:
        """Tables for the next batch (the base keeps the current ones)."""
        return self._decide(self.slot_to_expert.copy(), 0.0)

    def observe(self, loads: np.ndarray) -> Outcome:
        """Serve a batch with true ``loads [L, E]`` under the current tables."""
        loads = self.check(loads)
        tokens = tokens_per_device(self.slot_to_expert, loads, self.layout.num_devices, self.split)
        return Outcome(tokens, np.zeros(self.num_layers, np.int64))

    def check(self, loads: np.ndarray, name: str = "loads") -> np.ndarray:
        loads = check_loads(loads, num_experts=self.layout.num_experts, name=name)
        if loads.shape[0] != self.num_layers:
            raise InputError(f"{name}: has {loads.shape[0]} layers, the policy plans {self.num_layers}")
        return loads

    def tables(self) -> list[ReplicaTable]:
        """The current tables as validated :class:`ReplicaTable` objects (imports jax)."""
        from moeless_jax.moe.replica_table import ReplicaTable

        layout = self.layout
        return [
            ReplicaTable.from_slot_to_expert(
                row,
                num_experts=layout.num_experts,
                num_devices=layout.num_devices,
                slots_per_device=layout.slots_per_device,
            )
            for row in self.slot_to_expert
        ]

    def adopt(self, slot_to_expert: np.ndarray) -> None:
        """Make ``slot_to_expert [L, P]`` the tables in use (e.g. those a layer actually serves, after a move
        budget cut a plan short). Every row must be servable and fill at most the layout's slot cap."""
        from moeless_jax.plan.budget import check_table

        layout = self.layout
        tables = np.asarray(slot_to_expert)
        if tables.shape != self.slot_to_expert.shape:
            raise InputError(
                f"slot_to_expert: has shape {tables.shape}, expected {self.slot_to_expert.shape} = "
                "(layers, slots)"
            )
        rows = [
            check_table(
                row,
                num_experts=layout.num_experts,
                num_devices=layout.num_devices,
                slots_per_device=layout.slots_per_device,
                name=f"slot_to_expert layer {layer}",
            )
            for layer, row in enumerate(tables)
        ]
        filled = (tables >= 0).sum(-1)
        if (filled > layout.replica_cap).any():
            layer = int(np.argmax(filled > layout.replica_cap))
            raise InputError(
                f"slot_to_expert layer {layer}: fills {int(filled[layer])} slots, more than the cap "
                f"{layout.replica_cap}"
            )
        self.slot_to_expert = np.stack(rows)

    def _decide(self, new: np.ndarray, seconds: float, fallbacks: int = 0) -> Decision:
        old = self.slot_to_expert
        moved = ((new != old) & (new >= 0)).sum(-1)
        changed = (new != old).any(-1)
        self.slot_to_expert = new
        return Decision(new, changed, moved, seconds, fallbacks)


class StaticEP(Policy):
    """Static expert parallelism (Megatron-LM): one replica per expert, round-robin, never re-planned."""

    name = "static"


class MoEless(Policy):
    """MoEless: every batch, forecast -> scaler (Alg. 1) -> placer (Alg. 2), layer by layer.

    The placer starts from the table in use (warm replicas stay put within ``warm_slack``; see
    :mod:`moeless_jax.plan.placer`). Guard: a layer's plan never has a higher max device load than static EP
    on the same loads; if it would, the placement from static EP's table is used, or failing that static EP
    itself (counted in ``Decision.fallbacks``). A table placed again with its own counts comes back unchanged,
    so planning twice for the same loads moves nothing.
    """

    name = "moeless"

    def __init__(
        self,
        layout: SlotLayout,
        num_layers: int,
        config: MoElessConfig | None = None,
        topology: Topology | None = None,
        *,
        split: str = "even",
    ):
        super().__init__(layout, num_layers, split=split)
        self.config = config or MoElessConfig()
        self.topology = topology
        self._static_device = np.arange(layout.num_experts) % layout.num_devices

    def plan(self, forecast: np.ndarray | None = None) -> Decision:
        if forecast is None:
            raise InputError("moeless plans from a load forecast [layers, experts]; none was given")
        loads = self.check(forecast, "forecast")
        start = time.perf_counter()
        new = np.empty_like(self.slot_to_expert)
        fallbacks = 0
        for layer in range(self.num_layers):
            new[layer], fell_back = self.plan_layer(loads[layer], self.slot_to_expert[layer])
            fallbacks += fell_back
        return self._decide(new, time.perf_counter() - start, fallbacks)

    def plan_layer(self, loads: np.ndarray, previous: np.ndarray) -> tuple[np.ndarray, bool]:
        """One layer: checked ``loads [E]`` and the ``previous [P]`` table -> (``slot_to_expert [P]``,
        fell back)."""
        layout, config = self.layout, self.config
        num_devices, slots = layout.num_devices, layout.slots_per_device
        load = loads.astype(np.float64, copy=False)
        count = cv_counts(load, config.cv_target, layout.replica_cap, num_devices)
        share = load / count
        warm_slack = config.warm_slack
        if warm_slack is not None:  # in load units, as a Python float (the placer compares it per replica)
            warm_slack = warm_slack * float(load.sum()) / num_devices
        placement = (count, share, num_devices, slots)
        options = (config.reuse_warm, warm_slack, self.topology)
        table, device_load = place_checked(*placement, previous, *options)
        static_max = np.bincount(self._static_device, weights=load, minlength=num_devices).max()
        # The placer sums exact shares; the layer's integer split differs by < 1 token per replica, so a plan
        # S tokens under the static maximum stays under it with any rounding.
        static_limit = static_max - (slots if loads.dtype.kind in "iu" else 1e-9 * static_max)
        if max(device_load) <= static_limit or self._max_load(table, loads) <= static_max:
            return table, False
        table, device_load = place_checked(*placement, self.static, *options)
        if max(device_load) <= static_limit or self._max_load(table, loads) <= static_max:
            return table, True
        return self.static.copy(), True

    def _max_load(self, slot_to_expert: np.ndarray, loads: np.ndarray) -> float:
        return float(tokens_per_device(slot_to_expert, loads, self.layout.num_devices).max())


class EPLB(Policy):
    """DeepSeek EPLB, re-planned every ``period`` batches from the summed loads of the last ``window``.

    Until the first re-plan the static table is used. Every slot is filled (budget ``D * S - E`` redundant
    replicas). Our tables allow one replica of an expert per device, so replication is capped at the GPUs an
    expert can spread over, and replicas EPLB packs onto one GPU are swapped apart (same node first, nearest
    replica load; if no swap works, EPLB's replica counts are placed greedily). Layers that needed either
    count as ``Decision.fallbacks``. Slots are then aligned with the previous table so experts that stay on a
    device stay in their slot.
    """

    name = "eplb"

    def __init__(
        self, layout: SlotLayout, num_layers: int, config: EPLBConfig | None = None, *, split: str = "even"
    ):
        super().__init__(layout, num_layers, split=split)
        self.config = config or EPLBConfig()
        if layout.num_devices % self.config.num_nodes:
            raise InputError(
                f"eplb: {layout.num_devices} devices do not split over {self.config.num_nodes} nodes"
            )
        if layout.num_experts % self.config.num_groups:
            raise InputError(
                f"eplb: {layout.num_experts} experts do not split into {self.config.num_groups} groups"
            )
        self.history: deque[np.ndarray] = deque(maxlen=self.config.window)
        self.batches_seen = 0
        self._planned_at = 0
        self._node_of_device = np.arange(layout.num_devices) // (layout.num_devices // self.config.num_nodes)

    def observe(self, loads: np.ndarray) -> Outcome:
        outcome = super().observe(loads)
        self.history.append(self.check(loads))
        self.batches_seen += 1
        return outcome

    def plan(self, forecast: np.ndarray | None = None) -> Decision:
        due = (
            self.history
            and self.batches_seen % self.config.period == 0
            and self._planned_at != self.batches_seen
        )
        if not due:
            return super().plan()
        start = time.perf_counter()
        weight = np.sum(self.history, axis=0)  # [L, E]
        new, swaps = self.rebalance(weight)
        self._planned_at = self.batches_seen
        return self._decide(new, time.perf_counter() - start, swaps)

    def rebalance(self, weight: np.ndarray) -> tuple[np.ndarray, int]:
        """EPLB tables for summed loads ``weight [L, E]``, repaired and slot-aligned: (``[L, P]``, swaps)."""
        layout, config = self.layout, self.config
        phy2log, _, logcnt = rebalance_experts(
            weight,
            layout.num_slots,
            config.num_groups,
            config.num_nodes,
            layout.num_devices,
            cap_per_gpu=True,
        )
        new = np.empty_like(self.slot_to_expert)
        repairs = 0
        for layer in range(self.num_layers):
            share = weight[layer] / logcnt[layer]
            repaired, swapped = repair_anti_affinity(
                phy2log[layer], share, layout.slots_per_device, self._node_of_device
            )
            stuck = repaired is None
            if stuck:  # no swap separates them: place EPLB's replica counts greedily instead
                repaired = place_replicas(
                    logcnt[layer],
                    weight[layer],
                    num_devices=layout.num_devices,
                    slots_per_device=layout.slots_per_device,
                )
            new[layer] = align_slots(repaired, self.slot_to_expert[layer], layout.slots_per_device)
            repairs += swapped > 0 or stuck
        return new, repairs


class Oracle(Policy):
    """Capacity-aware "Oracle": ignores the gate and spreads every batch's tokens perfectly over devices.

    Fastest possible layer, but it changes the model's outputs (tokens do not go to their chosen experts).
    """

    name = "oracle"
    changes_outputs = True

    def observe(self, loads: np.ndarray) -> Outcome:
        loads = self.check(loads)
        num_devices = self.layout.num_devices
        total = loads.sum(-1)  # [L]
        if loads.dtype.kind in "iu":
            tokens = spread_evenly(total, num_devices)
        else:
            tokens = np.repeat(total[:, None] / num_devices, num_devices, axis=1)
        return Outcome(tokens, np.zeros(self.num_layers, np.int64))


class TokenDrop(Policy):
    """Static tables with a capacity factor gamma: each expert computes at most ``ceil(gamma * A / E)`` of a
    layer's ``A`` token-expert assignments; the overflow is dropped (the token skips that expert) and counted.
    Changes the model's outputs."""

    name = "tokendrop"
    changes_outputs = True

    def __init__(
        self,
        layout: SlotLayout,
        num_layers: int,
        config: TokenDropConfig | None = None,
        *,
        split: str = "even",
    ):
        super().__init__(layout, num_layers, split=split)
        self.config = config or TokenDropConfig()

    def capacity(self, loads: np.ndarray) -> np.ndarray:
        """``[L]`` tokens one expert may compute in each layer."""
        per_expert = self.config.capacity_factor * loads.sum(-1) / self.layout.num_experts
        return np.array([math.ceil(x) for x in per_expert.tolist()], np.int64)

    def observe(self, loads: np.ndarray) -> Outcome:
        loads = self.check(loads)
        capacity = self.capacity(loads)
        computed = np.minimum(loads, capacity[:, None].astype(loads.dtype))
        dropped = (loads - computed).sum(-1)
        tokens = tokens_per_device(self.slot_to_expert, computed, self.layout.num_devices, self.split)
        return Outcome(tokens, np.asarray(dropped))


class ReplicateAll(Policy):
    """Fixed replication: every expert gets the same number of replicas, placed once, never re-planned.

    The replicas are placed by the placer with equal loads, so each device holds as many as any other (within
    one) and no device holds two replicas of one expert.
    """

    name = "replicate"

    def __init__(
        self,
        layout: SlotLayout,
        num_layers: int,
        config: ReplicateConfig | None = None,
        *,
        split: str = "even",
    ):
        super().__init__(layout, num_layers, split=split)
        self.config = config or ReplicateConfig()
        num_experts, num_devices = layout.num_experts, layout.num_devices
        most = min(num_devices, layout.replica_cap // num_experts)
        replicas = most if self.config.replicas is None else self.config.replicas
        if replicas > most:
            raise InputError(
                f"replicate: replicas {replicas} x {num_experts} experts exceed what fits (at most {most}: "
                f"one per device, {layout.replica_cap} slots); lower replicas or add slots_per_device"
            )
        table = place_replicas(
            np.full(num_experts, replicas, np.int64),
            np.ones(num_experts),
            num_devices=num_devices,
            slots_per_device=layout.slots_per_device,
        )
        self.replicas = replicas
        self.slot_to_expert = np.tile(table, (num_layers, 1))


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (StaticEP, EPLB, MoEless, Oracle, TokenDrop, ReplicateAll)
}


def make_policy(
    name: str,
    layout: SlotLayout,
    num_layers: int,
    *,
    moeless: MoElessConfig | None = None,
    eplb: EPLBConfig | None = None,
    tokendrop: TokenDropConfig | None = None,
    replicate: ReplicateConfig | None = None,
    topology: Topology | None = None,
    split: str = "even",
) -> Policy:
    """The policy called ``name`` (one of :data:`POLICIES`) with its config, served with ``split``."""
    if name not in POLICIES:
        raise InputError(f"unknown policy '{name}'; choose one of {', '.join(POLICIES)}")
    if name == "moeless":
        return MoEless(layout, num_layers, moeless, topology, split=split)
    configs = {"eplb": eplb, "tokendrop": tokendrop, "replicate": replicate}
    if name in configs:
        return POLICIES[name](layout, num_layers, configs[name], split=split)
    return POLICIES[name](layout, num_layers, split=split)
