"""The native .npz routing-trace format: exact round trips and clear errors."""

import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeless_jax.errors import InputError
from moeless_jax.traces import FORMAT_VERSION, RoutingTrace, load_trace, save_trace, synthetic_trace


def assert_same(a: RoutingTrace, b: RoutingTrace) -> None:
    assert a.num_experts == b.num_experts and a.layer_ids == b.layer_ids
    for name in ("expert_ids", "request_id", "position", "gate_weights", "hidden", "token_text"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype, name
            np.testing.assert_array_equal(x, y, err_msg=name)


@given(
    num_requests=st.integers(0, 5),
    top_k=st.integers(1, 4),
    hidden_size=st.sampled_from([0, 3]),
    gate_weights=st.booleans(),
    with_text=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact(tmp_path_factory, num_requests, top_k, hidden_size, gate_weights, with_text,
                             seed):
    trace = synthetic_trace(num_requests=num_requests, mean_tokens=4, num_experts=6, top_k=top_k,
                            hidden_size=hidden_size, gate_weights=gate_weights, seed=seed)
    if with_text:  # token strings with the characters that break naive formats
        pool = np.array(["<｜begin▁of▁sentence｜>", ",", '"', "Ġ\"a,b\"", "Ċ", ""])
        text = pool[np.random.default_rng(seed).integers(0, pool.size, trace.num_tokens)]
        trace = RoutingTrace(trace.expert_ids, trace.request_id, trace.position, trace.num_experts,
                             trace.layer_ids, trace.gate_weights, trace.hidden, text)
    path = tmp_path_factory.mktemp("native") / "trace.npz"
    assert save_trace(trace, path) == path
    assert_same(trace, load_trace(path))


def test_float16_hidden_survives(tmp_path):
    base = synthetic_trace(num_requests=2, hidden_size=4)
    trace = RoutingTrace(base.expert_ids, base.request_id, base.position, base.num_experts, base.layer_ids,
                         hidden=base.hidden.astype(np.float16))
    save_trace(trace, tmp_path / "t.npz")
    assert load_trace(tmp_path / "t.npz").hidden.dtype == np.float16


def test_save_does_not_append_suffix_and_leaves_no_temp_files(tmp_path):
    save_trace(synthetic_trace(num_requests=1), tmp_path / "plain.trace")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.trace"]


def _write_npz(path, **arrays):
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def _valid_arrays():
    trace = synthetic_trace(num_requests=2)
    return dict(format=np.array("moeless_jax.routing_trace"), format_version=np.array(FORMAT_VERSION),
                num_experts=np.array(trace.num_experts), layer_ids=np.array(trace.layer_ids),
                expert_ids=trace.expert_ids, request_id=trace.request_id, position=trace.position)


def test_missing_key_is_named(tmp_path):
    arrays = _valid_arrays()
    del arrays["position"]
    _write_npz(tmp_path / "t.npz", **arrays)
    with pytest.raises(InputError, match=r"t\.npz: not a routing trace, missing key\(s\) \['position'\]"):
        load_trace(tmp_path / "t.npz")


def test_newer_version_is_refused(tmp_path):
    _write_npz(tmp_path / "t.npz", **{**_valid_arrays(), "format_version": np.array(FORMAT_VERSION + 1)})
    with pytest.raises(InputError, match="format_version 2 is not supported"):
        load_trace(tmp_path / "t.npz")


def test_wrong_format_name_is_refused(tmp_path):
    _write_npz(tmp_path / "t.npz", **{**_valid_arrays(), "format": np.array("something.else")})
    with pytest.raises(InputError, match="format is 'something.else'"):
        load_trace(tmp_path / "t.npz")


def test_invalid_content_names_file_and_field(tmp_path):
    arrays = _valid_arrays()
    arrays["expert_ids"] = arrays["expert_ids"] + 100  # out of range
    _write_npz(tmp_path / "t.npz", **arrays)
    with pytest.raises(InputError, match=r"t\.npz: RoutingTrace\.expert_ids: expert id"):
        load_trace(tmp_path / "t.npz")


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04truncated"])
def test_corrupt_file_is_a_clear_error(tmp_path, content):
    (tmp_path / "bad.npz").write_bytes(content)
    with pytest.raises(InputError, match=r"bad\.npz: not a readable \.npz routing trace"):
        load_trace(tmp_path / "bad.npz")


def test_truncated_archive_is_a_clear_error(tmp_path):
    save_trace(synthetic_trace(num_requests=3), tmp_path / "t.npz")
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable"):
        load_trace(tmp_path / "t.npz")


def test_pickled_objects_are_refused(tmp_path):
    arrays = _valid_arrays()
    arrays["token_text"] = np.array([object()] * arrays["position"].size, dtype=object)
    _write_npz(tmp_path / "t.npz", **arrays)
    with pytest.raises(InputError, match="not a readable"):
        load_trace(tmp_path / "t.npz")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no such trace file"):
        load_trace("does-not-exist.npz")


def test_bad_zip_member_is_a_clear_error(tmp_path):
    arrays = _valid_arrays()
    del arrays["expert_ids"]
    _write_npz(tmp_path / "t.npz", **arrays)
    with zipfile.ZipFile(tmp_path / "t.npz", "a") as archive:
        archive.writestr("expert_ids.npy", b"garbage")
    with pytest.raises(InputError, match=r"t\.npz: member\(s\) \['expert_ids'\] are not numpy arrays"):
        load_trace(tmp_path / "t.npz")
