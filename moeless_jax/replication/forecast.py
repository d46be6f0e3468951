"""Live load forecasters, fed each step with the expert loads the model just routed.

The trace-based predictors of :mod:`moeless_jax.predict` read whole routing traces; a running model only has
the loads ``[L, E]`` of the steps it has served, one step at a time. A :class:`Forecaster` turns those into
the forecast ``[L, E]`` a replication policy plans from.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from moeless_jax.errors import InputError

__all__ = ["Forecaster", "HistoryForecaster", "ScriptedForecaster"]


@runtime_checkable
class Forecaster(Protocol):
    """Forecasts the coming step's expert loads from the steps observed so far."""

    def observe(self, loads: np.ndarray) -> None:
        """Record the loads ``[L, E]`` (tokens routed to each expert of each layer) of one served step."""
        ...

    def forecast(self) -> np.ndarray | None:
        """``[L, E]`` float64 forecast for the next step, or None before any observation."""
        ...

    def reset(self) -> None:
        """Forget every observation."""
        ...


def _checked(loads, name: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """``loads`` as a finite, non-negative float64 ``[L, E]`` of ``shape`` (when one is fixed)."""
    array = np.asarray(loads)
    if array.dtype == np.bool_ or array.dtype.kind not in "iuf":
        raise InputError(f"{name}: expected numbers, got dtype {array.dtype}")
    if array.ndim != 2 or 0 in array.shape:
        raise InputError(f"{name}: expected a non-empty [layers, experts] matrix, got shape {array.shape}")
    if shape is not None and array.shape != shape:
        raise InputError(f"{name}: has shape {array.shape}, but earlier steps had {shape}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise InputError(f"{name}: loads must be finite and >= 0")
    return array


class HistoryForecaster:
    """The next step looks like the recent ones: the sum of the last ``window`` steps, or an EMA.

    Give exactly one of ``window`` (steps summed, as EPLB sums its history; ``window=1`` forecasts the last
    step) and ``ema_alpha`` (weight of the newest step, ``0 < alpha <= 1``: ``f = alpha * x + (1 - alpha) *
    f``, starting from the first step). Sums and averages plan the same tables: planners are scale-free.
    """

    def __init__(self, window: int | None = None, ema_alpha: float | None = None):
        if (window is None) == (ema_alpha is None):
            raise InputError(
                f"HistoryForecaster: give exactly one of window and ema_alpha, got window={window!r}, "
                f"ema_alpha={ema_alpha!r}"
            )
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise InputError(f"window: must be a positive integer, got {window!r}")
        if ema_alpha is not None and (
            isinstance(ema_alpha, bool)
            or not isinstance(ema_alpha, int | float)
            or not (math.isfinite(ema_alpha) and 0 < ema_alpha <= 1)
        ):
            raise InputError(f"ema_alpha: must be a number in (0, 1], got {ema_alpha!r}")
        self.window, self.ema_alpha = window, ema_alpha
        self.reset()

    def reset(self) -> None:
        self._history: deque[np.ndarray] = deque(maxlen=self.window)
        self._ema: np.ndarray | None = None
        self._shape: tuple[int, ...] | None = None

    def observe(self, loads: np.ndarray) -> None:
        loads = _checked(loads, "loads", self._shape)
        self._shape = loads.shape
        if self.window is not None:
            self._history.append(loads)
        elif self._ema is None:
            self._ema = loads
        else:
            self._ema = self.ema_alpha * loads + (1.0 - self.ema_alpha) * self._ema

    def forecast(self) -> np.ndarray | None:
        if self.window is not None:
            return np.sum(self._history, axis=0) if self._history else None
        return None if self._ema is None else self._ema.copy()


class ScriptedForecaster:
    """Replays given forecasts: after the ``k``-th observed step (1-based) it forecasts ``forecasts[k - 1]``.

    For tests and for replaying forecasts made elsewhere (e.g. by a trace-based predictor). Observed loads
    are checked for shape and otherwise ignored; observing more steps than there are forecasts is an error.
    """

    def __init__(self, forecasts: Sequence[np.ndarray]):
        if len(forecasts) == 0:
            raise InputError("forecasts: give at least one [layers, experts] forecast")
        first = _checked(forecasts[0], "forecasts[0]", None)
        self.forecasts = tuple(_checked(f, f"forecasts[{i}]", first.shape) for i, f in enumerate(forecasts))
        self.reset()

    def reset(self) -> None:
        self.steps = 0

    def observe(self, loads: np.ndarray) -> None:
        _checked(loads, "loads", self.forecasts[0].shape)
        if self.steps == len(self.forecasts):
            raise InputError(
                f"ScriptedForecaster: step {self.steps + 1} observed but only {len(self.forecasts)} "
                "forecasts were given"
            )
        self.steps += 1

    def forecast(self) -> np.ndarray | None:
        return None if self.steps == 0 else self.forecasts[self.steps - 1].copy()
