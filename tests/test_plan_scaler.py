"""Expert scaler (MoEless Alg. 1) and the fixed-budget min-max variant."""

import heapq
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeless_jax.errors import InputError
from moeless_jax.plan import replica_cv, replicate_experts, scale_min_max, scale_to_cv
from moeless_jax.plan import scaler as scaler_module
from moeless_jax.plan._compiled import python_of
from moeless_jax.plan.scaler import cv_counts


@st.composite
def scaling_problems(draw):
    """(loads [E] ints with zeros and ties, slot cap, max replicas per expert, CV target)."""
    experts = draw(st.integers(1, 12))
    loads = np.array(
        draw(st.lists(st.sampled_from([0, 1, 5, 5, 20, 100, 333]), min_size=experts, max_size=experts))
    )
    devices = draw(st.integers(1, 8))
    cap = draw(st.integers(experts, experts + 3 * devices))
    cv = draw(st.sampled_from([0.0, 0.1, 0.2, 0.5]))
    return loads, cap, devices, cv


@given(scaling_problems())
def test_cv_rule_holds_or_a_cap_is_reached(problem):
    loads, cap, devices, cv = problem
    count = scale_to_cv(loads, cv_target=cv, max_replicas=cap, max_per_expert=devices)
    assert count.min() >= 1 and count.max() <= devices and count.sum() <= cap
    capped = count.sum() == cap or np.all(count[loads > 0] == devices)
    assert replica_cv(loads, count) <= cv + 1e-9 or capped
    # Deterministic.
    np.testing.assert_array_equal(
        count, scale_to_cv(loads, cv_target=cv, max_replicas=cap, max_per_expert=devices)
    )


@given(scaling_problems())
def test_cv_rule_stops_at_the_first_step_that_meets_the_target(problem):
    loads, cap, devices, cv = problem
    count = scale_to_cv(loads, cv_target=cv, max_replicas=cap, max_per_expert=devices)
    added = int(count.sum() - len(loads))
    if added == 0:
        return
    # The same greedy order with one replica fewer is the min-max allocation of added - 1 extras.
    before = scale_min_max(loads, extra_replicas=added - 1, max_per_expert=devices)
    assert replica_cv(loads, before) > cv - 1e-9
    np.testing.assert_array_equal(count, scale_min_max(loads, extra_replicas=added, max_per_expert=devices))


def test_zero_loads_need_no_replicas():
    count = scale_to_cv(np.zeros(6), cv_target=0.0, max_replicas=20, max_per_expert=4)
    assert count.tolist() == [1] * 6


def test_ties_go_to_the_lower_expert():
    count = scale_to_cv(np.array([10, 10, 1]), cv_target=0.0, max_replicas=4, max_per_expert=4)
    assert count.tolist() == [2, 1, 1]


def test_idle_experts_do_not_grow_once_busy_ones_are_capped():
    count = scale_to_cv(np.array([100, 0, 0]), cv_target=0.0, max_replicas=10, max_per_expert=2)
    assert count.tolist() == [2, 1, 1]


@given(st.lists(st.integers(0, 200), min_size=1, max_size=10), st.integers(0, 20))
def test_min_max_matches_eplb_replication_without_a_device_cap(weights, extra):
    loads = np.array(weights)
    ours = scale_min_max(loads, extra_replicas=extra, max_per_expert=len(weights) + extra + 1)
    _, _, logcnt = replicate_experts(loads[None, :].astype(float), len(weights) + extra)
    np.testing.assert_array_equal(ours, logcnt[0])


def test_min_max_respects_the_per_expert_cap():
    count = scale_min_max(np.array([100, 1, 1]), extra_replicas=5, max_per_expert=3)
    assert count.tolist() == [3, 3, 2]  # 100 capped at 3; then 1, 1 alternate, the lower index first on ties
    assert scale_min_max(np.array([1, 1]), extra_replicas=10, max_per_expert=2).tolist() == [2, 2]


@pytest.mark.parametrize(
    "loads, problem",
    [
        ([1.0, np.nan], "finite"),
        ([1.0, np.inf], "finite"),
        ([1, -2], ">= 0"),
        ([[1, 2]], r"\[E\] vector"),
    ],
)
def test_bad_loads_are_rejected(loads, problem):
    with pytest.raises(InputError, match=problem):
        scale_to_cv(np.array(loads), cv_target=0.2, max_replicas=4, max_per_expert=2)


