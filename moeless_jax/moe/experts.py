"""SwiGLU experts: weights, the per-token MLP, and the grouped matmul over physical slots."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


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
