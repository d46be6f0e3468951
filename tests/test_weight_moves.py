"""In-step slot weight moves: equal to the host move plan bit for bit, under jit, on every mesh kind."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from moeless_jax.moe import MLPWeights, ReplicaTable, apply_moves, make_ep_mesh, plan_moves
from moeless_jax.moe.slot_weights import expert_bytes
from moeless_jax.moe.weight_moves import SlotMoves, move_slot_weights, moved_bytes, slot_moves

E, D, S, M, F = 16, 8, 3, 4, 6


def random_table(seed: int, *, experts: int = E, devices: int = D) -> ReplicaTable:
    free = devices * S - experts
    return ReplicaTable.random(
        np.random.default_rng(seed),
        num_experts=experts,
        num_devices=devices,
        slots_per_device=S,
        extra_replicas=seed % (free + 1),
    )


def slot_state(num_slots: int) -> dict:
    """Slot weights plus an optimizer-moment-like leaf; every slot's rows are distinct (slot id encoded)."""
    ids = np.arange(num_slots, dtype=np.float32)[:, None, None] * 1000
    gate = ids + np.arange(M * F, dtype=np.float32).reshape(M, F)
    down = -(ids + np.arange(F * M, dtype=np.float32).reshape(F, M))
    moment = (np.arange(num_slots, dtype=np.float32)[:, None] + np.array([0.25, 0.5], np.float32))
    return {"mlp": MLPWeights(gate, gate + 0.5, down), "moment": jnp.asarray(moment, jnp.bfloat16)}


def on_mesh(tree, mesh):
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("ep"))), tree)


def host_reference(state: dict, old: ReplicaTable, new: ReplicaTable) -> dict:
    plan = plan_moves(old, new, bytes_per_expert=1)
    moved = apply_moves(jax.tree.map(jnp.array, state), plan)  # apply_moves donates its input
    return jax.tree.map(np.asarray, moved)


def assert_trees_equal(got, want) -> None:
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@partial(jax.jit, static_argnames=("mesh", "budget"))
def move(state, old_arrays, new_slot_to_expert, *, mesh, budget):
    moves = slot_moves(old_arrays, new_slot_to_expert, slots_per_device=S)
    moved, fits = move_slot_weights(state, moves, mesh=mesh, max_moves_per_device=budget)
    return moved, fits, moves


def expected_moves(old: ReplicaTable, new: ReplicaTable):
    plan = plan_moves(old, new, bytes_per_expert=1)
    source = np.full(old.num_slots, -1, np.int32)
    per_device = np.zeros(old.num_devices, np.int32)
    for m in plan.moves:
        source[m.slot] = m.src_slot
        per_device[m.dst_device] += 1
    return source, per_device, plan.num_remote


@pytest.fixture(scope="module")
def mesh():
    return make_ep_mesh(D)


@given(old_seed=st.integers(0, 10**6), new_seed=st.integers(0, 10**6), budget=st.integers(1, S))
def test_moves_equal_host_plan_bit_for_bit_or_leave_weights_unchanged(mesh, old_seed, new_seed, budget):
    old, new = random_table(old_seed), random_table(new_seed)
    state = slot_state(old.num_slots)
    moved, fits, moves = move(on_mesh(state, mesh), old.arrays(), jnp.asarray(new.slot_to_expert),
                              mesh=mesh, budget=budget)
    source, per_device, remote = expected_moves(old, new)
    np.testing.assert_array_equal(moves.source_slot, source)
    np.testing.assert_array_equal(moves.per_device, per_device)
    assert int(moves.remote) == remote and int(moves.unsourced) == 0
    assert bool(fits) == (per_device.max() <= budget)
    assert_trees_equal(moved, host_reference(state, old, new) if fits else state)


def test_over_budget_returns_weights_unchanged(mesh):
    old, new = random_table(1), random_table(2)
    _, per_device, _ = expected_moves(old, new)
    most = int(per_device.max())
    assert most >= 2, "pick tables where some device receives several copies"
    state = slot_state(old.num_slots)
    args = (on_mesh(state, mesh), old.arrays(), jnp.asarray(new.slot_to_expert))
    moved, fits, _ = move(*args, mesh=mesh, budget=most - 1)
    assert not bool(fits)
    assert_trees_equal(moved, state)
    moved, fits, _ = move(*args, mesh=mesh, budget=most)
    assert bool(fits)
    assert_trees_equal(moved, host_reference(state, old, new))


def test_unsourced_expert_refuses_to_move(mesh):
    old, new = random_table(3), random_table(4)
    arrays = old.arrays()
    changed = int(np.flatnonzero((old.slot_to_expert != new.slot_to_expert) & (new.slot_to_expert >= 0))[0])
    # Corrupt the old table: the expert the changed slot needs has no listed replica.
    gone = arrays._replace(expert_slots=arrays.expert_slots.at[new.slot_to_expert[changed]].set(-1))
    state = slot_state(old.num_slots)
    new_s2e = jnp.asarray(new.slot_to_expert)
    moved, fits, moves = move(on_mesh(state, mesh), gone, new_s2e, mesh=mesh, budget=S)
    assert int(moves.unsourced) >= 1 and not bool(fits)
    assert_trees_equal(moved, state)


