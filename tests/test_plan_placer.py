"""Expert placer (MoEless Alg. 2): valid tables, warm reuse, stability, topology, and move plans."""

import contextlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeless_jax.errors import InputError
from moeless_jax.moe import ReplicaTable, plan_moves
from moeless_jax.plan import (
    Topology,
    TopologyConfig,
    place,
    place_replicas,
    scale_min_max,
    static_slot_to_expert,
    tokens_per_device,
)
from moeless_jax.plan import placer as placer_module
from moeless_jax.plan._compiled import njit, python_of

MODES = {  # name -> (reuse_warm, warm_slack in tokens)
    "paper": (True, None),
    "slack": (True, 3.0),
    "tight": (True, 0.0),
    "fresh": (False, None),
}


@st.composite
def placements(draw):
    """A layout, replica counts within it, loads, a previous table and a placer mode."""
    devices = draw(st.integers(1, 6))
    slots = draw(st.integers(1, 4))
    experts = draw(st.integers(1, devices * slots))
    loads = np.array(
        draw(st.lists(st.sampled_from([0, 1, 3, 3, 10, 50]), min_size=experts, max_size=experts))
    )
    extra = draw(st.integers(0, devices * slots - experts))
    count = scale_min_max(loads, extra_replicas=extra, max_per_expert=devices)
    seed = draw(st.integers(0, 2**16))
    previous = ReplicaTable.random(
        np.random.default_rng(seed), num_experts=experts, num_devices=devices, slots_per_device=slots
    ).slot_to_expert
    mode = draw(st.sampled_from(sorted(MODES)))
    topology = None
    if draw(st.booleans()) and devices % 2 == 0:
        topology = Topology.build(
            devices,
            TopologyConfig(devices_per_node=2 if devices > 2 else None, pairs=True, locality_slack=0.5),
        )
    return count, loads, devices, slots, previous, mode, topology


def run(count, loads, devices, slots, previous, mode, topology):
    reuse_warm, warm_slack = MODES[mode]
    return place_replicas(
        count,
        loads,
        num_devices=devices,
        slots_per_device=slots,
        previous=previous,
        reuse_warm=reuse_warm,
        warm_slack=warm_slack,
        topology=topology,
    )


@given(placements())
def test_placement_is_a_valid_table_with_the_requested_counts(case):
    count, loads, devices, slots, previous, mode, topology = case
    slot_to_expert = run(*case)
    # ReplicaTable checks: every expert served, no device over its slots, one replica of an expert per device.
    table = ReplicaTable.from_slot_to_expert(
        slot_to_expert, num_experts=len(count), num_devices=devices, slots_per_device=slots
    )
    np.testing.assert_array_equal(table.replica_count, count)
    np.testing.assert_array_equal(slot_to_expert, run(*case))  # deterministic


@given(placements())
def test_placing_a_table_again_changes_nothing(case):
    count, loads, devices, slots, previous, mode, topology = case
    if mode == "fresh":
        return  # the ablation ignores the previous table by design
    first = run(*case)
    second = run(count, loads, devices, slots, first, mode, topology)
    np.testing.assert_array_equal(second, first)


def test_paper_rule_keeps_every_warm_replica():
    previous = np.array([0, 1, 2, 3])  # devices of 2 slots: {0, 1} and {2, 3}
    loads = np.array([100, 100, 1, 1])  # device 0 is now far heavier, but nothing warm moves
    same = place_replicas(np.ones(4, np.int64), loads, num_devices=2, slots_per_device=2, previous=previous)
    np.testing.assert_array_equal(same, previous)
    moved = place_replicas(
        np.ones(4, np.int64), loads, num_devices=2, slots_per_device=2, previous=previous, warm_slack=0.0
    )
    assert sorted(tokens_per_device(moved, loads, 2).tolist()) == [101, 101]


