"""Batching of routing traces (token budget, 1-s windows) and per-(batch, layer) expert loads."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import moeless_jax.traces.batching as batching
from moeless_jax.errors import InputError
from moeless_jax.traces import (
    ArrivalTrace,
    expert_loads,
    synthetic_trace,
    token_budget_batches,
    window_batches,
    window_requests,
)

traces = st.builds(
    synthetic_trace,
    num_requests=st.integers(1, 12),
    mean_tokens=st.integers(1, 10),
    num_layers=st.integers(1, 3),
    num_experts=st.just(8),
    top_k=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)


def arrivals_at(times) -> ArrivalTrace:
    times = np.sort(np.asarray(times, dtype=np.float64))
    times = times - times[0] if times.size else times
    ones = np.ones(times.size, np.int64)
    return ArrivalTrace(times, ones, ones, "test")


@given(trace=traces, budget=st.integers(1, 40))
def test_token_budget_conserves_every_token_once_in_order(trace, budget):
    batches = token_budget_batches(trace, budget)
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(trace.num_tokens))
    start, stop = trace.request_bounds
    boundaries = set(start.tolist()) | {trace.num_tokens}
    for index, batch in enumerate(batches):
        assert batch.size > 0
        assert int(batch[0]) in boundaries and int(batch[-1]) + 1 in boundaries  # whole requests only
        one_request = np.unique(trace.request_id[batch]).size == 1
        assert batch.size <= budget or one_request  # only a lone oversize request may exceed the budget
        if index + 1 < len(batches):  # greedy: the next request would not have fitted
            next_request = trace.request_id[batches[index + 1][0]]
            assert batch.size + np.sum(trace.request_id == next_request) > budget


def test_token_budget_examples():
    trace = synthetic_trace(num_requests=4, mean_tokens=3, seed=3)
    lengths = trace.request_lengths.tolist()
    batches = token_budget_batches(trace, 10**6)
    assert len(batches) == 1
    assert [b.size for b in token_budget_batches(trace, 1)] == lengths  # every request alone
    with pytest.raises(InputError, match="batch_tokens"):
        token_budget_batches(trace, 0)


@given(trace=traces, gaps=st.lists(st.floats(0.0, 2.5), min_size=1, max_size=30),
       window_s=st.sampled_from([0.5, 1.0, 2.0]))
def test_window_batches_follow_arrivals(trace, gaps, window_s):
    arrivals = arrivals_at(np.cumsum(gaps))
    batches = window_batches(trace, arrivals, window_s=window_s)
    windows = np.floor(arrivals.arrival_s / window_s).astype(int)
    assert len(batches) == np.unique(windows).size  # one batch per non-empty window
    # Arrival i is served by request i mod R, in trace order; batches list them in arrival order.
    served = trace.requests[np.arange(arrivals.num_requests) % trace.requests.size]
    expected = np.concatenate([trace.tokens_of([r]) for r in served])
    np.testing.assert_array_equal(np.concatenate(batches), expected)
    grouped = window_requests(trace, arrivals, window_s=window_s)
    for batch, requests in zip(batches, grouped, strict=True):
        np.testing.assert_array_equal(batch, trace.tokens_of(requests))


@given(trace=traces, seed=st.integers(0, 2**16))
def test_window_batches_conserve_tokens_when_arrivals_match_requests(trace, seed):
    # With exactly R arrivals every request is served once: every token appears exactly once, in order.
    times = np.random.default_rng(seed).exponential(0.4, trace.requests.size)
    batches = window_batches(trace, arrivals_at(np.cumsum(times)))
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(trace.num_tokens))


def test_window_batches_skip_empty_windows_and_cycle():
    trace = synthetic_trace(num_requests=2, mean_tokens=2, seed=1)
    first, second = (trace.tokens_of([r]) for r in trace.requests)
    arrivals = arrivals_at([0.0, 0.2, 3.7, 3.9, 3.95])  # windows 0 and 3; 1 and 2 are empty
    batches = window_batches(trace, arrivals)
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[0], np.concatenate([first, second]))
    np.testing.assert_array_equal(batches[1], np.concatenate([first, second, first]))  # arrivals 2, 3, 4
    limited = window_batches(trace, arrivals, max_requests=3)
    np.testing.assert_array_equal(limited[1], first)


def test_window_batches_reject_bad_arguments():
    trace = synthetic_trace(num_requests=2)
    arrivals = arrivals_at([0.0, 1.0])
    with pytest.raises(InputError, match="window_s"):
        window_batches(trace, arrivals, window_s=0)
    with pytest.raises(InputError, match="max_requests"):
        window_batches(trace, arrivals, max_requests=0)
    empty = trace.subset(np.zeros(0, np.int64))
    with pytest.raises(InputError, match="no requests"):
        window_batches(empty, arrivals)
    assert window_batches(trace, arrivals_at([])) == []


def naive_loads(trace, batches):
    loads = np.zeros((len(batches), trace.num_layers, trace.num_experts), np.int64)
    for b, batch in enumerate(batches):
        for token in batch:
            for layer in range(trace.num_layers):
                for expert in trace.expert_ids[token, layer]:
                    loads[b, layer, expert] += 1
    return loads


@given(trace=traces, budget=st.integers(1, 30), arrivals=st.integers(1, 40), small_chunks=st.booleans(),
       path=st.sampled_from(["direct", "runs"]), seed=st.integers(0, 2**16))
def test_expert_loads_match_a_direct_count(trace, budget, arrivals, small_chunks, path, seed):
    rng = np.random.default_rng(seed)
    batches = token_budget_batches(trace, budget)
    batches += window_batches(trace, arrivals_at(np.cumsum(rng.exponential(0.3, arrivals))))  # reuse
    batches += [batches[0][::-1], np.zeros(0, np.int64), rng.integers(0, trace.num_tokens, 9)]  # any tokens
    with pytest.MonkeyPatch.context() as patch:
        if small_chunks:  # force many bincount calls and many matrix products
            patch.setattr(batching, "_LOAD_CHUNK", 7)
            patch.setattr(batching, "_MATRIX_ELEMENTS", 5)
        patch.setattr(batching, "_RUN_REUSE", 0 if path == "direct" else 10**9)
        loads = expert_loads(trace, batches)
    np.testing.assert_array_equal(loads, naive_loads(trace, batches))
    assert loads.dtype == np.int64
    np.testing.assert_array_equal(loads.sum(axis=2), np.array([[b.size * trace.top_k] * trace.num_layers
                                                               for b in batches]).reshape(len(batches), -1))


def test_expert_loads_reject_bad_indices():
    trace = synthetic_trace(num_requests=1)
    with pytest.raises(InputError, match="outside"):
        expert_loads(trace, [np.array([trace.num_tokens])])
    assert expert_loads(trace, []).shape == (0, trace.num_layers, trace.num_experts)
    assert not expert_loads(trace, [np.zeros(0, np.int64)]).any()
    with pytest.raises(InputError, match="integer token indices"):
        expert_loads(trace, [np.array([0.5])])
