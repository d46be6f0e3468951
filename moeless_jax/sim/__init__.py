"""Latency model calibrated from measured kernels (numpy only), and per-device emulation of an
expert-parallel layer on one accelerator (:mod:`moeless_jax.sim.emulate`, imports jax)."""

from moeless_jax.sim.calibration import CalibrationError, LatencyModel, fit_calibration, fit_linear

__all__ = ["CalibrationError", "LatencyModel", "fit_calibration", "fit_linear"]
