"""ReplicaTable: construction, validation errors, and properties of random tables."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeless_jax.moe import EMPTY, ReplicaTable, ReplicaTableError


def test_static_table_round_robin():
    t = ReplicaTable.static(num_experts=8, num_devices=4, slots_per_device=3)
    assert t.slot_to_expert.tolist() == [0, 4, -1, 1, 5, -1, 2, 6, -1, 3, 7, -1]
    assert t.replica_count.tolist() == [1] * 8
    assert t.expert_slots.shape == (8, 4)
    assert t.device_experts(1).tolist() == [1, 5]


def test_arrays_are_int32_and_read_only():
    t = ReplicaTable.static(num_experts=4, num_devices=2, slots_per_device=2)
    arrays = t.arrays()
    assert all(a.dtype == np.int32 for a in arrays)
    with pytest.raises(ValueError):
        t.slot_to_expert[0] = 3


@given(seed=st.integers(0, 2**31 - 1), e=st.integers(1, 12), d=st.integers(1, 6), extra=st.integers(0, 3))
def test_random_tables_are_valid(seed, e, d, extra):
    s = -(-e // d) + extra
    t = ReplicaTable.random(np.random.default_rng(seed), num_experts=e, num_devices=d, slots_per_device=s)
    assert (t.replica_count >= 1).all()
    filled = t.slot_to_expert[t.slot_to_expert >= 0]
    assert np.bincount(filled, minlength=e).tolist() == t.replica_count.tolist()
    for expert in range(e):
        slots = t.expert_slots[expert, : t.replica_count[expert]]
        assert len(set((slots // s).tolist())) == len(slots)  # one replica per device
        assert (t.slot_to_expert[slots] == expert).all()
    rebuilt = ReplicaTable.from_slot_to_expert(
        t.slot_to_expert, num_experts=e, num_devices=d, slots_per_device=s
    )
    assert rebuilt == t


@pytest.mark.parametrize(
    "slot_to_expert, match",
    [
        ([0, 1, EMPTY, EMPTY], "expert 2 has no replica"),
        ([0, 1, 7, 2], "slot 2 names expert 7, outside 0..2"),
        ([0, 0, 1, 2], "expert 0 has two replicas on device 0"),
        ([0, 1, 2], r"slot_to_expert has shape \(3,\), expected \(4,\)"),
        ([0, 1, -2, 2], "slot 2 names expert -2"),
    ],
)
def test_invalid_slot_to_expert(slot_to_expert, match):
    with pytest.raises(ReplicaTableError, match=match):
        ReplicaTable.from_slot_to_expert(
            np.array(slot_to_expert), num_experts=3, num_devices=2, slots_per_device=2
        )


def _arrays():
    t = ReplicaTable.from_slot_to_expert(
        np.array([0, 1, 2, 0]), num_experts=3, num_devices=2, slots_per_device=2
    )
    return t.slot_to_expert.copy(), t.expert_slots.copy(), t.replica_count.copy()


def test_slot_given_twice():
    s2e, slots, count = _arrays()
    slots[1, :2] = [1, 0]
    count[1] = 2
    with pytest.raises(ReplicaTableError, match="slot 0 is given twice"):
        ReplicaTable(s2e, slots, count, 2, 2)


def test_expert_slot_out_of_range():
    s2e, slots, count = _arrays()
    slots[2, 0] = 9
    with pytest.raises(ReplicaTableError, match="expert 2 replica 0 names slot 9, outside 0..3"):
        ReplicaTable(s2e, slots, count, 2, 2)


def test_inconsistent_arrays():
    s2e, slots, count = _arrays()
    count[0] = 1
    with pytest.raises(ReplicaTableError, match="expert 0: replica_count is 1"):
        ReplicaTable(s2e, slots, count, 2, 2)


def test_layout_mismatch_names_the_fix():
    t = ReplicaTable.static(num_experts=4, num_devices=2, slots_per_device=2)
    with pytest.raises(ReplicaTableError, match=r"\(experts, devices, slots_per_device\) = \(4, 2, 2\)"):
        t.check_layout(num_experts=4, num_devices=4, slots_per_device=1)


def test_too_few_slots():
    with pytest.raises(ReplicaTableError, match="raise slots_per_device to at least 3"):
        ReplicaTable.static(num_experts=6, num_devices=2, slots_per_device=2)


def test_non_integer_dtype():
    with pytest.raises(ReplicaTableError, match="must hold integers"):
        ReplicaTable.from_slot_to_expert(
            np.array([0.0, 1.0]), num_experts=2, num_devices=1, slots_per_device=2
        )


@given(seed=st.integers(0, 2**31 - 1))
def test_batched_expert_slot_arrays_match_single_tables(seed):
    from moeless_jax.moe.replica_table import expert_slot_arrays

    rng = np.random.default_rng(seed)
    tables = [ReplicaTable.random(rng, num_experts=6, num_devices=4, slots_per_device=3) for _ in range(6)]
    stacked = np.stack([t.slot_to_expert for t in tables]).reshape(2, 3, 12)
    expert_slots, replica_count = expert_slot_arrays(stacked, 6, 4)
    assert expert_slots.shape == (2, 3, 6, 4) and replica_count.shape == (2, 3, 6)
    for i, t in enumerate(tables):
        np.testing.assert_array_equal(expert_slots.reshape(6, 6, 4)[i], t.expert_slots)
        np.testing.assert_array_equal(replica_count.reshape(6, 6)[i], t.replica_count)