def test_new_replicas_go_to_the_least_loaded_device_without_that_expert():
    previous = np.array([0, -1, 1, -1, 2, -1])  # 3 devices x 2 slots
    count = np.array([2, 1, 1])
    loads = np.array([40, 30, 10])
    out = place_replicas(count, loads, num_devices=3, slots_per_device=2, previous=previous)
    # Expert 0's second replica (20 tokens) goes to device 2, the lightest; warm replicas keep their slots.
    assert out.tolist() == [0, -1, 1, -1, 2, 0]


def test_a_cornered_greedy_is_completed_by_an_augmenting_path():
    # a=10 -> device 0; b, c, d -> device 1 (lighter) which fills up; then both replicas of e (0.5 each) need
    # two devices, but only device 0 has room: a replica must move to make space.
    count = np.array([1, 1, 1, 1, 2])
    loads = np.array([10, 1, 1, 1, 1])
    out = place_replicas(count, loads, num_devices=2, slots_per_device=3)
    table = ReplicaTable.from_slot_to_expert(out, num_experts=5, num_devices=2, slots_per_device=3)
    np.testing.assert_array_equal(table.replica_count, count)


def test_placement_reports_warm_hits_cold_moves_and_bytes():
    previous = ReplicaTable.static(num_experts=4, num_devices=2, slots_per_device=3)
    loads = np.array([60, 10, 10, 10])
    result = place(
        np.array([2, 1, 1, 1]),
        loads,
        num_devices=2,
        slots_per_device=3,
        previous=previous,
        bytes_per_expert=1000,
    )
    assert result.warm_hits == 4 and result.cold_moves == 1 and result.bytes == 1000
    assert result.moves.moves[0].expert == 0 and result.moves.moves[0].src_device == 0
    assert result.summary()["remote_moves"] == 1


def test_moves_copy_from_the_closest_replica():
    # Expert 0 lives on devices 0 and 3 (nodes of 4, pairs {0,1}, {2,3}); a new replica on device 2 copies
    # from its pair partner, device 3, and one on device 1 from device 0.
    old = ReplicaTable.from_slot_to_expert([0, -1, -1, 0], num_experts=1, num_devices=4, slots_per_device=1)
    new = ReplicaTable.from_slot_to_expert([0, 0, 0, 0], num_experts=1, num_devices=4, slots_per_device=1)
    topology = Topology.build(4, TopologyConfig(devices_per_node=4, pairs=True))
    plan = plan_moves(
        old,
        new,
        bytes_per_expert=1,
        node_of_device=topology.node_of_device,
        pair_of_device=topology.pair_of_device,
    )
    assert {(m.dst_device, m.src_device) for m in plan.moves} == {(1, 0), (2, 3)}
    plain = plan_moves(old, new, bytes_per_expert=1)
    assert {(m.dst_device, m.src_device) for m in plain.moves} == {(1, 0), (2, 0)}


def test_topology_prefers_a_close_device_within_the_slack():
    # Expert 1 (on device 2) needs a second replica; devices 0, 1 and 3 are equally light. Without a topology
    # the lowest index wins; with NVLink pairs, device 3 (paired with device 2) wins, so the copy stays local.
    previous = np.array([0, -1, 2, -1, 1, -1, 3, -1])  # 4 devices x 2 slots
    loads, count = np.array([10, 40, 10, 10]), np.array([1, 2, 1, 1])
    plain = place_replicas(count, loads, num_devices=4, slots_per_device=2, previous=previous)
    assert plain.tolist() == [0, 1, 2, -1, 1, -1, 3, -1]
    topology = Topology.build(4, TopologyConfig(pairs=True))
    paired = place_replicas(
        count, loads, num_devices=4, slots_per_device=2, previous=previous, topology=topology
    )
    assert paired.tolist() == [0, -1, 2, -1, 1, -1, 3, 1]
    assert topology.distance(np.arange(4), 0).tolist() == [0, 1, 2, 2]
    assert topology.copy_distance([0, 3], 2) == 1


