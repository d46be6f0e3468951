"""Dense reference MoE: every expert on every token, masked by the router's combine weights.

Slow (E times the work) and single-device, but obviously right; tests compare the replicated layer to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moeless_jax.moe.config import MoEConfig
from moeless_jax.moe.experts import MLPWeights, swiglu
from moeless_jax.moe.router import route


def combine_matrix(weights: jax.Array, expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """[T, K] weights and ids -> [T, E] dense combine weights (zero for unchosen experts)."""
    rows = jnp.arange(weights.shape[0])[:, None]
    return jnp.zeros((weights.shape[0], num_experts), jnp.float32).at[rows, expert_ids].add(weights)


def dense_moe_reference(
    router: jax.Array,
    experts: MLPWeights,
    shared: MLPWeights | None,
    x: jax.Array,
    *,
    config: MoEConfig,
) -> jax.Array:
    """Reference output [T, M] from *logical* expert weights ``[E, ...]``."""
    routing = route(x, router, top_k=config.top_k, kind=config.router, renormalize=config.renormalize)
    combine = combine_matrix(routing.weights, routing.expert_ids, config.num_experts)
    per_expert = jax.vmap(lambda w: swiglu(x, MLPWeights(*w)))(tuple(experts))  # [E, T, M]
    y = jnp.einsum("te,etm->tm", combine, per_expert.astype(jnp.float32))
    if shared is not None:
        y = y + swiglu(x, shared).astype(jnp.float32)
    return y.astype(x.dtype)
