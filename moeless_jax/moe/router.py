"""Top-k routers: Mixtral style and DeepSeek style."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moeless_jax.moe.config import RouterKind


class Routing(NamedTuple):
    """What the router decided for a block of tokens.

    weights:       [T, K] float32 combine weight of each chosen expert.
    expert_ids:    [T, K] int32 logical expert ids, distinct within a row.
    expert_counts: [E] int32 tokens routed to each expert (sum = T * K).
    """

    weights: jax.Array
    expert_ids: jax.Array
    expert_counts: jax.Array


def router_logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """[T, M] x [M, E] -> [T, E] float32 logits (the gate runs in float32 for stable top-k)."""
    return jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def route(
    x: jax.Array,
    kernel: jax.Array,
    *,
    top_k: int,
    kind: RouterKind = "mixtral",
    renormalize: bool = True,
) -> Routing:
    """Choose ``top_k`` experts per token.

    ``mixtral``: top-k of the logits, softmax over the chosen ones.
    ``deepseek``: softmax over all experts, top-k of the probabilities, optionally renormalised.
    Ties break toward the lower expert id (``lax.top_k``), so routing is deterministic.
    """
    logits = router_logits(x, kernel)
    num_experts = kernel.shape[-1]
    if kind == "mixtral":
        top_logits, expert_ids = jax.lax.top_k(logits, top_k)
        weights = jax.nn.softmax(top_logits, axis=-1)
    elif kind == "deepseek":
        probs = jax.nn.softmax(logits, axis=-1)
        weights, expert_ids = jax.lax.top_k(probs, top_k)
        if renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    else:
        raise ValueError(f"router kind '{kind}' is not mixtral|deepseek")
    expert_ids = expert_ids.astype(jnp.int32)
    return Routing(weights, expert_ids, expert_histogram(expert_ids, num_experts))


def expert_histogram(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """[...] int ids -> [num_experts] int32 counts."""
    return jnp.zeros(num_experts, jnp.int32).at[expert_ids.reshape(-1)].add(1)
