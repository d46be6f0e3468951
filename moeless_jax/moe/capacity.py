"""Static buffer sizes of one layer call, and the dropless retry over a ladder of them.

Two buffers bound what a call can compute:

* the dispatch buffer (rows per device pair for ``dense``, per receiving device for ``ragged``);
* with the ``capacity`` expert kernel, the per-slot buffer plus a ragged overflow buffer.

Everything past a buffer is counted in ``MoEOutput.overflow`` and never silently dropped. The last rung of
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
    slot_rows: rows per slot of the ``capacity`` expert kernel; ``None`` runs the ``ragged`` kernel.
    overflow_rows: rows of the ragged overflow path of the ``capacity`` kernel.
    """

    dispatch_rows: int
    slot_rows: int | None = None
    overflow_rows: int = 0


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
    """The first rung: buffers sized from the config's factors (``backend`` resolves ``auto`` kernels)."""
    kw = dict(
        tokens_per_device=tokens_per_device,
        top_k=config.top_k,
        num_devices=config.num_devices,
        slots_per_device=config.slots_per_device,
    )
    dispatch_rows = dispatch_capacity(config.backend, capacity_factor=config.capacity_factor, **kw)
    if resolve_expert_kernel(config, backend) == "ragged":
        return Buffers(dispatch_rows)
    rows_per_device = tokens_per_device * config.top_k  # balanced load of one device
    return Buffers(
        dispatch_rows,
        slot_buffer_rows(rows_per_device / config.slots_per_device, config.slot_capacity_factor),
        max(8, math.ceil(config.overflow_fraction * rows_per_device)),
    )


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
    """Rungs of growing buffers for :func:`call_dropless`: the config's, each grown by ``grow``, then the
    worst case."""
    first = default_buffers(config, tokens_per_device, backend)
    worst = worst_case_buffers(config, tokens_per_device)
    rungs = [first]
    for g in grow:
        rungs.append(
            Buffers(
                min(worst.dispatch_rows, math.ceil(first.dispatch_rows * g)),
                None if first.slot_rows is None else math.ceil(first.slot_rows * g),
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
