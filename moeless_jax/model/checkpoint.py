"""Saving and restoring :class:`MoETransformer` models with orbax.

A checkpoint is a directory written by one orbax composite save with two items:

- ``metadata`` (JSON): format name and version, the :class:`ModelConfig`, the storage dtype, the training
  step and a free-form ``extra`` mapping;
- ``params``: every array of :meth:`MoETransformer.logical_state` by dotted name. MoE experts are stored as
  their logical weights ``[E, ...]``, so a checkpoint does not depend on the replica tables it was saved
  with, and any table (or mesh size) can be chosen when loading.

Loading rebuilds the model on the given mesh (slot weights materialised for the tables, every other array
replicated on every device) and checks each stored array's name and shape against the config, so a
damaged or mismatched checkpoint fails with one line naming the file or array.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from moeless_jax.checkpointing import restore_item
from moeless_jax.config import ConfigError
from moeless_jax.errors import InputError
from moeless_jax.model.config import ModelConfig, config_from_mapping
from moeless_jax.model.transformer import MoETransformer
from moeless_jax.moe.config import DTYPES
from moeless_jax.moe.replica_table import ReplicaTable

FORMAT_NAME = "moeless_jax.model"
FORMAT_VERSION = 1


class CheckpointInfo(NamedTuple):
    """What a checkpoint's metadata says: its config, storage dtype (None: as trained), step, extra."""

    config: ModelConfig
    dtype: str | None
    step: int | None
    extra: dict[str, Any]


def save_model(
    path: str | Path,
    model: MoETransformer,
    *,
    step: int | None = None,
    extra: dict[str, Any] | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to the directory ``path`` (absolute path returned).

    ``dtype`` stores every floating-point array in that dtype (e.g. ``"bfloat16"`` to ship small; None: as
    is). ``extra`` (JSON-serialisable) is kept with the config, e.g. the tokenizer or data it was trained on.
    """
    target = Path(path).expanduser().resolve()
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {DTYPES}")
    if step is not None and (not isinstance(step, int) or step < 0):
        raise InputError(f"step must be a non-negative integer or None, got {step!r}")
    if target.exists():
        if not overwrite:
            raise InputError(f"{target}: already exists; pass overwrite=True or choose another directory")
        shutil.rmtree(target)
    arrays = {name: _stored(value, dtype) for name, value in model.logical_state().items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "dtype": dtype,
        "step": step,
        "extra": extra or {},
    }
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(target, ocp.args.Composite(params=ocp.args.StandardSave(arrays),
                                                     metadata=ocp.args.JsonSave(metadata)))
    return target


def _stored(value: jax.Array, dtype: str | None) -> np.ndarray:
    """A host copy of ``value``, floating-point arrays cast to ``dtype`` when given."""
    host = np.asarray(jax.device_get(value))
    if dtype is not None and jnp.issubdtype(host.dtype, jnp.floating):
        host = np.asarray(jnp.asarray(host).astype(dtype))
    return host


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """The metadata of the checkpoint at ``path``; any defect raises :class:`InputError`."""
    target = _directory(path)
    return _info(target, _restore(target, "metadata", ocp.args.JsonRestore()))


def load_model(
    path: str | Path,
    *,
    mesh: jax.sharding.Mesh,
    tables: ReplicaTable | Sequence[ReplicaTable | None] | None = None,
    dtype: str | None = None,
    config: ModelConfig | None = None,
) -> MoETransformer:
    """The model saved at ``path``, on ``mesh`` with ``tables`` (None: static expert parallelism).

    ``dtype``: the parameter dtype to run in (None: the saved config's). ``config``: the config the caller
    expects; a checkpoint whose config differs (dtype aside) is refused, naming the fields.
    """
    target = _directory(path)
    info = _info(target, _restore(target, "metadata", ocp.args.JsonRestore()))
    stored = info.config
    if config is not None:
        differ = [f.name for f in dataclasses.fields(ModelConfig)
                  if f.name != "dtype" and getattr(config, f.name) != getattr(stored, f.name)]
        if differ:
            field = differ[0]
            raise InputError(f"{target}: the checkpoint's config differs from the given one in {differ} "
                             f"(e.g. {field}: saved {getattr(stored, field)!r}, given "
                             f"{getattr(config, field)!r}); load without config= or pass the saved one")
        stored = dataclasses.replace(stored, dtype=config.dtype)
    if dtype is not None:
        try:
            stored = dataclasses.replace(stored, dtype=dtype)
        except ConfigError as err:
            raise InputError(f"dtype: {err}") from None
    arrays = _restore(target, "params", ocp.args.StandardRestore())
    if not isinstance(arrays, dict):
        raise InputError(f"{target}: the checkpoint's params are not a mapping of named arrays")
    try:
        return MoETransformer.from_logical_state(stored, arrays, mesh=mesh, tables=tables)
    except InputError as err:
        raise InputError(f"{target}: {err}; the checkpoint does not match its own config") from None


def _directory(path: str | Path) -> Path:
    target = Path(path).expanduser().resolve()
    if not target.is_dir():
        raise InputError(f"{target}: no model checkpoint here (not a directory); save one with save_model")
    return target


def _restore(path: Path, item: str, args):
    return restore_item(path, item, args, fix="save the model again")


def _info(path: Path, metadata) -> CheckpointInfo:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise InputError(f"{path}: not a {FORMAT_NAME} checkpoint (its metadata names another format)")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: checkpoint format_version {version!r} is not supported (this reader knows "
                         f"{FORMAT_VERSION})")
    try:
        config = config_from_mapping(metadata["config"], source=f"{path} config")
    except (KeyError, TypeError, ConfigError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path}: unreadable model config in the checkpoint metadata ({message})") from None
    extra = metadata.get("extra") or {}
    return CheckpointInfo(config, metadata.get("dtype"), metadata.get("step"), dict(extra))
