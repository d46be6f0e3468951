"""Request arrival traces: when requests arrive and how long they are.

Two public formats are read:

- Azure LLM inference trace 2023 (CSV): ``TIMESTAMP,ContextTokens,GeneratedTokens`` with wall-clock
  timestamps ``YYYY-MM-DD HH:MM:SS.fffffff``.
- Mooncake / Kimi FAST'25 traces (JSONL): ``{"timestamp": ms, "input_length": n, "output_length": n,
  "hash_ids": [...]}`` per line; ``hash_ids`` (prefix-block hashes) are checked but not kept.

Both become an :class:`ArrivalTrace` with times in seconds from the first arrival, sorted (ties keep file
order). Malformed files raise :class:`InputError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeless_jax.errors import InputError

AZURE_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True, eq=False)
class ArrivalTrace:
    """``R`` requests: ``arrival_s`` ``[R]`` float64 seconds (sorted, from the first arrival for readers'
    output), ``input_tokens`` / ``output_tokens`` ``[R]`` int64 prompt and generated lengths, and ``source``,
    a short description of where the trace came from."""

    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        arrival = np.asarray(self.arrival_s, dtype=np.float64)
        if arrival.ndim != 1:
            raise InputError(f"ArrivalTrace.arrival_s: expected shape [R], got {arrival.shape}")
        if not np.isfinite(arrival).all() or (arrival < 0).any():
            raise InputError("ArrivalTrace.arrival_s: times must be finite and >= 0")
        if (np.diff(arrival) < 0).any():
            raise InputError("ArrivalTrace.arrival_s: times must be sorted")
        object.__setattr__(self, "arrival_s", arrival)
        for name in ("input_tokens", "output_tokens"):
            tokens = np.asarray(getattr(self, name))
            if tokens.size == 0:
                tokens = tokens.astype(np.int64)
            if tokens.dtype.kind not in "iu" or tokens.shape != arrival.shape:
                raise InputError(
                    f"ArrivalTrace.{name}: expected int [{arrival.size}], got {tokens.dtype} {tokens.shape}"
                )
            if (tokens < 0).any():
                raise InputError(f"ArrivalTrace.{name}: token counts must be >= 0")
            object.__setattr__(self, name, tokens.astype(np.int64))
        object.__setattr__(self, "source", str(self.source))

    @property
    def num_requests(self) -> int:
        return int(self.arrival_s.size)

    @property
    def duration_s(self) -> float:
        """Seconds from the first to the last arrival (0 for fewer than two requests)."""
        return float(self.arrival_s[-1] - self.arrival_s[0]) if self.arrival_s.size > 1 else 0.0

    def head(self, num_requests: int) -> ArrivalTrace:
        """The first ``num_requests`` arrivals."""
        return ArrivalTrace(self.arrival_s[:num_requests], self.input_tokens[:num_requests],
                            self.output_tokens[:num_requests], self.source)


def read_azure_arrivals(path: str | Path) -> ArrivalTrace:
    """Read an Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``)."""
    path = Path(path)
    rows, lines = _csv_rows(path)
    if not rows:
        raise InputError(f"{path}:1: empty file, expected the header '{','.join(AZURE_HEADER)}'")
    if tuple(cell.strip() for cell in rows[0]) != AZURE_HEADER:
        expected = ",".join(AZURE_HEADER)
        raise InputError(f"{path}:{lines[0]}: expected the header '{expected}', got {','.join(rows[0])!r}")
    data, lines = rows[1:], lines[1:]
    if not data:
        raise InputError(f"{path}: no requests after the header")
    for row, line in zip(data, lines, strict=True):
        if len(row) != 3:
            raise InputError(f"{path}:{line}: expected 3 columns '{','.join(AZURE_HEADER)}', got {len(row)}")
    stamps, context, generated = (list(column) for column in zip(*data, strict=True))
    time_ns = _timestamps_ns(stamps, path, lines)
    input_tokens = _counts(context, "ContextTokens", path, lines)
    output_tokens = _counts(generated, "GeneratedTokens", path, lines)
    return _sorted_trace(time_ns, input_tokens, output_tokens, f"azure:{path.name}")


def read_mooncake_arrivals(path: str | Path) -> ArrivalTrace:
    """Read a Mooncake JSONL trace (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    time_ms, input_tokens, output_tokens = [], [], []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            for key, into in (("timestamp", time_ms), ("input_length", input_tokens),
                              ("output_length", output_tokens)):
                value = record.get(key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    what = "missing" if key not in record else f"got {value!r}"
                    raise InputError(f"{path}:{line_number}: '{key}' must be a non-negative integer, {what}")
                into.append(value)
            hashes = record.get("hash_ids", [])
            if not isinstance(hashes, list) or not all(type(h) is int for h in hashes):  # bool is no hash
                raise InputError(f"{path}:{line_number}: 'hash_ids' must be a list of integers")
    if not time_ms:
        raise InputError(f"{path}: no requests in the file")
    time_ns = np.array(time_ms, np.int64) * 1_000_000
    return _sorted_trace(time_ns, np.array(input_tokens, np.int64), np.array(output_tokens, np.int64),
                         f"mooncake:{path.name}")


def _sorted_trace(time_ns: np.ndarray, input_tokens, output_tokens, source: str) -> ArrivalTrace:
    order = np.argsort(time_ns, kind="stable")  # the public traces are sorted already; ties keep file order
    time_ns = time_ns[order]
    return ArrivalTrace((time_ns - time_ns[0]) / 1e9, input_tokens[order], output_tokens[order], source)


def _csv_rows(path: Path) -> tuple[list[list[str]], list[int]]:
    """Non-blank CSV rows and the line each starts on."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows, lines = [], []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            start = 1
            for row in reader:
                if row:
                    rows.append(row)
                    lines.append(start)
                start = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err})") from None
    except csv.Error as err:
        raise InputError(f"{path}: malformed CSV ({err})") from None
    return rows, lines


def _timestamps_ns(stamps: list[str], path: Path, lines: list[int]) -> np.ndarray:
    """``[R]`` int64 nanoseconds since the epoch from ``YYYY-MM-DD HH:MM:SS[.fffffff]`` strings."""
    try:
        times = np.array([stamp.strip() for stamp in stamps], dtype="datetime64[ns]")
        if not np.isnat(times).any():
            return times.astype(np.int64)
    except ValueError:
        pass
    for stamp, line in zip(stamps, lines, strict=True):
        try:
            bad = np.isnat(np.datetime64(stamp.strip(), "ns"))
        except ValueError:
            bad = True
        if bad:
            raise InputError(
                f"{path}:{line}: TIMESTAMP must look like 'YYYY-MM-DD HH:MM:SS.fffffff', got {stamp!r}"
            )
    raise AssertionError("unreachable: a bad timestamp was not found")


def _counts(column: list[str], name: str, path: Path, lines: list[int]) -> np.ndarray:
    """``[R]`` int64 non-negative token counts."""
    try:
        counts = np.array([text.strip() for text in column]).astype(np.int64)
        if (counts >= 0).all():
            return counts
    except ValueError:
        pass
    for text, line in zip(column, lines, strict=True):
        try:
            ok = int(text) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise InputError(f"{path}:{line}: {name} must be a non-negative integer, got {text!r}")
    raise AssertionError("unreachable: a bad count was not found")
