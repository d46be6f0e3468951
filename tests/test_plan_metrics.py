"""Load split over replicas, balancedness, CV, slot alignment and anti-affinity repair."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import moeless_jax.plan.policies as policies
from moeless_jax.moe import ReplicaTable
from moeless_jax.moe.split import even_quotas
from moeless_jax.plan import (
    SlotLayout,
    align_slots,
    balancedness,
    device_loads,
    make_policy,
    repair_anti_affinity,
    replica_cv,
    slot_loads,
    tokens_per_device,
)


@st.composite
def tables_and_loads(draw):
    devices = draw(st.integers(1, 5))
    slots = draw(st.integers(1, 3))
    experts = draw(st.integers(1, devices * slots))
    table = ReplicaTable.random(
        np.random.default_rng(draw(st.integers(0, 2**16))),
        num_experts=experts,
        num_devices=devices,
        slots_per_device=slots,
    )
    loads = np.array(draw(st.lists(st.integers(0, 40), min_size=experts, max_size=experts)))
    return table, loads


@given(tables_and_loads())
def test_integer_split_matches_the_layers_even_quotas(case):
    table, loads = case
    per_slot = slot_loads(table.slot_to_expert, loads)
    quotas = np.asarray(even_quotas(jnp.asarray(loads), jnp.asarray(table.replica_count), table.num_devices))
    for e in range(table.num_experts):
        slots = table.expert_slots[e, : table.replica_count[e]]
        np.testing.assert_array_equal(per_slot[slots], quotas[e, : table.replica_count[e]])
    assert per_slot.sum() == loads.sum() and per_slot.dtype.kind == "i"
    np.testing.assert_array_equal(device_loads(table, loads), per_slot.reshape(table.num_devices, -1).sum(1))


@given(tables_and_loads())
def test_float_split_is_exact_and_batched_over_layers(case):
    table, loads = case
    floats = loads + 0.5
    stacked = tokens_per_device(
        np.stack([table.slot_to_expert] * 2), np.stack([floats, 3 * floats]), table.num_devices
    )
    np.testing.assert_allclose(stacked[0].sum(), floats.sum())
    expected = np.zeros(table.num_devices)
    for p, e in enumerate(table.slot_to_expert):
        if e >= 0:
            expected[p // table.slots_per_device] += floats[e] / table.replica_count[e]
    np.testing.assert_allclose(stacked[0], expected)
    np.testing.assert_allclose(stacked[1], 3 * expected)


def test_balancedness_is_mean_over_max():
    assert balancedness(np.array([[10, 10], [5, 15], [0, 0]])).tolist() == [1.0, 10 / 15, 1.0]


def test_replica_cv_counts_every_replica():
    assert replica_cv(np.array([10, 10]), np.array([1, 1])) == 0.0
    assert replica_cv(np.array([20, 10]), np.array([2, 1])) == 0.0  # three replicas of 10
    assert replica_cv(np.zeros(3), np.ones(3)) == 0.0
    assert replica_cv(np.array([30, 10]), np.array([1, 1])) == pytest.approx(0.5)


def test_align_keeps_replicas_that_stay_on_their_device_in_place():
    previous = np.array([0, 1, 2, 3, 4, -1])  # 2 devices x 3 slots
    new = np.array([5, 1, 0, 3, 2, 4])  # device 0 keeps {0, 1}, gains 5; device 1 keeps {3, 4}, gains 2
    aligned = align_slots(new, previous, 3)
    assert aligned.tolist() == [0, 1, 5, 3, 4, 2]


def test_repair_separates_duplicates_and_reports_when_it_cannot():
    fixed, swaps = repair_anti_affinity(np.array([0, 0, 1, 1]), np.array([5.0, 5.0]), 2)
    assert swaps == 1 and sorted(fixed[:2].tolist()) == [0, 1] and sorted(fixed[2:].tolist()) == [0, 1]
    # Expert 0 twice on device 0 and device 2; every swap partner would collide somewhere.
    stuck, _ = repair_anti_affinity(np.array([0, 0, 2, 2, 2, 2, 3, 0, 3, 0, 1, 1]), np.ones(4), 3)
    assert stuck is None


def test_eplb_places_its_counts_greedily_when_no_swap_works(monkeypatch):
    monkeypatch.setattr(policies, "repair_anti_affinity", lambda s2e, share, slots, nodes: (None, 0))
    policy = make_policy("eplb", SlotLayout(4, 4, 2), 1)
    policy.observe(np.array([[5, 5, 5, 5]]))
    decision = policy.plan()
    assert decision.fallbacks == 1
    ReplicaTable.from_slot_to_expert(
        decision.slot_to_expert[0], num_experts=4, num_devices=4, slots_per_device=2
    )
