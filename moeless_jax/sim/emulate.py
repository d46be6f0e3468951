"""Per-device emulation of an expert-parallel MoE layer on one accelerator.

Before several GPUs are at hand, a D-device layer is emulated on one: for a replica table and a batch's
per-expert token counts, each device's share of the expert computation (its S slots and the tokens the
split gives each of them) is run and timed on the local accelerator, one device at a time. The emulated layer
time is the slowest device's *measured* compute plus the *modelled* dispatch and combine all-to-alls
(:meth:`moeless_jax.sim.LatencyModel.all_to_all_ms`):

    layer_ms = max_d compute_ms[d] + 2 * all_to_all_ms(max_d rows[d] * bytes_per_row)

What a device runs is what the layer's SPMD program runs there, so it has the program's static shapes:

* ``capacity`` kernel: each device computes a ``[S, C_d]`` slot buffer, ``C_d`` the smallest of the
  compiled capacities (:func:`moeless_jax.moe.capacity.slot_capacities`) that holds its fullest slot, as
  the kernel picks it in the step. A skewed device pays for its fullest slot on every one of its slots:
  this is where balanced replicas pay off.
* ``ragged`` kernel: the layer's grouped SwiGLU (rows sorted by slot, ``jax.lax.ragged_dot``) over the
  device's own rows in a receive buffer of ``rows_buffer`` rows (the dispatch buffer, same on every device).

Times are memoised per distinct input (the capacity kernel's time depends on ``C`` alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from moeless_jax.bench import time_fn
from moeless_jax.moe.capacity import checked_capacities, pick_capacity
from moeless_jax.moe.experts import capacity_swiglu, grouped_swiglu, init_mlp_weights

KERNELS = ("capacity", "ragged")


@dataclass(frozen=True)
class ExpertShape:
    """One expert's SwiGLU MLP: ``d_model -> d_ff -> d_model`` in ``dtype``."""

    d_model: int
    d_ff: int
    dtype: str = "bfloat16"

    @property
    def bytes_per_row(self) -> int:
        """Bytes of one token's activation row sent by an all-to-all."""
        return self.d_model * jnp.dtype(self.dtype).itemsize


@dataclass
class DeviceEmulator:
    """Times one device's expert work on the local accelerator (see the module docstring).

    shape: the expert MLP; slots_per_device: S; rows_buffer: static rows a device receives (the dispatch
    buffer); repeats: timed calls per measurement (median).
    """

    shape: ExpertShape
    slots_per_device: int
    rows_buffer: int
    repeats: int = 5
    _weights: object = field(init=False, repr=False)
    _rows: jax.Array = field(init=False, repr=False)
    _memo: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        dtype = jnp.dtype(self.shape.dtype)
        key_w, key_x = jax.random.split(jax.random.key(0))
        self._weights = init_mlp_weights(key_w, (self.slots_per_device,), self.shape.d_model, self.shape.d_ff,
                                         dtype)
        self._rows = jax.random.normal(key_x, (self.rows_buffer, self.shape.d_model), dtype)

    def device_ms(self, slot_rows: Sequence[int], *, kernel: str, capacity: int | None = None) -> float:
        """Measured milliseconds of one device's expert work: ``slot_rows [S]`` tokens per local slot.

        ``capacity`` (rows per slot buffer) is required for the ``capacity`` kernel and must hold every slot.
        """
        slot_rows = np.asarray(slot_rows, np.int64)
        if slot_rows.shape != (self.slots_per_device,) or (slot_rows < 0).any():
            raise ValueError(f"slot_rows must be [{self.slots_per_device}] counts >= 0, got {slot_rows}")
        total = int(slot_rows.sum())
        if total > self.rows_buffer:
            raise ValueError(f"{total} rows exceed the device's receive buffer of {self.rows_buffer}")
        if kernel == "capacity":
            if capacity is None or capacity < int(slot_rows.max()):
                fullest = int(slot_rows.max())
                raise ValueError(f"capacity {capacity} must hold the fullest slot ({fullest} rows)")
            key = ("capacity", capacity)
        elif kernel == "ragged":
            key = ("ragged", tuple(slot_rows.tolist()))
        else:
            raise ValueError(f"kernel '{kernel}' is not one of {KERNELS}")
        if key not in self._memo:
            self._memo[key] = 1e3 * self._measure(slot_rows, kernel, capacity)
        return self._memo[key]

    def _measure(self, slot_rows: np.ndarray, kernel: str, capacity: int | None) -> float:
        num_slots = self.slots_per_device
        slot = np.full(self.rows_buffer, num_slots, np.int32)  # padding rows: slot S
        slot[: int(slot_rows.sum())] = np.repeat(np.arange(num_slots, dtype=np.int32), slot_rows)
        slot = jnp.asarray(slot)
        if kernel == "capacity":
            run = partial(_capacity_call, self._rows, slot, self._weights, capacity=capacity)
            return time_fn(run, warmup=1, repeats=self.repeats)
        return time_fn(lambda: _ragged_call(self._rows, slot, self._weights), warmup=1, repeats=self.repeats)


@partial(jax.jit, static_argnames="capacity")
def _capacity_call(rows, slot, w, *, capacity: int):
    return capacity_swiglu(rows, slot, w, capacity=capacity, overflow_rows=8)[0]


_ragged_call = jax.jit(grouped_swiglu)


@dataclass(frozen=True)
class EmulatedLayer:
    """One emulated layer call: per-device measured compute, the modelled all-to-all, and their sum."""

    compute_ms: np.ndarray  # [D]
    all_to_all_ms: float  # dispatch + combine
    capacities: np.ndarray | None  # [D] each device's slot buffer rows (capacity kernel)

    @property
    def capacity(self) -> int | None:
        """The largest slot buffer any device computed (``None`` for the ragged kernel)."""
        return None if self.capacities is None else int(self.capacities.max())

    @property
    def layer_ms(self) -> float:
        return float(self.compute_ms.max()) + self.all_to_all_ms


def emulate_layer(
    emulator: DeviceEmulator,
    slot_tokens: np.ndarray,
    *,
    kernel: str,
    all_to_all_ms,
    ladder: Sequence[int] | None = None,
) -> EmulatedLayer:
    """Emulate one layer call from ``slot_tokens [P]`` (tokens per slot, P = D * S; see
    :func:`moeless_jax.moe.split.host_slot_tokens`).

    all_to_all_ms: ``bytes_per_device -> ms`` (e.g. ``LatencyModel.all_to_all_ms``); ladder: the capacity
    kernel's compiled capacities (ascending; each device uses the first that holds its fullest slot).
    """
    per_device = np.asarray(slot_tokens, np.int64).reshape(-1, emulator.slots_per_device)  # [D, S]
    capacities = None
    if kernel == "capacity":
        if not ladder:
            raise ValueError("the capacity kernel needs a ladder of compiled capacities")
        ladder = checked_capacities(tuple(int(r) for r in ladder))
        fullest = int(per_device.max())
        if ladder[-1] < fullest:
            raise ValueError(f"no capacity rung holds the fullest slot ({fullest} rows); extend the ladder")
        capacities = np.array([pick_capacity(ladder, int(rows.max())) for rows in per_device])
    compute = np.array([
        emulator.device_ms(rows, kernel=kernel, capacity=None if capacities is None else int(capacities[d]))
        for d, rows in enumerate(per_device)
    ])
    rows = int(per_device.sum(-1).max())
    a2a = 2.0 * float(all_to_all_ms(rows * emulator.shape.bytes_per_row))
    return EmulatedLayer(compute, a2a, capacities)
