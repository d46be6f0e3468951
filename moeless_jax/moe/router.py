"""Top-k routers: Mixtral style, DeepSeek(-V2) style and DeepSeek-V3 style, plus the router losses."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moeless_jax.moe.config import GroupLimit, RouterKind

NO_GROUP_LIMIT = GroupLimit()


class Routing(NamedTuple):
    """What the router decided for a block of tokens.

    weights:       [T, K] float32 combine weight of each chosen expert.
    expert_ids:    [T, K] int32 logical expert ids, distinct within a row.
    expert_counts: [E] int32 tokens routed to each expert (sum = T * K).
    logits:        [T, E] float32 router logits (None when the routing was given, e.g. a replayed trace).
    """

    weights: jax.Array
    expert_ids: jax.Array
    expert_counts: jax.Array
    logits: jax.Array | None = None


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
    bias: jax.Array | None = None,
    group_limit: GroupLimit = NO_GROUP_LIMIT,
    scaling: float = 1.0,
) -> Routing:
    """Choose ``top_k`` experts per token.

    ``mixtral``: top-k of the logits, softmax over the chosen ones.
    ``deepseek``: softmax over all experts, top-k of the probabilities, optionally renormalised.
    ``deepseek_v3``: sigmoid scores; experts are chosen by ``score + bias [E]`` (the bias balances load
    without an auxiliary loss and never enters the weights) within the ``group_limit`` groups; the weights are
    the chosen unbiased scores, renormalised when ``renormalize``, times ``scaling``.
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
    elif kind == "deepseek_v3":
        scores = jax.nn.sigmoid(logits)
        choice = scores if bias is None else scores + bias.astype(jnp.float32)
        _, expert_ids = jax.lax.top_k(_mask_to_top_groups(choice, group_limit), top_k)
        weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
        if renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights * scaling
    else:
        raise ValueError(f"router kind '{kind}' is not mixtral|deepseek|deepseek_v3")
    expert_ids = expert_ids.astype(jnp.int32)
    return Routing(weights, expert_ids, expert_histogram(expert_ids, num_experts), logits)


def _mask_to_top_groups(choice: jax.Array, limit: GroupLimit) -> jax.Array:
    """[T, E] selection scores with experts outside each token's top ``topk_groups`` groups set to -inf."""
    if limit.groups == 1:
        return choice
    num_tokens, num_experts = choice.shape
    grouped = choice.reshape(num_tokens, limit.groups, num_experts // limit.groups)
    best_two = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0].sum(-1)  # [T, G]
    _, top_groups = jax.lax.top_k(best_two, limit.topk_groups)
    rows = jnp.arange(num_tokens)[:, None]
    keep = jnp.zeros((num_tokens, limit.groups), bool).at[rows, top_groups].set(True)
    return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(num_tokens, num_experts)


def expert_histogram(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """[...] int ids -> [num_experts] int32 counts."""
    return jnp.zeros(num_experts, jnp.int32).at[expert_ids.reshape(-1)].add(1)


def router_probs(logits: jax.Array, kind: RouterKind) -> jax.Array:
    """[T, E] per-token probabilities over experts that the load-balancing loss weighs: the softmax of the
    logits, or for ``deepseek_v3`` the sigmoid scores normalised per token (as its sequence-wise balance
    loss does)."""
    if kind == "deepseek_v3":
        scores = jax.nn.sigmoid(logits)
        return scores / jnp.sum(scores, axis=-1, keepdims=True)
    return jax.nn.softmax(logits, axis=-1)


class RouterLossSums(NamedTuple):
    """Per-shard sums that the router losses need; sum them over shards, then :func:`router_losses`.

    prob_sums: [E] sum over tokens of each expert's probability; z_sum: [] sum over tokens of
    logsumexp(logits)**2; tokens: [] tokens summed.
    """

    prob_sums: jax.Array
    z_sum: jax.Array
    tokens: jax.Array


def router_loss_sums(logits: jax.Array, kind: RouterKind) -> RouterLossSums:
    z = jax.nn.logsumexp(logits, axis=-1)
    return RouterLossSums(
        jnp.sum(router_probs(logits, kind), axis=0), jnp.sum(z * z), jnp.float32(logits.shape[0])
    )


def router_losses(sums: RouterLossSums, expert_counts: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """(load-balancing loss, z-loss) from summed :class:`RouterLossSums` and ``expert_counts [E]``.

    Load balancing (Switch / Mixtral): ``E * sum_e f_e * p_e`` with ``f_e`` the share of assignments routed to
    expert e and ``p_e`` its mean probability; 1.0 when perfectly balanced. z-loss (ST-MoE): mean over tokens
    of ``logsumexp(logits)**2``. The counts carry no gradient: the loss trains the router through ``p``.
    """
    num_experts = expert_counts.shape[0]
    share = expert_counts.astype(jnp.float32) / (sums.tokens * top_k)
    mean_prob = sums.prob_sums / sums.tokens
    return num_experts * jnp.sum(jax.lax.stop_gradient(share) * mean_prob), sums.z_sum / sums.tokens
