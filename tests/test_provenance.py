"""Provenance names the code that produced a result, with or without git."""

import json
import shutil

from moeless_jax.provenance import source_digest, write_json


def test_source_digest_follows_the_source_and_nothing_else(tmp_path):
    root = tmp_path / "copy"
    (root / "moeless_jax" / "moe").mkdir(parents=True)
    (root / "scripts").mkdir()
    (root / "moeless_jax" / "moe" / "layer.py").write_text("x = 1\n")
    (root / "scripts" / "bench.py").write_text("print(1)\n")
    (root / "pyproject.toml").write_text("[project]\n")
    first = source_digest(root)
    assert len(first) == 12 and int(first, 16) >= 0
    (root / "results").mkdir()
    (root / "results" / "out.json").write_text("{}")  # results are not source
    assert source_digest(root) == first
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    assert source_digest(moved) == first  # paths are relative to the root
    (root / "moeless_jax" / "moe" / "layer.py").write_text("x = 2\n")
    assert source_digest(root) != first
    (root / "moeless_jax" / "moe" / "layer.py").write_text("x = 1\n")
    (root / "scripts" / "bench.py").rename(root / "scripts" / "bench2.py")  # a rename is a change
    assert source_digest(root) != first


def test_written_results_carry_the_source_digest(tmp_path):
    path = write_json(tmp_path / "r.json", {"value": 1}, method="computed", device="cpu")
    info = json.loads(path.read_text())["provenance"]
    assert info["source_sha256"] == source_digest()
    assert info["method"] == "computed" and info["device"] == "cpu"


def test_rewritten_results_do_not_mark_a_result_dirty(tmp_path):
    import subprocess

    from moeless_jax.provenance import _git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "a@b.c")
    git("config", "user.name", "t")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "scripts" / "run.py").write_text("x = 1\n")
    (tmp_path / "results" / "out.json").write_text("{}\n")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        (tmp_path / "results" / "out.json").write_text('{"a": 1}\n')
        assert not _git_commit().endswith("+dirty")
        (tmp_path / "scripts" / "run.py").write_text("x = 2\n")
        assert _git_commit().endswith("+dirty")
    finally:
        os.chdir(here)
