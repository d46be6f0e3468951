"""The load-predictor interface.

A predictor forecasts, for a batch about to run, the per-expert load (tokens routed to each expert) of layer
``l + d`` from what is known when layer ``l`` runs: the batch's routing (and, where a trace has them, gate
inputs) at layers ``<= l``, and the loads of batches already served. ``d`` is the predictor's *distance*.

Layers are indices on a trace's L axis. A predictor of distance ``d`` forecasts the *target* layers
``d .. L-1``; target ``t`` is forecast from *source* layer ``t - d``. Every forecast row is scaled to the
batch's assignments (``tokens x K``), so it can be fed to a planner as it is.

Life cycle: ``fit(trace)`` once on training requests (or restore a checkpoint), then per batch
``predict(trace, batch)`` before it runs and ``observe(loads)`` after it ran (only history uses the latter).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Self

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.traces import RoutingTrace, expert_loads


class LoadPredictor(abc.ABC):
    """Base class: shapes, checks and the checkpointable state of a load predictor.

    Subclasses set ``name``, implement :meth:`_fit` and :meth:`_predict`, and keep everything a fitted
    predictor needs in :meth:`state` (numpy arrays, restored by :meth:`set_state`) and its settings in
    :meth:`settings` (JSON), so :mod:`~moeless_jax.predict.checkpoint` can rebuild it.
    """

    name: ClassVar[str]

    def __init__(self, distance: int = 1):
        if isinstance(distance, bool) or not isinstance(distance, int | np.integer) or distance < 1:
            raise InputError(f"distance must be a positive integer, got {distance!r}")
        self.distance = int(distance)
        self.shape: tuple[int, int, int] | None = None  # (L, E, K) of the traces it was fitted on

    # -- shapes -----------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self._shape()[0]

    @property
    def num_experts(self) -> int:
        return self._shape()[1]

    @property
    def top_k(self) -> int:
        return self._shape()[2]

    @property
    def targets(self) -> np.ndarray:
        """``[T]`` int64 target layer indices ``d .. L-1`` (T = L - d)."""
        return np.arange(self.distance, self.num_layers, dtype=np.int64)

    def _shape(self) -> tuple[int, int, int]:
        if self.shape is None:
            raise InputError(f"predictor {self.name!r} is not fitted: call fit(trace) or load a checkpoint")
        return self.shape

    def _set_shape(self, trace: RoutingTrace) -> None:
        if trace.num_layers <= self.distance:
            raise InputError(f"distance {self.distance} needs a trace with more than {self.distance} layers, "
                             f"got {trace.num_layers}")
        self.shape = (trace.num_layers, trace.num_experts, trace.top_k)

    def check_trace(self, trace: RoutingTrace) -> None:
        """Raise :class:`InputError` unless ``trace`` has the layers, experts and top-k fitted on."""
        got = (trace.num_layers, trace.num_experts, trace.top_k)
        if got != self._shape():
            raise InputError(f"predictor {self.name!r} was fitted on (layers, experts, top_k) = "
                             f"{self.shape}, the trace has {got}")

    # -- life cycle -------------------------------------------------------------------------------------

    def fit(self, trace: RoutingTrace) -> Self:
        """Fit on the requests of ``trace``; returns ``self``."""
        if trace.num_tokens == 0:
            raise InputError(f"cannot fit predictor {self.name!r} on an empty trace")
        self._set_shape(trace)
        self._fit(trace)
        return self

    def predict(self, trace: RoutingTrace, batch: np.ndarray, targets=None) -> np.ndarray:
        """``[T', E]`` float64 forecast loads of ``batch`` (token indices into ``trace``).

        ``targets`` (default :attr:`targets`) lists the target layer indices to forecast, each in ``d..L-1``;
        row ``i`` is the load of layer ``targets[i]`` forecast from layer ``targets[i] - d``, and sums to
        ``len(batch) * K``.
        """
        self.check_trace(trace)
        batch = np.asarray(batch, dtype=np.int64).reshape(-1)
        if batch.size == 0:
            raise InputError("cannot forecast an empty batch")
        if batch.min() < 0 or batch.max() >= trace.num_tokens:
            raise InputError(f"batch holds token indices outside 0..{trace.num_tokens - 1}")
        chosen = self.targets if targets is None else np.asarray(targets, dtype=np.int64).reshape(-1)
        if chosen.size == 0 or chosen.min() < self.distance or chosen.max() >= self.num_layers:
            raise InputError(f"targets must be layer indices in {self.distance}..{self.num_layers - 1}, "
                             f"got {chosen.tolist()}")
        loads = np.asarray(self._predict(trace, batch, chosen), dtype=np.float64)  # [T', E]
        return scale_rows(loads, float(batch.size * self.top_k))

    def observe(self, loads: np.ndarray) -> None:  # noqa: B027 - only history learns online
        """Learn from the true ``[L, E]`` loads of a batch that just ran (default: nothing)."""

    def reset(self) -> None:  # noqa: B027 - only history has online state
        """Forget what :meth:`observe` learned (default: nothing)."""

    # -- subclass hooks ---------------------------------------------------------------------------------

    def _fit(self, trace: RoutingTrace) -> None:  # noqa: B027 - stateless predictors need no fitting
        """Learn from ``trace`` (shape already set)."""

    @abc.abstractmethod
    def _predict(self, trace: RoutingTrace, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``[T', E]`` non-negative forecast of the target layers (any scale; rows are rescaled)."""

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable settings needed to rebuild the predictor (its config)."""
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """The fitted arrays, by name (what a checkpoint stores)."""
        return {}

    def set_state(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027 - stateless by default
        """Restore arrays produced by :meth:`state` (shapes already checked against :meth:`state_spec`)."""

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{name: (shape, dtype)}`` that :meth:`state` has once fitted; used to check checkpoints."""
        return {name: (tuple(array.shape), str(array.dtype)) for name, array in self.state().items()}

    def num_bytes(self) -> int:
        """Bytes of the fitted state as stored (the predictor's size)."""
        return int(sum(array.nbytes for array in self.state().values()))


def scale_rows(loads: np.ndarray, total: float) -> np.ndarray:
    """``[..., E]`` loads rescaled so each row sums to ``total``; an all-zero row becomes uniform."""
    loads = np.clip(np.asarray(loads, dtype=np.float64), 0.0, None)
    sums = loads.sum(axis=-1, keepdims=True)
    uniform = np.full_like(loads, total / loads.shape[-1])
    return np.where(sums > 0, loads * (total / np.where(sums > 0, sums, 1.0)), uniform)


def true_loads(trace: RoutingTrace, batch: np.ndarray) -> np.ndarray:
    """``[L, E]`` int64 true loads of one batch."""
    return expert_loads(trace, [np.asarray(batch, dtype=np.int64)])[0]

