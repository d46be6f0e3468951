"""The demos as a user runs them: a fresh process, embedded config and shipped checkpoint."""

import json
import os
import subprocess
import sys


def test_layer_demo_runs_and_replication_balances_without_changing_outputs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the demo sets its own device count
    config = tmp_path / "demo.yaml"
    config.write_text("tokens: 512\nhot_fraction: 0.7\n")
    done = subprocess.run(
        [sys.executable, "-m", "moeless_jax.cli", "demo-layer", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    static, even, balanced = report["static"], report["moeless_even"], report["moeless_balanced"]
    assert sum(static["tokens_per_device"]) == 512 * 2
    assert static["balancedness"] < even["balancedness"] <= balanced["balancedness"]
    assert balanced["balancedness"] > 0.95
    for run in (even, balanced):
        assert run["max_abs_diff_vs_static"] < 1e-5 and run["overflow"] == 0


def test_layer_demo_rejects_a_bad_config(tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text("tokens: 100\nnum_devices: 8\n")
    done = subprocess.run(
        [sys.executable, "-m", "moeless_jax.cli", "demo-layer", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "tokens: must be divisible by num_devices=8" in done.stderr
    assert "Traceback" not in done.stderr


def test_model_demo_generates_the_same_tokens_with_the_controller_and_layer_ahead_on():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, "-m", "moeless_jax.cli", "demo", "--json", "--prompt", "Write a short poem.",
         "--prompt", "Explain a hash table."],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tokens_identical"] is True
    assert len(report["texts"]) == 2 and all(report["texts"])
    static, live = report["static"], report["controller"]
    assert len(static["balancedness_per_layer"]) == len(live["balancedness_per_layer"]) == 4
    assert live["controller"]["slots_moved"] > 0
    assert live["balancedness_mean"] > static["balancedness_mean"]
    ahead = report["layer_ahead"]
    assert ahead["layer_ahead_weight_copies"] > 0 and len(ahead["balancedness_per_layer"]) == 4


def test_generate_rejects_an_empty_prompt_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "moeless_jax.cli", "generate", "--prompt", "  "],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2
    want = "moeless generate: error: --prompt number 1 is empty; every prompt needs text"
    assert done.stderr.strip() == want


def test_generate_layer_ahead_refuses_a_forecaster_it_cannot_load(tmp_path):
    config = tmp_path / "la.yaml"
    config.write_text("layer_ahead:\n  forecaster: routing_only\n")
    done = subprocess.run(
        [sys.executable, "-m", "moeless_jax.cli", "generate", "--prompt", "Hi", "--layer-ahead", str(config)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 2
    assert "--layer-ahead: forecaster 'routing_only' needs a fitted predictor" in done.stderr
    assert "Traceback" not in done.stderr
