"""Decode-size SwiGLU over slot buffers as Pallas kernels that stream the weights (GPU).

At decode sizes a slot buffer holds a few rows (``C <= 64``), so the three matmuls only read weights; XLA's
GEMMs read them at about half the card's bandwidth there (``results/gpu/decode_variants.json``). These
kernels tile the weights so that every SM streams its own columns:

* gate and up together: one program per (slot, block of ``F``) loads matching gate and up tiles, so the
  SiLU(gate)·up product never leaves the program;
* down: one program per (slot, block of ``M``, chunk of ``F``), partial sums added afterwards (more programs
  than the ``M`` blocks alone would give).

``interpret=True`` runs them on CPU for tests.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas.triton import CompilerParams

MIN_ROWS = 16  # the dot of a kernel needs at least 16 rows


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _gate_up_kernel(x_ref, gate_ref, up_ref, h_ref, *, block_k: int):
    rows, d_model = x_ref.shape
    block_f = gate_ref.shape[1]

    def step(k, acc):
        acc_g, acc_u = acc
        x = x_ref[:, pl.ds(k * block_k, block_k)]
        g = gate_ref[pl.ds(k * block_k, block_k), :]
        u = up_ref[pl.ds(k * block_k, block_k), :]
        return acc_g + _dot(x, g), acc_u + _dot(x, u)

    zeros = jnp.zeros((rows, block_f), jnp.float32)
    acc_g, acc_u = jax.lax.fori_loop(0, d_model // block_k, step, (zeros, zeros))
    h_ref[...] = (jax.nn.silu(acc_g) * acc_u).astype(h_ref.dtype)


def _down_kernel(h_ref, down_ref, out_ref, *, block_k: int):
    rows, chunk = h_ref.shape
    block_m = down_ref.shape[1]

    def step(k, acc):
        h = h_ref[:, pl.ds(k * block_k, block_k)]
        w = down_ref[pl.ds(k * block_k, block_k), :]
        return acc + _dot(h, w)

    out_ref[...] = jax.lax.fori_loop(0, chunk // block_k, step, jnp.zeros((rows, block_m), jnp.float32))


@partial(jax.jit, static_argnames=("block_f", "block_m", "block_k", "splits", "num_warps", "num_stages",
                                   "interpret"))
def decode_swiglu(
    buffer: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    block_f: int = 128,
    block_m: int = 128,
    block_k: int = 64,
    splits: int = 4,
    num_warps: int = 4,
    num_stages: int = 4,
    interpret: bool = False,
) -> jax.Array:
    """``buffer [S, C, M]`` rows per slot -> ``[S, C, M]`` SwiGLU outputs; weights ``[S, M, F]`` (gate, up)
    and ``[S, F, M]`` (down). ``F`` must divide by ``block_f`` and ``splits * block_k``, ``M`` by ``block_m``
    and ``block_k``."""
    num_slots, rows, d_model = buffer.shape
    d_ff = gate.shape[-1]
    padded = max(MIN_ROWS, -(-rows // MIN_ROWS) * MIN_ROWS)
    x = jnp.pad(buffer, ((0, 0), (0, padded - rows), (0, 0)))
    params = CompilerParams(num_warps=num_warps, num_stages=num_stages)
    h = pl.pallas_call(
        partial(_gate_up_kernel, block_k=block_k),
        grid=(num_slots, d_ff // block_f),
        in_specs=[
            pl.BlockSpec((None, padded, d_model), lambda s, j: (s, 0, 0)),
            pl.BlockSpec((None, d_model, block_f), lambda s, j: (s, 0, j)),
            pl.BlockSpec((None, d_model, block_f), lambda s, j: (s, 0, j)),
        ],
        out_specs=pl.BlockSpec((None, padded, block_f), lambda s, j: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((num_slots, padded, d_ff), buffer.dtype),
        compiler_params=params,
        interpret=interpret,
    )(x, gate, up)
    chunk = d_ff // splits
    partial_sums = pl.pallas_call(
        partial(_down_kernel, block_k=block_k),
        grid=(num_slots, d_model // block_m, splits),
        in_specs=[
            pl.BlockSpec((None, padded, chunk), lambda s, i, c: (s, 0, c)),
            pl.BlockSpec((None, chunk, block_m), lambda s, i, c: (s, c, i)),
        ],
        out_specs=pl.BlockSpec((None, None, padded, block_m), lambda s, i, c: (s, c, 0, i)),
        out_shape=jax.ShapeDtypeStruct((num_slots, splits, padded, d_model), jnp.float32),
        compiler_params=params,
        interpret=interpret,
    )(h, down)
    return partial_sums.sum(axis=1)[:, :rows].astype(buffer.dtype)
