"""Calibration of the latency model: expert compute time against rows, copy bandwidth, all-to-all constants.

``fit_calibration`` turns measured kernel points (``scripts/bench_gpu.py``) into a JSON-able dict;
:class:`LatencyModel` loads such a file and predicts times. Compute time of one device's expert work is
``fixed_ms + ms_per_row * rows`` per model shape and kernel, fitted by least squares on relative error over
the balanced-slot measurements; each fit keeps its points and its largest relative error, so a user can see
where the line holds. The all-to-all term is an alpha-beta model whose constants are *modelled* until
measured on several GPUs (the file says which).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
# NVLink 4 on H200 SXM: 900 GB/s per GPU both directions together -> 450 GB/s each way (vendor figure).
DEFAULT_ALL_TO_ALL = {
    "model": "latency_us + bytes_per_device / bandwidth",
    "latency_us": 15.0,
    "bandwidth_gbps_per_direction": 450.0,
    "status": "modelled (vendor NVLink figure, latency assumed); replace with multi-GPU measurements",
}


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message names the file and the field."""


def fit_linear(rows: np.ndarray, ms: np.ndarray) -> tuple[float, float, float]:
    """Fit ``ms = fixed + per_row * rows`` on relative error; returns (fixed, per_row, max_rel_err)."""
    rows, ms = np.asarray(rows, np.float64), np.asarray(ms, np.float64)
    if rows.size < 2:
        raise ValueError("need at least two points to fit a line")
    weights = 1.0 / ms
    design = np.stack([np.ones_like(rows), rows], axis=1) * weights[:, None]
    (fixed, per_row), *_ = np.linalg.lstsq(design, ms * weights, rcond=None)
    fixed, per_row = max(float(fixed), 0.0), max(float(per_row), 0.0)
    predicted = fixed + per_row * rows
    return fixed, per_row, float(np.max(np.abs(predicted - ms) / ms))


def fit_calibration(
    kernel_points: list[dict],
    *,
    shapes: dict[str, tuple[int, int, int, int]],
    copy_tbps: float | None,
    predictor_points: dict[int, float] | None = None,
    regime: str = "balanced",
) -> dict[str, Any]:
    """Calibration dict from measured points (``shape, kernel, regime, rows, slots, ms`` per point)."""
    compute: dict[str, dict[str, Any]] = {}
    for shape, (d_model, d_ff, experts, top_k) in shapes.items():
        for kernel in sorted({p["kernel"] for p in kernel_points if p["shape"] == shape}):
            pts = [
                p for p in kernel_points if (p["shape"], p["kernel"], p["regime"]) == (shape, kernel, regime)
            ]
            if len(pts) < 2:
                continue
            rows = np.array([p["rows"] for p in pts])
            ms = np.array([p["ms"] for p in pts])
            fixed, per_row, err = fit_linear(rows, ms)
            compute.setdefault(shape, {})[kernel] = {
                "d_model": d_model,
                "d_ff": d_ff,
                "experts": experts,
                "top_k": top_k,
                "slots": pts[0]["slots"],
                "fixed_ms": fixed,
                "ms_per_row": per_row,
                "max_rel_err": err,
                "points": [[int(r), float(m)] for r, m in zip(rows, ms, strict=True)],
            }
    return {
        "format_version": FORMAT_VERSION,
        "expert_compute": compute,
        "copy_tbps_read_plus_write": copy_tbps,
        "predictor_ms_per_layer": {str(k): v for k, v in (predictor_points or {}).items()},
        "all_to_all": DEFAULT_ALL_TO_ALL,
    }


@dataclass(frozen=True)
class LatencyModel:
    """Predict MoE-layer times from a calibration (see module docstring)."""

    calibration: dict[str, Any]

    @classmethod
    def from_file(cls, path: str | Path) -> LatencyModel:
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"{path}: no calibration file; produce one with scripts/bench_gpu.py")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{path}: not valid JSON ({err})") from None
        return cls.validated(data, source=str(path))

    @classmethod
    def validated(cls, data: dict[str, Any], *, source: str = "calibration") -> LatencyModel:
        if data.get("format_version") != FORMAT_VERSION:
            raise CalibrationError(
                f"{source}: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        compute = data.get("expert_compute")
        if not isinstance(compute, dict) or not compute:
            raise CalibrationError(f"{source}: 'expert_compute' must map model shapes to kernel fits")
        for shape, kernels in compute.items():
            for kernel, fit in kernels.items():
                for field in ("fixed_ms", "ms_per_row", "max_rel_err", "points"):
                    if field not in fit:
                        raise CalibrationError(f"{source}: expert_compute.{shape}.{kernel} lacks '{field}'")
                if fit["fixed_ms"] < 0 or fit["ms_per_row"] < 0:
                    raise CalibrationError(
                        f"{source}: expert_compute.{shape}.{kernel} has a negative coefficient"
                    )
        a2a = data.get("all_to_all", {})
        for field in ("latency_us", "bandwidth_gbps_per_direction"):
            if not isinstance(a2a.get(field), int | float) or a2a[field] <= 0:
                raise CalibrationError(f"{source}: all_to_all.{field} must be a positive number")
        return cls(data)

    def expert_ms(self, shape: str, kernel: str, rows) -> np.ndarray:
        """Compute time (ms) of one device's expert work for ``rows`` (scalar or array)."""
        try:
            fit = self.calibration["expert_compute"][shape][kernel]
        except KeyError:
            known = {s: sorted(k) for s, k in self.calibration["expert_compute"].items()}
            raise CalibrationError(
                f"no fit for shape '{shape}' kernel '{kernel}'; calibrated: {known}"
            ) from None
        return fit["fixed_ms"] + fit["ms_per_row"] * np.asarray(rows, np.float64)

    def all_to_all_ms(self, bytes_per_device) -> np.ndarray:
        a2a = self.calibration["all_to_all"]
        return (
            a2a["latency_us"] / 1e3
            + np.asarray(bytes_per_device, np.float64) / (a2a["bandwidth_gbps_per_direction"] * 1e9) * 1e3
        )

    def layer_ms(self, shape: str, kernel: str, rows_per_device, *, bytes_per_row: int) -> float:
        """Straggler compute plus dispatch and combine all-to-alls (each moves a device's rows once)."""
        rows = np.asarray(rows_per_device, np.float64)
        compute = float(np.max(self.expert_ms(shape, kernel, rows)))
        return compute + 2 * float(np.max(self.all_to_all_ms(rows * bytes_per_row)))
