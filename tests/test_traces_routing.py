"""RoutingTrace: validation, selection methods and the synthetic generator."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeless_jax.errors import InputError
from moeless_jax.traces import RoutingTrace, synthetic_trace


def tiny(**overrides):
    """Two requests (ids 5 and 9) of 2 and 1 tokens, 2 layers, top-2 of 4 experts."""
    fields = dict(
        expert_ids=[[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[3, 0], [1, 2]]],
        request_id=[5, 5, 9],
        position=[0, 1, 0],
        num_experts=4,
        layer_ids=(1, 2),
    )
    fields.update(overrides)
    return RoutingTrace(**fields)


def test_tiny_trace_sizes_and_dtypes():
    trace = tiny()
    assert (trace.num_tokens, trace.num_layers, trace.top_k) == (3, 2, 2)
    assert trace.expert_ids.dtype == np.int16
    assert trace.request_id.dtype == np.int32 and trace.position.dtype == np.int32
    np.testing.assert_array_equal(trace.requests, [5, 9])
    np.testing.assert_array_equal(trace.request_lengths, [2, 1])
    assert trace.layer_index(2) == 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(expert_ids=[[[0, 4], [2, 3]], [[1, 2], [0, 3]], [[3, 0], [1, 2]]]), "expert_ids"),  # id 4 >= E
        (dict(expert_ids=[[[0, -1], [2, 3]], [[1, 2], [0, 3]], [[3, 0], [1, 2]]]), "expert_ids"),
        (dict(expert_ids=[[[1, 1], [2, 3]], [[1, 2], [0, 3]], [[3, 0], [1, 2]]]), "expert_ids"),  # repeat
        (dict(expert_ids=np.zeros((3, 2)), ), "expert_ids"),  # wrong rank
        (dict(expert_ids=np.zeros((3, 2, 2), np.float32)), "expert_ids"),  # not integer
        (dict(request_id=[5, 9]), "request_id"),  # wrong length
        (dict(request_id=[5, 9, 5], position=[0, 0, 1]), "request_id"),  # request 5 not contiguous
        (dict(position=[1, 1, 0]), "position"),  # not increasing within request 5
        (dict(position=[-1, 0, 0]), "position"),
        (dict(layer_ids=(1,)), "layer_ids"),
        (dict(layer_ids=(1, 1)), "layer_ids"),
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=1), "expert_ids"),  # top-2 of 1 expert
        (dict(gate_weights=np.ones((3, 2, 3))), "gate_weights"),
        (dict(gate_weights=np.full((3, 2, 2), np.nan)), "gate_weights"),
        (dict(hidden=np.ones((3, 1, 8))), "hidden"),
        (dict(hidden=np.ones((3, 2, 8), np.int32)), "hidden"),
        (dict(token_text=np.array(["a", "b"])), "token_text"),
    ],
)
def test_invalid_fields_are_named(overrides, field):
    with pytest.raises(InputError, match=f"RoutingTrace.{field}"):
        tiny(**overrides)


def test_optional_fields_are_cast():
    trace = tiny(gate_weights=np.full((3, 2, 2), 0.5), hidden=np.zeros((3, 2, 4), np.float64),
                 token_text=["a", ",", '"'])
    assert trace.gate_weights.dtype == np.float32
    assert trace.hidden.dtype == np.float32
    assert trace.token_text.dtype.kind == "U"


def test_tokens_of_follows_the_order_given():
    trace = tiny()
    np.testing.assert_array_equal(trace.tokens_of([9, 5]), [2, 0, 1])
    np.testing.assert_array_equal(trace.tokens_of([5, 5]), [0, 1, 0, 1])
    assert trace.tokens_of([]).size == 0
    with pytest.raises(InputError, match="request id 7"):
        trace.tokens_of([7])


def test_subset_keeps_every_field():
    trace = tiny(token_text=["a", "b", "c"], hidden=np.arange(12, dtype=np.float32).reshape(3, 2, 2))
    part = trace.subset([1, 2])
    np.testing.assert_array_equal(part.expert_ids, trace.expert_ids[1:])
    np.testing.assert_array_equal(part.position, [1, 0])
    np.testing.assert_array_equal(part.token_text, ["b", "c"])
    np.testing.assert_array_equal(part.hidden, trace.hidden[1:])
    assert part.layer_ids == trace.layer_ids
    with pytest.raises(InputError, match="out of range"):
        trace.subset([3])


@given(num_requests=st.integers(2, 12), fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_split_by_request_partitions_whole_requests(num_requests, fraction, seed):
    trace = synthetic_trace(num_requests=num_requests, mean_tokens=3, seed=seed)
    fit, test = trace.split_by_request(fraction, seed=seed)
    assert fit.requests.size >= 1 and test.requests.size >= 1
    assert fit.requests.size + test.requests.size == num_requests
    assert not set(fit.requests) & set(test.requests)
    assert fit.num_tokens + test.num_tokens == trace.num_tokens
    for part in (fit, test):  # original order kept, requests whole
        assert (np.diff(part.requests) > 0).all()
        np.testing.assert_array_equal(part.request_lengths, trace.request_lengths[part.requests])
    again, _ = trace.split_by_request(fraction, seed=seed)
    np.testing.assert_array_equal(again.requests, fit.requests)


def test_split_fraction_must_be_open_interval():
    with pytest.raises(InputError, match="fraction"):
        tiny().split_by_request(1.0)


def test_empty_trace_is_valid():
    trace = RoutingTrace(np.zeros((0, 2, 2), np.int32), [], [], num_experts=4, layer_ids=(0, 1))
    assert trace.num_tokens == 0 and trace.requests.size == 0
    assert trace.tokens_of([]).size == 0


@given(skew=st.floats(0.0, 2.0), seed=st.integers(0, 2**16))
def test_synthetic_trace_is_valid_and_skewed(skew, seed):
    trace = synthetic_trace(num_requests=4, num_experts=8, top_k=3, skew=skew, seed=seed, gate_weights=True)
    assert trace.top_k == 3 and trace.num_experts == 8
    np.testing.assert_allclose(trace.gate_weights.sum(axis=2), 1.0, rtol=1e-5)