@pytest.mark.parametrize(
    "count, loads, previous, problem",
    [
        ([3, 1], [1, 1], None, "1..2 replicas"),
        ([2, 2, 1], [1, 1, 1], None, "do not fit in 4 slots"),
        ([1, 1], [1, np.nan], None, "finite"),
        ([1, 1], [1, 1], [0, 0, 1, -1], "two replicas of one expert on a device"),
        ([1, 1], [1, 1], [0, 1, 5, -1], "entries in -1..1"),
    ],
)
def test_bad_placement_inputs_are_rejected(count, loads, previous, problem):
    with pytest.raises(InputError, match=problem):
        place_replicas(
            np.array(count),
            np.array(loads),
            num_devices=2,
            slots_per_device=2,
            previous=None if previous is None else np.array(previous),
        )


def test_static_layout_matches_the_replica_table():
    expected = ReplicaTable.static(num_experts=10, num_devices=4, slots_per_device=3).slot_to_expert
    np.testing.assert_array_equal(static_slot_to_expert(10, 4, 3), expected)


@st.composite
def slack_problems(draw):
    """Counts, loads and a previous table for the warm-slack greedy: up to 16 devices, loads with ties and
    zeros (or floats), and previous tables that are random, static, or the greedy's own answer to other loads
    (the steady state of a policy)."""
    devices = draw(st.integers(1, 16))
    slots = draw(st.integers(2, 5))
    experts = draw(st.integers(1, devices * slots))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))

    def draw_loads():
        if draw(st.booleans()):
            return rng.choice([0, 1, 3, 3, 10, 50], experts)
        return rng.random(experts) * 100

    def draw_count(loads):
        extra = int(rng.integers(0, devices * slots - experts + 1))
        return scale_min_max(loads, extra_replicas=extra, max_per_expert=devices)

    layout = {"num_experts": experts, "num_devices": devices, "slots_per_device": slots}
    slack = draw(st.sampled_from([0.0, 1.0, 3.0, 25.0, 1e9]))
    kind = draw(st.sampled_from(["random", "static", "placed"]))
    if kind == "random":
        previous = ReplicaTable.random(rng, **layout).slot_to_expert
    elif kind == "static":
        previous = static_slot_to_expert(experts, devices, slots)
    else:
        loads = draw_loads()
        previous = place_replicas(
            draw_count(loads),
            loads,
            num_devices=devices,
            slots_per_device=slots,
            previous=ReplicaTable.random(rng, **layout).slot_to_expert,
            warm_slack=slack,
        )
    loads = draw_loads()
    count = draw_count(loads)
    return count, loads / count, devices, slots, np.asarray(previous, np.int64), slack


def _python_greedy():
    """Run the fast greedy as the plain Python function (what runs where numba is missing)."""
    return mock.patch.object(placer_module, "_slack_greedy", python_of(placer_module._slack_greedy))


@settings(max_examples=300)
@given(slack_problems(), st.sampled_from(["compiled", "python"]))
def test_fast_slack_greedy_matches_the_one_by_one_reference(problem, run_as):
    count, share, devices, slots, previous, slack = problem
    with _python_greedy() if run_as == "python" else contextlib.nullcontext():
        fast = placer_module._place_slack(count, share, devices, slots, previous, slack)
    reference = placer_module._Placement(count, share, devices, slots, previous, None)
    reference.place_one_by_one(slack)
    if fast is None:  # cornered: the reference repairs the corner with an augmenting path
        assert reference.augmented
        return
    assert not reference.augmented
    table, device_load = reference.result()
    np.testing.assert_array_equal(fast[0], table)
    assert fast[1] == device_load  # the same sums, in the same order


