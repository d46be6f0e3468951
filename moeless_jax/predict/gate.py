"""Gate-based predictors, for traces that carry hidden states (the gate inputs).

- :class:`GateReuse`: layer ``l + d``'s own gate applied to layer ``l``'s gate input. Residual streams change
  slowly from layer to layer, so the next gate often routes the current input almost as the next layer will
  (as in Mixtral-offloading and ProMoE).
- :class:`MoElessPredictor` (MoEless, arXiv 2603.06350): a copy of layer ``l + d``'s gate, fine-tuned on
  (gate input at ``l``, routing at ``l + d``) pairs, but only for target layers where gate reuse scores below
  a threshold on held-out requests (7:3 split). A fine-tuned copy is kept only if it validates better.

Both forecast a batch's load as the per-expert count of the top-k experts each token's forecast gate picks.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moeless_jax.errors import InputError
from moeless_jax.moe.router import route, router_logits
from moeless_jax.predict.base import LoadPredictor
from moeless_jax.predict.config import GateTuneConfig
from moeless_jax.predict.metrics import load_accuracy
from moeless_jax.traces import RoutingTrace, expert_loads, token_budget_batches


@partial(jax.jit, static_argnames="top_k")
def _routed_ids(hidden: jax.Array, kernel: jax.Array, *, top_k: int) -> jax.Array:
    """``[n, M]`` gate inputs x ``[M, E]`` kernel -> ``[n, K]`` int32 top-k expert ids (the router's)."""
    return route(hidden, kernel, top_k=top_k).expert_ids


def _gate_loads(hidden: np.ndarray, kernel: np.ndarray, top_k: int, num_experts: int) -> np.ndarray:
    """``[E]`` int64 tokens per expert when ``kernel [M, E]`` routes ``hidden [n, M]``."""
    ids = np.asarray(_routed_ids(jnp.asarray(hidden), jnp.asarray(kernel), top_k=top_k))
    return np.bincount(ids.reshape(-1), minlength=num_experts)


class GateReuse(LoadPredictor):
    """Layer ``l + d``'s gate kernel applied to layer ``l``'s gate input.

    ``kernels`` ``[L, M, E]`` are the model's gate kernels, one per layer of the trace's L axis.
    """

    name = "gate_reuse"

    def __init__(self, distance: int = 1, kernels: np.ndarray | None = None, *,
                 hidden_size: int | None = None):
        super().__init__(distance)
        self.kernels = None if kernels is None else np.asarray(kernels, np.float32)
        if self.kernels is not None and self.kernels.ndim != 3:
            raise InputError(f"gate kernels must have shape [L, M, E], got {self.kernels.shape}")
        self.hidden_size = int(self.kernels.shape[1]) if self.kernels is not None else hidden_size

    def _fit(self, trace: RoutingTrace) -> None:
        if self.kernels is None:
            raise InputError(f"{self.name} needs the model's gate kernels [L, M, E] (e.g. --gates FILE.npz)")
        self._check_hidden(trace)

    def _check_hidden(self, trace: RoutingTrace) -> None:
        if trace.hidden is None:
            raise InputError(f"{self.name} needs a trace with hidden states (gate inputs); this one has "
                             "none: use the routing_only predictor for routing-only traces")
        expected = (trace.num_layers, trace.hidden.shape[2], trace.num_experts)
        if self.kernels.shape != expected:
            raise InputError(f"gate kernels have shape {self.kernels.shape}, the trace needs [L, M, E] = "
                             f"{expected}")

    def _predict(self, trace: RoutingTrace, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
        self._check_hidden(trace)
        hidden = trace.hidden[batch]  # [n, L, M]
        return np.stack([
            _gate_loads(hidden[:, target - self.distance], self.kernels[target], self.top_k, self.num_experts)
            for target in targets
        ])

    def settings(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size}

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.kernels is None else {"kernels": self.kernels}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.kernels = np.asarray(state["kernels"], np.float32)

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"kernels": ((self.num_layers, self.hidden_size, self.num_experts), "float32")}

    def num_bytes(self) -> int:
        """Zero: gate reuse runs the model's own gates and stores nothing of its own."""
        return 0


class GateCopy(nnx.Module):
    """A trainable copy of one gate: ``[T, M] -> [T, E]`` float32 router logits."""

    def __init__(self, kernel: np.ndarray):
        self.kernel = nnx.Param(jnp.asarray(kernel, jnp.float32))

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return router_logits(hidden, self.kernel[...])


def _k_hot_target(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[n, K]`` ids -> ``[n, E]`` float32 target distribution (1/K on each chosen expert)."""
    target = np.zeros((expert_ids.shape[0], num_experts), np.float32)
    np.put_along_axis(target, expert_ids.astype(np.int64), 1.0 / expert_ids.shape[1], axis=1)
    return target


@nnx.jit
def _tune_step(model: GateCopy, optimizer: nnx.Optimizer, hidden: jax.Array, target: jax.Array) -> jax.Array:
    def loss_fn(model):
        # Cross-entropy against the normalised K-hot routing: rewards putting all K chosen experts on top.
        return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(model(hidden), axis=-1), axis=-1))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def fine_tune_gate(kernel: np.ndarray, hidden: np.ndarray, expert_ids: np.ndarray, *,
                   config: GateTuneConfig, seed: int = 0) -> np.ndarray:
    """Fine-tune a gate copy on (``hidden [n, M]`` at layer l, ``expert_ids [n, K]`` at l + d) pairs.

    Returns the new ``[M, E]`` float32 kernel.
    """
    num_experts = kernel.shape[1]
    model = GateCopy(kernel)
    optimizer = nnx.Optimizer(model, optax.adam(config.learning_rate), wrt=nnx.Param)
    target = _k_hot_target(expert_ids, num_experts)
    rng = np.random.default_rng(seed)
    for _ in range(config.steps):
        rows = rng.integers(0, hidden.shape[0], min(config.batch_size, hidden.shape[0]))
        _tune_step(model, optimizer, jnp.asarray(hidden[rows], jnp.float32), jnp.asarray(target[rows]))
    return np.asarray(model.kernel[...], np.float32)


class MoElessPredictor(GateReuse):
    """MoEless: gate copies, fine-tuned where gate reuse is below ``config.threshold``.

    After :meth:`fit`, ``tuned [L]`` says which target layers got a fine-tuned copy and
    ``accuracy_before`` / ``accuracy_after`` ``[L]`` hold the validation accuracy of gate reuse and of the
    kept copy (NaN for layers that are not targets).
    """

    name = "moeless"

    def __init__(self, distance: int = 1, kernels: np.ndarray | None = None,
                 config: GateTuneConfig | None = None, *, hidden_size: int | None = None):
        super().__init__(distance, kernels, hidden_size=hidden_size)
        self.config = config or GateTuneConfig()
        self.tuned: np.ndarray | None = None
        self.accuracy_before: np.ndarray | None = None
        self.accuracy_after: np.ndarray | None = None

    def _fit(self, trace: RoutingTrace) -> None:
        super()._fit(trace)
        config = self.config
        tune, validate = trace.split_by_request(config.split, seed=config.seed)
        batches = token_budget_batches(validate, config.val_batch_tokens)
        true = expert_loads(validate, batches)  # [B, L, E]
        kernels = self.kernels.copy()
        num_layers = trace.num_layers
        self.tuned = np.zeros(num_layers, bool)
        self.accuracy_before = np.full(num_layers, np.nan)
        self.accuracy_after = np.full(num_layers, np.nan)
        for target in self.targets:
            source = target - self.distance
            before = self._validation_accuracy(validate, batches, true, kernels[target], source, target)
            after = before
            if before < config.threshold:
                candidate = fine_tune_gate(kernels[target], tune.hidden[:, source],
                                           tune.expert_ids[:, target], config=config,
                                           seed=config.seed + int(target))
                tuned_accuracy = self._validation_accuracy(validate, batches, true, candidate, source, target)
                if tuned_accuracy > before:  # keep a copy only if it validates better than gate reuse
                    kernels[target], after, self.tuned[target] = candidate, tuned_accuracy, True
            self.accuracy_before[target], self.accuracy_after[target] = before, after
        self.kernels = kernels

    def _validation_accuracy(self, trace: RoutingTrace, batches, true: np.ndarray, kernel: np.ndarray,
                             source: int, target: int) -> float:
        """Mean load accuracy of ``kernel`` forecasting ``target`` from ``source`` over the batches."""
        forecast = np.stack([_gate_loads(trace.hidden[batch, source], kernel, self.top_k, self.num_experts)
                             for batch in batches])  # [B, E]
        return float(np.mean(load_accuracy(forecast, true[:, target])))

    def settings(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, **asdict(self.config)}

    def state(self) -> dict[str, np.ndarray]:
        if self.kernels is None or self.tuned is None:
            return {}
        return {"kernels": self.kernels, "tuned": self.tuned.astype(np.int8),
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        super().set_state(state)
        self.tuned = np.asarray(state["tuned"]).astype(bool)
        self.accuracy_before = np.asarray(state["accuracy_before"], np.float64)
        self.accuracy_after = np.asarray(state["accuracy_after"], np.float64)

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        layers = (self.num_layers,)
        return {**super().state_spec(), "tuned": (layers, "int8"), "accuracy_before": (layers, "float64"),
                "accuracy_after": (layers, "float64")}

    def num_bytes(self) -> int:
        """Bytes of the gate copies, one per target layer (the validation record is not counted)."""
        return 0 if self.kernels is None else int(self.kernels[self.targets].nbytes)
