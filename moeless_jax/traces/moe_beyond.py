"""Reader for the MoE-Beyond routing CSVs (``training_data_eamc/prompt_<N>_data.csv``).

Each file is one prompt, captured in one prefill pass with batch size 1. Its header is
``Layer ID,Batch Number,Token,Activated Expert IDs`` and it has one row per (layer, token), ordered by layer
and then by token; a token's position is its row order within the layer. ``Activated Expert IDs`` is a quoted
Python list such as ``"[8, 26, 56, 57, 60, 43]"`` whose order carries no meaning (the gate used an unsorted
top-k), so the reader stores each row sorted ascending. Token strings may hold commas and quotes; the csv
module undoes the quoting.

Parsing is vectorized per file (about 1.3 M rows in a few seconds); only when a file is malformed is it
re-read row by row to name the offending line. The parsed trace is cached as a native ``.npz`` keyed by the
files' names, sizes and modification times, so a second read takes well under two seconds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.traces.native import load_trace, save_trace
from moeless_jax.traces.routing import RoutingTrace

HEADER = ("Layer ID", "Batch Number", "Token", "Activated Expert IDs")
_HEADER_TEXT = ", ".join(HEADER)
_FILE_PATTERN = re.compile(r"prompt_(\d+)_data\.csv")
_SUBFOLDER = "training_data_eamc"
# Bump when parsing changes what a file turns into, so stale cache entries are not reused.
_PARSER_VERSION = 1


class _RowDefect(Exception):
    """A defect found at data row ``row`` (0-based, blank rows skipped); turned into a file:line error."""

    def __init__(self, row: int, message: str):
        super().__init__(message)
        self.row = row
        self.message = message


def read_moe_beyond(
    directory: str | Path,
    *,
    prompts: Iterable[int] | None = None,
    num_experts: int = 64,
    top_k: int = 6,
    progress: bool = True,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> RoutingTrace:
    """Read MoE-Beyond routing CSVs into one :class:`RoutingTrace`.

    ``directory`` is the ``moe-beyond`` folder or its ``training_data_eamc`` subfolder. ``prompts`` selects
    prompt numbers (default: every ``prompt_<N>_data.csv`` found); prompts are read in increasing N and
    prompt N becomes request id N. Every row must list ``top_k`` distinct ids in ``0..num_experts-1``. With
    ``cache`` the parsed trace is stored under ``cache_dir`` (default :func:`default_cache_dir`) and reused
    while the files' names, sizes and modification times are unchanged.
    """
    files = _select_files(_resolve_folder(Path(directory)), prompts)
    cache_path = None
    if cache:
        key = _cache_key(files, num_experts, top_k)
        cache_path = Path(cache_dir or default_cache_dir()) / f"moe_beyond-{key}.npz"
        if cache_path.is_file():
            try:
                return load_trace(cache_path)
            except InputError:
                pass  # a damaged cache entry is rebuilt below
    trace = _parse_files(files, num_experts=num_experts, top_k=top_k, progress=progress)
    if cache_path is not None:
        try:
            save_trace(trace, cache_path)
        except OSError as err:  # an unwritable cache must not stop the read
            warnings.warn(f"could not cache the parsed trace at {cache_path}: {err}", stacklevel=2)
    return trace


def default_cache_dir() -> Path:
    """``$MOELESS_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/moeless_jax``, else ``~/.cache/moeless_jax``."""
    if os.environ.get("MOELESS_JAX_CACHE_DIR"):
        return Path(os.environ["MOELESS_JAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moeless_jax"


def read_moe_beyond_file(path: str | Path, *, num_experts: int = 64, top_k: int = 6):
    """Parse one prompt CSV into ``(layer_ids, expert_ids [T, L, K] int16 sorted per row, tokens [T])``."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row]  # blank lines carry nothing
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err})") from None
    except csv.Error as err:
        raise InputError(f"{path}: malformed CSV ({err})") from None
    if not rows:
        raise InputError(f"{path}:1: empty file, expected the header '{_HEADER_TEXT}'")
    if tuple(cell.strip() for cell in rows[0]) != HEADER:
        raise InputError(f"{path}:1: expected the header '{_HEADER_TEXT}', got {', '.join(rows[0])!r}")
    data = rows[1:]
    if not data:
        raise InputError(f"{path}: no data rows after the header")
    try:
        return _parse_rows(data, num_experts=num_experts, top_k=top_k)
    except _RowDefect as defect:
        raise InputError(f"{path}:{_line_of_row(path, defect.row + 1)}: {defect.message}") from None


# -- files ----------------------------------------------------------------------------------------------


def _resolve_folder(directory: Path) -> Path:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    if (directory / _SUBFOLDER).is_dir():
        return directory / _SUBFOLDER
    return directory


