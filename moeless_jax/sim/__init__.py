"""Latency model calibrated from measured kernels, for trace-driven simulation."""

from moeless_jax.sim.calibration import CalibrationError, LatencyModel, fit_calibration, fit_linear

__all__ = ["CalibrationError", "LatencyModel", "fit_calibration", "fit_linear"]
