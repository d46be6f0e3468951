"""Predictor configs: one frozen, self-validating dataclass per trainable or stateful predictor.

``configs/predict.yaml`` holds an example of each, one top-level section per class, for
:func:`moeless_jax.config.load_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moeless_jax.config import is_positive_int, require, require_positive_ints

HistoryMode = Literal["cumulative", "window", "ema"]
PARAM_DTYPES = ("float32", "float16", "bfloat16")



@dataclass(frozen=True)
class HistoryConfig:
    """How :class:`~moeless_jax.predict.history.History` summarises the loads of past batches.

    Attributes:
      mode: ``cumulative`` (sum of every batch seen so far), ``window`` (sum of the last ``window`` batches,
        as vLLM's EPLB does) or ``ema`` (exponential moving average with weight ``ema_alpha`` on the newest).
      window: batches in the ``window`` mode.
      ema_alpha: weight of the newest batch in the ``ema`` mode, in (0, 1].
    """

    mode: HistoryMode = "cumulative"
    window: int = 1000
    ema_alpha: float = 0.05

    def __post_init__(self) -> None:
        require(self.mode in ("cumulative", "window", "ema"), "mode",
                f"must be cumulative, window or ema, got {self.mode!r}")
        require(is_positive_int(self.window), "window", f"must be a positive integer, got {self.window!r}")
        require(isinstance(self.ema_alpha, int | float) and 0.0 < self.ema_alpha <= 1.0, "ema_alpha",
                f"must lie in (0, 1], got {self.ema_alpha!r}")


@dataclass(frozen=True)
class RoutingOnlyConfig:
    """The per-token routing-transition network of :class:`~moeless_jax.predict.routing_only.RoutingOnly`.

    Attributes:
      hidden: width H of the network's one hidden layer.
      window: source layers W whose expert sets the network reads (layer l and the W-1 before it; 25 reads
        every earlier MoE layer of DeepSeek-V2-Lite's 26).
      own_layers: of those, how many of the most recent get a dense weight of their own per target layer
        (the rest share one expert embedding per source layer, scaled per target); 0..window.
      dropout: dropout rate on the hidden layer while training.
      steps: optimiser steps.
      tokens_per_step: tokens per step; each token trains every target layer at once.
      learning_rate: peak AdamW learning rate (linear warm-up, cosine decay).
      warmup_steps: warm-up steps.
      weight_decay: AdamW weight decay.
      param_dtype: dtype the parameters are stored in (checkpoint and predictor bytes); the network always
        computes in float32.
      online_alpha: weight of the newest batch in an exponential moving average of the forecast's error
        (true minus forecast load shares, per target layer), which is added to later forecasts; 0 turns the
        correction off. It uses only loads of batches already served, as history does.
      seed: seed of initialisation, token sampling and dropout.
    """

    hidden: int = 256
    window: int = 25
    own_layers: int = 2
    dropout: float = 0.15
    steps: int = 6000
    tokens_per_step: int = 256
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    param_dtype: str = "float16"
    online_alpha: float = 0.001
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive_ints(self, "hidden", "window", "steps", "tokens_per_step")
        require(isinstance(self.own_layers, int) and 0 <= self.own_layers <= self.window, "own_layers",
                f"must lie in 0..window ({self.window}), got {self.own_layers!r}")
        require(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.steps, "warmup_steps",
                f"must lie in 0..steps-1, got {self.warmup_steps!r}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must lie in [0, 1), got {self.dropout!r}")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate!r}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        require(self.param_dtype in PARAM_DTYPES, "param_dtype",
                f"must be one of {PARAM_DTYPES}, got {self.param_dtype!r}")
        alpha = self.online_alpha
        require(isinstance(alpha, int | float) and 0.0 <= alpha <= 1.0, "online_alpha",
                f"must lie in [0, 1], got {alpha!r}")
        require(isinstance(self.seed, int), "seed", f"must be an int, got {self.seed!r}")


@dataclass(frozen=True)
class GateTuneConfig:
    """When and how :class:`~moeless_jax.predict.gate.MoElessPredictor` fine-tunes its gate copies.

    Attributes:
      threshold: a target layer whose gate-reuse accuracy on the validation part is below this gets its gate
        copy fine-tuned (paper: 0.8).
      split: fraction of the fitting requests used to fine-tune; the rest validate (paper: 7:3).
      steps: optimiser steps per fine-tuned layer.
      batch_size: tokens per step.
      learning_rate: Adam learning rate.
      val_batch_tokens: token budget of the validation batches the accuracy is measured on.
      seed: seed of the split and of token sampling.
    """

    threshold: float = 0.8
    split: float = 0.7
    steps: int = 300
    batch_size: int = 256
    learning_rate: float = 1e-2
    val_batch_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        require(0.0 <= self.threshold <= 1.0, "threshold", f"must lie in [0, 1], got {self.threshold!r}")
        require(0.0 < self.split < 1.0, "split", f"must lie strictly between 0 and 1, got {self.split!r}")
        require_positive_ints(self, "steps", "batch_size", "val_batch_tokens")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate!r}")
        require(isinstance(self.seed, int), "seed", f"must be an int, got {self.seed!r}")
