"""Saving and restoring fitted predictors with orbax.

A checkpoint is a directory written by one orbax composite save with two items:

- ``metadata`` (JSON): format name and version, predictor name, distance, the ``(L, E, K)`` shape it was
  fitted on, and its settings (config);
- ``state``: the predictor's arrays (:meth:`LoadPredictor.state`).

Restoring rebuilds the predictor from the metadata, then checks every stored array's name, shape and dtype
against what that predictor expects, so a checkpoint from another config or model is refused with a message
naming the array, instead of failing later inside a jitted function.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from moeless_jax.checkpointing import restore_item
from moeless_jax.errors import InputError
from moeless_jax.predict.base import LoadPredictor
from moeless_jax.predict.registry import from_settings

FORMAT_NAME = "moeless_jax.predictor"
FORMAT_VERSION = 1
_REFIT = "re-create it with `moeless predict fit ... --checkpoint DIR`"


def save_predictor(predictor: LoadPredictor, directory: str | Path, *, overwrite: bool = False,
                   note: dict | None = None) -> Path:
    """Write a fitted ``predictor`` to ``directory`` (absolute path returned).

    ``note`` (JSON) records how it was fitted (trace, split, seed); :func:`read_note` returns it.
    """
    path = Path(directory).expanduser().resolve()
    state = predictor.state()
    if predictor.shape is None or (predictor.state_spec() and not state):
        raise InputError(f"predictor {predictor.name!r} is not fitted; fit it before saving")
    if path.exists():
        if not overwrite:
            raise InputError(f"{path}: already exists; pass overwrite=True (CLI: --overwrite) or choose "
                             "another directory")
        shutil.rmtree(path)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": predictor.name,
        "distance": predictor.distance,
        "shape": list(predictor.shape),
        "settings": predictor.settings(),
        "note": note or {},
    }
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        # orbax refuses an empty tree; a stateless predictor stores one marker array.
        tree = state or {"empty": np.zeros(1, np.int8)}
        checkpointer.save(path, ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                   metadata=ocp.args.JsonSave(metadata)))
    return path


def load_predictor(directory: str | Path) -> LoadPredictor:
    """Restore a predictor written by :func:`save_predictor`; any defect raises :class:`InputError`."""
    path, metadata = _open(directory)
    predictor = _build(path, metadata)
    expected = predictor.state_spec()
    stored = _restore(path, "state", ocp.args.StandardRestore())
    stored = {} if set(stored) == {"empty"} and not expected else stored
    _check_state(path, stored, expected)
    if expected:
        predictor.set_state({name: np.asarray(value) for name, value in stored.items()})
    return predictor


def read_note(directory: str | Path) -> dict:
    """The ``note`` a checkpoint was saved with (``{}`` if none)."""
    _, metadata = _open(directory)
    return dict(metadata.get("note") or {}) if isinstance(metadata, dict) else {}


def _open(directory: str | Path) -> tuple[Path, object]:
    """(resolved checkpoint path, its stored metadata); a missing directory raises :class:`InputError`."""
    path = Path(directory).expanduser().resolve()
    if not path.is_dir():
        raise InputError(f"{path}: no predictor checkpoint here (not a directory); {_REFIT}")
    return path, _restore(path, "metadata", ocp.args.JsonRestore())


def _restore(path: Path, item: str, args):
    return restore_item(path, item, args, fix=_REFIT)


def _build(path: Path, metadata) -> LoadPredictor:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise InputError(f"{path}: not a {FORMAT_NAME} checkpoint; {_REFIT}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: checkpoint format_version {version!r} is not supported (this reader knows "
                         f"{FORMAT_VERSION}); {_REFIT}")
    try:
        predictor = from_settings(metadata["name"], int(metadata["distance"]), metadata["settings"])
        shape = tuple(int(value) for value in metadata["shape"])
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: damaged checkpoint metadata ({type(err).__name__}: {err}); "
                         f"{_REFIT}") from None
    if len(shape) != 3 or min(shape) < 1 or shape[0] <= predictor.distance:
        raise InputError(f"{path}: checkpoint metadata has an invalid shape {shape}; {_REFIT}")
    predictor.shape = shape
    return predictor


def _check_state(path: Path, stored: dict, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    if set(stored) != set(expected):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise InputError(f"{path}: checkpoint arrays do not match the predictor (missing {missing}, "
                         f"unexpected {extra}); {_REFIT}")
    for name, (shape, dtype) in expected.items():
        array = np.asarray(stored[name])
        if tuple(array.shape) != shape or str(array.dtype) != dtype:
            raise InputError(f"{path}: checkpoint array {name!r} is {array.dtype} {tuple(array.shape)}, the "
                             f"predictor's settings need {dtype} {shape}; {_REFIT}")
        # Validation records mark non-target layers NaN; parameters must be finite.
        bad = np.isinf(array) if name.startswith("accuracy") else ~np.isfinite(array)
        if array.dtype.kind == "f" and bad.any():
            raise InputError(f"{path}: checkpoint array {name!r} holds NaN or inf; {_REFIT}")
