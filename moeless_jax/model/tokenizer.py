"""A byte-level BPE tokenizer: a typed wrapper around the ``tokenizers`` package.

Text is split into UTF-8 bytes (GPT-2 style byte-level pre-tokenizer and decoder), so every string
round-trips exactly: ``decode(encode(s)) == s``. Special tokens ``<pad>``, ``<bos>``, ``<eos>`` have ids 0, 1
and 2; they are never produced from input text (a literal ``"<eos>"`` in a prompt is encoded as ordinary
bytes) and :meth:`Tokenizer.decode` drops them. :func:`default_tokenizer` loads the tokenizer shipped with
the package (``assets/tokenizer.json``, see ``assets/README.md`` for what it was trained on).
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from moeless_jax.config import require
from moeless_jax.errors import InputError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2 in this order
_NUM_BYTES = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + _NUM_BYTES
_ASSET = "assets/tokenizer.json"


class Tokenizer:
    """Byte-level BPE tokenizer with ``<pad>``/``<bos>``/``<eos>`` at ids 0/1/2."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            got = backend.token_to_id(token)
            if got != expected_id:
                raise InputError(f"tokenizer: special token {token} must have id {expected_id}, got {got}")
        # Special tokens must come only from code, never from text, or decode(encode(s)) would lose them.
        backend.encode_special_tokens = True
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included; ids are ``0..vocab_size-1``."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added); encodes in parallel."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"texts[{i}]: expected str, got {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise InputError(f"texts[{i}]: not encodable as UTF-8 ({err.reason} at {err.start})") \
                    from None
        encodings = self._backend.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def encode_prompts(self, texts: Sequence[str], max_len: int | None = None) -> list[list[int]]:
        """Model prompts: BOS, then each text's ids; cut to ``max_len`` tokens (BOS included) when given."""
        prompts = [[self.bos_id, *ids] for ids in self.encode_batch(texts)]
        return prompts if max_len is None else [prompt[:max_len] for prompt in prompts]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special tokens are skipped."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            raise InputError(f"ids: token ids must lie in 0..{self._vocab_size - 1}, "
                             f"got {min(ids)}..{max(ids)}")
        return self._backend.decode(ids, skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as ``tokenizers`` JSON, atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same folder, so the rename is atomic; created by a plain open, so the file gets the umask's mode.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self._backend.save(str(tmp), pretty=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer saved by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{path.name}: not a valid tokenizer file (not UTF-8 at byte {err.start})") \
                from None
        return cls.from_json(text, source=path.name)

    @classmethod
    def from_json(cls, text: str, *, source: str = "tokenizer") -> Tokenizer:
        """Build from ``tokenizers`` JSON text; ``source`` names it in errors."""
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as err:  # the Rust side raises a bare Exception for any parse error
            raise InputError(f"{source}: not a valid tokenizer file ({str(err).splitlines()[0]})") from None
        if not isinstance(backend.model, models.BPE):
            raise InputError(f"{source}: expected a BPE model, got {type(backend.model).__name__}")
        if not isinstance(backend.decoder, decoders.ByteLevel):
            raise InputError(f"{source}: expected a ByteLevel decoder; decoding would not be exact")
        try:
            return cls(backend)
        except InputError as err:
            raise InputError(f"{source}: {err}") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with at most ``vocab_size`` ids (fewer when the text runs out of
    merges). All 256 byte symbols are in the vocabulary whatever the text, so any string can be encoded."""
    require(isinstance(vocab_size, int) and vocab_size >= MIN_VOCAB_SIZE, "vocab_size",
            f"must be an integer >= {MIN_VOCAB_SIZE} (3 special tokens + 256 bytes), got {vocab_size!r}")
    texts = list(texts)
    if not any(texts):
        raise InputError("texts: no text to train on")
    backend = tokenizers.Tokenizer(models.BPE())
    # No normalizer: any normalization (NFC, lowercasing, ...) would break exact round trips.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)


def default_tokenizer() -> Tokenizer:
    """The tokenizer shipped with the package (``moeless_jax/model/assets/tokenizer.json``)."""
    asset = importlib.resources.files("moeless_jax.model").joinpath(_ASSET)
    if not asset.is_file():
        raise FileNotFoundError(f"moeless_jax.model/{_ASSET}: the shipped tokenizer is missing from the "
                                "install")
    return Tokenizer.from_json(asset.read_text(encoding="utf-8"), source=_ASSET)
