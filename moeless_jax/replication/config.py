"""Configuration of the replication controller (a frozen dataclass; YAML via :func:`moeless_jax.load_config`).

Example ``replication:`` section::

    replication:
      policy: moeless          # moeless | eplb | static
      rebalance_interval: 1    # observed steps between re-plans
      history_window: 1        # steps the forecaster sums (or ema_alpha: 0.5 instead)
      max_moves_per_layer: 4   # weight copies per layer per re-plan; null = no limit
      split: even              # must be the layers' MoEConfig.split
      moeless: {cv_target: 0.2}
      eplb: {num_groups: 1, num_nodes: 1}

The number of redundant slots is not a setting: it is what the layers' ``D * S`` slots hold beyond their
``E`` experts (see :attr:`moeless_jax.replication.ReplicationController.redundant_slots`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moeless_jax.config import config_from_dict, require
from moeless_jax.plan.config import EPLBConfig, MoElessConfig
from moeless_jax.plan.metrics import SPLITS
from moeless_jax.replication.forecast import HistoryForecaster

CONTROLLER_POLICIES = ("moeless", "eplb", "static")


def _non_negative_int(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@dataclass(frozen=True)
class ControllerConfig:
    """When and how the controller re-plans the replica tables of a model's MoE layers.

    Attributes:
      policy: ``moeless`` (forecast -> scaler -> placer), ``eplb`` (DeepSeek EPLB on the forecast, which with
        a history window is EPLB's summed history) or ``static`` (keep the tables in use).
      rebalance_interval: observed steps between re-plans (vLLM and SGLang use the same name; the MoEless
        paper re-plans every step).
      history_window: steps the forecaster sums; ``None`` with no ``ema_alpha``: 1 (the last step).
      ema_alpha: instead of a window, an exponential moving average with this weight on the newest step,
        in (0, 1].
      max_moves_per_layer: at most this many slots of a layer receive a weight copy per re-plan (see
        :func:`moeless_jax.plan.limit_moves`); ``None``: no limit; 0 freezes the tables.
      split: ``even`` or ``balanced``; must equal every layer's ``config.split`` (the controller checks).
      moeless: the MoEless planner's config (a mapping in YAML).
      eplb: EPLB's config (a mapping in YAML). Its ``window`` and ``period`` are the controller's
        ``history_window`` and ``rebalance_interval``: left out, they are filled in from them; given, they
        must agree (with ``ema_alpha`` the window is not used).
    """

    policy: str = "moeless"
    rebalance_interval: int = 1
    history_window: int | None = None
    ema_alpha: float | None = None
    max_moves_per_layer: int | None = None
    split: str = "even"
    moeless: MoElessConfig = field(default_factory=MoElessConfig)
    eplb: EPLBConfig | None = None

    def __post_init__(self) -> None:
        require(
            self.policy in CONTROLLER_POLICIES,
            "policy",
            f"'{self.policy}' is not a controller policy; use one of {', '.join(CONTROLLER_POLICIES)}",
        )
        require(
            _non_negative_int(self.rebalance_interval, 1),
            "rebalance_interval",
            f"must be a positive integer (steps), got {self.rebalance_interval!r}",
        )
        require(
            self.history_window is None or _non_negative_int(self.history_window, 1),
            "history_window",
            f"must be a positive integer (steps) or null, got {self.history_window!r}",
        )
        require(
            self.ema_alpha is None
            or (
                isinstance(self.ema_alpha, int | float)
                and not isinstance(self.ema_alpha, bool)
                and math.isfinite(self.ema_alpha)
                and 0 < self.ema_alpha <= 1
            ),
            "ema_alpha",
            f"must be a number in (0, 1] or null, got {self.ema_alpha!r}",
        )
        require(
            self.history_window is None or self.ema_alpha is None,
            "ema_alpha",
            "give history_window or ema_alpha, not both",
        )
        require(
            self.max_moves_per_layer is None or _non_negative_int(self.max_moves_per_layer, 0),
            "max_moves_per_layer",
            f"must be an integer >= 0 or null (no limit), got {self.max_moves_per_layer!r}",
        )
        require(
            self.split in SPLITS,
            "split",
            f"'{self.split}' is not a split the layer performs; use {' or '.join(SPLITS)}",
        )
        self._set_sub_configs()

    def _set_sub_configs(self) -> None:
        moeless = self.moeless
        if isinstance(moeless, dict):
            moeless = config_from_dict(MoElessConfig, moeless, source="moeless")
        require(isinstance(moeless, MoElessConfig), "moeless", f"expected a mapping, got {moeless!r}")
        object.__setattr__(self, "moeless", moeless)
        schedule = {"period": self.rebalance_interval}
        if self.window is not None:
            schedule["window"] = self.window
        eplb = {} if self.eplb is None else self.eplb
        if isinstance(eplb, dict):
            eplb = config_from_dict(EPLBConfig, {**schedule, **eplb}, source="eplb")
        require(isinstance(eplb, EPLBConfig), "eplb", f"expected a mapping or null, got {eplb!r}")
        object.__setattr__(self, "eplb", eplb)
        if self.policy != "eplb":
            return
        for name, want in schedule.items():
            have = getattr(eplb, name)
            knob = "rebalance_interval" if name == "period" else "history_window"
            require(
                have == want,
                f"eplb.{name}",
                f"is {have} but {knob} is {want}; the controller runs EPLB on its own schedule: "
                f"leave eplb.{name} out or set it to {want}",
            )

    @property
    def window(self) -> int | None:
        """Steps the default forecaster sums (None: it is an EMA)."""
        if self.history_window is not None:
            return self.history_window
        return 1 if self.ema_alpha is None else None

    def forecaster(self) -> HistoryForecaster:
        """The forecaster these settings describe."""
        return HistoryForecaster(window=self.window, ema_alpha=self.ema_alpha)
