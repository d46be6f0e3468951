"""History predictors: forecast a layer's load from the loads of the batches already served.

This is what serverful systems plan from (DeepSeek EPLB over ~10 minutes, vLLM over a 1000-step window). It
ignores the batch's own routing, so ``d`` does not matter: the forecast of layer ``l + d`` is that layer's
summarised history. Before the first observed batch it uses the fitting trace's mean load.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.predict.base import LoadPredictor
from moeless_jax.predict.config import HistoryConfig
from moeless_jax.traces import RoutingTrace


class History(LoadPredictor):
    """Cumulative, moving-window or exponential-moving-average history of per-layer loads."""

    name = "history"

    def __init__(self, distance: int = 1, config: HistoryConfig | None = None):
        super().__init__(distance)
        self.config = config or HistoryConfig()
        self.prior: np.ndarray | None = None  # [L, E] float64 fitting-trace load shares
        self.reset()

    def reset(self) -> None:
        self._sum: np.ndarray | None = None  # cumulative / window: summed loads; ema: the average
        self._recent: deque[np.ndarray] = deque()  # window mode: the loads being summed
        self._seen = 0

    def _fit(self, trace: RoutingTrace) -> None:
        loads = np.zeros((trace.num_layers, trace.num_experts), np.float64)
        for layer in range(trace.num_layers):
            loads[layer] = np.bincount(trace.expert_ids[:, layer].reshape(-1).astype(np.int64),
                                       minlength=trace.num_experts)
        self.prior = loads / loads.sum(axis=1, keepdims=True)
        self.reset()

    def observe(self, loads: np.ndarray) -> None:
        loads = np.asarray(loads, dtype=np.float64)
        if loads.shape != (self.num_layers, self.num_experts):
            raise InputError(f"observed loads must have shape {(self.num_layers, self.num_experts)}, "
                             f"got {loads.shape}")
        mode = self.config.mode
        if self._sum is None:
            self._sum = loads.copy()
        elif mode == "ema":
            self._sum += self.config.ema_alpha * (loads - self._sum)
        else:
            self._sum += loads
        if mode == "window":
            self._recent.append(loads)
            if len(self._recent) > self.config.window:
                self._sum -= self._recent.popleft()
        self._seen += 1

    def _predict(self, trace: RoutingTrace, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
        estimate = self.prior if self._sum is None else self._sum  # [L, E]
        return estimate[targets]

    def settings(self) -> dict:
        return asdict(self.config)

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.prior is None else {"prior": self.prior}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.prior = np.asarray(state["prior"], dtype=np.float64)
        self.reset()

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"prior": ((self.num_layers, self.num_experts), "float64")}
