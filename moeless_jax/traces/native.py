"""The native routing-trace file: one compressed ``.npz`` holding a :class:`RoutingTrace`.

Keys (N tokens, L layers, K top-k, M hidden size):

=================  ==============  =====================================================
key                shape / dtype   meaning
=================  ==============  =====================================================
``format``         str scalar      always ``"moeless_jax.routing_trace"``
``format_version`` int scalar      :data:`FORMAT_VERSION`; newer files are refused
``num_experts``    int scalar      E
``layer_ids``      [L] int64       source layer numbers
``expert_ids``     [N, L, K] int   expert ids
``request_id``     [N] int32       request of each token
``position``       [N] int32       position within the request
``gate_weights``   [N, L, K] f32   optional
``hidden``         [N, L, M] f16/32 optional gate inputs
``token_text``     [N] str         optional token strings
=================  ==============  =====================================================

Files are read with ``allow_pickle=False``: a trace file cannot execute code.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.traces.routing import RoutingTrace

FORMAT_NAME = "moeless_jax.routing_trace"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "num_experts", "layer_ids", "expert_ids", "request_id", "position")
_OPTIONAL = ("gate_weights", "hidden", "token_text")


def save_trace(trace: RoutingTrace, path: str | Path) -> Path:
    """Write ``trace`` to ``path`` (compressed ``.npz``, written atomically); returns the path."""
    path = Path(path)
    arrays = {
        "format": np.array(FORMAT_NAME),
        "format_version": np.array(FORMAT_VERSION, np.int64),
        "num_experts": np.array(trace.num_experts, np.int64),
        "layer_ids": np.array(trace.layer_ids, np.int64),
        "expert_ids": trace.expert_ids,
        "request_id": trace.request_id,
        "position": trace.position,
    }
    for key in _OPTIONAL:
        if getattr(trace, key) is not None:
            arrays[key] = getattr(trace, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a reader never sees a half-written file (the cache relies on it).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **arrays)  # a file object: numpy does not append ".npz"
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_trace(path: str | Path) -> RoutingTrace:
    """Read a trace written by :func:`save_trace`; any defect raises :class:`InputError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such trace file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        raise InputError(f"{path}: not a readable .npz routing trace ({type(err).__name__}: {err})") from None
    not_arrays = [key for key, value in arrays.items() if not isinstance(value, np.ndarray)]
    if not_arrays:  # numpy hands back raw bytes for a member that is not a .npy file
        raise InputError(f"{path}: member(s) {not_arrays} are not numpy arrays")
    if "format" in arrays and str(arrays["format"]) != FORMAT_NAME:
        raise InputError(f"{path}: format is {str(arrays['format'])!r}, expected {FORMAT_NAME!r}")
    missing = [key for key in _REQUIRED if key not in arrays]
    if missing:
        raise InputError(f"{path}: not a routing trace, missing key(s) {missing}")
    version = _scalar_int(arrays["format_version"], path, "format_version")
    if version < 1 or version > FORMAT_VERSION:
        raise InputError(
            f"{path}: format_version {version} is not supported (this reader knows 1..{FORMAT_VERSION})"
        )
    try:
        return RoutingTrace(
            expert_ids=arrays["expert_ids"],
            request_id=arrays["request_id"],
            position=arrays["position"],
            num_experts=_scalar_int(arrays["num_experts"], path, "num_experts"),
            layer_ids=tuple(int(layer) for layer in np.asarray(arrays["layer_ids"]).reshape(-1)),
            gate_weights=arrays.get("gate_weights"),
            hidden=arrays.get("hidden"),
            token_text=arrays.get("token_text"),
        )
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def _scalar_int(value: np.ndarray, path: Path, key: str) -> int:
    array = np.asarray(value)
    if array.shape != () or array.dtype.kind not in "iu":
        raise InputError(f"{path}: key {key!r} must be an integer scalar, got {array.dtype} {array.shape}")
    return int(array)
