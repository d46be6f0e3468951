"""Serverless expert replicas and what serving costs.

- :mod:`~moeless_jax.serverless.lifecycle`: :class:`ReplicaPool`, replicas that warm up, serve, idle under a
  keep-alive and are released; pre-warming from a forecast; late starts counted, tokens never dropped.
- :mod:`~moeless_jax.serverless.cost`: the paper's GB·s and a dollar bill (serverful: every device for the
  whole span; serverless: each replica's warm-up + busy + keep-alive by its memory share), priced by
  :class:`Prices`.
"""

from moeless_jax.serverless.cost import Prices, gb_seconds, serverful_dollars, serverless_dollars
from moeless_jax.serverless.lifecycle import LATE_START_POLICIES, LifecycleConfig, ReplicaPool, Served

__all__ = [
    "LATE_START_POLICIES",
    "LifecycleConfig",
    "Prices",
    "ReplicaPool",
    "Served",
    "gb_seconds",
    "serverful_dollars",
    "serverless_dollars",
]
