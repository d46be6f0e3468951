"""RMSNorm, rotary position embeddings and grouped-query attention with a per-sequence KV cache.

Activations are ``[B, T, ...]`` with the batch sharded over every mesh axis; parameters are replicated on
every device of the mesh. The cache holds ``S_max`` positions per sequence and each sequence's own length,
so sequences of different lengths decode together: a step writes sequence ``b``'s new keys at
``lengths[b], lengths[b] + 1, ...`` and its queries see only cache positions up to their own.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Masked scores: finite, so a row that sees nothing yields a uniform softmax instead of NaN.
_MASKED = float(np.finfo(np.float32).min)


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """Mesh axes the batch dimension is sharded over: all of them, in mesh order."""
    return tuple(mesh.axis_names)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Sharding of a ``[B, ...]`` activation of ``ndim`` dimensions: B over all mesh axes."""
    return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh, array: jax.Array) -> jax.Array:
    """``array`` replicated on every device of ``mesh``."""
    return jax.device_put(array, NamedSharding(mesh, P()))


def normal_init(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    """Normal weights with variance ``1 / fan_in`` (activations keep unit scale through a matmul)."""
    return (jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis, computed in float32, returned in ``x``'s dtype."""

    def __init__(self, dim: int, *, eps: float, mesh: jax.sharding.Mesh, dtype):
        self.eps = eps
        self.scale = nnx.Param(replicated(mesh, jnp.ones((dim,), dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` by the angles of ``positions [B, T]`` (int); halves-paired, as in Llama.

    Dimension ``i < D/2`` pairs with ``i + D/2`` and turns at frequency ``theta ** (-2i / D)``.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float32) * 2.0 / x.shape[-1])
    angles = positions.astype(jnp.float32)[:, :, None, None] * jnp.asarray(inv_freq)  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    first, second = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


class KVCache(NamedTuple):
    """One layer's key/value cache (a pytree).

    k, v:    [B, S_max, H_kv, Dh] keys (after RoPE) and values; positions at or past ``lengths[b]`` hold
             nothing valid.
    lengths: [B] int32 valid positions of each sequence.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array


def init_cache(
    batch: int, max_len: int, *, num_kv_heads: int, head_dim: int, dtype, mesh: jax.sharding.Mesh
) -> KVCache:
    """An empty cache of ``max_len`` positions for ``batch`` sequences, batch-sharded over ``mesh``."""
    shape = (batch, max_len, num_kv_heads, head_dim)
    zeros = jax.device_put(jnp.zeros(shape, dtype), batch_sharding(mesh, 4))
    lengths = jax.device_put(jnp.zeros((batch,), jnp.int32), batch_sharding(mesh, 1))
    return KVCache(zeros, zeros, lengths)


def write_cache(cache: KVCache, k: jax.Array, v: jax.Array) -> KVCache:
    """Append ``k, v [B, T, H_kv, Dh]`` to each sequence at its own ``lengths[b]``; lengths grow by T.

    Positions past ``S_max`` are not written (the caller keeps ``lengths + T <= S_max``).
    """
    num_new, s_max = k.shape[1], cache.k.shape[1]
    offset = jnp.arange(s_max, dtype=jnp.int32)[None, :] - cache.lengths[:, None]  # [B, S_max]
    fresh = (offset >= 0) & (offset < num_new)
    index = jnp.clip(offset, 0, num_new - 1)

    def merge(old: jax.Array, new: jax.Array) -> jax.Array:
        taken = jnp.take_along_axis(new, index[:, :, None, None], axis=1)  # [B, S_max, H_kv, Dh]
        return jnp.where(fresh[:, :, None, None], taken.astype(old.dtype), old)

    return KVCache(merge(cache.k, k), merge(cache.v, v), cache.lengths + num_new)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE: ``num_heads`` query heads share ``num_kv_heads`` key/value
    heads in groups of ``num_heads // num_kv_heads``."""

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope_theta: float,
        mesh: jax.sharding.Mesh,
        rngs: nnx.Rngs,
        dtype,
    ):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta

        def weight(shape: tuple[int, int]) -> nnx.Param:
            return nnx.Param(replicated(mesh, normal_init(rngs.params(), shape, shape[0], dtype)))

        self.q = weight((d_model, num_heads * head_dim))
        self.k = weight((d_model, num_kv_heads * head_dim))
        self.v = weight((d_model, num_kv_heads * head_dim))
        self.o = weight((num_heads * head_dim, d_model))

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """``x [B, T, M]`` at ``positions [B, T]`` -> (``[B, T, M]``, the cache with these T appended).

        Without a cache the T tokens attend causally among themselves. With one, sequence ``b``'s tokens
        take cache positions ``lengths[b] + t`` and attend to every cache position up to their own.
        """
        b, t, _ = x.shape
        hk, group, dh = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = apply_rope((x @ self.q[...]).reshape(b, t, self.num_heads, dh), positions, self.rope_theta)
        k = apply_rope((x @ self.k[...]).reshape(b, t, hk, dh), positions, self.rope_theta)
        v = (x @ self.v[...]).reshape(b, t, hk, dh)
        query_slot = jnp.arange(t, dtype=jnp.int32)[None, :]  # [1, T]
        if cache is not None:
            query_slot = cache.lengths[:, None] + query_slot  # [B, T]
            cache = write_cache(cache, k, v)
            k, v = cache.k, cache.v
        key_slot = jnp.arange(k.shape[1], dtype=jnp.int32)
        visible = key_slot[None, None, :] <= query_slot[:, :, None]  # [B|1, T, S]
        q = q.reshape(b, t, hk, group, dh)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / np.sqrt(dh)
        scores = jnp.where(visible[:, None, None], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
        return out.reshape(b, t, self.num_heads * dh) @ self.o[...], cache
