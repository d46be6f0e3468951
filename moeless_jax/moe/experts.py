"""SwiGLU experts: weights, the per-token MLP, and the grouped matmul over physical slots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moeless_jax.moe.capacity import checked_capacities
from moeless_jax.moe.split import rank_within_group


class MLPWeights(NamedTuple):
    """SwiGLU weights, optionally with a leading expert or slot axis N.

    gate: [N?, M, F]; up: [N?, M, F]; down: [N?, F, M].
    """

    gate: jax.Array
    up: jax.Array
    down: jax.Array


def init_mlp_weights(key: jax.Array, leading: tuple[int, ...], d_model: int, d_ff: int, dtype) -> MLPWeights:
    """Scaled-normal init (fan-in) for ``leading + weight`` shaped SwiGLU weights."""
    k_gate, k_up, k_down = jax.random.split(key, 3)
    w_in = jax.random.normal(k_gate, (*leading, d_model, d_ff), jnp.float32) / jnp.sqrt(d_model)
    w_up = jax.random.normal(k_up, (*leading, d_model, d_ff), jnp.float32) / jnp.sqrt(d_model)
    w_out = jax.random.normal(k_down, (*leading, d_ff, d_model), jnp.float32) / jnp.sqrt(d_ff)
    return MLPWeights(w_in.astype(dtype), w_up.astype(dtype), w_out.astype(dtype))


def swiglu(x: jax.Array, w: MLPWeights) -> jax.Array:
    """[T, M] through one SwiGLU MLP with 2-D weights -> [T, M]."""
    h = jax.nn.silu(x @ w.gate) * (x @ w.up)
    return h @ w.down


def grouped_swiglu(rows: jax.Array, slot: jax.Array, w: MLPWeights) -> jax.Array:
    """Apply slot ``slot[r]``'s SwiGLU to row ``r``.

    rows: [R, M] tokens received by this device.
    slot: [R] int32 local slot of each row in ``0..S-1``; ``S`` marks a padding row.
    w:    MLPWeights with leading slot axis S.
    Returns [R, M]; padding rows are zero.

    Rows are sorted by slot so each slot's rows are contiguous, then ``jax.lax.ragged_dot`` does the
    grouped matmul. It is the portable path; padding rows sort past the last group, where ragged_dot
    writes zeros.
    """
    num_slots = w.gate.shape[0]
    order = jnp.argsort(slot, stable=True)
    group_sizes = jnp.zeros(num_slots, jnp.int32).at[slot].add(1, mode="drop")
    xs = rows[order]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w.gate, group_sizes)) * jax.lax.ragged_dot(xs, w.up, group_sizes)
    ys = jax.lax.ragged_dot(h, w.down, group_sizes)
    return jnp.zeros_like(ys).at[order].set(ys)


def capacity_swiglu(
    rows: jax.Array, slot: jax.Array, w: MLPWeights, *, capacity: int | Sequence[int], overflow_rows: int
) -> tuple[jax.Array, jax.Array]:
    """Grouped SwiGLU as dense batched matmuls over per-slot buffers, with a ragged overflow path.

    rows: [R, M]; slot: [R] local slot in ``0..S-1`` (``S`` = padding); w: weights with leading axis S.
    capacity: compiled rows per slot buffer, ascending (an int is one). The call computes with the smallest
    that holds its fullest slot, chosen on the device from the rows that arrived (one ``lax.switch``):
    each slot's rows go to a ``[S, C, M]`` buffer and through three batched einsums, near matmul peak when
    slots are balanced, which is what replication buys. When no capacity holds the fullest slot, the largest
    is used and the rows past it go, grouped by slot, through ``ragged_dot`` on a ``[overflow_rows, M]``
    buffer; rows past that are not computed and are counted: the caller retries with larger buffers.
    Returns (y [R, M] with padding rows zero, uncomputed row count []).
    """
    capacities = checked_capacities(capacity)
    num_slots = w.gate.shape[0]
    real = slot < num_slots
    position, _ = rank_within_group(slot, num_slots + 1)
    fits = real & (position < capacities[-1])
    spill = real & ~fits
    spill_sizes = _overflow_group_sizes(slot, spill, num_slots, overflow_rows)

    def buffered(capacity: int):
        return lambda rows: _slot_buffer_swiglu(rows, slot, position, fits, w, capacity)

    def buffered_and_overflow(rows):
        y = buffered(capacities[-1])(rows)
        return y + _overflow_swiglu(rows, slot, spill, spill_sizes, w, overflow_rows)

    # Branch i < n: capacity i holds the fullest slot; branch n: rows spill past the largest. Balanced slots
    # rarely spill, so the ragged kernels run only when some did.
    fullest = jnp.max(jnp.where(real, position + 1, 0))
    branch = jnp.sum(jnp.asarray(capacities) < fullest).astype(jnp.int32)
    y = jax.lax.switch(branch, [*map(buffered, capacities), buffered_and_overflow], rows)
    uncomputed = jnp.sum(spill) - jnp.sum(spill_sizes)
    return y, uncomputed.astype(jnp.int32)


def _slot_buffer_swiglu(rows, slot, position, fits, w: MLPWeights, capacity: int) -> jax.Array:
    """Rows with ``fits`` through their slot's SwiGLU in a ``[S, capacity, M]`` buffer; others get 0."""
    num_slots = w.gate.shape[0]
    padded, source = _buffer_sources(rows, slot, position, fits, num_slots, capacity)
    buffer = padded[source].reshape(num_slots, capacity, rows.shape[-1])
    h = jax.nn.silu(jnp.einsum("scm,smf->scf", buffer, w.gate)) * jnp.einsum("scm,smf->scf", buffer, w.up)
    y_buffer = jnp.einsum("scf,sfm->scm", h, w.down)
    got = y_buffer.at[slot, jnp.minimum(position, capacity - 1)].get(mode="clip")
    return jnp.where(fits[:, None], got, 0)


