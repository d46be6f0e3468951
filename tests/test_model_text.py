"""Text side of the language model: prompt readers, corpus split, packing, tokenizer, unigram baseline."""

import hashlib
import json
import math

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from moeless_jax.config import ConfigError
from moeless_jax.errors import InputError
from moeless_jax.model.text import (
    PUFFIN_FILE,
    is_heldout,
    load_corpus,
    pack_tokens,
    read_puffin,
    read_sharegpt,
    unigram_perplexity,
)
from moeless_jax.model.tokenizer import Tokenizer, default_tokenizer, train_tokenizer


def _write_sharegpt(path, conversations):
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"id": f"c{i}", "conversations": [{"from": who, "value": text} for who, text in turns]}
               for i, turns in enumerate(conversations)]
    path.write_text(json.dumps(entries))


def _write_puffin(path, prompts):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, prompt in enumerate(prompts, start=1):
        lines += [f">>>>>>>>>>>PROMPT_START: {n}", prompt, f">>>>>>>>>>>>PROMPT_END: {n}"]
    path.write_text("\n".join(lines) + "\n")


# --- readers -------------------------------------------------------------------------------------------


def test_read_sharegpt_takes_every_human_turn_in_order(tmp_path):
    path = tmp_path / "s.json"
    _write_sharegpt(path, [[("human", "first"), ("gpt", "answer"), ("human", "second")],
                           [("system", "be nice")], [("human", "")], [("human", "third\nline")]])
    assert read_sharegpt(path) == ["first", "second", "", "third\nline"]


def test_read_puffin_multiline_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text(
        ">>>>>>>>>>>PROMPT_START: 1\nHow do I\n\n  center text?\n>>>>>>>>>>>>PROMPT_END: 1\n"
        "\n"
        ">>>>>>>>>>>PROMPT_START: 2\n>> quoted > text\n>>>>>>>>>>>>PROMPT_END: 2\n"
        ">>>>>>>>>>>PROMPT_START: 3\n>>>>>>>>>>>>PROMPT_END: 3"
    )
    assert read_puffin(path) == ["How do I\n\n  center text?", ">> quoted > text", ""]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (">>>>>>>>>>>PROMPT_START: 1\nhello\n", r"p.txt:1: PROMPT_START 1 has no PROMPT_END"),
        (">>>>>>>>>>>PROMPT_START: 1\na\n>>>>>>>>>>>PROMPT_START: 2\nb\n>>>>>>>>>>>>PROMPT_END: 2\n",
         r"p.txt:3: PROMPT_START inside prompt 1"),
        (">>>>>>>>>>>PROMPT_START: 1\na\n>>>>>>>>>>>>PROMPT_END: 2\n", r"p.txt:3: PROMPT_END 2 but prompt 1"),
        (">>>>>>>>>>>>PROMPT_END: 1\n", r"p.txt:1: PROMPT_END 1 but no prompt is open"),
        ("stray\n>>>>>>>>>>>PROMPT_START: 1\na\n>>>>>>>>>>>>PROMPT_END: 1\n", r"p.txt:1: text outside"),
    ],
)
def test_read_puffin_errors_name_file_and_line(tmp_path, text, match):
    path = tmp_path / "p.txt"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        read_puffin(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('[{"id": "a", "conversations": [', r"bad.json:1: not valid JSON"),
        ('{"id": "a"}', r"bad.json: expected a JSON list"),
        ('[{"id": "a"}]', r"bad.json: entry 0 has no 'conversations' list"),
        ('[{"id": "a", "conversations": [{"from": "human", "value": 3}]}]', r"bad.json: entry 0 turn 0"),
    ],
)
def test_read_sharegpt_errors_name_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputError, match=match):
        read_sharegpt(path)


def test_readers_reject_invalid_utf8(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b">>>>>>>>>>>PROMPT_START: 1\n\xff\n>>>>>>>>>>>>PROMPT_END: 1\n")
    with pytest.raises(InputError, match=r"p.txt: not valid UTF-8"):
        read_puffin(path)


# --- corpus ---------------------------------------------------------------------------------------------


