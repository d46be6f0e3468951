"""``moeless trace`` subcommands, driven through their own parser on tiny synthetic files."""

import argparse
import subprocess
import sys

import numpy as np
import pytest

from moeless_jax.traces import cli, load_trace, save_trace, synthetic_trace


def write_prompt(path, num_tokens=4, layers=(1, 2, 3), seed=0):
    """A MoE-Beyond style CSV: header, then one row per (layer, token) with 6 distinct ids of 64."""
    rng = np.random.default_rng(seed)
    lines = ["Layer ID,Batch Number,Token,Activated Expert IDs"]
    for layer in layers:
        for token in range(num_tokens):
            ids = ", ".join(str(i) for i in rng.choice(64, size=6, replace=False))
            lines.append(f'{layer},0,t{token},"[{ids}]"')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def run(argv):
    parser = argparse.ArgumentParser(prog="moeless")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def moe_beyond_dir(tmp_path):
    for number in (1, 2, 3):
        write_prompt(tmp_path / "mb" / f"prompt_{number}_data.csv", num_tokens=number + 4, seed=number)
    return tmp_path / "mb"


def test_convert_then_info(moe_beyond_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOELESS_JAX_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "t.npz"
    assert run(["trace", "convert", "--format", "moe-beyond", "--input", str(moe_beyond_dir),
                "--output", str(out), "--prompts", "1-2"]) == 0
    assert "11 tokens, 2 requests, 3 layers, top-6 of 64 experts" in capsys.readouterr().out
    np.testing.assert_array_equal(load_trace(out).requests, [1, 2])
    assert run(["trace", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tokens: 11" in text and "experts: 64, top-k: 6" in text and "token_text" in text


def test_batches_by_budget_and_by_arrivals(tmp_path, capsys):
    path = save_trace(synthetic_trace(num_requests=4, mean_tokens=3, seed=2), tmp_path / "t.npz")
    assert run(["trace", "batches", str(path), "--batch-tokens", "1"]) == 0
    assert "batches: 4" in capsys.readouterr().out
    arrivals = tmp_path / "a.jsonl"
    arrivals.write_text("".join(f'{{"timestamp": {ms}, "input_length": 1, "output_length": 1}}\n'
                                for ms in (0, 100, 2500)))
    assert run(["trace", "batches", str(path), "--arrivals", str(arrivals)]) == 0
    assert "batches: 2" in capsys.readouterr().out


def test_prompt_list_parsing():
    assert cli._prompt_list("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(argparse.ArgumentTypeError):
        cli._prompt_list("a-b")


def test_importing_the_command_does_not_import_jax():
    code = "import sys, moeless_jax.traces.cli; print('jax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
