"""Serving: generation with live expert replication (:mod:`~moeless_jax.serve.live`)."""

from moeless_jax.serve.live import LiveRun, device_balancedness, generate_live

__all__ = ["LiveRun", "device_balancedness", "generate_live"]
