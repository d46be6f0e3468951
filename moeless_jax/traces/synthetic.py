"""Synthetic routing traces with skewed expert popularity, for tests and demos that must run without data."""

from __future__ import annotations

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.traces.routing import RoutingTrace


def synthetic_trace(
    *,
    num_requests: int = 8,
    mean_tokens: int = 32,
    num_layers: int = 4,
    num_experts: int = 16,
    top_k: int = 2,
    skew: float = 1.0,
    hidden_size: int = 0,
    gate_weights: bool = False,
    seed: int = 0,
) -> RoutingTrace:
    """A random :class:`RoutingTrace`: ``num_requests`` requests (ids ``0..R-1``) of 1..2·mean_tokens tokens.

    Each layer ranks its experts in a random order and picks them with Zipf-like probability
    ``rank ** -skew`` (``skew=0``: uniform), so hot experts differ between layers as in real traces. With
    ``hidden_size > 0`` the trace carries random float32 gate inputs ``[N, L, hidden_size]``; with
    ``gate_weights`` it carries softmax-normalized weights, one row per (token, layer).
    """
    if num_requests < 0 or mean_tokens < 1 or num_layers < 1 or not 1 <= top_k <= num_experts or skew < 0:
        raise InputError("synthetic_trace: need num_requests >= 0, mean_tokens >= 1, num_layers >= 1, "
                         "1 <= top_k <= num_experts and skew >= 0")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * mean_tokens + 1, size=num_requests)  # [R]
    num_tokens = int(lengths.sum())
    request_id = np.repeat(np.arange(num_requests, dtype=np.int32), lengths)
    position = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]) if num_requests else request_id
    popularity = np.arange(1, num_experts + 1, dtype=np.float64) ** -skew  # [E] by rank
    expert_ids = np.empty((num_tokens, num_layers, top_k), np.int32)
    for layer in range(num_layers):
        # Gumbel top-k on log-probabilities samples k distinct experts per token without a Python loop.
        log_p = np.log(popularity / popularity.sum())[rng.permutation(num_experts)]  # [E]
        scores = log_p + rng.gumbel(size=(num_tokens, num_experts))  # [N, E]
        expert_ids[:, layer] = np.argsort(-scores, axis=1)[:, :top_k]
    weights = None
    if gate_weights:
        raw = rng.random((num_tokens, num_layers, top_k)).astype(np.float32) + 0.1
        weights = raw / raw.sum(axis=2, keepdims=True)
    hidden = None
    if hidden_size:
        hidden = rng.standard_normal((num_tokens, num_layers, hidden_size)).astype(np.float32)
    return RoutingTrace(
        expert_ids=expert_ids,
        request_id=request_id,
        position=position,
        num_experts=num_experts,
        layer_ids=tuple(range(num_layers)),
        gate_weights=weights,
        hidden=hidden,
    )
