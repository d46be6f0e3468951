"""Training through MoELayer: tied replica gradients, optimizer state that follows the table, router losses,
DeepSeek-V3 routing, Auto / Explicit / data x expert meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moeless_jax.moe import (
    MoEConfig,
    MoELayer,
    ReplicaTable,
    dense_moe_reference,
    make_ep_mesh,
    route,
)
from moeless_jax.moe.optimizer_state import follow_moves
from moeless_jax.moe.reference import combine_matrix

CONFIG = MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, num_devices=8, slots_per_device=2)
REPLICATED = [0, 1, 1, 0, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 2]  # every expert twice, one per device
TOKENS = 64


class Net(nnx.Module):
    """A two-block model around the layer, as a user would write one."""

    def __init__(self, config: MoEConfig, mesh, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Linear(config.d_model, config.d_model, rngs=rngs)
        self.moe1 = MoELayer(config, mesh=mesh, rngs=rngs)
        self.moe2 = MoELayer(config, mesh=mesh, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        a = self.moe1(h)
        h = h + a.y
        b = self.moe2(h)
        return h + b.y, a.load_balance_loss + b.load_balance_loss

    def moe_layers(self):
        return [self.moe1, self.moe2]


def _batch(seed, n=TOKENS, d=16):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (n, d)), jax.random.normal(k2, (n, d))


def _train(model, optimizer, steps, seed=0, mesh=None, on_step=None):
    @nnx.jit
    def step(model, optimizer, x, target):
        def loss_fn(model):
            y, balance = model(x)
            return jnp.mean((y - target) ** 2) + 0.01 * balance

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    for i in range(steps):
        x, target = _batch(seed + i)
        if mesh is not None:
            x = jax.device_put(x, NamedSharding(mesh, P()))
            target = jax.device_put(target, NamedSharding(mesh, P()))
        losses.append(float(step(model, optimizer, x, target)))
        if on_step is not None:
            on_step(i)
    return losses


def _table(slot_to_expert):
    return ReplicaTable.from_slot_to_expert(
        np.asarray(slot_to_expert), num_experts=8, num_devices=8, slots_per_device=2
    )


def _logical(layer):
    return jax.tree.map(np.asarray, layer.logical_experts())


def _assert_replicas_identical(layer):
    table = layer.replica_table()
    for w in layer.experts.weights():
        w = np.asarray(w)
        for e in range(table.num_experts):
            slots = table.expert_slots[e, : table.replica_count[e]]
            for s in slots[1:]:
                np.testing.assert_array_equal(w[s], w[slots[0]], err_msg=f"expert {e} slot {s} drifted")


def test_replicated_training_equals_static_training_and_replicas_never_drift():
    mesh = make_ep_mesh(8)
    static_model = Net(CONFIG, mesh)
    replicated_model = Net(CONFIG, mesh)
    replicated_opt = nnx.Optimizer(replicated_model, optax.adamw(3e-3), wrt=nnx.Param)
    static_opt = nnx.Optimizer(static_model, optax.adamw(3e-3), wrt=nnx.Param)
    _train(static_model, static_opt, 3)
    _train(replicated_model, replicated_opt, 3)
    # Mid-training table change: weights and Adam moments must follow the table.
    for layer in replicated_model.moe_layers():
        plan = layer.set_table(_table(REPLICATED))
        assert follow_moves(replicated_opt, replicated_model, layer, plan) == 6
    _train(static_model, static_opt, 12, seed=3)
    _train(replicated_model, replicated_opt, 12, seed=3)
    for s_layer, r_layer in zip(static_model.moe_layers(), replicated_model.moe_layers(), strict=True):
        _assert_replicas_identical(r_layer)
        for a, b in zip(jax.tree.leaves(_logical(s_layer)), jax.tree.leaves(_logical(r_layer)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_slot_gradients_are_the_logical_experts_gradients():
    mesh = make_ep_mesh(8)
    layer = MoELayer(CONFIG, mesh=mesh, rngs=nnx.Rngs(1))
    layer.set_table(_table(REPLICATED))
    logical = layer.logical_experts()
    x, cot = _batch(4)

    def layer_loss(layer):
        return jnp.sum(layer(x).y * cot)

    with jax.set_mesh(mesh):  # jax.grad on an Explicit mesh outside jit needs the mesh in context
        grads = nnx.grad(layer_loss)(layer)
    router = np.asarray(layer.router[...])
    want = jax.grad(
        lambda e: jnp.sum(dense_moe_reference(router, e, None, x, config=CONFIG) * cot)
    )(jax.tree.map(np.asarray, logical))
    slot_to_expert = layer.replica_table().slot_to_expert
    for name, w in zip(("gate", "up", "down"), want, strict=True):
        got = np.asarray(getattr(grads.experts, name)[...])
        np.testing.assert_allclose(got, np.asarray(w)[slot_to_expert], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_nnx_optimizer_runs_on_explicit_and_auto_meshes(axis_type):
    kind = jax.sharding.AxisType.Explicit if axis_type == "explicit" else jax.sharding.AxisType.Auto
    mesh = make_ep_mesh(8, axis_type=kind)
    model = Net(CONFIG, mesh)
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    losses = _train(model, optimizer, 20, mesh=mesh)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert model.moe1.experts.gate[...].sharding.spec[0] == "ep"


def test_output_keeps_the_inputs_layout_on_an_explicit_mesh():
    mesh = make_ep_mesh(8)
    layer = MoELayer(CONFIG, mesh=mesh, rngs=nnx.Rngs(0))
    x = jax.device_put(_batch(0)[0], NamedSharding(mesh, P()))
    out = layer(x)
    assert out.y.sharding.is_equivalent_to(x.sharding, 2)
    np.testing.assert_array_equal(np.asarray(out.y + x), np.asarray(out.y) + np.asarray(x))


def test_data_by_expert_mesh_trains_and_each_data_shard_dispatches_only_its_tokens():
    config = MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, num_devices=4, slots_per_device=3)
    mesh = make_ep_mesh(4, data=2)
    model = Net(config, mesh)
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    losses = _train(model, optimizer, 20, mesh=mesh)
    assert losses[-1] < losses[0]
    x = jax.device_put(_batch(0)[0], NamedSharding(mesh, P(("data", "ep"))))
    out = model.moe1(x)
    want = dense_moe_reference(
        model.moe1.router[...], model.moe1.logical_experts(), None, np.asarray(x), config=config
    )
    np.testing.assert_allclose(np.asarray(out.y), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert int(out.expert_counts.sum()) == TOKENS * config.top_k
    # Every all-to-all runs within one data shard's ep group of 4 devices, never across data shards.
    hlo = jax.jit(lambda x: model.moe1(x).y).lower(x).compile().as_text()
    groups = [line for line in hlo.splitlines() if "all-to-all" in line and "replica_groups" in line]
    assert groups, "expected all-to-all dispatch"
    for line in groups:
        assert "replica_groups={{0,1,2,3},{4,5,6,7}}" in line or "'ep'=4] {'ep'}" in line, line


def test_router_losses_match_their_definitions():
    mesh = make_ep_mesh(8)
    layer = MoELayer(CONFIG, mesh=mesh, rngs=nnx.Rngs(2))
    x = _batch(5)[0]
    out = layer(x)
    logits = np.asarray(x, np.float64) @ np.asarray(layer.router[...], np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    counts = np.asarray(out.expert_counts)
    want_balance = 8 * np.sum(counts / (TOKENS * 2) * probs.mean(0))
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    np.testing.assert_allclose(float(out.load_balance_loss), want_balance, rtol=1e-4)
    np.testing.assert_allclose(float(out.router_z_loss), np.mean(lse**2), rtol=1e-4)
    with jax.set_mesh(layer.mesh):
        grads = nnx.grad(lambda layer: layer(x).load_balance_loss)(layer)
    assert float(jnp.abs(grads.router[...]).sum()) > 0


def _v3_reference(x, kernel, bias, *, top_k, groups, topk_groups, scaling):
    scores = 1 / (1 + np.exp(-(np.asarray(x, np.float64) @ np.asarray(kernel, np.float64))))
    choice = scores + bias
    ids = np.zeros((len(x), top_k), int)
    per = scores.shape[1] // groups
    for t in range(len(x)):
        grouped = choice[t].reshape(groups, per)
        group_score = np.sort(grouped, axis=1)[:, -2:].sum(1)
        keep = np.argsort(-group_score, kind="stable")[:topk_groups]
        masked = np.full(scores.shape[1], -np.inf)
        for g in keep:
            masked[g * per : (g + 1) * per] = choice[t, g * per : (g + 1) * per]
        ids[t] = np.argsort(-masked, kind="stable")[:top_k]
    weights = np.take_along_axis(scores, ids, 1)
    return ids, weights / weights.sum(1, keepdims=True) * scaling


def test_deepseek_v3_routing_matches_a_reference_and_its_bias_only_chooses():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 16)).astype(np.float32)
    kernel = rng.normal(size=(16, 16)).astype(np.float32) / 4
    bias = rng.normal(size=16).astype(np.float32) / 4
    got = route(jnp.asarray(x), jnp.asarray(kernel), top_k=4, kind="deepseek_v3", bias=jnp.asarray(bias),
                group_limit=MoEConfig(d_model=16, d_ff=8, num_experts=16, top_k=4, num_devices=2,
                                      slots_per_device=8, router="deepseek_v3", num_expert_groups=4,
                                      topk_groups=2).group_limit, scaling=2.5)
    ids, weights = _v3_reference(x, kernel, bias, top_k=4, groups=4, topk_groups=2, scaling=2.5)
    np.testing.assert_array_equal(np.sort(np.asarray(got.expert_ids), 1), np.sort(ids, 1))
    order_got, order_ref = np.argsort(np.asarray(got.expert_ids), 1), np.argsort(ids, 1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(got.weights), order_got, 1),
                               np.take_along_axis(weights, order_ref, 1), rtol=1e-5)
    # Experts outside the kept groups are never chosen.
    per_group = np.asarray(got.expert_ids) // 4
    assert all(len(set(row)) <= 2 for row in per_group)


def test_deepseek_v3_layer_is_exact_and_its_bias_moves_load():
    config = MoEConfig(d_model=16, d_ff=8, num_experts=16, top_k=4, num_devices=8, slots_per_device=3,
                       router="deepseek_v3", num_expert_groups=4, topk_groups=2, routed_scaling_factor=2.0)
    layer = MoELayer(config, mesh=make_ep_mesh(8), rngs=nnx.Rngs(3))
    x = _batch(6)[0]
    out = layer(x)
    params = layer.params
    routing = route(x, params.router, top_k=4, kind="deepseek_v3", bias=params.router_bias,
                    group_limit=config.group_limit, scaling=2.0)
    combine = combine_matrix(routing.weights, routing.expert_ids, 16)
    logical = layer.logical_experts()
    per_expert = jax.vmap(lambda g, u, d: (jax.nn.silu(x @ g) * (x @ u)) @ d)(*logical)
    np.testing.assert_allclose(np.asarray(out.y), np.einsum("te,etm->tm", combine, per_expert),
                               rtol=2e-5, atol=2e-5)
    counts = np.asarray(out.expert_counts)
    forward = nnx.jit(lambda layer, x: layer(x).expert_counts)
    for _ in range(30):
        layer.update_router_bias(forward(layer, x), 0.05)
    after = np.asarray(forward(layer, x))
    assert after.max() < counts.max(), (counts, after)
    with pytest.raises(ValueError, match="only deepseek_v3"):
        MoELayer(CONFIG, mesh=make_ep_mesh(8), rngs=nnx.Rngs(0)).update_router_bias(counts, 0.1)


def test_set_table_rejects_what_is_not_a_table():
    layer = MoELayer(CONFIG, mesh=make_ep_mesh(8), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="ReplicaTable.from_slot_to_expert"):
        layer.set_table(REPLICATED)


def test_integer_input_and_follow_moves_errors_are_clear():
    layer = MoELayer(CONFIG, mesh=make_ep_mesh(8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="embed token ids first"):
        layer(jnp.ones((TOKENS, 16), jnp.int32))
    other = Net(CONFIG, make_ep_mesh(8))
    optimizer = nnx.Optimizer(other, optax.sgd(0.1), wrt=nnx.Param)
    plan = other.moe1.set_table(_table(REPLICATED))
    with pytest.raises(ValueError, match="holds no state"):
        follow_moves(optimizer, other, other.moe1, plan)
    with pytest.raises(ValueError, match="not part of model"):
        follow_moves(optimizer, other, layer, plan)
