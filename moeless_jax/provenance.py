"""Every result says what produced it: command, machine, date, software, and how it was obtained."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

Method = Literal["measured", "emulated", "simulated", "computed"]
METHODS = ("measured", "emulated", "simulated", "computed")


# What a result's code is: changes here mark a result dirty; results/, docs and tests do not.
SOURCE_PATHS = ("moeless_jax", "scripts", "configs", "pyproject.toml")


def _git_commit() -> str | None:
    """Short commit of the checkout, with ``+dirty`` when tracked source files (:data:`SOURCE_PATHS`) differ
    from it (the result then comes from the commit that records those changes, or from none). Rewritten
    results, docs or tests do not count: a script that rewrites ``results/`` while another runs must not mark
    the next one dirty."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    if not commit:
        return None
    return commit + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")


SOURCE_GLOBS = ("moeless_jax/**/*.py", "scripts/*.py", "configs/**/*.yaml", "pyproject.toml")


def source_digest(root: str | Path | None = None) -> str:
    """First 12 hex digits of a SHA-256 over the project's source (package, scripts, configs, pyproject:
    each file's path relative to ``root`` and its bytes, in path order).

    It names the code that produced a result even where the git metadata is missing or stale (a copy of the
    tree on another machine); recompute it on a checkout to check which commit matches.
    """
    root = Path(__file__).resolve().parent.parent if root is None else Path(root)
    files = sorted({f for pattern in SOURCE_GLOBS for f in root.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _portable_command(argv: list[str]) -> str:
    """The command line with machine-specific paths replaced: data folders by ``DATA_DIR`` (where the public
    traces were put), other absolute paths outside the repo by ``<scratch>/...`` (a temporary output folder
    whose files were copied under ``results/``)."""
    cwd = Path.cwd().resolve()
    words = [Path(argv[0]).name]
    after_data = False
    for arg in argv[1:]:
        if after_data:
            words.append("DATA_DIR")
        elif arg.startswith("/"):
            path = Path(arg).resolve()
            words.append(str(path.relative_to(cwd)) if path.is_relative_to(cwd) else f"<scratch>/{path.name}")
        else:
            words.append(arg)
        after_data = arg == "--data-dir"
    return " ".join(words)


def cpu_name() -> str:
    """The host CPU's model name and logical CPU count (host-side timings say which CPU they ran on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def compute_device_name() -> str:
    """What jax computes on: the accelerator's kind, or the host CPU's name on the CPU backend."""
    import jax

    if jax.default_backend() == "cpu":
        return cpu_name()
    return f"{jax.devices()[0].device_kind} (jax {jax.default_backend()} backend)"


def provenance(method: Method, *, device: str | None = None, note: str | None = None) -> dict[str, Any]:
    """Who, what and how: attach this under ``"provenance"`` in every results JSON.

    method: ``measured`` (timed on the hardware named), ``emulated`` (real kernels on one GPU, one
    device's share at a time, modelled communication), ``simulated`` (latency model) or ``computed``
    (host-side arithmetic on traces, e.g. balancedness of a plan).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    info: dict[str, Any] = {
        "method": method,
        "command": _portable_command(sys.argv),
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "machine": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "source_sha256": source_digest(),
    }
    try:
        import jax

        info["jax_version"] = jax.__version__
        info["jax_backend"] = jax.default_backend()
        info["device"] = device or jax.devices()[0].device_kind
    except ImportError:  # planning-only results need no jax
        info["device"] = device or "cpu"
    if note:
        info["note"] = note
    return info


def write_json(
    path: str | Path,
    summary: dict[str, Any],
    *,
    method: Method,
    device: str | None = None,
    note: str | None = None,
) -> Path:
    """Write ``summary`` plus its provenance to ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**summary, "provenance": provenance(method, device=device, note=note)}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
