"""Generation with the replication controller between steps: same tokens, better-balanced devices."""

import numpy as np
import pytest
from flax import nnx

from moeless_jax.model import ModelConfig, MoESection, MoETransformer
from moeless_jax.moe import ReplicaTable, make_ep_mesh
from moeless_jax.replication import ControllerConfig
from moeless_jax.serve import device_balancedness, generate_live

MODEL = ModelConfig(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_seq_len=32,
    moe=MoESection(num_experts=8, top_k=2, d_ff=16, expert_kernel="ragged", split="even"),
)
PROMPTS = [[1, 5, 9, 13], [1, 7], [1, 2, 3, 4, 5, 6], [1, 30], [1, 11, 12], [1, 40, 41], [1, 8], [1, 63, 2]]


@pytest.fixture(scope="module")
def models():
    mesh = make_ep_mesh(8)
    return tuple(MoETransformer(MODEL, mesh=mesh, rngs=nnx.Rngs(0)) for _ in range(2))


def test_controller_keeps_the_tokens_and_installs_tables_within_budget(models):
    static_model, live_model = models
    static = generate_live(static_model, PROMPTS, 10)
    live = generate_live(live_model, PROMPTS, 10,
                         controller=ControllerConfig(policy="moeless", max_moves_per_layer=3))
    assert live.tokens == static.tokens
    assert static.balancedness.shape == live.balancedness.shape == (10, 2)
    summary = live.controller
    assert summary["steps"] == 10 and summary["rebalances"] >= 1 and summary["slots_moved"] > 0
    assert summary["slots_moved"] <= 3 * 2 * summary["rebalances"]
    replicated = [layer.replica_table() for layer in live_model.moe_layers()]
    assert any((t.replica_count > 1).any() for t in replicated)
    # The static model's tables never changed.
    static_table = ReplicaTable.static(num_experts=8, num_devices=8, slots_per_device=2)
    assert all(layer.replica_table() == static_table for layer in static_model.moe_layers())


def test_device_balancedness():
    counts = np.array([[4, 0, 4, 0], [8, 0, 0, 0], [0, 0, 0, 0]])  # 2 devices x 2 slots
    np.testing.assert_allclose(device_balancedness(counts, 2), [1.0, 0.5, 1.0])


def _hot_model(mesh):
    model = MoETransformer(MODEL, mesh=mesh, rngs=nnx.Rngs(0))
    for layer in model.moe_layers():  # a hot expert, so forecasts ask for replicas
        layer.router.set_value(layer.router[...].at[:, 0].add(1.0))
    return model


def test_layer_ahead_and_controller_together_keep_the_tokens_and_the_weights():
    """Layer-ahead inside every step (min_tokens_per_device=0) and the controller between steps, on one
    model: the controller must copy from the tables layer-ahead left, so every slot holds its expert."""
    from moeless_jax.moe import materialize_slot_weights
    from moeless_jax.replication import LayerAhead, LayerAheadConfig

    mesh = make_ep_mesh(8)
    static = generate_live(_hot_model(mesh), PROMPTS, 6)
    model = _hot_model(mesh)
    controller = ControllerConfig(policy="moeless", max_moves_per_layer=3)
    live = generate_live(model, PROMPTS, 6, controller=controller,
                         layer_ahead=LayerAhead(LayerAheadConfig(min_tokens_per_device=0)))
    assert live.tokens == static.tokens
    assert live.weight_copies.shape == (6, 2) and live.weight_copies[:, 0].sum() == 0
    assert live.weight_copies[:, 1].sum() > 0 and live.controller["slots_moved"] > 0
    for layer in model.moe_layers():
        table = layer.replica_table()
        want = materialize_slot_weights(layer.logical_experts(), table)
        filled = table.slot_to_expert >= 0
        for got, ref in zip(layer.experts.weights(), want, strict=True):
            np.testing.assert_array_equal(np.asarray(got)[filled], np.asarray(ref)[filled])
    assert live.summary()["layer_ahead_weight_copies"] == int(live.weight_copies.sum())
    assert static.weight_copies is None and static.summary()["layer_ahead_weight_copies"] is None
