"""``moeless plan``: output for every policy, and one-line errors (exit 2, no traceback) for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from moeless_jax import cli as top_cli
from moeless_jax.plan import read_loads


@pytest.fixture
def plan_only(monkeypatch):
    """The top-level ``moeless`` command with only the plan subcommand registered."""
    monkeypatch.setattr(top_cli, "COMMAND_MODULES", ("moeless_jax.plan.cli",))
    return top_cli.main


@pytest.fixture
def loads_npy(tmp_path):
    rng = np.random.default_rng(0)
    loads = rng.multinomial(6000, rng.dirichlet(np.full(16, 0.4)), size=3)  # 3 layers x 16 experts
    path = tmp_path / "loads.npy"
    np.save(path, loads)
    return path


@pytest.mark.parametrize("policy", ["static", "eplb", "moeless", "oracle", "tokendrop", "replicate"])
def test_json_output_for_every_policy(plan_only, loads_npy, capsys, policy):
    code = plan_only(
        [
            "plan",
            "--loads",
            str(loads_npy),
            "--devices",
            "4",
            "--slots-per-device",
            "5",
            "--policy",
            policy,
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["balancedness"]) == 3 and all(0 < b <= 1 for b in out["balancedness"])
    assert np.array(out["replica_count"]).shape == (3, 16) and np.array(out["slot_to_expert"]).shape == (
        3,
        20,
    )
    assert out["seconds"] >= 0 and out["changes_outputs"] == (policy in ("oracle", "tokendrop"))
    assert (np.array(out["replica_count"]) >= 1).all()


def test_moeless_beats_static_and_cv_flag_is_used(plan_only, loads_npy, capsys):
    def mean_balancedness(*extra):
        plan_only(
            ["plan", "--loads", str(loads_npy), "--devices", "4", "--slots-per-device", "5", "--json", *extra]
        )
        return json.loads(capsys.readouterr().out)

    static = mean_balancedness("--policy", "static")["balancedness_mean"]
    moeless = mean_balancedness("--policy", "moeless")
    assert moeless["balancedness_mean"] > static
    loose = mean_balancedness("--policy", "moeless", "--cv", "10")
    assert np.array(loose["replica_count"]).sum() == 3 * 16  # a CV target of 10 needs no replicas


def test_text_output_and_csv_input(plan_only, tmp_path, capsys):
    path = tmp_path / "loads.csv"
    path.write_text("10,20,30,40\n5,5,5,5\n")
    assert read_loads(path).dtype == np.int64
    assert (
        plan_only(
            ["plan", "--loads", str(path), "--devices", "2", "--slots-per-device", "3", "--policy", "moeless"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "policy moeless: 2 layers, 4 experts, 2 devices x 3 slots" in out and "mean balancedness" in out


def test_config_file_sections(plan_only, loads_npy, tmp_path, capsys):
    config = tmp_path / "plan.yaml"
    config.write_text("moeless:\n  cv_target: 10.0\ntopology:\n  pairs: true\n")
    plan_only(
        [
            "plan",
            "--loads",
            str(loads_npy),
            "--devices",
            "4",
            "--slots-per-device",
            "5",
            "--policy",
            "moeless",
            "--config",
            str(config),
            "--json",
        ]
    )
    assert np.array(json.loads(capsys.readouterr().out)["replica_count"]).sum() == 3 * 16
    config.write_text("moeless:\n  cv_targt: 0.1\n")
    assert (
        plan_only(
            [
                "plan",
                "--loads",
                str(loads_npy),
                "--devices",
                "4",
                "--slots-per-device",
                "5",
                "--policy",
                "moeless",
                "--config",
                str(config),
            ]
        )
        == 2
    )
    assert "unknown field(s) ['cv_targt']" in capsys.readouterr().err


def bad_file(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    "name, content, devices, slots, message",
    [
        ("neg.npy", np.array([[1, -3, 2, 2]]), 2, 2, "layer 0 expert 1 is -3; loads must be >= 0"),
        ("nan.npy", np.array([[1.0, np.nan, 2, 2]]), 2, 2, "layer 0 expert 1 is nan; loads must be finite"),
        ("inf.csv", "1,2,inf,4\n", 2, 2, "layer 0 expert 2 is inf; loads must be finite"),
        (
            "cube.npy",
            np.ones((2, 2, 4)),
            2,
            2,
            "expected a non-empty layers x experts matrix, got shape (2, 2, 4)",
        ),
        ("ragged.csv", "1,2,3\n4,5\n", 2, 2, "rows have different lengths"),
        ("words.csv", "1,two,3\n", 2, 2, "row 1 holds a value that is not a number"),
        ("loads.txt", "1,2\n", 2, 2, "expected a .npy or .csv file"),
        ("small.npy", np.ones((1, 9)), 2, 4, "2 devices x 4 slots = 8 slots cannot hold 9 experts"),
        ("zero.npy", np.ones((1, 4)), 0, 4, "num_devices: must be a positive integer"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    plan_only, tmp_path, capsys, name, content, devices, slots, message
):
    path = bad_file(tmp_path, name, content)
    code = plan_only(
        [
            "plan",
            "--loads",
            str(path),
            "--devices",
            str(devices),
            "--slots-per-device",
            str(slots),
            "--policy",
            "moeless",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_file_and_unknown_policy(plan_only, tmp_path, capsys):
    assert (
        plan_only(
            [
                "plan",
                "--loads",
                str(tmp_path / "nope.npy"),
                "--devices",
                "2",
                "--slots-per-device",
                "2",
                "--policy",
                "static",
            ]
        )
        == 2
    )
    assert "nope.npy: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        plan_only(
            ["plan", "--loads", "x.npy", "--devices", "2", "--slots-per-device", "2", "--policy", "magic"]
        )
    assert exit_info.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_plan_command_does_not_import_jax():
    code = (
        "import sys, argparse; from moeless_jax.plan import cli; "
        "p = argparse.ArgumentParser(); cli.register(p.add_subparsers()); "
        "import moeless_jax.plan, moeless_jax.plan.policies; print('jax' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
