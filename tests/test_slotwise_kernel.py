"""The slotwise expert kernel: every slot computes with its own buffer size; exact, dropless, counted."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from moeless_jax.moe import (
    MoEConfig,
    MoEParams,
    ReplicaTable,
    default_buffers,
    dense_moe_reference,
    grouped_swiglu,
    init_mlp_weights,
    make_ep_mesh,
    materialize_slot_weights,
    moe_forward,
    slotwise_swiglu,
)
from moeless_jax.moe.capacity import config_slot_capacities, pick_capacity, slotwise_rows

WEIGHTS = init_mlp_weights(jax.random.key(0), (4,), 8, 16, jnp.float32)


@given(
    shares=st.lists(st.integers(0, 40), min_size=5, max_size=5),
    capacities=st.lists(st.integers(1, 48), min_size=1, max_size=4, unique=True),
    overflow_rows=st.integers(1, 64),
)
def test_every_row_that_fits_is_exact_and_the_rest_is_counted(shares, capacities, overflow_rows):
    capacities = tuple(sorted(capacities))
    slot = np.random.default_rng(sum(shares)).permutation(np.repeat(np.arange(5), shares))  # 4 = padding
    if slot.size == 0:
        return
    slot = jnp.asarray(slot, jnp.int32)
    rows = jax.random.normal(jax.random.key(slot.size), (slot.size, 8))
    y, lost = jax.jit(partial(slotwise_swiglu, capacity=capacities, overflow_rows=overflow_rows))(
        rows, slot, WEIGHTS
    )
    spilled = sum(max(0, n - capacities[-1]) for n in shares[:4])
    assert int(lost) == max(0, spilled - overflow_rows)
    if int(lost) == 0:
        np.testing.assert_allclose(y, grouped_swiglu(rows, slot, WEIGHTS), rtol=1e-5, atol=1e-5)


def test_each_slot_at_its_size_edges():
    capacities = (4, 8, 12)
    for fullest in (0, 1, 4, 5, 8, 9, 12, 13, 20):
        slot = jnp.asarray(np.concatenate([np.zeros(fullest), [1, 1, 2, 4, 4]]), jnp.int32)
        rows = jax.random.normal(jax.random.key(fullest), (slot.size, 8))
        y, lost = slotwise_swiglu(rows, slot, WEIGHTS, capacity=capacities, overflow_rows=8)
        assert int(lost) == 0
        np.testing.assert_allclose(y, grouped_swiglu(rows, slot, WEIGHTS), rtol=1e-5, atol=1e-5)


def test_the_rows_a_device_computes_follow_its_slots_not_its_fullest_slot():
    capacities = (64, 128, 256, 512)
    assert slotwise_rows(capacities, [500, 10, 0, 70]) == 512 + 64 + 128
    assert slotwise_rows(capacities, [500, 10, 0, 70]) < 4 * pick_capacity(capacities, 500)
    config = MoEConfig(d_model=16, d_ff=32, num_experts=64, top_k=6, num_devices=8, slots_per_device=10,
                       expert_kernel="slotwise")
    sizes = config_slot_capacities(config, 1024)
    assert sizes[0] == 64 and sizes[-1] >= 2 * 1024 * 6 / 10  # from one tile up to 2x a balanced slot


def test_layer_with_the_slotwise_kernel_matches_the_dense_reference_in_values_and_gradients():
    config = MoEConfig(d_model=16, d_ff=8, num_experts=16, top_k=4, num_devices=8, slots_per_device=3,
                       router="deepseek", split="balanced", expert_kernel="slotwise")
    mesh = make_ep_mesh(8)
    k_router, k_experts, k_x, k_cot = jax.random.split(jax.random.key(2), 4)
    router = jax.random.normal(k_router, (16, 16))
    experts = init_mlp_weights(k_experts, (16,), 16, 8, jnp.float32)
    table = ReplicaTable.random(np.random.default_rng(1), num_experts=16, num_devices=8, slots_per_device=3)
    x = jax.random.normal(k_x, (128, 16))
    cotangent = jax.random.normal(k_cot, x.shape)
    assert default_buffers(config, 16).slot_rows is not None

    def layer_loss(experts, x):
        params = MoEParams(router, materialize_slot_weights(experts, table), None)
        out = moe_forward(params, table.arrays(), x, config=config, mesh=mesh)
        return jnp.sum(out.y * cotangent), out

    def reference_loss(experts, x):
        return jnp.sum(dense_moe_reference(router, experts, None, x, config=config) * cotangent)

    with jax.set_mesh(mesh):
        (_, out), got = jax.jit(jax.value_and_grad(layer_loss, argnums=(0, 1), has_aux=True))(experts, x)
    assert int(out.overflow) == 0
    want_y = dense_moe_reference(router, experts, None, x, config=config)
    np.testing.assert_allclose(np.asarray(out.y), np.asarray(want_y), rtol=2e-5, atol=2e-5)
    want = jax.jit(jax.grad(reference_loss, argnums=(0, 1)))(experts, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)
