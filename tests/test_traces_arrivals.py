"""Arrival-trace readers (Azure CSV, Mooncake JSONL) on tiny synthetic files."""

import json

import numpy as np
import pytest

from moeless_jax.errors import InputError
from moeless_jax.traces import ArrivalTrace, read_azure_arrivals, read_mooncake_arrivals

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,879,55
2023-11-16 18:15:51.2224670,10,0
"""


def test_azure_reader(tmp_path):
    path = tmp_path / "conv.csv"
    path.write_text(AZURE)
    trace = read_azure_arrivals(path)
    np.testing.assert_allclose(trace.arrival_s, [0.0, 4.314579, 4.541877, 4.541877], atol=1e-9)
    np.testing.assert_array_equal(trace.input_tokens, [374, 396, 879, 10])
    np.testing.assert_array_equal(trace.output_tokens, [44, 109, 55, 0])
    assert trace.num_requests == 4 and trace.source == "azure:conv.csv"
    assert trace.duration_s == pytest.approx(4.541877)


def test_azure_rows_out_of_order_are_sorted(tmp_path):
    lines = AZURE.splitlines()
    path = tmp_path / "t.csv"
    path.write_text("\n".join([lines[0], lines[2], lines[1], lines[3]]) + "\n")
    trace = read_azure_arrivals(path)
    assert trace.arrival_s[0] == 0.0 and (np.diff(trace.arrival_s) >= 0).all()
    np.testing.assert_array_equal(trace.input_tokens[:2], [374, 396])


@pytest.mark.parametrize(
    ("line", "bad", "message"),
    [
        (3, "2023-11-16 18:15:50.9951690,396", "expected 3 columns 'TIMESTAMP,Context.*', got 2"),
        (3, "yesterday,396,109", "TIMESTAMP must look like 'YYYY-MM-DD HH:MM:SS.fffffff', got 'yesterday'"),
        (3, "NaT,396,109", "TIMESTAMP must look like"),
        (4, "2023-11-16 18:15:51.2224670,8x9,55", "ContextTokens must be a non-negative integer, got '8x9'"),
        (4, "2023-11-16 18:15:51.2224670,879,-5", "GeneratedTokens must be a non-negative integer, got '-5'"),
    ],
)
def test_azure_malformed_names_file_and_line(tmp_path, line, bad, message):
    lines = AZURE.splitlines()
    lines[line - 1] = bad
    path = tmp_path / "conv.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"conv\.csv:{line}: {message}"):
        read_azure_arrivals(path)


def test_azure_header_and_empty(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("time,in,out\n2023-11-16 18:15:46.68,1,2\n")
    with pytest.raises(InputError, match=r"a\.csv:1: expected the header"):
        read_azure_arrivals(path)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(InputError, match="no requests"):
        read_azure_arrivals(path)
    with pytest.raises(FileNotFoundError):
        read_azure_arrivals(tmp_path / "missing.csv")


def _mooncake(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_mooncake_reader(tmp_path):
    path = _mooncake(tmp_path / "conv.jsonl", [
        {"timestamp": 1000, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1]},
        {"timestamp": 1000, "input_length": 7322, "output_length": 490, "hash_ids": [0, 2]},
        {"timestamp": 4500, "input_length": 10, "output_length": 1, "hash_ids": []},
    ])
    trace = read_mooncake_arrivals(path)
    np.testing.assert_allclose(trace.arrival_s, [0.0, 0.0, 3.5])
    np.testing.assert_array_equal(trace.input_tokens, [6758, 7322, 10])
    np.testing.assert_array_equal(trace.output_tokens, [500, 490, 1])
    assert trace.source == "mooncake:conv.jsonl"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ('{"timestamp": 5, "input_length": 1,', "not valid JSON"),
        ("[1, 2, 3]", "expected a JSON object, got list"),
        ({"input_length": 1, "output_length": 1}, "'timestamp' must be a non-negative integer, missing"),
        ({"timestamp": 5, "input_length": -1, "output_length": 1}, "'input_length' must be .* got -1"),
        ({"timestamp": 5, "input_length": 1, "output_length": 1.5}, "'output_length' must be .* got 1.5"),
        ({"timestamp": True, "input_length": 1, "output_length": 1}, "'timestamp' must be .* got True"),
        ({"timestamp": 5, "input_length": 1, "output_length": 1, "hash_ids": "ab"}, "'hash_ids' must be"),
    ],
)
def test_mooncake_malformed_names_file_and_line(tmp_path, record, message):
    good = {"timestamp": 0, "input_length": 3, "output_length": 4, "hash_ids": [0]}
    path = _mooncake(tmp_path / "t.jsonl", [good, "", record])  # the blank line still counts as line 2
    with pytest.raises(InputError, match=rf"t\.jsonl:3: {message}"):
        read_mooncake_arrivals(path)


def test_mooncake_empty(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no requests"):
        read_mooncake_arrivals(tmp_path / "e.jsonl")


def test_arrival_trace_validates_itself():
    with pytest.raises(InputError, match="sorted"):
        ArrivalTrace(np.array([1.0, 0.5]), np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(InputError, match="input_tokens"):
        ArrivalTrace(np.array([0.0, 0.5]), np.array([1]), np.array([1, 1]))
    with pytest.raises(InputError, match=">= 0"):
        ArrivalTrace(np.array([0.0, 0.5]), np.array([1, -1]), np.array([1, 1]))
    trace = ArrivalTrace(np.array([0.0, 0.5, 2.0]), np.array([1, 2, 3]), np.array([4, 5, 6]), "x")
    assert trace.head(2).num_requests == 2
