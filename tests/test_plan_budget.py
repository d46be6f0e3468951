"""The move budget: servable tables, never more copies than allowed, never worse than the table in use."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeless_jax.errors import InputError
from moeless_jax.moe import ReplicaTable
from moeless_jax.plan import SlotLayout, limit_moves, make_policy, tokens_per_device
from moeless_jax.plan.budget import check_table, copies


def random_table(rng, num_experts, num_devices, slots, *, static=False):
    layout = {"num_experts": num_experts, "num_devices": num_devices, "slots_per_device": slots}
    if static:
        return ReplicaTable.static(**layout).slot_to_expert.astype(np.int64)
    extra = int(rng.integers(0, num_devices * slots - num_experts + 1))
    return ReplicaTable.random(rng, extra_replicas=extra, **layout).slot_to_expert.astype(np.int64)


@st.composite
def budget_problems(draw):
    """(E, D, S, previous [P], proposed [P], loads [E], max_moves)."""
    devices = draw(st.integers(1, 6))
    slots = draw(st.integers(1, 4))
    experts = draw(st.integers(1, devices * slots))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    previous = random_table(rng, experts, devices, slots, static=draw(st.booleans()))
    proposed = random_table(rng, experts, devices, slots)
    loads = rng.choice([0, 1, 5, 20, 300], size=experts).astype(np.float64)
    max_moves = draw(st.integers(0, devices * slots))
    return experts, devices, slots, previous, proposed, loads, max_moves


def peak(table, loads, devices):
    return tokens_per_device(table, loads, devices).max()


@given(budget_problems())
def test_budgeted_tables_are_servable_within_budget_and_never_worse(problem):
    experts, devices, slots, previous, proposed, loads, max_moves = problem
    layout = {"num_experts": experts, "num_devices": devices, "slots_per_device": slots}
    out = limit_moves(previous, proposed, loads, max_moves=max_moves, **layout)
    ReplicaTable.from_slot_to_expert(out, **layout)  # raises unless servable
    assert out.dtype == np.int64
    assert copies(previous, out).sum() <= max_moves
    # Every changed slot takes the proposal's value: the budget only leaves changes out.
    changed = out != previous
    np.testing.assert_array_equal(out[changed], proposed[changed])
    assert (out >= 0).sum() <= max((previous >= 0).sum(), (proposed >= 0).sum())
    wanted = copies(previous, proposed).sum()
    if max_moves == 0:
        np.testing.assert_array_equal(out, previous)
    elif max_moves >= wanted:
        np.testing.assert_array_equal(out, proposed)
    else:
        assert peak(out, loads, devices) <= peak(previous, loads, devices) * (1 + 1e-12)
    again = limit_moves(previous, proposed, loads, max_moves=max_moves, **layout)
    np.testing.assert_array_equal(again, out)  # deterministic
    unlimited = limit_moves(previous, proposed, loads, max_moves=None, **layout)
    np.testing.assert_array_equal(unlimited, proposed)


def test_skewed_load_gets_the_hottest_copies_first_and_improves_monotonically():
    experts, devices, slots = 8, 4, 3
    layout = {"num_experts": experts, "num_devices": devices, "slots_per_device": slots}
    loads = np.array([500, 10, 10, 10, 300, 10, 10, 10], np.float64)
    policy = make_policy("moeless", SlotLayout(experts, devices, slots), 1)
    previous = policy.slot_to_expert[0].copy()  # static EP: hot experts 0 and 4 share device 0
    proposed = policy.plan(loads[None]).slot_to_expert[0]
    wanted = int(copies(previous, proposed).sum())
    assert wanted > 3
    peaks = []
    for budget in range(wanted + 1):
        out = limit_moves(previous, proposed, loads, max_moves=budget, **layout)
        peaks.append(peak(out, loads, devices))
        if 1 <= budget <= 3:  # the first copies bring replicas of the two hot experts
            assert set(out[copies(previous, out)].tolist()) <= {0, 4}
    assert peaks[0] == peak(previous, loads, devices) == 800.0
    assert all(b <= a for a, b in zip(peaks, peaks[1:], strict=False))
    assert peaks[1] < peaks[0] and peaks[3] < 0.4 * peaks[0]
    assert peaks[-1] == peak(proposed, loads, devices) == 285.0


def test_a_moved_replica_takes_its_free_clear_along_under_a_full_slot_count():
    layout = {"num_experts": 3, "num_devices": 2, "slots_per_device": 2}
    previous = np.array([0, 1, 2, -1])
    loads = np.array([10.0, 10.0, 1.0])
    # Three copies wanted: 0 and 2 swap devices, 1 moves beside 2 (its old slot emptied).
    proposed = np.array([2, -1, 0, 1])
    out = limit_moves(previous, proposed, loads, max_moves=1, **layout)
    # The swap halves cannot go alone (each expert would lose its only replica); expert 1's copy into the
    # empty slot would fill a fourth slot, so it takes the clear of its old slot along.
    np.testing.assert_array_equal(out, [0, -1, 2, 1])
    assert peak(out, loads, 2) == 11.0 < peak(previous, loads, 2) == 20.0


def test_zero_budget_freezes_even_a_proposal_that_only_clears():
    layout = {"num_experts": 2, "num_devices": 2, "slots_per_device": 2}
    previous = np.array([0, 1, 1, -1])
    proposed = np.array([0, 1, -1, -1])
    loads = np.array([1.0, 1.0])
    np.testing.assert_array_equal(limit_moves(previous, proposed, loads, max_moves=0, **layout), previous)
    np.testing.assert_array_equal(limit_moves(previous, proposed, loads, max_moves=1, **layout), proposed)


def test_bad_inputs_name_the_problem():
    layout = {"num_experts": 2, "num_devices": 2, "slots_per_device": 1}
    good, loads = np.array([0, 1]), np.array([1.0, 2.0])
    with pytest.raises(InputError, match="previous: expert 1 has no replica"):
        limit_moves(np.array([0, 0]), good, loads, max_moves=1, **layout)
    with pytest.raises(InputError, match="proposed: has shape"):
        limit_moves(good, np.array([0, 1, 1]), loads, max_moves=1, **layout)
    with pytest.raises(InputError, match="max_moves"):
        limit_moves(good, good, loads, max_moves=-1, **layout)
    with pytest.raises(InputError, match="loads: has shape"):
        limit_moves(good, good, np.ones(3), max_moves=1, **layout)
    with pytest.raises(InputError, match="device 0 holds two replicas of expert 0"):
        check_table(np.array([0, 0, 1, -1]), num_experts=2, num_devices=2, slots_per_device=2)
    with pytest.raises(InputError, match="slot 1 names expert 5"):
        check_table(np.array([0, 5]), **layout)