def test_tables_are_data_inside_a_bigger_jit(mesh):
    traces = []

    @jax.jit
    def step(state, x, old_arrays, new_slot_to_expert):
        traces.append(1)
        moves = slot_moves(old_arrays, new_slot_to_expert, slots_per_device=S)
        moved, fits = move_slot_weights(state, moves, mesh=mesh, max_moves_per_device=S)
        hidden = jnp.einsum("m,pmf->pf", x, moved["mlp"].gate)
        return moved, fits, jnp.sum(hidden)

    state = slot_state(D * S)
    x = jnp.arange(M, dtype=jnp.float32)
    for old_seed, new_seed in ((10, 11), (12, 13)):
        old, new = random_table(old_seed), random_table(new_seed)
        moved, fits, total = step(on_mesh(state, mesh), x, old.arrays(), jnp.asarray(new.slot_to_expert))
        want = host_reference(state, old, new)
        assert bool(fits)
        assert_trees_equal(moved, want)
        np.testing.assert_allclose(total, np.einsum("m,pmf->", np.asarray(x), want["mlp"].gate), rtol=1e-6)
    assert len(traces) == 1 and step._cache_size() == 1, "a new table pair must not recompile"


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_gradient_flows_back_to_source_rows(axis_type):
    mesh = make_ep_mesh(D, axis_type=axis_type)
    old, new = random_table(20), random_table(21)
    moves = slot_moves(old.arrays(), jnp.asarray(new.slot_to_expert), slots_per_device=S)
    source = np.asarray(moves.source_slot)
    index = np.where(source >= 0, source, np.arange(old.num_slots))
    assert (index != np.arange(old.num_slots)).any()
    state = slot_state(old.num_slots)["mlp"]
    # Integer-valued cotangents keep every sum exact, so the comparison can be bit for bit.
    rng = np.random.default_rng(0)
    cotangent = jax.tree.map(lambda w: rng.integers(-8, 8, w.shape).astype(np.float32), state)

    def moved_loss(w):
        moved, _ = move_slot_weights(w, moves, mesh=mesh, max_moves_per_device=S)
        return sum(jnp.sum(a * c) for a, c in zip(moved, cotangent, strict=True))

    def gather_loss(w):
        return sum(jnp.sum(a[index] * c) for a, c in zip(w, cotangent, strict=True))

    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(moved_loss))(on_mesh(state, mesh))
    want = jax.grad(gather_loss)(jax.tree.map(jnp.asarray, state))
    assert_trees_equal(got, want)


def test_data_by_ep_mesh_moves_every_data_group():
    devices = 4
    mesh = make_ep_mesh(devices, data=2)
    old, new = random_table(30, experts=8, devices=devices), random_table(31, experts=8, devices=devices)
    state = slot_state(devices * S)
    moved, fits, moves = move(on_mesh(state, mesh), old.arrays(), jnp.asarray(new.slot_to_expert),
                              mesh=mesh, budget=S)
    assert bool(fits) and int(jnp.sum(moves.per_device)) > 0
    want = host_reference(state, old, new)
    for got, expected in zip(jax.tree.leaves(moved), jax.tree.leaves(want), strict=True):
        assert len(got.addressable_shards) == 8
        for shard in got.addressable_shards:  # each data group holds its own copy of the ep shards
            np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])


def test_auto_mesh():
    mesh = make_ep_mesh(D, axis_type=AxisType.Auto)
    old, new = random_table(40), random_table(41)
    state = slot_state(old.num_slots)
    moved, fits, _ = move(on_mesh(state, mesh), old.arrays(), jnp.asarray(new.slot_to_expert),
                          mesh=mesh, budget=S)
    assert bool(fits)
    assert_trees_equal(moved, host_reference(state, old, new))


def test_moved_bytes_match_the_host_plan():
    old, new = random_table(50), random_table(51)
    weights = slot_state(old.num_slots)["mlp"]
    moves = slot_moves(old.arrays(), new.slot_to_expert, slots_per_device=S)
    plan = plan_moves(old, new, bytes_per_expert=expert_bytes(weights))
    assert float(moved_bytes(moves, weights)) == plan.bytes_total > 0
    assert float(moved_bytes(moves, weights, remote_only=True)) == plan.num_remote * expert_bytes(weights)


def test_bad_inputs_name_the_field(mesh):
    old = random_table(60)
    moves = slot_moves(old.arrays(), old.slot_to_expert, slots_per_device=S)
    assert isinstance(moves, SlotMoves) and int(jnp.sum(moves.per_device)) == 0
    with pytest.raises(ValueError, match="new_slot_to_expert"):
        slot_moves(old.arrays(), old.slot_to_expert[:-1], slots_per_device=S)
    with pytest.raises(ValueError, match="leading slot axis"):
        move_slot_weights(jnp.zeros((5, 2)), moves, mesh=mesh, max_moves_per_device=1)
    with pytest.raises(ValueError, match="max_moves_per_device"):
        move_slot_weights(jnp.zeros((D * S, 2)), moves, mesh=mesh, max_moves_per_device=0)
