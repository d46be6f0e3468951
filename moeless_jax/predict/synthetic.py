"""A small synthetic gated MoE stack with hidden states, for testing and demonstrating gate predictors.

Each token's gate input walks through the layers as ``x_{l+1} = x_l @ A_l + noise * z``, with
``A_l = (1 - mixing) I + mixing Q_l`` (``Q_l`` a random orthogonal matrix), and layer ``l`` routes it with its
own random gate kernel ``G_l``: ``top_k(x_l @ G_l)``. With ``mixing = 0`` the next gate applied to the current
input (gate reuse) is nearly right; larger ``mixing`` makes gate reuse worse but leaves the transition linear,
so a fine-tuned gate copy (``A_l @ G_{l+1}``) can recover it. ``skew`` shifts every token's first input along
one shared direction, which makes some experts hot, as in real routing.
"""

from __future__ import annotations

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.traces import RoutingTrace


def synthetic_gated_trace(*, num_requests: int = 16, tokens_per_request: int = 32, num_layers: int = 4,
                          hidden_size: int = 16, num_experts: int = 8, top_k: int = 2, mixing: float = 0.0,
                          noise: float = 0.1, skew: float = 1.0,
                          seed: int = 0) -> tuple[RoutingTrace, np.ndarray]:
    """``(trace with hidden [N, L, M], kernels [L, M, E] float32)`` of a random gated stack (see module)."""
    if min(num_requests, tokens_per_request, num_layers, hidden_size) < 1 or not 1 <= top_k <= num_experts:
        raise InputError("synthetic_gated_trace: sizes must be >= 1 and 1 <= top_k <= num_experts")
    if not 0.0 <= mixing <= 1.0 or noise < 0:
        raise InputError("synthetic_gated_trace: need 0 <= mixing <= 1 and noise >= 0")
    rng = np.random.default_rng(seed)
    num_tokens = num_requests * tokens_per_request
    kernels = rng.standard_normal((num_layers, hidden_size, num_experts)) / np.sqrt(hidden_size)
    hidden = np.empty((num_tokens, num_layers, hidden_size))
    direction = rng.standard_normal(hidden_size)
    direction *= np.sqrt(hidden_size) / np.linalg.norm(direction)
    hidden[:, 0] = rng.standard_normal((num_tokens, hidden_size)) + skew * direction
    for layer in range(1, num_layers):
        rotation, _ = np.linalg.qr(rng.standard_normal((hidden_size, hidden_size)))
        transition = (1.0 - mixing) * np.eye(hidden_size) + mixing * rotation  # [M, M]
        step = hidden[:, layer - 1] @ transition + noise * rng.standard_normal((num_tokens, hidden_size))
        hidden[:, layer] = step / np.linalg.norm(step, axis=1, keepdims=True) * np.sqrt(hidden_size)
    logits = np.einsum("nlm,lme->nle", hidden, kernels)  # [N, L, E]
    expert_ids = np.argsort(-logits, axis=-1, kind="stable")[..., :top_k]  # [N, L, K]
    trace = RoutingTrace(
        expert_ids=expert_ids,
        request_id=np.repeat(np.arange(num_requests), tokens_per_request),
        position=np.tile(np.arange(tokens_per_request), num_requests),
        num_experts=num_experts,
        layer_ids=tuple(range(num_layers)),
        hidden=hidden.astype(np.float32),
    )
    return trace, kernels.astype(np.float32)
