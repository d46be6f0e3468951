"""The oracle predictor: the true load of the target layer, the upper bound for every real predictor."""

from __future__ import annotations

import numpy as np

from moeless_jax.predict.base import LoadPredictor, true_loads
from moeless_jax.traces import RoutingTrace


class Oracle(LoadPredictor):
    """Forecasts each target layer's true load (it reads the future; for upper bounds only)."""

    name = "oracle"

    def _predict(self, trace: RoutingTrace, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return true_loads(trace, batch)[targets]