def _select_files(folder: Path, prompts: Iterable[int] | None) -> list[tuple[int, Path]]:
    """``[(prompt number, path)]`` in increasing prompt number."""
    found = {}
    for entry in folder.iterdir():
        match = _FILE_PATTERN.fullmatch(entry.name)
        if match and entry.is_file():
            found[int(match.group(1))] = entry
    if not found:
        raise InputError(
            f"{folder}: no prompt_<N>_data.csv files (expected the moe-beyond folder or {_SUBFOLDER})"
        )
    if prompts is None:
        return sorted(found.items())
    wanted = sorted({int(number) for number in prompts})
    missing = [number for number in wanted if number not in found]
    if missing:
        more = " ..." if len(missing) > 10 else ""
        raise InputError(f"{folder}: no file for prompt(s) {missing[:10]}{more}")
    if not wanted:
        raise InputError(f"{folder}: the prompt selection is empty")
    return [(number, found[number]) for number in wanted]


def _cache_key(files: Sequence[tuple[int, Path]], num_experts: int, top_k: int) -> str:
    entries = []
    for number, path in files:
        stat = path.stat()
        entries.append([number, path.name, stat.st_size, stat.st_mtime_ns])
    blob = json.dumps(
        {"parser": _PARSER_VERSION, "folder": str(files[0][1].parent.resolve()), "num_experts": num_experts,
         "top_k": top_k, "files": entries}
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _parse_files(files, *, num_experts: int, top_k: int, progress: bool) -> RoutingTrace:
    from tqdm.auto import tqdm  # imported here: only the cold path shows a bar

    per_prompt_ids, per_prompt_text, request_ids, positions = [], [], [], []
    layer_ids = None
    for number, path in tqdm(files, desc="MoE-Beyond CSVs", unit="file", disable=not progress):
        file_layers, expert_ids, token_text = read_moe_beyond_file(path, num_experts=num_experts, top_k=top_k)
        if layer_ids is None:
            layer_ids, first_path = file_layers, path
        elif file_layers != layer_ids:
            raise InputError(
                f"{path}: layers {_span(file_layers)} differ from {_span(layer_ids)} in {first_path.name}"
            )
        per_prompt_ids.append(expert_ids)
        per_prompt_text.append(token_text)
        request_ids.append(np.full(expert_ids.shape[0], number, np.int32))
        positions.append(np.arange(expert_ids.shape[0], dtype=np.int32))
    return RoutingTrace(
        expert_ids=np.concatenate(per_prompt_ids),
        request_id=np.concatenate(request_ids),
        position=np.concatenate(positions),
        num_experts=num_experts,
        layer_ids=layer_ids,
        token_text=np.concatenate(per_prompt_text),
    )


def _span(layers: tuple[int, ...]) -> str:
    if layers == tuple(range(layers[0], layers[0] + len(layers))):
        return f"{layers[0]}..{layers[-1]}"
    return str(list(layers))


def _line_of_row(path: Path, row: int) -> int:
    """The 1-based line where non-blank CSV row ``row`` (0 = header) starts; quoted fields may span lines."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        seen = -1
        start = 1
        for record in reader:
            if record:
                seen += 1
                if seen == row:
                    return start
            start = reader.line_num + 1
    return start


# -- rows -----------------------------------------------------------------------------------------------


def _parse_rows(rows: list[list[str]], *, num_experts: int, top_k: int):
    """Vectorized parse of the data rows; raises :class:`_RowDefect` at the first bad row."""
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
    if (lengths != 4).any():
        row = int(np.argmax(lengths != 4))
        raise _RowDefect(row, f"expected 4 columns '{_HEADER_TEXT}', got {lengths[row]}")
    layer_col, batch_col, token_col, ids_col = zip(*rows, strict=True)
    layer = _int_column(layer_col, "Layer ID")  # [rows]
    batch = _int_column(batch_col, "Batch Number")
    if (batch != batch[0]).any():
        row = int(np.argmax(batch != batch[0]))
        raise _RowDefect(row, f"Batch Number {batch[row]} differs from {batch[0]} on the first row; "
                              "one batch per file is supported")
    ids = _id_column(ids_col, num_experts=num_experts, top_k=top_k)  # [rows, K]
    layer_ids, num_tokens = _layer_blocks(layer)
    tokens = _check_tokens(token_col, layer_ids, num_tokens)  # [T]
    # Rows are layer-major: [L, T, K] -> [T, L, K].
    expert_ids = np.sort(ids, axis=1).reshape(len(layer_ids), num_tokens, top_k).transpose(1, 0, 2)
    return layer_ids, np.ascontiguousarray(expert_ids, dtype=np.int16), tokens


def _check_tokens(column: Sequence[str], layer_ids: tuple[int, ...], num_tokens: int) -> np.ndarray:
    """Every layer must list the same token sequence; returns it as a ``[T]`` str array."""
    first = column[:num_tokens]
    for block in range(1, len(layer_ids)):
        tokens = column[block * num_tokens : (block + 1) * num_tokens]
        if tokens != first:  # tuple comparison runs in C; find the position only on failure
            position = next(i for i, (a, b) in enumerate(zip(tokens, first, strict=True)) if a != b)
            raise _RowDefect(
                block * num_tokens + position,
                f"token {tokens[position]!r} at position {position} of layer {layer_ids[block]} "
                f"differs from {first[position]!r} in layer {layer_ids[0]}",
            )
    return np.array(first, dtype=np.str_)


def _parse_ints(text: str) -> np.ndarray | None:
    """Comma-separated integers parsed in C; ``None`` if the text does not parse to its end."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns (instead of raising) when text stops parsing
        try:
            return np.fromstring(text, dtype=np.int64, sep=",")
        except (ValueError, DeprecationWarning):
            return None


def _int_column(column: Sequence[str], name: str) -> np.ndarray:
    """``[rows]`` int64; a field that is not one integer raises :class:`_RowDefect` naming its row."""
    values = _parse_ints(",".join(column))
    if values is not None and values.size == len(column):
        return values
    for row, text in enumerate(column):
        try:
            int(text)
        except ValueError:
            raise _RowDefect(row, f"{name} must be an integer, got {text!r}") from None
    return np.array([int(text) for text in column], np.int64)


def _id_column(column: Sequence[str], *, num_experts: int, top_k: int) -> np.ndarray:
    """``[rows, K]`` int64 from strings like ``"[8, 26, 56, 57, 60, 43]"``."""
    ids = _fast_ids(column, top_k)
    if ids is None:
        ids = np.array([_row_ids(text, row, top_k) for row, text in enumerate(column)], np.int64)
    bad = (ids < 0) | (ids >= num_experts)
    if bad.any():
        row = int(np.argmax(bad.any(axis=1)))
        raise _RowDefect(row, f"expert id outside 0..{num_experts - 1} in {column[row]}")
    repeats = (np.diff(np.sort(ids, axis=1), axis=1) == 0).any(axis=1)
    if repeats.any():
        row = int(np.argmax(repeats))
        raise _RowDefect(row, f"expert ids must be distinct, got {column[row]}")
    return ids


def _fast_ids(column: Sequence[str], top_k: int) -> np.ndarray | None:
    """All rows in one C parse; ``None`` when anything looks off, so the row-by-row path names the defect."""
    if not all(text[:1] == "[" and text[-1:] == "]" for text in column):
        return None
    # A -1 after each row marks where rows end: valid ids are >= 0, so a row with too many or too few ids
    # shifts the markers out of the last column.
    text = ",-1,".join(column)
    if text.count("[") != len(column) or text.count("]") != len(column):
        return None
    flat = _parse_ints(text.replace("[", "").replace("]", ""))
    if flat is None or flat.size != len(column) * (top_k + 1) - 1:
        return None
    table = np.append(flat, -1).reshape(len(column), top_k + 1)
    if (table[:, top_k] != -1).any() or (table[:, :top_k] < 0).any():
        return None
    return table[:, :top_k]


def _row_ids(text: str, row: int, top_k: int) -> list[int]:
    inner = text.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        raise _RowDefect(row, f"Activated Expert IDs must be a list like '[1, 2, 3]', got {text!r}")
    parts = [part.strip() for part in inner[1:-1].split(",")]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise _RowDefect(row, f"Activated Expert IDs must be integers, got {text!r}") from None
    if len(values) != top_k:
        raise _RowDefect(row, f"expected {top_k} expert ids, got {len(values)} in {text!r}")
    return values


def _layer_blocks(layer: np.ndarray) -> tuple[tuple[int, ...], int]:
    """Check rows come in equal, increasing layer blocks; return ``(layer ids, tokens per layer)``."""
    back = np.diff(layer) < 0
    if back.any():
        row = int(np.argmax(back)) + 1
        raise _RowDefect(row, f"layer {layer[row]} after layer {layer[row - 1]}: rows must go by layer")
    starts = np.concatenate(([0], np.flatnonzero(np.diff(layer)) + 1))
    counts = np.diff(np.concatenate((starts, [layer.size])))
    uneven = counts != counts[0]
    if uneven.any():
        block = int(np.argmax(uneven))
        raise _RowDefect(
            int(starts[block]),
            f"layer {layer[starts[block]]} has {counts[block]} tokens, layer {layer[0]} has {counts[0]}: "
            "every layer needs the same tokens",
        )
    return tuple(int(v) for v in layer[starts]), int(counts[0])
