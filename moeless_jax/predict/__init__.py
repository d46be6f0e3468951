"""Expert-load predictors: forecast layer l+d's per-expert load of a batch from what layer l knows.

- :mod:`~moeless_jax.predict.base`: the :class:`LoadPredictor` interface.
- :mod:`~moeless_jax.predict.history`: :class:`History` (cumulative, moving window or EMA of past loads).
- :mod:`~moeless_jax.predict.routing_only`: :class:`RoutingOnly`, a per-token routing-transition network.
- :mod:`~moeless_jax.predict.layer_stream`: RoutingOnly one layer at a time (:func:`forecast_step` inside a
  jitted step, :class:`LayerStream` on the host).
- :mod:`~moeless_jax.predict.in_step`: gate and RoutingOnly forecasts on token-sharded arrays, inside a step.
- :mod:`~moeless_jax.predict.gate`: :class:`GateReuse` and :class:`MoElessPredictor` (fine-tuned gate copies).
- :mod:`~moeless_jax.predict.oracle`: :class:`Oracle`, the true load (upper bound).
- :mod:`~moeless_jax.predict.metrics`: accuracy (1 - TV), hot-expert recall, Pearson r, timing.
- :mod:`~moeless_jax.predict.checkpoint`: orbax save and restore.
- :mod:`~moeless_jax.predict.synthetic`: a small gated stack with hidden states, for tests and demos.

Names are imported on first use, so ``import moeless_jax.predict.cli`` (the ``moeless`` command) stays light
and jax is imported only when a predictor is actually built.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "base": ("LoadPredictor", "scale_rows", "true_loads"),
    "checkpoint": ("load_predictor", "read_note", "save_predictor"),
    "config": ("GateTuneConfig", "HistoryConfig", "RoutingOnlyConfig"),
    "gate": ("GateReuse", "MoElessPredictor", "fine_tune_gate"),
    "history": ("History",),
    "in_step": ("RoutingOnlyStream", "StreamInputs", "gate_loads"),
    "layer_stream": ("LayerStream", "StreamState", "forecast_step", "init_state"),
    "metrics": ("Scores", "default_hot", "hot_expert_recall", "load_accuracy", "pearson", "score_batches",
                "time_per_layer"),
    "oracle": ("Oracle",),
    "registry": ("CONFIGS", "PREDICTORS", "from_settings", "make_predictor"),
    "routing_only": ("RoutingOnly", "TransitionNet"),
    "synthetic": ("synthetic_gated_trace",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
