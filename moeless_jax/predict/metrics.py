"""Predictor metrics (docs/predictors.md): accuracy, hot-expert recall, Pearson r, size and speed.

All three scores compare a forecast load vector with the true one over the last axis (experts):

- accuracy ``1 - TV = 1 - 1/2 sum_e |p_hat_e - p_e|`` of the loads normalised to sum 1 (1: exact shares);
- hot-expert recall: the fraction of the true ``m`` most loaded experts that are among the forecast's ``m``
  most loaded (ties broken toward the lower expert id);
- Pearson r of the two load vectors (NaN when either is constant; means skip NaN).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from moeless_jax.errors import InputError
from moeless_jax.traces import RoutingTrace, expert_loads


def _pair(predicted, true) -> tuple[np.ndarray, np.ndarray]:
    predicted = np.asarray(predicted, np.float64)
    true = np.asarray(true, np.float64)
    if predicted.shape != true.shape or predicted.ndim < 1:
        raise InputError(f"forecast and true loads must have the same shape [..., E], got {predicted.shape} "
                         f"and {true.shape}")
    if (predicted < 0).any() or (true < 0).any():
        raise InputError("loads must be non-negative")
    return predicted, true


def _shares(loads: np.ndarray) -> np.ndarray:
    total = loads.sum(axis=-1, keepdims=True)
    return np.where(total > 0, loads / np.where(total > 0, total, 1.0), np.nan)


def load_accuracy(predicted, true) -> np.ndarray:
    """``[...]`` 1 - total variation between the normalised ``[..., E]`` loads (NaN where a row sums to 0)."""
    predicted, true = _pair(predicted, true)
    return 1.0 - 0.5 * np.abs(_shares(predicted) - _shares(true)).sum(axis=-1)


def hot_expert_recall(predicted, true, hot: int) -> np.ndarray:
    """``[...]`` fraction of the true top-``hot`` experts that the forecast also ranks in its top ``hot``."""
    predicted, true = _pair(predicted, true)
    num_experts = true.shape[-1]
    if not 1 <= hot <= num_experts:
        raise InputError(f"hot must lie in 1..{num_experts}, got {hot}")
    # A stable sort of the negated loads ranks ties toward the lower expert id.
    top_true = np.argsort(-true, axis=-1, kind="stable")[..., :hot]  # [..., m]
    top_pred = np.argsort(-predicted, axis=-1, kind="stable")[..., :hot]
    in_pred = np.zeros(predicted.shape, bool)
    np.put_along_axis(in_pred, top_pred, True, axis=-1)
    return np.take_along_axis(in_pred, top_true, axis=-1).mean(axis=-1)


def pearson(predicted, true) -> np.ndarray:
    """``[...]`` Pearson correlation of the ``[..., E]`` load vectors (NaN where either is constant)."""
    predicted, true = _pair(predicted, true)
    a = predicted - predicted.mean(axis=-1, keepdims=True)
    b = true - true.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=-1) / np.where(denominator > 0, denominator, 1.0),
                        np.nan)


def default_hot(num_experts: int) -> int:
    """Hot experts tracked by recall: the top eighth (8 of 64, 2 of 16), at least one."""
    return max(1, num_experts // 8)


@dataclass(frozen=True)
class Scores:
    """Scores of one predictor over B batches and its T target layers.

    target_layers: ``[T]`` source layer numbers (``trace.layer_ids``) of the target layers.
    accuracy, recall, pearson: ``[B, T]`` per batch and target layer.
    seconds: ``[B]`` wall-clock seconds of each ``predict`` call (all targets at once).
    tokens: ``[B]`` tokens per batch.
    """

    target_layers: np.ndarray
    accuracy: np.ndarray
    recall: np.ndarray
    pearson: np.ndarray
    seconds: np.ndarray
    tokens: np.ndarray

    def summary(self) -> dict[str, Any]:
        """Means per layer and overall, plus milliseconds per target layer of the forecasts timed."""
        per_layer = np.nanmean(self.accuracy, axis=0)  # [T]
        recall = np.nanmean(self.recall, axis=0)  # [T]
        layers = [int(layer) for layer in self.target_layers]
        return {
            "layers": layers,
            "accuracy_per_layer": {str(layer): float(value)
                                   for layer, value in zip(layers, per_layer, strict=True)},
            "recall_per_layer": {str(layer): float(value)
                                 for layer, value in zip(layers, recall, strict=True)},
            "accuracy_mean": float(np.nanmean(self.accuracy)),
            "recall_mean": float(np.nanmean(self.recall)),
            "pearson_mean": float(np.nanmean(self.pearson)),
            "batches": int(self.accuracy.shape[0]),
            "tokens_per_batch_mean": float(self.tokens.mean()),
            "ms_per_layer": float(1e3 * np.median(self.seconds) / len(layers)),
        }


def score_batches(predictor, trace: RoutingTrace, batches: list[np.ndarray], *, hot: int | None = None,
                  progress: bool = False, desc: str | None = None) -> Scores:
    """Run ``predictor`` over ``batches`` in order (predict, then observe the true loads) and score it."""
    if not batches:
        raise InputError("no batches to score")
    true = expert_loads(trace, batches)  # [B, L, E]
    targets = predictor.targets
    hot = default_hot(trace.num_experts) if hot is None else hot
    forecasts = np.zeros((len(batches), targets.size, trace.num_experts))
    seconds = np.zeros(len(batches))
    for index, batch in enumerate(tqdm(batches, desc=desc or predictor.name, disable=not progress,
                                       leave=False)):
        start = time.perf_counter()
        forecasts[index] = predictor.predict(trace, batch)
        seconds[index] = time.perf_counter() - start
        predictor.observe(true[index])
    actual = true[:, targets]  # [B, T, E]
    return Scores(
        target_layers=np.asarray(trace.layer_ids)[targets],
        accuracy=load_accuracy(forecasts, actual),
        recall=hot_expert_recall(forecasts, actual, hot),
        pearson=pearson(forecasts, actual),
        seconds=seconds,
        tokens=np.array([len(batch) for batch in batches]),
    )


def time_per_layer(predictor, trace: RoutingTrace, *, batch_tokens: int = 4096, repeats: int = 20) -> dict:
    """Median milliseconds to forecast one target layer for a ``batch_tokens``-token batch.

    ``ms_per_layer``: one call forecasting every target layer, divided by their number.
    ``ms_single_layer``: one call forecasting one (middle) target layer alone, as a layer-by-layer serving
    loop would call it. Both include host-side input preparation; the first calls (compilation) are not
    timed. The batch cycles through the trace's tokens when it has fewer than ``batch_tokens``.
    """
    if batch_tokens < 1 or repeats < 1:
        raise InputError("batch_tokens and repeats must be >= 1")
    batch = np.arange(batch_tokens, dtype=np.int64) % trace.num_tokens
    middle = [int(predictor.targets[predictor.targets.size // 2])]
    results = {}
    runs = (("ms_per_layer", None, predictor.targets.size), ("ms_single_layer", middle, 1))
    for key, targets, count in runs:
        predictor.predict(trace, batch, targets)  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predictor.predict(trace, batch, targets)
            times.append(time.perf_counter() - start)
        results[key] = float(1e3 * np.median(times) / count)
    results["batch_tokens"] = batch_tokens
    return results
