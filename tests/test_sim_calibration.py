"""The latency model and the committed H200 calibration it loads."""

import json
from pathlib import Path

import numpy as np
import pytest

from moeless_jax.sim import CalibrationError, LatencyModel, fit_calibration, fit_linear

CALIBRATION = Path(__file__).resolve().parent.parent / "results" / "gpu" / "calibration-h200.json"


def test_fit_linear_recovers_an_exact_line():
    rows = np.array([10, 100, 1000, 10000])
    fixed, per_row, err = fit_linear(rows, 0.2 + 0.003 * rows)
    assert fixed == pytest.approx(0.2) and per_row == pytest.approx(0.003) and err < 1e-9


def test_committed_calibration_reproduces_its_points_within_the_stated_error():
    model = LatencyModel.from_file(CALIBRATION)
    compute = model.calibration["expert_compute"]
    assert {"mixtral", "phi35moe", "llama4scout", "dsv2lite"} <= set(compute)
    for shape, kernels in compute.items():
        assert {"capacity", "ragged"} <= set(kernels), shape
        for kernel, fit in kernels.items():
            rows, ms = np.array(fit["points"], dtype=np.float64).T
            rel = np.abs(model.expert_ms(shape, kernel, rows) - ms) / ms
            assert rel.max() <= fit["max_rel_err"] + 1e-9, (shape, kernel)
            assert fit["max_rel_err"] < 0.5, f"{shape}/{kernel}: the linear model is too far off to use"
    assert model.all_to_all_ms(0) > 0
    assert model.calibration["all_to_all"]["status"].startswith("modelled")


def test_layer_time_is_the_straggler_plus_two_all_to_alls():
    model = LatencyModel.from_file(CALIBRATION)
    rows = np.array([100, 4000, 900])
    got = model.layer_ms("mixtral", "capacity", rows, bytes_per_row=8192)
    want = model.expert_ms("mixtral", "capacity", 4000) + 2 * model.all_to_all_ms(4000 * 8192)
    assert got == pytest.approx(float(want))


def test_fit_calibration_round_trips_through_the_model(tmp_path):
    points = [
        {
            "shape": "toy",
            "kernel": "capacity",
            "regime": "balanced",
            "rows": r,
            "slots": 2,
            "ms": 0.1 + 1e-4 * r,
        }
        for r in (64, 512, 4096)
    ]
    data = fit_calibration(points, shapes={"toy": (8, 16, 4, 2)}, copy_tbps=3.0)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(data))
    assert LatencyModel.from_file(path).expert_ms("toy", "capacity", 1000) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(format_version=7), "format_version 7"),
        (lambda d: d.update(expert_compute={}), "'expert_compute' must map"),
        (lambda d: d["expert_compute"]["mixtral"]["capacity"].pop("ms_per_row"), "lacks 'ms_per_row'"),
        (lambda d: d["all_to_all"].update(latency_us=-1), "all_to_all.latency_us must be a positive number"),
    ],
)
def test_bad_calibrations_name_the_field(tmp_path, mutate, match):
    data = json.loads(CALIBRATION.read_text())
    mutate(data)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=match):
        LatencyModel.from_file(path)


def test_missing_calibration_file(tmp_path):
    with pytest.raises(CalibrationError, match="no calibration file"):
        LatencyModel.from_file(tmp_path / "absent.json")
    with pytest.raises(CalibrationError, match="no fit for shape 'nope'"):
        LatencyModel.from_file(CALIBRATION).expert_ms("nope", "capacity", 1)


def test_padded_fits_reproduce_their_points_and_static_layer_time_charges_the_buffers():
    model = LatencyModel.from_file(CALIBRATION)
    fit = model.calibration["expert_compute"]["dsv2lite"]["capacity"]["padded"]
    computed, ms = np.array(fit["points"], dtype=np.float64).T
    rel = np.abs(model.padded_ms("dsv2lite", "capacity", computed) - ms) / ms
    assert rel.max() <= fit["max_rel_err"] + 1e-9
    rows = np.array([100, 4000, 900])
    a2a = 2 * model.all_to_all_ms(4000 * 4096)
    # capacity: every device computes slots x capacity rows, whatever it received
    got = model.layer_ms_static("dsv2lite", "capacity", rows, bytes_per_row=4096, slots=10, capacity=512)
    assert got == pytest.approx(float(model.padded_ms("dsv2lite", "capacity", 5120) + a2a))
    # ragged: the receive buffer, not the rows
    got = model.layer_ms_static("dsv2lite", "ragged", rows, bytes_per_row=4096, rows_buffer=8192)
    assert got == pytest.approx(float(model.expert_ms("dsv2lite", "ragged", 8192) + a2a))
    with pytest.raises(CalibrationError, match="slots and capacity"):
        model.layer_ms_static("dsv2lite", "capacity", rows, bytes_per_row=4096)
    with pytest.raises(CalibrationError, match="no padded fit"):
        model.padded_ms("dsv2lite", "ragged", 100)
