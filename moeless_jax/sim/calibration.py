"""Calibration of the latency model: expert compute time against rows, copy bandwidth, all-to-all constants.

``fit_calibration`` turns measured kernel points (``scripts/bench_gpu.py``) into a JSON-able dict;
:class:`LatencyModel` loads such a file and predicts times. Compute time of one device's expert work is
``fixed_ms + ms_per_row * rows`` per model shape and kernel, fitted by least squares on relative error over
the balanced-slot measurements; each fit keeps its points and its largest relative error, so a user can see
where the line holds. A kernel that computes padded buffers (``capacity``: every slot padded to the
buffer's rows) also gets a ``padded`` fit against the rows it actually computes, ``slots x buffer rows``,
which is what :meth:`LatencyModel.layer_ms_static` charges. The all-to-all term is an alpha-beta model whose
constants are *modelled* until measured on several GPUs (the file says which).
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


def _line(rows: np.ndarray, ms: np.ndarray) -> dict[str, Any]:
    fixed, per_row, err = fit_linear(rows, ms)
    points = [[int(r), float(m)] for r, m in zip(rows, ms, strict=True)]
    return {"fixed_ms": fixed, "ms_per_row": per_row, "max_rel_err": err, "points": points}


def fit_calibration(
    kernel_points: list[dict],
    *,
    shapes: dict[str, tuple[int, int, int, int]],
    copy_tbps: float | None,
    predictor_points: dict[int, float] | None = None,
    regime: str = "balanced",
    padded_kernels: tuple[str, ...] = ("capacity",),
) -> dict[str, Any]:
    """Calibration dict from measured points (``shape, kernel, regime, rows, slots, ms`` per point; points
    of ``padded_kernels`` also carry ``slot_buffer_rows``, the rows each slot's buffer had)."""
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
            fit = {
                "d_model": d_model,
                "d_ff": d_ff,
                "experts": experts,
                "top_k": top_k,
                "slots": pts[0]["slots"],
                **_line(rows, ms),
            }
            if kernel in padded_kernels and all("slot_buffer_rows" in p for p in pts):  # what it computes
                fit["padded"] = _line(np.array([p["slots"] * p["slot_buffer_rows"] for p in pts]), ms)
            compute.setdefault(shape, {})[kernel] = fit
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
                _check_line(fit, f"{source}: expert_compute.{shape}.{kernel}")
                if "padded" in fit:
                    _check_line(fit["padded"], f"{source}: expert_compute.{shape}.{kernel}.padded")
        a2a = data.get("all_to_all", {})
        for field in ("latency_us", "bandwidth_gbps_per_direction"):
            if not isinstance(a2a.get(field), int | float) or a2a[field] <= 0:
                raise CalibrationError(f"{source}: all_to_all.{field} must be a positive number")
        return cls(data)

    def expert_ms(self, shape: str, kernel: str, rows) -> np.ndarray:
        """Compute time (ms) of one device's expert work for ``rows`` (scalar or array)."""
        fit = self._fit(shape, kernel)
        return fit["fixed_ms"] + fit["ms_per_row"] * np.asarray(rows, np.float64)

    def _fit(self, shape: str, kernel: str) -> dict[str, Any]:
        try:
            return self.calibration["expert_compute"][shape][kernel]
        except KeyError:
            known = {s: sorted(k) for s, k in self.calibration["expert_compute"].items()}
            raise CalibrationError(
                f"no fit for shape '{shape}' kernel '{kernel}'; calibrated: {known}"
            ) from None

    def padded_ms(self, shape: str, kernel: str, computed_rows) -> np.ndarray:
        """Compute time (ms) of a padded kernel for the rows it computes (``slots x buffer rows``)."""
        fit = self._fit(shape, kernel)
        if "padded" not in fit:
            raise CalibrationError(f"'{shape}/{kernel}' has no padded fit (only padded kernels have one)")
        padded = fit["padded"]
        return padded["fixed_ms"] + padded["ms_per_row"] * np.asarray(computed_rows, np.float64)

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
        return compute + self.exchange_ms(rows, bytes_per_row=bytes_per_row)

    def exchange_ms(self, rows_per_device, *, bytes_per_row: int) -> float:
        """The dispatch and combine all-to-alls of one call: each moves the fullest device's rows once."""
        rows = np.asarray(rows_per_device, np.float64)
        return 2 * float(np.max(self.all_to_all_ms(rows * bytes_per_row)))

    def layer_ms_static(
        self,
        shape: str,
        kernel: str,
        rows_per_device,
        *,
        bytes_per_row: int,
        slots: int | None = None,
        capacity: int | None = None,
        rows_buffer: int | None = None,
    ) -> float:
        """:meth:`layer_ms` charging what the layer's static shapes make the slowest device compute: with the
        ``capacity`` kernel ``slots x capacity`` rows, ``capacity`` the slot size the device holding the
        fullest slot picks (:func:`moeless_jax.moe.capacity.pick_capacity`), with ``ragged`` its receive
        buffer of ``rows_buffer`` rows (default: the fullest device's rows)."""
        rows = np.asarray(rows_per_device, np.float64)
        if kernel == "capacity":
            if slots is None or capacity is None:
                raise CalibrationError("the capacity kernel's time needs slots and capacity")
            compute = float(self.padded_ms(shape, kernel, slots * capacity))
        else:
            computed = rows.max() if rows_buffer is None else rows_buffer
            compute = float(self.expert_ms(shape, kernel, computed))
        return compute + self.exchange_ms(rows, bytes_per_row=bytes_per_row)


def _check_line(fit: dict[str, Any], where: str) -> None:
    for field in ("fixed_ms", "ms_per_row", "max_rel_err", "points"):
        if field not in fit:
            raise CalibrationError(f"{where} lacks '{field}'")
    if fit["fixed_ms"] < 0 or fit["ms_per_row"] < 0:
        raise CalibrationError(f"{where} has a negative coefficient")
