"""Load matrices: checking them and reading them from ``.npy`` / ``.csv`` files.

A load matrix is ``[L, E]``: tokens (or forecast tokens) routed to each expert of each layer. Integer loads
stay int64 (so even splits are exact integers, as the layer computes them); anything else becomes float64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moeless_jax.errors import InputError


def check_loads(loads, *, num_experts: int | None = None, name: str = "loads") -> np.ndarray:
    """Validate an ``[L, E]`` (or ``[E]``: one layer) load matrix; return it as int64 or float64 ``[L, E]``.

    Raises :class:`InputError` naming the problem: wrong shape, wrong expert count, non-numeric values,
    NaN, inf or negative entries.
    """
    array = np.asarray(loads)
    if array.dtype == np.bool_ or array.dtype.kind not in "iuf":
        raise InputError(f"{name}: expected numbers, got dtype {array.dtype}")
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name}: expected a non-empty layers x experts matrix, got shape {np.shape(loads)}")
    if num_experts is not None and array.shape[1] != num_experts:
        raise InputError(f"{name}: has {array.shape[1]} experts per layer, expected {num_experts}")
    array = array.astype(np.int64) if array.dtype.kind in "iu" else array.astype(np.float64)
    if array.dtype.kind == "f":
        bad = np.argwhere(~np.isfinite(array))
        if bad.size:
            layer, expert = (int(i) for i in bad[0])
            raise InputError(
                f"{name}: layer {layer} expert {expert} is {array[layer, expert]}; loads must be finite "
                f"({bad.shape[0]} non-finite entries)"
            )
    negative = np.argwhere(array < 0)
    if negative.size:
        layer, expert = (int(i) for i in negative[0])
        raise InputError(
            f"{name}: layer {layer} expert {expert} is {array[layer, expert]}; loads must be >= 0 "
            f"({negative.shape[0]} negative entries)"
        )
    return array


def read_loads(path: str | Path) -> np.ndarray:
    """Read and check a layers x experts load matrix: ``.npy``, or ``.csv`` (comma separated, no header)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise InputError(f"{path}: not a readable .npy array ({err})") from None
    elif suffix == ".csv":
        array = _read_csv(path)
    else:
        raise InputError(f"{path}: expected a .npy or .csv file, got '{suffix or 'no suffix'}'")
    return check_loads(array, name=str(path))


def _read_csv(path: Path) -> np.ndarray:
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise InputError(f"{path}: empty file, expected one row of expert loads per layer")
    table = []
    for number, line in enumerate(rows, start=1):
        try:
            table.append([float(cell) for cell in line.split(",")])
        except ValueError:
            raise InputError(
                f"{path}: row {number} holds a value that is not a number: {line[:80]!r}"
            ) from None
    widths = {len(row) for row in table}
    if len(widths) != 1:
        raise InputError(
            f"{path}: rows have different lengths {sorted(widths)}; every layer needs one load per expert"
        )
    array = np.array(table, dtype=np.float64)
    # Keep whole-number CSVs integral so even splits stay exact integers.
    if np.all(np.isfinite(array)) and np.all(array == np.round(array)) and np.all(np.abs(array) < 2**53):
        return array.astype(np.int64)
    return array