def test_load_corpus_reads_both_sources_dedupes_and_splits_by_hash(tmp_path):
    docs = [f"prompt number {i}: {'x' * (i % 7)}" for i in range(400)]
    blank = [[("human", " ")]]  # whitespace-only documents are dropped
    _write_sharegpt(tmp_path / "sharegpt" / "a.json", [[("human", d)] for d in docs[:150]] + blank)
    _write_sharegpt(tmp_path / "sharegpt" / "b.json", [[("human", d)] for d in docs[100:250]])
    _write_puffin(tmp_path / PUFFIN_FILE, docs[200:] + [docs[0]])
    corpus = load_corpus(tmp_path)

    assert len(corpus.train) + len(corpus.heldout) == len(docs)  # each distinct document once
    assert set(corpus.train) | set(corpus.heldout) == set(docs)
    assert not set(corpus.train) & set(corpus.heldout)
    assert set(corpus.heldout) == {d for d in docs if is_heldout(d)}
    assert list(corpus.train) == [d for d in docs if not is_heldout(d)]  # first-seen order
    assert corpus.sources == (
        {"file": "sharegpt/a.json", "sha256": _sha(tmp_path / "sharegpt/a.json"), "documents": 150},
        {"file": "sharegpt/b.json", "sha256": _sha(tmp_path / "sharegpt/b.json"), "documents": 150},
        {"file": PUFFIN_FILE, "sha256": _sha(tmp_path / PUFFIN_FILE), "documents": 201},
    )


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_split_side_depends_on_content_only(tmp_path):
    docs = [f"document {i} about topic {i * 31 % 17}" for i in range(300)]
    one, two = tmp_path / "one", tmp_path / "two"
    _write_sharegpt(one / "sharegpt" / "x.json", [[("human", d)] for d in docs[:100]])
    _write_puffin(one / PUFFIN_FILE, docs[100:])
    # other files, other order, other split of documents over files, plus repeats
    _write_sharegpt(two / "sharegpt" / "y.json", [[("human", d)] for d in reversed(docs[150:])])
    _write_sharegpt(two / "sharegpt" / "z.json", [[("human", d)] for d in docs[:160]])
    first, second = load_corpus(one), load_corpus(two)
    assert set(first.train) == set(second.train) and set(first.heldout) == set(second.heldout)
    assert load_corpus(one) == first  # and reading twice gives the same corpus


def test_heldout_share_is_about_ten_percent():
    docs = [f"synthetic prompt {i} with words {i % 13} {i % 101}" for i in range(5000)]
    share = np.mean([is_heldout(d) for d in docs])
    assert 0.09 < share < 0.11  # binomial sd is 0.004 at n = 5000


def test_load_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data folder"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"sharegpt/\*\.json.*tagged_puffin_prompts.txt.*docs/traces.md"):
        load_corpus(tmp_path / "empty")
    bad = tmp_path / "bad" / "sharegpt" / "broken.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("[{")
    with pytest.raises(InputError, match=r"broken.json:1: not valid JSON"):
        load_corpus(tmp_path / "bad")
    _write_puffin(tmp_path / "unterminated" / PUFFIN_FILE, ["fine"])
    with (tmp_path / "unterminated" / PUFFIN_FILE).open("a") as f:
        f.write(">>>>>>>>>>>PROMPT_START: 2\nnever ends\n")
    with pytest.raises(InputError, match=r"tagged_puffin_prompts.txt:4: PROMPT_START 2 has no PROMPT_END"):
        load_corpus(tmp_path / "unterminated")


# --- packing --------------------------------------------------------------------------------------------


def test_pack_tokens_windows_and_eos():
    windows = pack_tokens([[3, 4], [5], [], [6, 7, 8]], seq_len=3, eos_id=2)
    # stream: 3 4 2 5 2 2 6 7 8 2 -> two windows of 4, tail [8, 2] dropped
    np.testing.assert_array_equal(windows, np.array([[3, 4, 2, 5], [2, 2, 6, 7]], dtype=np.int32))
    assert windows.dtype == np.int32
    inputs, targets = windows[:, :-1], windows[:, 1:]
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])


