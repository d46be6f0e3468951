"""Predictors by name, and building one from the settings a checkpoint stores."""

from __future__ import annotations

from typing import Any

import numpy as np

from moeless_jax.config import config_from_dict
from moeless_jax.errors import InputError
from moeless_jax.predict.base import LoadPredictor
from moeless_jax.predict.config import GateTuneConfig, HistoryConfig, RoutingOnlyConfig
from moeless_jax.predict.gate import GateReuse, MoElessPredictor
from moeless_jax.predict.history import History
from moeless_jax.predict.oracle import Oracle
from moeless_jax.predict.routing_only import RoutingOnly

PREDICTORS: dict[str, type[LoadPredictor]] = {
    "history": History,
    "routing_only": RoutingOnly,
    "gate_reuse": GateReuse,
    "moeless": MoElessPredictor,
    "oracle": Oracle,
}

# The config class of each configurable predictor (the section name in configs/predict.yaml).
CONFIGS: dict[str, type] = {
    "history": HistoryConfig,
    "routing_only": RoutingOnlyConfig,
    "moeless": GateTuneConfig,
}


def make_predictor(name: str, distance: int = 1, config: Any = None, *, kernels: np.ndarray | None = None,
                   hidden_size: int | None = None) -> LoadPredictor:
    """A new, unfitted predictor. ``kernels [L, M, E]``: the model's gates (gate_reuse and moeless only)."""
    if name not in PREDICTORS:
        raise InputError(f"unknown predictor {name!r}; choose one of {sorted(PREDICTORS)}")
    if config is not None and not isinstance(config, CONFIGS.get(name, ())):
        raise InputError(f"predictor {name!r} takes a {CONFIGS[name].__name__ if name in CONFIGS else 'no'} "
                         f"config, got {type(config).__name__}")
    if name == "gate_reuse":
        return GateReuse(distance, kernels, hidden_size=hidden_size)
    if name == "moeless":
        return MoElessPredictor(distance, kernels, config, hidden_size=hidden_size)
    if kernels is not None:
        raise InputError(f"predictor {name!r} takes no gate kernels")
    return PREDICTORS[name](distance) if name not in CONFIGS else PREDICTORS[name](distance, config)


def from_settings(name: str, distance: int, settings: dict[str, Any]) -> LoadPredictor:
    """Rebuild an unfitted predictor from :meth:`LoadPredictor.settings` (as a checkpoint stored them)."""
    if name not in PREDICTORS:
        raise InputError(f"unknown predictor {name!r}; choose one of {sorted(PREDICTORS)}")
    settings = dict(settings)
    hidden_size = settings.pop("hidden_size", None)
    config = config_from_dict(CONFIGS[name], settings, source=f"{name} settings") if name in CONFIGS else None
    if name not in CONFIGS and settings:
        raise InputError(f"predictor {name!r} takes no settings, got {sorted(settings)}")
    return make_predictor(name, distance, config, hidden_size=hidden_size)