def _buffer_sources(rows, slot, position, fits, num_slots: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """(rows with a zero row appended [R + 1, M], source row of every slot-buffer entry [S * capacity]).

    Entry ``s * capacity + i`` names the row at position ``i`` of slot ``s`` (rows with ``fits``); empty
    entries name the zero row. Buffers are then filled by a gather: only the int32 index is scattered.
    """
    num_rows = rows.shape[0]
    source = jnp.full(num_slots * capacity, num_rows, jnp.int32)
    source = source.at[jnp.where(fits, slot * capacity + position, num_slots * capacity)].set(
        jnp.arange(num_rows, dtype=jnp.int32), mode="drop"
    )
    return jnp.concatenate([rows, jnp.zeros((1, rows.shape[-1]), rows.dtype)]), source


def _overflow_group_sizes(slot, spill, num_slots: int, overflow_rows: int) -> jax.Array:
    """[S] spilled rows of each slot that the overflow buffer takes, slot order, ``overflow_rows`` in all."""
    sizes = jnp.zeros(num_slots, jnp.int32).at[jnp.where(spill, slot, num_slots)].add(1, mode="drop")
    taken = jnp.minimum(jnp.cumsum(sizes), overflow_rows)
    return taken - jnp.concatenate([jnp.zeros(1, jnp.int32), taken[:-1]])


def _overflow_swiglu(rows, slot, spill, sizes, w: MLPWeights, overflow_rows: int) -> jax.Array:
    """Spilled rows (the first ``sizes[s]`` of each slot ``s``) through ``ragged_dot``; others get 0."""
    num_slots = w.gate.shape[0]
    order = jnp.argsort(jnp.where(spill, slot, num_slots), stable=True)[:overflow_rows]  # spilled first
    xs = jnp.where(spill[order][:, None], rows[order], 0)
    hs = jax.nn.silu(jax.lax.ragged_dot(xs, w.gate, sizes)) * jax.lax.ragged_dot(xs, w.up, sizes)
    ys = jax.lax.ragged_dot(hs, w.down, sizes)
    return jnp.zeros_like(rows).at[order].add(jnp.where(spill[order][:, None], ys, 0))


def slotwise_swiglu(
    rows: jax.Array, slot: jax.Array, w: MLPWeights, *, capacity: int | Sequence[int], overflow_rows: int
) -> tuple[jax.Array, jax.Array]:
    """Grouped SwiGLU in which every slot computes with its own buffer size, so a device's time follows the
    rows it holds (the sum over its slots, each rounded up to a compiled size), not ``S x`` its fullest slot.

    rows: [R, M]; slot: [R] local slot in ``0..S-1`` (``S`` = padding); w: weights with leading axis S.
    capacity: compiled rows per slot buffer, ascending. Each slot picks, on the device, the smallest that
    holds its rows, or none when it has no rows (one ``lax.switch`` per slot, over its own weights; see
    :func:`moeless_jax.moe.capacity.slotwise_rows` for its host twin); rows past the largest go through the
    ragged overflow path of :func:`capacity_swiglu`, and rows past that are not computed and are counted.
    Returns (y [R, M] with padding rows zero, uncomputed row count []).
    """
    capacities = checked_capacities(capacity)
    largest, num_slots = capacities[-1], w.gate.shape[0]
    real = slot < num_slots
    position, counts = rank_within_group(slot, num_slots + 1)
    fits = real & (position < largest)
    spill = real & ~fits
    padded, source = _buffer_sources(rows, slot, position, fits, num_slots, largest)
    source = source.reshape(num_slots, largest)

    def sized(size: int):
        def run(padded, sources, weights):
            y = swiglu(padded[sources[:size]], weights)
            # Pad rather than write into a zero buffer: inside shard_map, XLA:CPU 0.11.2 crashed compiling
            # the full-size update (`zeros.at[:largest].set(y)`).
            return jnp.pad(y, ((0, largest - size), (0, 0)))

        return run

    def empty(padded, sources, weights):
        # An empty slot (a spare one, or an expert nobody chose) computes nothing. The zeros are derived from
        # the rows so that, inside shard_map, they vary over the mesh as the other branches' outputs do.
        return jnp.zeros((largest, padded.shape[-1]), padded.dtype) + 0 * padded[:1]

    branches = [empty, *(sized(c) for c in capacities)]

    def one_slot(s: int) -> jax.Array:
        weights = MLPWeights(w.gate[s], w.up[s], w.down[s])
        branch = jnp.where(counts[s] == 0, 0, 1 + jnp.sum(jnp.asarray(capacities) < counts[s]))
        return jax.lax.switch(jnp.minimum(branch, len(capacities)).astype(jnp.int32), branches, padded,
                              source[s], weights)

    buffers = jnp.stack([one_slot(s) for s in range(num_slots)])  # [S, largest, M]
    got = buffers.at[slot, jnp.minimum(position, largest - 1)].get(mode="clip")
    y = jnp.where(fits[:, None], got, 0)
    spill_sizes = _overflow_group_sizes(slot, spill, num_slots, overflow_rows)
    # The ragged overflow kernels run only when some slot spilled past the largest buffer.
    y = jax.lax.cond(
        jnp.any(spill),
        lambda y: y + _overflow_swiglu(rows, slot, spill, spill_sizes, w, overflow_rows),
        lambda y: y,
        y,
    )
    return y, (jnp.sum(spill) - jnp.sum(spill_sizes)).astype(jnp.int32)
