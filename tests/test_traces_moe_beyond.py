"""MoE-Beyond CSV reader, on tiny synthetic files written in the same layout as the public ones."""

import csv
import os

import numpy as np
import pytest

import moeless_jax.traces.moe_beyond as moe_beyond
from moeless_jax.errors import InputError
from moeless_jax.traces import read_moe_beyond, read_moe_beyond_file

HEADER = ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]
TOKENS = ["<｜begin▁of▁sentence｜>", "How", ",", '"', 'Ġ"a,b"', "Ċ"]


def prompt_rows(tokens=TOKENS, layers=(1, 2, 3), top_k=6, num_experts=64, seed=0):
    """Rows ordered by layer, then token, each with ``top_k`` distinct ids in unsorted order."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in layers:
        for token in tokens:
            ids = rng.choice(num_experts, size=top_k, replace=False)
            rows.append([str(layer), "0", token, "[" + ", ".join(str(i) for i in ids) + "]"])
    return rows


def write_csv(path, rows, header=HEADER):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:  # csv's default \r\n, like the originals
        writer = csv.writer(handle)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def data_dir(tmp_path):
    """A ``moe-beyond`` folder with prompts 1, 2 and 10 (different lengths) under training_data_eamc."""
    folder = tmp_path / "moe-beyond" / "training_data_eamc"
    write_csv(folder / "prompt_1_data.csv", prompt_rows(seed=1))
    write_csv(folder / "prompt_2_data.csv", prompt_rows(tokens=TOKENS[:2], seed=2))
    write_csv(folder / "prompt_10_data.csv", prompt_rows(tokens=TOKENS[:4], seed=10))
    (folder.parent / "prompt_datasets").mkdir()
    return folder.parent


def read(folder, **kwargs):
    return read_moe_beyond(folder, progress=False, cache=False, **kwargs)


def test_reads_all_prompts_in_numeric_order(data_dir):
    trace = read(data_dir)
    np.testing.assert_array_equal(trace.requests, [1, 2, 10])
    np.testing.assert_array_equal(trace.request_lengths, [6, 2, 4])
    assert (trace.num_layers, trace.top_k, trace.num_experts, trace.layer_ids) == (3, 6, 64, (1, 2, 3))
    np.testing.assert_array_equal(trace.position[:6], np.arange(6))
    np.testing.assert_array_equal(trace.token_text[:6], TOKENS)  # commas and quotes survive


def test_ids_match_the_rows_sorted(data_dir):
    trace = read(data_dir / "training_data_eamc", prompts=[1])
    rows = prompt_rows(seed=1)
    for row_index, row in enumerate(rows):
        layer, token = divmod(row_index, len(TOKENS))
        expected = sorted(int(i) for i in row[3].strip("[]").split(","))
        np.testing.assert_array_equal(trace.expert_ids[token, layer], expected)


def test_prompt_selection(data_dir):
    trace = read(data_dir, prompts=[10, 2])
    np.testing.assert_array_equal(trace.requests, [2, 10])
    with pytest.raises(InputError, match=r"no file for prompt\(s\) \[3\]"):
        read(data_dir, prompts=[1, 3])


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no prompt_<N>_data.csv files"):
        read(tmp_path)
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "missing")


def test_layer_sets_must_agree_across_files(data_dir):
    write_csv(data_dir / "training_data_eamc" / "prompt_3_data.csv", prompt_rows(layers=(1, 2)))
    with pytest.raises(InputError, match=r"prompt_3_data\.csv: layers 1\.\.2 differ from 1\.\.3"):
        read(data_dir)


def test_cache_is_used_and_invalidated(data_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = read_moe_beyond(data_dir, progress=False, cache_dir=cache)
    assert len(list(cache.glob("moe_beyond-*.npz"))) == 1

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed again despite a valid cache entry")

    monkeypatch.setattr(moe_beyond, "_parse_files", no_parse)
    second = read_moe_beyond(data_dir, progress=False, cache_dir=cache)
    np.testing.assert_array_equal(second.expert_ids, first.expert_ids)
    np.testing.assert_array_equal(second.token_text, first.token_text)
    monkeypatch.undo()

    # A changed file (new size and mtime) gets a new cache entry.
    path = data_dir / "training_data_eamc" / "prompt_2_data.csv"
    write_csv(path, prompt_rows(tokens=TOKENS[:3], seed=5))
    os.utime(path, ns=(1, 1))
    changed = read_moe_beyond(data_dir, progress=False, cache_dir=cache)
    np.testing.assert_array_equal(changed.request_lengths, [6, 3, 4])
    assert len(list(cache.glob("moe_beyond-*.npz"))) == 2


def test_damaged_cache_entry_is_rebuilt(data_dir, tmp_path):
    cache = tmp_path / "cache"
    read_moe_beyond(data_dir, progress=False, cache_dir=cache)
    (entry,) = cache.glob("*.npz")
    entry.write_bytes(b"junk")
    trace = read_moe_beyond(data_dir, progress=False, cache_dir=cache)
    assert trace.num_tokens == 12


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOELESS_JAX_CACHE_DIR", str(tmp_path / "c"))
    assert moe_beyond.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MOELESS_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert moe_beyond.default_cache_dir() == tmp_path / "x" / "moeless_jax"


# -- malformed files: the error names the file and the line ---------------------------------------------

LINE_OF_DATA_ROW = 2  # row 0 of the data is on line 2, after the header


def _broken(rows, index, column, value):
    rows = [list(row) for row in rows]
    if column is None:
        rows[index] = value
    else:
        rows[index][column] = value
    return rows


@pytest.mark.parametrize(
    ("index", "column", "value", "message"),
    [
        (4, None, ["1", "0", "x"], f"expected 4 columns '{', '.join(HEADER)}', got 3"),
        (4, None, ["1", "0", "x", "[1, 2, 3, 4, 5, 6]", "extra"], "expected 4 columns .* got 5"),
        (7, 0, "two", "Layer ID must be an integer, got 'two'"),
        (7, 1, "1", "Batch Number 1 differs from 0"),
        (5, 3, "[1, 2, 3, 4, 5, 64]", r"expert id outside 0\.\.63 in \[1, 2, 3, 4, 5, 64\]"),
        (5, 3, "[1, 2, 3, 4, 5, -1]", r"expert id outside 0\.\.63"),
        (5, 3, "[1, 2, 3, 4, 5, 5]", "expert ids must be distinct"),
        (5, 3, "[1, 2, 3, 4, 5]", "expected 6 expert ids, got 5"),
        (5, 3, "[1, 2, 3, 4, 5, 6, 7]", "expected 6 expert ids, got 7"),
        (5, 3, "1, 2, 3, 4, 5, 6", "Activated Expert IDs must be a list like"),
        (5, 3, "[1, 2, x, 4, 5, 6]", "Activated Expert IDs must be integers"),
        (5, 3, "[]", "Activated Expert IDs must be integers"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, index, column, value, message):
    rows = _broken(prompt_rows(layers=(0, 1)), index, column, value)
    path = write_csv(tmp_path / "prompt_4_data.csv", rows)
    line = index + LINE_OF_DATA_ROW
    with pytest.raises(InputError, match=rf"prompt_4_data\.csv:{line}: {message}"):
        read_moe_beyond_file(path)


def test_every_layer_must_see_the_same_tokens(tmp_path):
    row = len(TOKENS) + 5  # layer 1, position 5
    path = write_csv(tmp_path / "prompt_1_data.csv", _broken(prompt_rows(layers=(0, 1)), row, 2, "Why"))
    with pytest.raises(InputError, match=rf":{row + LINE_OF_DATA_ROW}: token 'Why' at position 5 of layer 1 "
                                         "differs from 'Ċ' in layer 0"):
        read_moe_beyond_file(path)


def test_layers_out_of_order(tmp_path):
    rows = prompt_rows(layers=(2, 1))
    path = write_csv(tmp_path / "prompt_1_data.csv", rows)
    with pytest.raises(InputError, match=rf":{len(TOKENS) + 2}: layer 1 after layer 2"):
        read_moe_beyond_file(path)


def test_unequal_token_counts_per_layer(tmp_path):
    rows = prompt_rows(layers=(1, 2))[:-1]  # layer 2 loses its last token
    path = write_csv(tmp_path / "prompt_1_data.csv", rows)
    with pytest.raises(InputError, match=rf":{len(TOKENS) + 2}: layer 2 has 5 tokens, layer 1 has 6"):
        read_moe_beyond_file(path)


def test_bad_header_and_empty_files(tmp_path):
    path = write_csv(tmp_path / "a.csv", prompt_rows(), header=["Layer", "Batch", "Token", "IDs"])
    with pytest.raises(InputError, match=r"a\.csv:1: expected the header"):
        read_moe_beyond_file(path)
    path = write_csv(tmp_path / "b.csv", [], header=None)
    with pytest.raises(InputError, match=r"b\.csv:1: empty file"):
        read_moe_beyond_file(path)
    path = write_csv(tmp_path / "c.csv", [])
    with pytest.raises(InputError, match=r"c\.csv: no data rows"):
        read_moe_beyond_file(path)


def test_line_numbers_count_multiline_quoted_tokens(tmp_path):
    rows = prompt_rows(tokens=["a", "two\nlines", "b"], layers=(1,))
    rows[2][3] = "[0, 0, 1, 2, 3, 4]"
    path = write_csv(tmp_path / "prompt_1_data.csv", rows)
    with pytest.raises(InputError, match=r"prompt_1_data\.csv:5: expert ids must be distinct"):
        read_moe_beyond_file(path)


def test_options_for_other_models(tmp_path):
    path = write_csv(tmp_path / "prompt_1_data.csv", prompt_rows(top_k=2, num_experts=8))
    layers, expert_ids, text = read_moe_beyond_file(path, num_experts=8, top_k=2)
    assert layers == (1, 2, 3) and expert_ids.shape == (len(TOKENS), 3, 2) and text.shape == (len(TOKENS),)
    with pytest.raises(InputError, match="expected 6 expert ids, got 2"):
        read_moe_beyond_file(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "prompt_1_data.csv"
    path.write_bytes(b'Layer ID,Batch Number,Token,Activated Expert IDs\r\n1,0,\xff,"[1, 2, 3, 4, 5, 6]"\r\n')
    with pytest.raises(InputError, match="not UTF-8"):
        read_moe_beyond_file(path)
