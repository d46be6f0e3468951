"""Static buffer sizes of one layer call, and the dropless retry over a ladder of them.

Two buffers bound what a call can compute:

* the dispatch buffer (rows per device pair for ``dense``, per receiving device for ``ragged``);
* with the ``capacity`` expert kernel, the per-slot buffer plus a ragged overflow buffer.

The per-slot buffer comes in a few compiled capacities (:func:`slot_capacities`): each call picks, on each
device, the smallest that holds its fullest slot, so a balanced slot computes (almost) no padding rows while
a fuller one still fits without a retry.

With a config's defaults (``capacity_factor`` and ``overflow_fraction`` null) both buffers hold every row a
device can receive, so one call is complete. A config or caller that bounds them opts into the contract:
everything past a buffer is counted in ``MoEOutput.overflow`` and never silently dropped. The last rung of
:func:`buffer_ladder` is the worst case (worst-case dispatch, ``ragged`` expert kernel), which cannot
overflow, so :func:`call_dropless` always ends with a complete output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from moeless_jax.moe.config import Backend, MoEConfig


@dataclass(frozen=True)
class Buffers:
    """Static rows of a call's buffers (hashable: pass it as a static argument).

    dispatch_rows: rows per device pair (``dense``) or per receiving device (``ragged``).
    slot_rows: the ``capacity`` expert kernel's compiled rows per slot, ascending (an int is one
      capacity); each device computes with the smallest that holds its fullest slot and spills past the
      largest. ``None`` runs the ``ragged`` kernel.
    overflow_rows: rows of the ragged overflow path of the ``capacity`` kernel.
    """

    dispatch_rows: int
    slot_rows: tuple[int, ...] | None = None
    overflow_rows: int = 0

    def __post_init__(self) -> None:
        if self.slot_rows is not None:
            object.__setattr__(self, "slot_rows", checked_capacities(self.slot_rows))


def checked_capacities(capacity: int | Sequence[int]) -> tuple[int, ...]:
    """``capacity`` as a tuple of positive ints, strictly ascending; a clear error otherwise."""
    rungs = (capacity,) if isinstance(capacity, int) else tuple(capacity)
    if not rungs or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in rungs):
        raise ValueError(f"slot capacities must be positive ints, got {capacity!r}")
    if any(b <= a for a, b in zip(rungs, rungs[1:], strict=False)):
        raise ValueError(f"slot capacities must be strictly ascending, got {capacity!r}; sort and dedupe")
    return rungs


def pick_capacity(capacities: Sequence[int], fullest_rows: int) -> int:
    """Host-side twin of the kernel's in-step choice: the smallest capacity holding ``fullest_rows`` rows,
    else the largest (past which rows spill)."""
    return next((c for c in capacities if c >= fullest_rows), capacities[-1])


def slotwise_rows(capacities: Sequence[int], slot_rows: Sequence[int]) -> int:
    """Host twin of the ``slotwise`` kernel's choice: rows a device computes for its slots' ``slot_rows``
    (each slot's smallest capacity holding its rows, none for an empty slot, the largest when it spills)."""
    return sum(pick_capacity(capacities, int(n)) for n in slot_rows if n > 0)


def dispatch_capacity(
    backend: Backend,
    *,
    tokens_per_device: int,
    top_k: int,
    num_devices: int,
    slots_per_device: int,
    capacity_factor: float | None,
) -> int:
    """Dispatch buffer rows: per device pair (``dense``) or per receiving device (``ragged``).

    The worst case (``capacity_factor=None``): one token can send at most ``min(K, S)`` assignments to one
    device (distinct experts, at most one replica of an expert per device, S slots).
    """
    per_token = min(top_k, slots_per_device)
    worst_pair = tokens_per_device * per_token
    if backend == "dense":
        worst, balanced = worst_pair, tokens_per_device * top_k / num_devices
    else:
        worst, balanced = worst_pair * num_devices, tokens_per_device * top_k
    if capacity_factor is None:
        return worst
    rows = 8 * math.ceil(capacity_factor * balanced / 8)
    return int(max(1, min(worst, rows)))


def slot_buffer_rows(rows_per_slot: float, factor: float, multiple: int = 64) -> int:
    """Per-slot buffer rows: ``factor`` x the expected rows of a slot, rounded up to ``multiple``."""
    return int(max(multiple, multiple * math.ceil(factor * rows_per_slot / multiple)))


def slot_capacities(
    rows_per_slot: float, factor: float, ratio: float | None, multiple: int = 64
) -> tuple[int, ...]:
    """Compiled per-slot capacities: ``rows_per_slot * ratio**i`` for ``i = 0, 1, ...`` below ``factor``,
    then ``factor`` itself, each rounded up to ``multiple`` (duplicates removed). ``ratio=None``: the
    ``factor`` capacity alone.

    Nothing below a balanced slot (``i < 0``) is compiled: the device that sets the layer's latency holds at
    least the mean rows, so its fullest slot holds at least ``rows_per_slot``; smaller buffers would only
    speed up devices that wait anyway.
    """
    if ratio is not None and ratio <= 1:
        raise ValueError(f"ratio must be > 1 (or None for one capacity), got {ratio}")
    rungs = {slot_buffer_rows(rows_per_slot, factor, multiple)}
    scale = 1.0
    while ratio is not None and scale < factor:
        rungs.add(slot_buffer_rows(rows_per_slot, scale, multiple))
        scale *= ratio
    return tuple(sorted(rungs))


def resolve_expert_kernel(config: MoEConfig, backend: str | None = None) -> str:
    """The expert kernel a call runs: ``config.expert_kernel``, with ``auto`` resolved for ``backend``
    (default: jax's default backend).

    ``auto`` picks ``capacity`` on accelerators: on an H200 it was the fastest of ``capacity``, ``ragged``
    and ``tokamax.ragged_dot`` in every measured regime, 1 to 65 536 tokens per device, balanced and skewed
    slots, for four expert shapes (``results/gpu/part_kernels.json``; TPUs are not measured). On CPU it picks
    ``ragged``, which needs no slot buffers.
    """
    if config.expert_kernel != "auto":
        return config.expert_kernel
    if backend is None:
        import jax

        backend = jax.default_backend()
    return "ragged" if backend == "cpu" else "capacity"


def default_buffers(config: MoEConfig, tokens_per_device: int, backend: str | None = None) -> Buffers:
    """The first rung: buffers sized from the config's factors (``backend`` resolves ``auto`` kernels).

    With the config's defaults (``capacity_factor`` and ``overflow_fraction`` null) nothing can overflow: the
    layer is dropless in one call. Only a config that bounds a buffer opts into the ``overflow`` contract.
    """
    kw = dict(
        tokens_per_device=tokens_per_device,
        top_k=config.top_k,
        num_devices=config.num_devices,
        slots_per_device=config.slots_per_device,
    )
    dispatch_rows = dispatch_capacity(config.backend, capacity_factor=config.capacity_factor, **kw)
    if resolve_expert_kernel(config, backend) == "ragged":
        return Buffers(dispatch_rows)
    if config.overflow_fraction is None:  # every row the device can receive: nothing is left uncomputed
        overflow_rows = dispatch_rows * (config.num_devices if config.backend == "dense" else 1)
    else:
        rows_per_device = tokens_per_device * config.top_k  # balanced load of one device
        overflow_rows = max(8, math.ceil(config.overflow_fraction * rows_per_device))
    return Buffers(dispatch_rows, config_slot_capacities(config, tokens_per_device), overflow_rows)


def config_slot_capacities(config: MoEConfig, tokens_per_device: int, grow: float = 1.0) -> tuple[int, ...]:
    """The slot sizes of ``config``'s kernel at ``tokens_per_device``, up to ``grow`` x
    ``slot_capacity_factor`` balanced slots. ``slotwise`` adds sizes below a balanced slot (64, 128, 256, ...
    rows): each of its slots picks its own size, and a cold slot holds fewer rows than a balanced one."""
    rows_per_slot = tokens_per_device * config.top_k / config.slots_per_device
    sizes = slot_capacities(rows_per_slot, grow * config.slot_capacity_factor, config.slot_capacity_ratio)
    if config.expert_kernel != "slotwise":
        return sizes
    small = [64 * 2**i for i in range(32) if 64 * 2**i < sizes[0]]
    return tuple(sorted({*small, *sizes}))


def worst_case_buffers(config: MoEConfig, tokens_per_device: int) -> Buffers:
    """Buffers that cannot overflow: worst-case dispatch and the ragged expert kernel."""
    return Buffers(
        dispatch_capacity(
            config.backend,
            tokens_per_device=tokens_per_device,
            top_k=config.top_k,
            num_devices=config.num_devices,
            slots_per_device=config.slots_per_device,
            capacity_factor=None,
        )
    )


def buffer_ladder(
    config: MoEConfig, tokens_per_device: int, grow: Sequence[float] = (2.0,), backend: str | None = None
) -> list[Buffers]:
    """Rungs of growing buffers for :func:`call_dropless`: the config's, each grown by ``grow`` (the slot
    sizes continue up to ``grow`` x the largest and keep the smaller ones), then the worst case."""
    first = default_buffers(config, tokens_per_device, backend)
    worst = worst_case_buffers(config, tokens_per_device)
    rungs = [first]
    for g in grow:
        rungs.append(
            Buffers(
                min(worst.dispatch_rows, math.ceil(first.dispatch_rows * g)),
                None
                if first.slot_rows is None
                else tuple(sorted({*first.slot_rows, *config_slot_capacities(config, tokens_per_device, g)})),
                math.ceil(first.overflow_rows * g),
            )
        )
    rungs.append(worst)
    unique: list[Buffers] = []
    for rung in rungs:
        if rung not in unique:
            unique.append(rung)
    return unique


def call_dropless(run: Callable[[Buffers], Any], ladder: Sequence[Buffers]) -> tuple[Any, Buffers]:
    """Run ``run(buffers)`` up the ladder until nothing overflows.

    ``run`` should be jitted with ``buffers`` static: each rung compiles once. The last rung must be the worst
    case (see :func:`buffer_ladder`), so the loop always ends with a complete output.
    Returns the output and the rung that served it.
    """
    out = None
    for buffers in ladder:
        out = run(buffers)
        if int(out.overflow) == 0:
            return out, buffers
    raise RuntimeError(
        f"the layer overflowed even with {ladder[-1]} ({int(out.overflow)} assignments not computed); "
        "the last rung of the ladder must be worst_case_buffers(...)"
    )