def test_a_cap_below_the_expert_count_is_rejected():
    with pytest.raises(InputError, match="cannot hold 3 experts"):
        scale_to_cv(np.ones(3), cv_target=0.2, max_replicas=2, max_per_expert=2)


def heap_cv_counts(loads, cv_target, max_replicas, max_per_expert):
    """Alg. 1 written out: while the CV is above the target, one more replica to the expert with the highest
    load per replica (a max-heap; ties to the lower expert), within the slot cap and one replica per device.
    The CV test uses the same float operations as the scaler (n * Q > T^2 * (1 + V^2), Q updated per step).
    """
    count = [1] * loads.size
    budget = min(max_replicas - loads.size, loads.size * (max_per_expert - 1))
    total = float(loads.sum())
    if budget <= 0 or total <= 0:
        return count
    square_sum = float(np.dot(loads, loads))
    limit = total * total * (1.0 + cv_target * cv_target)
    values = loads.tolist()
    heap = [(-load, e) for e, load in enumerate(values)] if max_per_expert > 1 else []
    heapq.heapify(heap)
    replicas = loads.size
    while replicas - loads.size < budget and replicas * square_sum > limit and heap:
        neg_share, e = heap[0]
        if neg_share == 0.0:
            break
        r, load = count[e], values[e]
        square_sum -= load * load / (r * (r + 1))
        count[e] = r + 1
        replicas += 1
        if r + 1 < max_per_expert:
            heapq.heapreplace(heap, (-load / (r + 1), e))
        else:
            heapq.heappop(heap)
    return count


@st.composite
def wide_scaling_problems(draw):
    """Loads with ties, zeros, equal loads, a dominant expert, spread-out or subnormal floats; caps from none
    over tight to more than every expert can use, one device or many."""
    experts = draw(st.integers(1, 80))
    kind = draw(st.sampled_from(["ties", "skewed", "floats", "one", "equal", "subnormal"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if kind == "ties":
        loads = rng.choice([0, 0, 1, 4, 4, 9, 30, 200], experts).astype(np.float64)
    elif kind == "skewed":
        popularity = rng.dirichlet(np.full(experts, 0.3))
        loads = rng.multinomial(int(rng.integers(0, 20000)), popularity).astype(np.float64)
    elif kind == "floats":
        loads = rng.random(experts) ** 3 * 10 ** rng.uniform(-3, 4)
    elif kind == "equal":
        loads = np.full(experts, float(rng.choice([0.0, 1.0, 7.0, 1e6])))
    elif kind == "subnormal":  # load / r rounds to 0 for a busy expert
        loads = rng.choice([0.0, 5e-324, 1e-323, 3e-323, 1.0], experts)
    else:
        loads = np.zeros(experts)
        loads[rng.integers(0, experts)] = rng.integers(1, 1000)
    devices = draw(st.integers(1, 70))
    cap = draw(
        st.one_of(
            st.integers(experts, experts + 2 * devices + 2),
            st.sampled_from([experts, experts + 1, experts * devices - 1, experts * devices]),
            st.integers(experts * devices, experts * devices + 5),
        )
    )
    cv = draw(st.sampled_from([0.0, 0.05, 0.2, 1.0]))
    return loads, max(cap, experts), devices, cv


@settings(max_examples=300)
@given(wide_scaling_problems())
def test_cv_counts_match_the_heap_loop(problem):
    loads, cap, devices, cv = problem
    np.testing.assert_array_equal(cv_counts(loads, cv, cap, devices), heap_cv_counts(loads, cv, cap, devices))


@settings(max_examples=100)
@given(wide_scaling_problems())
def test_the_python_fallback_counts_like_the_compiled_loop(problem):
    # Where numba is missing, _grow_to_cv runs as the plain Python function: it must give the same counts.
    loads, cap, devices, cv = problem
    compiled = cv_counts(loads, cv, cap, devices)
    with mock.patch.object(scaler_module, "_grow_to_cv", python_of(scaler_module._grow_to_cv)):
        python = cv_counts(loads, cv, cap, devices)
    np.testing.assert_array_equal(python, compiled)


def test_the_compiled_loop_has_one_specialisation():
    for loads in (np.array([5, 1, 0, 9]), np.array([5.0, 1.0, 0.5, 9.0]), np.arange(8.0)[::2]):
        scale_to_cv(loads, cv_target=0.0, max_replicas=10, max_per_expert=np.int32(3))
        cv_counts(loads.astype(np.float64), 0, 9, 2)
    assert len(getattr(scaler_module._grow_to_cv, "signatures", [])) <= 1
