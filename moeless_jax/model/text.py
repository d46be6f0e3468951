"""Real chat text for training and evaluating the small MoE language model.

Two public prompt collections are read (docs/traces.md says where they come from):

- ShareGPT prompts: a JSON list of ``{"id": str, "conversations": [{"from": str, "value": str}, ...]}``;
  the ``"human"`` turns are the documents.
- Puffin prompts (``moe-beyond/prompt_datasets/tagged_puffin_prompts.txt``): each prompt sits between a line
  ``>>>>>>>>>>>PROMPT_START: <N>`` (11 ``>``) and a line ``>>>>>>>>>>>>PROMPT_END: <N>`` (12 ``>``).

:func:`load_corpus` turns a data folder into a deduplicated :class:`Corpus` with a held-out split decided by
each document's content hash alone, so a document never changes side when files are added or reordered.
:func:`pack_tokens` cuts tokenized documents into fixed-length training windows and
:func:`unigram_perplexity` is the baseline a trained model must beat. Malformed files raise
:class:`InputError` naming the file (and line, where there is one).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeless_jax.errors import InputError

HELDOUT_FRACTION = 0.1
SHAREGPT_GLOB = "sharegpt/*.json"
PUFFIN_FILE = "moe-beyond/prompt_datasets/tagged_puffin_prompts.txt"

_INT32_MAX = int(np.iinfo(np.int32).max)
_PROMPT_START = re.compile(r">{11}PROMPT_START: (\d+)")
_PROMPT_END = re.compile(r">{12}PROMPT_END: (\d+)")


@dataclass(frozen=True)
class Corpus:
    """Deduplicated documents split into ``train`` and ``heldout`` (disjoint; each keeps first-seen order),
    and ``sources``: one ``{"file", "sha256", "documents"}`` dict per file read, ``file`` relative to the
    data folder and ``documents`` the non-empty documents it held before deduplication."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    sources: tuple[dict, ...]

    def __post_init__(self) -> None:
        for name in ("train", "heldout", "sources"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if set(self.train) & set(self.heldout):
            raise InputError("Corpus: a document is in both train and heldout")


def is_heldout(text: str) -> bool:
    """Whether ``text`` belongs to the held-out split: the first 8 bytes of its UTF-8 SHA-256, read as an
    integer, fall in the lowest ``HELDOUT_FRACTION`` of their range. Depends on the text only."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < HELDOUT_FRACTION * 2**64


def read_sharegpt(path: str | Path) -> list[str]:
    """The ``"human"`` turns of a ShareGPT JSON file, in file order (empty turns included)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise InputError(f"{path.name}: expected a JSON list of conversations, got {type(data).__name__}")
    texts = []
    for i, entry in enumerate(data):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            raise InputError(f"{path.name}: entry {i} has no 'conversations' list")
        for j, turn in enumerate(turns):
            if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
                    and isinstance(turn.get("value"), str)):
                raise InputError(f"{path.name}: entry {i} turn {j} must be an object with string 'from' and "
                                 "'value'")
            if turn["from"] == "human":
                texts.append(turn["value"])
    return texts


def read_puffin(path: str | Path) -> list[str]:
    """The prompts of a tagged Puffin prompts file, in file order; a prompt's lines are joined with ``\\n``.

    Blank lines between prompts are allowed; any other text outside a prompt, a nested or unterminated
    ``PROMPT_START`` and a ``PROMPT_END`` that does not close the open prompt are errors."""
    path = Path(path)
    lines = _read_text(path).split("\n")
    texts: list[str] = []
    open_number: str | None = None
    open_line = 0
    body: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        start, end = _PROMPT_START.fullmatch(line), _PROMPT_END.fullmatch(line)
        if start:
            if open_number is not None:
                raise InputError(f"{path.name}:{lineno}: PROMPT_START inside prompt {open_number} "
                                 f"(opened on line {open_line}, never ended)")
            open_number, open_line, body = start.group(1), lineno, []
        elif end:
            if open_number != end.group(1):
                expected = "no prompt is open" if open_number is None else f"prompt {open_number} is open"
                raise InputError(f"{path.name}:{lineno}: PROMPT_END {end.group(1)} but {expected}")
            texts.append("\n".join(body))
            open_number = None
        elif open_number is not None:
            body.append(line)
        elif line.strip():
            raise InputError(f"{path.name}:{lineno}: text outside PROMPT_START/PROMPT_END: {line[:40]!r}")
    if open_number is not None:
        raise InputError(f"{path.name}:{open_line}: PROMPT_START {open_number} has no PROMPT_END")
    return texts


