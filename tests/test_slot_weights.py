"""Materialising slot weights, move plans, and the NNX layer swapping tables without recompiling."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from moeless_jax.moe import (
    MoEConfig,
    MoELayer,
    ReplicaTable,
    apply_moves,
    dense_moe_reference,
    init_mlp_weights,
    make_ep_mesh,
    materialize_slot_weights,
    plan_moves,
)
from moeless_jax.moe.slot_weights import expert_bytes

E, D, S = 8, 8, 2
CONFIG = MoEConfig(d_model=16, d_ff=32, num_experts=E, top_k=2, num_devices=D, slots_per_device=S)
LOGICAL = init_mlp_weights(jax.random.key(0), (E,), 16, 32, jnp.float32)


def random_table(seed):
    return ReplicaTable.random(
        np.random.default_rng(seed), num_experts=E, num_devices=D, slots_per_device=S, extra_replicas=seed % 9
    )


@given(old_seed=st.integers(0, 10**6), new_seed=st.integers(0, 10**6))
def test_moves_touch_only_changed_slots_and_reach_the_new_table(old_seed, new_seed):
    old, new = random_table(old_seed), random_table(new_seed)
    weights = materialize_slot_weights(LOGICAL, old)
    plan = plan_moves(old, new, bytes_per_expert=expert_bytes(weights))
    changed = set(np.flatnonzero(old.slot_to_expert != new.slot_to_expert).tolist())
    assert {m.slot for m in plan.moves} | set(plan.cleared_slots) == changed
    for m in plan.moves:
        assert old.slot_to_expert[m.src_slot] == m.expert == new.slot_to_expert[m.slot]
        assert m.src_device == m.src_slot // S and m.dst_device == m.slot // S
        same_device = [p for p in old.expert_slots[m.expert] if p >= 0 and p // S == m.dst_device]
        assert m.local == bool(same_device)
    moved = apply_moves(jax.tree.map(jnp.copy, weights), plan)
    want = materialize_slot_weights(LOGICAL, new)
    filled = new.slot_to_expert >= 0
    for got_w, want_w in zip(moved, want, strict=True):
        np.testing.assert_array_equal(np.asarray(got_w)[filled], np.asarray(want_w)[filled])
    assert plan.bytes_total == len(plan.moves) * expert_bytes(weights)


def test_unchanged_table_moves_nothing():
    t = random_table(3)
    plan = plan_moves(t, t, bytes_per_expert=10)
    assert plan.moves == () and plan.cleared_slots == ()
    assert plan.summary() == {"moves": 0, "local_moves": 0, "remote_moves": 0, "bytes": 0, "cleared_slots": 0}


def test_nnx_layer_set_table_keeps_output_and_compiles_once():
    mesh = make_ep_mesh(D)
    layer = MoELayer(CONFIG, mesh=mesh, rngs=nnx.Rngs(0), logical_experts=LOGICAL)
    x = jax.random.normal(jax.random.key(1), (64, 16))
    traces = []

    @nnx.jit
    def step(layer, x):
        traces.append(1)
        return layer(x)

    first = step(layer, x)
    want = dense_moe_reference(layer.router[...], LOGICAL, None, x, config=CONFIG)
    np.testing.assert_allclose(first.y, want, rtol=2e-5, atol=2e-5)
    for seed in (5, 6, 7):
        new = random_table(seed)
        previous = layer.replica_table()
        plan = layer.set_table(new)
        assert len(plan.moves) + len(plan.cleared_slots) == int(
            np.sum(previous.slot_to_expert != new.slot_to_expert)
        )
        assert layer.replica_table() == new
        out = step(layer, x)
        np.testing.assert_allclose(out.y, want, rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(
            np.asarray(out.slot_counts)[new.slot_to_expert < 0], 0, err_msg="empty slots must get no tokens"
        )
    assert len(traces) == 1, "swapping the replica table must not retrace"
