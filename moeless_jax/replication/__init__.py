"""Live expert replication for any Flax NNX model that exposes its MoE layers.

- :mod:`~moeless_jax.replication.controller`: :class:`ReplicationController` observes each step's expert
  counts, forecasts, plans with a :mod:`moeless_jax.plan` policy, and installs new replica tables within a
  move budget; :class:`ReplicatedModel` / :class:`ReplicatedLayer` say what a model must expose.
- :mod:`~moeless_jax.replication.forecast`: forecasters fed by observed loads (history window, EMA, scripted).
- :mod:`~moeless_jax.replication.config`: :class:`ControllerConfig`.
- :mod:`~moeless_jax.replication.layer_ahead`: :class:`LayerAhead`, replication inside the step: layer
  ``l + 1``'s table forecast, planned and moved on the devices while layer ``l`` runs.
"""

from moeless_jax.replication.config import CONTROLLER_POLICIES, ControllerConfig
from moeless_jax.replication.controller import (
    LayerConfig,
    ReplicatedLayer,
    ReplicatedModel,
    ReplicationController,
    ReplicationLog,
    StepRecord,
)
from moeless_jax.replication.forecast import Forecaster, HistoryForecaster, ScriptedForecaster
from moeless_jax.replication.layer_ahead import (
    FORECASTERS,
    Installed,
    LayerAhead,
    LayerAheadConfig,
    install_ahead,
    layer_ahead_stack,
)

__all__ = [
    "CONTROLLER_POLICIES",
    "FORECASTERS",
    "ControllerConfig",
    "Forecaster",
    "HistoryForecaster",
    "Installed",
    "LayerAhead",
    "LayerAheadConfig",
    "LayerConfig",
    "ReplicatedLayer",
    "ReplicatedModel",
    "ReplicationController",
    "ReplicationLog",
    "ScriptedForecaster",
    "StepRecord",
    "install_ahead",
    "layer_ahead_stack",
]