@st.composite
def wide_slack_problems(draw):
    """Larger layouts than :func:`slack_problems` (up to 48 devices), steady-state previous tables."""
    devices = draw(st.integers(1, 48))
    slots = draw(st.integers(2, 6))
    experts = draw(st.integers(1, devices * slots))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    layout = {"num_experts": experts, "num_devices": devices, "slots_per_device": slots}
    slack = draw(st.sampled_from([0.0, 0.5, 3.0, 1e9]))
    previous = ReplicaTable.random(rng, **layout).slot_to_expert
    for _ in range(draw(st.integers(0, 2))):
        loads = rng.dirichlet(np.full(experts, 0.5)) * 1000
        count = scale_min_max(loads, extra_replicas=int(rng.integers(0, devices * slots - experts + 1)),
                              max_per_expert=devices)
        previous = place_replicas(count, loads, num_devices=devices, slots_per_device=slots,
                                  previous=previous, warm_slack=slack)
    loads = rng.choice([0, 1, 3, 3, 10, 50], experts) if draw(st.booleans()) else rng.random(experts) * 100
    count = scale_min_max(loads, extra_replicas=int(rng.integers(0, devices * slots - experts + 1)),
                          max_per_expert=devices)
    return count, loads / count, devices, slots, np.asarray(previous, np.int64), slack


@settings(max_examples=150)
@given(st.one_of(slack_problems(), wide_slack_problems()))
def test_the_python_fallback_places_like_the_compiled_greedy(problem):
    # Where numba is missing, _slack_greedy runs as the plain Python function: it must give the same tables
    # and the same device loads, and give up on the same cornered runs.
    count, share, devices, slots, previous, slack = problem
    compiled = placer_module._place_slack(count, share, devices, slots, previous, slack)
    with _python_greedy():
        python = placer_module._place_slack(count, share, devices, slots, previous, slack)
    assert (python is None) == (compiled is None)
    if compiled is not None:
        np.testing.assert_array_equal(python[0], compiled[0])
        assert python[1] == compiled[1]


def test_the_compiled_greedy_has_one_specialisation():
    previous = np.array([0, -1, 1, 2, -1, -1], np.int32)
    for loads in (np.array([5, 1, 9]), np.array([5.0, 1.5, 9.0]), np.arange(6.0)[::2] + 1):
        place_replicas(np.array([2, 1, 1], np.int32), loads, num_devices=np.int64(2), slots_per_device=3,
                       previous=previous, warm_slack=1)
    assert len(getattr(placer_module._slack_greedy, "signatures", [])) <= 1


def test_njit_works_where_no_cache_can_be_written():
    # A function with no source file has no cache location: numba refuses cache=True for it, and njit then
    # compiles without a cache instead of raising.
    namespace: dict = {}
    exec("def twice(x):\n    return 2 * x\n", namespace)
    assert njit(namespace["twice"])(21) == 42


def test_a_cornered_slack_run_is_repaired_by_the_general_path():
    # Heaviest first: expert 1 (25 per replica) on both devices, experts 2 and 3 (3 each) fill device 0,
    # expert 0's first replica (1.5) goes to device 1 and its second has no device left without expert 0.
    # The fast greedy stops there; the general one repairs the corner with an augmenting path and settles.
    count, loads = np.array([2, 2, 1, 1]), np.array([3, 50, 3, 3])
    previous = np.array([2, 3, 0, -1, 0, 1])  # 2 devices x 3 slots
    share = loads / count
    assert placer_module._place_slack(count, share, 2, 3, previous, 3.0) is None
    with _python_greedy():
        assert placer_module._place_slack(count, share, 2, 3, previous, 3.0) is None
    out = place_replicas(count, loads, num_devices=2, slots_per_device=3, previous=previous, warm_slack=3.0)
    table = ReplicaTable.from_slot_to_expert(out, num_experts=4, num_devices=2, slots_per_device=3)
    np.testing.assert_array_equal(table.replica_count, count)
    again = place_replicas(count, loads, num_devices=2, slots_per_device=3, previous=out, warm_slack=3.0)
    np.testing.assert_array_equal(again, out)