def test_pack_tokens_shapes_on_larger_input():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(3, 50, size=n)) for n in rng.integers(0, 40, size=50)]
    windows = pack_tokens(docs, seq_len=16, eos_id=2)
    total = sum(len(d) + 1 for d in docs)
    assert windows.shape == (total // 17, 17)
    stream = np.concatenate([np.append(np.asarray(d, dtype=np.int64), 2) for d in docs])
    np.testing.assert_array_equal(windows.reshape(-1), stream[: windows.size])
    assert (windows == 2).sum() == (stream[: windows.size] == 2).sum()


def test_pack_tokens_errors():
    with pytest.raises(InputError, match=r"5 tokens .* too few for one window of seq_len \+ 1 = 6"):
        pack_tokens([[1, 1], [1]], seq_len=5, eos_id=2)
    with pytest.raises(InputError, match="seq_len"):
        pack_tokens([[1, 2, 3]], seq_len=0, eos_id=2)
    with pytest.raises(InputError, match="eos_id"):
        pack_tokens([[1, 2, 3]], seq_len=1, eos_id=-1)
    with pytest.raises(InputError, match=r"docs_token_ids\[1\]"):
        pack_tokens([[1, 2, 3], [4, -5]], seq_len=1, eos_id=2)


# --- unigram baseline -----------------------------------------------------------------------------------


def test_unigram_perplexity_matches_hand_computation():
    # counts [2, 1, 0], N = 3, V = 3: p = [3/6, 2/6, 1/6]; held-out 0, 2, 1
    expected = math.exp(-(math.log(3 / 6) + math.log(1 / 6) + math.log(2 / 6)) / 3)
    assert unigram_perplexity([0, 0, 1], [0, 2, 1], 3) == pytest.approx(expected, rel=1e-12)
    assert unigram_perplexity([[0], [], [0, 1]], [[0, 2], [1]], 3) == pytest.approx(expected, rel=1e-12)
    as_arrays = unigram_perplexity(np.array([[0, 0, 1]]), np.array([0, 2, 1]), 3)
    assert as_arrays == pytest.approx(expected, rel=1e-12)
    # no training tokens: uniform over the vocabulary
    assert unigram_perplexity([], [1, 2], 5) == pytest.approx(5.0, rel=1e-12)


def test_unigram_perplexity_errors():
    with pytest.raises(InputError, match=r"heldout_ids: token ids must lie in 0..2"):
        unigram_perplexity([0], [3], 3)
    with pytest.raises(InputError, match="heldout_ids: no tokens"):
        unigram_perplexity([0], [], 3)
    with pytest.raises(InputError, match="vocab_size"):
        unigram_perplexity([0], [0], 0)


# --- tokenizer ------------------------------------------------------------------------------------------

_TEXTS = ["The quick brown fox jumps over the lazy dog.", "How do I center a text element in a row?",
          "naïve café — 日本語のテキスト 🎉", "def f(x):\n    return x * 2\n"] * 5


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_tokenizer(_TEXTS, vocab_size=300)


def test_trained_tokenizer_specials_and_vocab(small_tokenizer):
    tok = small_tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 300
    ids = tok.encode("the quick brown fox")
    assert len(ids) < len("the quick brown fox")  # merges were learned
    assert min(ids) >= 3
    # literal special-token text is ordinary text, not a special id
    literal = "a <eos> b <pad><bos>"
    assert not {0, 1, 2} & set(tok.encode(literal))
    assert tok.decode(tok.encode(literal)) == literal
    assert tok.decode([tok.bos_id, *tok.encode("fox"), tok.eos_id, tok.pad_id]) == "fox"
    assert tok.encode("") == [] and tok.decode([]) == ""
    assert tok.encode_batch(["fox", "dog"]) == [tok.encode("fox"), tok.encode("dog")]


@settings(max_examples=200)
@given(st.text())
def test_round_trip_is_exact_for_any_text(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


@settings(max_examples=200)
@given(st.lists(st.text(), max_size=4))
def test_shipped_tokenizer_round_trips_batches(texts):
    tok = default_tokenizer()
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts


def test_tokenizer_input_errors(small_tokenizer):
    with pytest.raises(InputError, match=r"ids: token ids must lie in 0..\d+"):
        small_tokenizer.decode([small_tokenizer.vocab_size])
    with pytest.raises(InputError, match=r"texts\[0\]: not encodable as UTF-8"):
        small_tokenizer.encode("a\ud800b")
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(_TEXTS, vocab_size=258)
    with pytest.raises(InputError, match="no text"):
        train_tokenizer(["", ""], vocab_size=300)


def test_training_is_deterministic(small_tokenizer, tmp_path):
    again = train_tokenizer(_TEXTS, vocab_size=300)
    small_tokenizer.save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_save_load_round_trip(small_tokenizer, tmp_path):
    path = tmp_path / "sub" / "tok.json"
    small_tokenizer.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]  # no temporary file left
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == small_tokenizer.vocab_size
    assert loaded.encode_batch(_TEXTS) == small_tokenizer.encode_batch(_TEXTS)
    assert loaded.decode(loaded.encode("x <eos> y")) == "x <eos> y"


def test_load_errors(small_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json: no such tokenizer file"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "corrupt.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(InputError, match="corrupt.json: not a valid tokenizer file"):
        Tokenizer.load(tmp_path / "corrupt.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="binary.json: not a valid tokenizer file"):
        Tokenizer.load(tmp_path / "binary.json")
    swapped = tokenizers.Tokenizer(tokenizers.models.BPE())
    swapped.decoder = tokenizers.decoders.ByteLevel()
    swapped.add_special_tokens(["<bos>", "<pad>", "<eos>"])
    swapped.save(str(tmp_path / "swapped.json"))
    with pytest.raises(InputError, match="swapped.json: .*special token <pad> must have id 0, got 1"):
        Tokenizer.load(tmp_path / "swapped.json")
    wordlevel = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0}, unk_token="<pad>"))
    wordlevel.save(str(tmp_path / "wordlevel.json"))
    with pytest.raises(InputError, match="wordlevel.json: expected a BPE model"):
        Tokenizer.load(tmp_path / "wordlevel.json")


def test_shipped_tokenizer():
    tok = default_tokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.decode([i]) for i in (0, 1, 2)] == ["", "", ""]  # specials decode to nothing
    assert tok.vocab_size == 4096
    text = "How do I center a text element vertically in a row in jetpack compose?"
    ids = tok.encode(text)
    assert len(ids) < len(text) / 2.5  # trained on English prompts: several bytes per token
    assert tok.decode(ids) == text


def test_encode_prompts_puts_bos_first_and_cuts_bos_included():
    tok = default_tokenizer()
    texts = ["Explain a hash table.", "Hi"]
    assert tok.encode_prompts(texts) == [[tok.bos_id, *tok.encode(t)] for t in texts]
    cut = tok.encode_prompts(texts, 3)
    assert cut[0] == [tok.bos_id, *tok.encode(texts[0])][:3] and len(cut[0]) == 3
    assert cut[1] == [tok.bos_id, *tok.encode("Hi")][:3]
