"""The small trained checkpoints that ship inside the package (no download needed)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from moeless_jax.errors import InputError

SHIPPED = ("mixtral_tiny", "deepseek_tiny")


def shipped_checkpoint(name: str = "mixtral_tiny") -> Path:
    """Directory of the shipped checkpoint ``name`` (one of :data:`SHIPPED`)."""
    if name not in SHIPPED:
        raise InputError(f"no shipped checkpoint '{name}'; choose one of {list(SHIPPED)}")
    path = Path(str(resources.files("moeless_jax.model") / "assets" / "checkpoints" / name))
    if not path.is_dir():
        raise InputError(f"the shipped checkpoint {path} is missing; reinstall the package (pip install .)")
    return path
