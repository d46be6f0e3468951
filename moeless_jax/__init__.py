"""moeless_jax: serve Mixture-of-Experts models with predictor-driven, elastic expert replication."""

from moeless_jax.config import ConfigError, load_config

__version__ = "0.1.0"
__all__ = ["ConfigError", "__version__", "load_config"]
