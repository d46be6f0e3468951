"""``moeless predict fit`` and ``moeless predict eval`` on a small native trace."""

import json

import pytest
import yaml

from moeless_jax.cli import main
from moeless_jax.traces import save_trace, synthetic_trace

EXPECTED_KEYS = {"accuracy_per_layer", "accuracy_mean", "recall_mean", "pearson_mean", "bytes",
                 "ms_per_layer"}


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "trace.npz"
    save_trace(synthetic_trace(num_requests=30, mean_tokens=16, num_layers=3, num_experts=8, seed=0), path)
    return path


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "predict.yaml"
    path.write_text(yaml.safe_dump({"routing_only": {"hidden": 8, "window": 2, "own_layers": 1, "steps": 10,
                                                     "tokens_per_step": 16, "warmup_steps": 1}}))
    return path


def _json_run(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_fit_then_eval_from_the_checkpoint(trace_file, tiny_config, tmp_path, capsys):
    common = ["--routing-trace", str(trace_file), "--format", "native", "--predictor", "routing_only",
              "--distance", "1", "--config", str(tiny_config)]
    fitted = _json_run(capsys, ["predict", "fit", *common, "--checkpoint", str(tmp_path / "ckpt"), "--json"])
    assert fitted["predictor"] == "routing_only" and fitted["bytes"] > 0
    result = _json_run(capsys, ["predict", "eval", *common, "--checkpoint", str(tmp_path / "ckpt"),
                                "--batch-tokens", "64", "--json"])
    assert EXPECTED_KEYS <= set(result)
    assert set(result["accuracy_per_layer"]) == {"1", "2"}  # target layers of a 3-layer trace at d = 1
    assert result["bytes"] == fitted["bytes"]
    assert 0.0 <= result["accuracy_mean"] <= 1.0


@pytest.mark.parametrize("name", ["history", "oracle"])
def test_eval_fits_on_the_fly_without_a_checkpoint(trace_file, capsys, name):
    result = _json_run(capsys, ["predict", "eval", "--routing-trace", str(trace_file), "--format", "native",
                                "--predictor", name, "--distance", "2", "--json"])
    assert EXPECTED_KEYS <= set(result)
    assert list(result["accuracy_per_layer"]) == ["2"]
    if name == "oracle":
        assert result["accuracy_mean"] == pytest.approx(1.0)


def test_eval_prints_a_table_without_json(trace_file, capsys):
    assert main(["predict", "eval", "--routing-trace", str(trace_file), "--format", "native",
                 "--predictor", "history"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("history d=1: accuracy") and "layer    2:" in out


def test_missing_checkpoint_is_one_line_and_exit_2(trace_file, tmp_path, capsys):
    code = main(["predict", "eval", "--routing-trace", str(trace_file), "--format", "native", "--predictor",
                 "history", "--checkpoint", str(tmp_path / "absent"), "--json"])
    err = capsys.readouterr().err
    assert code == 2
    assert "absent: no predictor checkpoint here" in err and len(err.strip().splitlines()) == 1


def test_checkpoint_of_another_predictor_is_refused(trace_file, tmp_path, capsys):
    base = ["--routing-trace", str(trace_file), "--format", "native", "--distance", "1"]
    assert main(["predict", "fit", *base, "--predictor", "history", "--checkpoint", str(tmp_path / "h")]) == 0
    code = main(["predict", "eval", *base, "--predictor", "oracle", "--checkpoint", str(tmp_path / "h")])
    assert code == 2 and "holds history at distance 1" in capsys.readouterr().err


def test_gate_predictors_need_hidden_states(trace_file, capsys):
    code = main(["predict", "eval", "--routing-trace", str(trace_file), "--format", "native",
                 "--predictor", "gate_reuse"])
    assert code == 2 and "needs the model's gate kernels" in capsys.readouterr().err


def test_gate_reuse_and_moeless_take_gates_from_a_file(tmp_path, capsys):
    import numpy as np

    from moeless_jax.predict import synthetic_gated_trace

    trace, kernels = synthetic_gated_trace(num_requests=20, num_layers=3, mixing=0.0, noise=0.0, seed=1)
    save_trace(trace, tmp_path / "gated.npz")
    np.savez(tmp_path / "gates.npz", kernels=kernels)
    common = ["--routing-trace", str(tmp_path / "gated.npz"), "--format", "native", "--gates",
              str(tmp_path / "gates.npz"), "--json"]
    reuse = _json_run(capsys, ["predict", "eval", "--predictor", "gate_reuse", *common])
    assert reuse["accuracy_mean"] == pytest.approx(1.0) and reuse["bytes"] == 0
    fitted = _json_run(capsys, ["predict", "fit", "--predictor", "moeless", *common, "--checkpoint",
                                str(tmp_path / "m")])
    assert fitted["bytes"] == kernels[1:].nbytes
    result = _json_run(capsys, ["predict", "eval", "--predictor", "moeless", "--checkpoint",
                                str(tmp_path / "m"), *common])
    assert result["accuracy_mean"] == pytest.approx(1.0)