def load_corpus(data_dir: str | Path) -> Corpus:
    """Read every known prompt file under ``data_dir`` (``sharegpt/*.json`` and the Puffin prompts file),
    drop empty and repeated documents, and split by :func:`is_heldout`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such data folder")
    files = [(p, read_sharegpt) for p in sorted(data_dir.glob(SHAREGPT_GLOB)) if p.is_file()]
    if (data_dir / PUFFIN_FILE).is_file():
        files.append((data_dir / PUFFIN_FILE, read_puffin))
    if not files:
        raise InputError(f"{data_dir}: no prompt files found; expected {SHAREGPT_GLOB} and/or {PUFFIN_FILE} "
                         "(the data comes from the public repositories listed in docs/traces.md)")
    seen: set[str] = set()
    train: list[str] = []
    heldout: list[str] = []
    sources = []
    for path, reader in files:
        docs = [doc for doc in reader(path) if doc.strip()]
        sources.append({"file": path.relative_to(data_dir).as_posix(), "sha256": _sha256(path),
                        "documents": len(docs)})
        for doc in docs:
            if doc not in seen:
                seen.add(doc)
                (heldout if is_heldout(doc) else train).append(doc)
    return Corpus(tuple(train), tuple(heldout), tuple(sources))


def pack_tokens(docs_token_ids: list[list[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Training windows ``[N, seq_len + 1]`` int32 from tokenized documents.

    The documents are concatenated in order, each followed by ``eos_id``, and the stream is cut into
    ``N = len // (seq_len + 1)`` consecutive windows; the ragged tail is dropped. A model reads
    ``windows[:, :-1]`` and predicts ``windows[:, 1:]``."""
    if not (_is_int(seq_len) and seq_len >= 1):
        raise InputError(f"seq_len: must be an integer >= 1, got {seq_len!r}")
    if not (_is_int(eos_id) and 0 <= eos_id <= _INT32_MAX):
        raise InputError(f"eos_id: must be a non-negative int32, got {eos_id!r}")
    pieces = []
    for i, ids in enumerate(docs_token_ids):
        arr = np.asarray(ids).reshape(-1)
        if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > _INT32_MAX):
            raise InputError(f"docs_token_ids[{i}]: token ids must be integers in 0..2**31-1")
        pieces += [arr.astype(np.int64), np.array([eos_id], dtype=np.int64)]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    window = seq_len + 1
    count = stream.size // window
    if count == 0:
        raise InputError(f"docs_token_ids: {stream.size} tokens (eos included) is too few for one window of "
                         f"seq_len + 1 = {window}")
    return stream[: count * window].reshape(count, window).astype(np.int32)


def unigram_perplexity(train_ids: Sequence[int] | np.ndarray | Sequence[Sequence[int]],
                       heldout_ids: Sequence[int] | np.ndarray | Sequence[Sequence[int]],
                       vocab_size: int) -> float:
    """Perplexity on ``heldout_ids`` of the add-one smoothed unigram model fitted on ``train_ids``:
    ``p(v) = (count_train(v) + 1) / (N_train + vocab_size)``, ``exp(-mean log p(heldout token))``.

    Either argument is a flat id sequence, an array of any shape, or a list of per-document id lists."""
    if not (_is_int(vocab_size) and vocab_size >= 1):
        raise InputError(f"vocab_size: must be an integer >= 1, got {vocab_size!r}")
    train = _flat_ids(train_ids, "train_ids", vocab_size)
    heldout = _flat_ids(heldout_ids, "heldout_ids", vocab_size)
    if heldout.size == 0:
        raise InputError("heldout_ids: no tokens to evaluate on")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    log_p = np.log(counts + 1.0) - math.log(train.size + vocab_size)
    return float(np.exp(-log_p[heldout].mean()))


def _flat_ids(ids, name: str, vocab_size: int) -> np.ndarray:
    """``ids`` as a flat int64 array ``[N]``, checked to lie in ``0..vocab_size-1``."""
    if isinstance(ids, np.ndarray) or not len(ids) or np.isscalar(ids[0]):
        pieces = [np.asarray(ids).reshape(-1)]
    else:
        pieces = [np.asarray(doc).reshape(-1) for doc in ids]
    pieces = [piece for piece in pieces if piece.size]  # an empty list reads as float64; it holds no ids
    if not pieces:
        return np.zeros(0, dtype=np.int64)
    flat = np.concatenate(pieces)
    if flat.dtype.kind not in "iu":
        raise InputError(f"{name}: token ids must be integers, got {flat.dtype}")
    if flat.min() < 0 or flat.max() >= vocab_size:
        raise InputError(f"{name}: token ids must lie in 0..{vocab_size - 1}, got {flat.min()}..{flat.max()}")
    return flat.astype(np.int64)


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path.name}: not valid UTF-8 (byte {err.start})") from None


def _read_json(path: Path):
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path.name}:{err.lineno}: not valid JSON ({err.msg})") from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
