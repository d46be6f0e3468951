"""Layer-ahead replication: forecast, plan and move layer l + 1 inside the step; outputs never change."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moeless_jax.config import ConfigError, load_config
from moeless_jax.errors import InputError
from moeless_jax.model import ModelConfig, MoESection, MoETransformer
from moeless_jax.moe import (
    MoEConfig,
    MoEParams,
    ReplicaTable,
    init_mlp_weights,
    make_ep_mesh,
    materialize_slot_weights,
    moe_forward,
)
from moeless_jax.predict import RoutingOnly
from moeless_jax.replication import LayerAhead, LayerAheadConfig, layer_ahead_stack

CONFIG = MoEConfig(num_experts=16, top_k=2, d_model=32, d_ff=16, num_devices=8, slots_per_device=3,
                   router="mixtral", dtype="float32")
LAYERS, TOKENS = 3, 128


def _layers(seed=0):
    """Per layer: a skewed router (so balancing has work to do) and logical experts ``[E, ...]``."""
    key = jax.random.key(seed)
    routers, logical = [], []
    for layer in range(LAYERS):
        k1, k2, key = jax.random.split(jax.random.fold_in(key, layer), 3)
        router = jax.random.normal(k1, (CONFIG.d_model, CONFIG.num_experts)) * 0.3
        router = router.at[:, : 3].add(0.4)  # experts 0-2 are hot in every layer
        routers.append(router)
        logical.append(init_mlp_weights(k2, (CONFIG.num_experts,), CONFIG.d_model, CONFIG.d_ff, jnp.float32))
    return routers, logical


def _static_tables():
    table = ReplicaTable.static(num_experts=16, num_devices=8, slots_per_device=3)
    return [table.arrays() for _ in range(LAYERS)]


def _params(routers, logical, tables):
    return [MoEParams(r, materialize_slot_weights(w, t), None)
            for r, w, t in zip(routers, logical, tables, strict=True)]


@pytest.fixture(scope="module")
def mesh(devices):
    return make_ep_mesh(8, devices)


@pytest.fixture(scope="module")
def inputs():
    return jax.random.normal(jax.random.key(7), (TOKENS, CONFIG.d_model))


def _run_static(logical, tables, x, routers, mesh):
    for params, table in zip(_params(routers, logical, tables), tables, strict=True):
        x = x + moe_forward(params, table, x, config=CONFIG, mesh=mesh).y
    return jnp.sum(jnp.sin(x)), x


def _run_ahead(logical, tables, x, routers, mesh):
    params = _params(routers, logical, tables)
    y, used, experts, _, moves = layer_ahead_stack(params, tables, x, config=CONFIG, mesh=mesh,
                                                   max_moves_per_device=2)
    return jnp.sum(jnp.sin(y)), (y, used, experts, moves)


@pytest.fixture(scope="module")
def stack_runs(mesh, inputs):
    """Values and gradients (in the logical experts and the input) of a 3-layer stack, static and layer-ahead,
    for two different starting tables: the static one and a random one."""
    routers, logical = _layers()
    static = jax.jit(jax.value_and_grad(partial(_run_static, routers=routers, mesh=mesh), argnums=(0, 2),
                                        has_aux=True))
    ahead = jax.jit(jax.value_and_grad(partial(_run_ahead, routers=routers, mesh=mesh), argnums=(0, 2),
                                       has_aux=True))
    rng = np.random.default_rng(0)
    random = [ReplicaTable.random(rng, num_experts=16, num_devices=8, slots_per_device=3).arrays()
              for _ in range(LAYERS)]
    runs, static_tables = [], _static_tables()  # both built outside the mesh context: one array type
    with jax.set_mesh(mesh):
        for tables in (static_tables, random):
            runs.append((tables, static(logical, tables, inputs), ahead(logical, tables, inputs)))
    return logical, runs, (static, ahead)


def test_stack_values_and_gradients_equal_the_static_tables(stack_runs):
    _, runs, _ = stack_runs
    for _, ((_, y_static), g_static), ((_, (y_ahead, _, _, moves)), g_ahead) in runs:
        np.testing.assert_allclose(np.asarray(y_ahead), np.asarray(y_static), rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(g_ahead), jax.tree.leaves(g_static), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
        assert np.all(np.asarray(moves) <= 2) and int(np.asarray(moves)[0].sum()) == 0
    tables, _, ((_, (_, used, _, moves)), _) = runs[0]
    assert int(moves.sum()) > 0, "the skewed routers must make layer-ahead move something"
    start = np.asarray(tables[0].slot_to_expert)
    assert any(not np.array_equal(np.asarray(t.slot_to_expert), start) for t in used[1:])


def test_moved_slots_hold_their_new_experts_bit_for_bit(stack_runs):
    logical, runs, _ = stack_runs
    for _, _, ((_, (_, used, experts, _)), _) in runs:
        for layer in range(LAYERS):
            table = ReplicaTable.from_slot_to_expert(np.asarray(used[layer].slot_to_expert), num_experts=16,
                                                     num_devices=8, slots_per_device=3)
            want = materialize_slot_weights(logical[layer], table)
            filled = table.slot_to_expert >= 0
            for got, ref in zip(experts[layer], want, strict=True):
                np.testing.assert_array_equal(np.asarray(got)[filled], np.asarray(ref)[filled])


def test_tables_are_data_one_compilation(stack_runs):
    _, _, (static, ahead) = stack_runs
    assert static._cache_size() == 1 and ahead._cache_size() == 1


# ------------------------------------------------------------------------------------------- model mode
MODEL = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    max_seq_len=32,
                    moe=MoESection(num_experts=16, top_k=2, d_ff=16, router="mixtral", expert_kernel="ragged",
                                   split="even", slots_per_device=3))
ROWS, WIDTH = 8, 16
GATE_REUSE = LayerAhead(LayerAheadConfig(min_tokens_per_device=0))


TRACES: list[bool] = []  # one entry per trace of _forward, recording whether it replicated


@nnx.jit(static_argnames="layer_ahead")
def _forward(model, tokens, layer_ahead=None):
    TRACES.append(layer_ahead is not None)
    return model(tokens, layer_ahead=layer_ahead)


def _model(mesh, seed=0):
    model = MoETransformer(MODEL, mesh=mesh, rngs=nnx.Rngs(seed))
    for layer in model.moe_layers():  # a hot expert, as trained routers have
        layer.router.set_value(layer.router[...].at[:, 0].add(0.5))
    return model


def _slot_tables(model):
    return [np.asarray(layer.table.get_value().slot_to_expert) for layer in model.moe_layers()]


@pytest.fixture(scope="module")
def model_runs(mesh):
    """A plain forward, and two layer-ahead forwards of one model (the second from the first's tables)."""
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (ROWS, WIDTH)), jnp.int32)
    TRACES.clear()
    reference = _forward(_model(mesh), tokens)
    model = _model(mesh)
    before = _slot_tables(model)
    first = _forward(model, tokens, GATE_REUSE)
    after_first = _slot_tables(model)
    second = _forward(model, tokens, GATE_REUSE)
    return tokens, reference, model, before, first, after_first, second, list(TRACES)


def test_model_layer_ahead_keeps_logits_and_moves_weights(model_runs):
    _, reference, model, before, first, after, second, traced = model_runs
    for out in (first, second):
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(reference.logits), rtol=1e-5, atol=1e-5)
    copies = np.asarray(first.weight_copies)
    assert copies.shape == (2, 8) and copies[0].sum() == 0 and 0 < copies[1].sum() and copies.max() <= 4
    np.testing.assert_array_equal(after[0], before[0])
    assert not np.array_equal(after[1], before[1])
    for layer in model.moe_layers():  # the persisted tables are valid and their weights are their experts'
        table = layer.replica_table()
        want = materialize_slot_weights(layer.logical_experts(), table)
        filled = table.slot_to_expert >= 0
        for got, ref in zip(layer.experts.weights(), want, strict=True):
            np.testing.assert_array_equal(np.asarray(got)[filled], np.asarray(ref)[filled])
    assert traced == [False, True]  # the second layer-ahead call, on other tables, was not traced again


def test_model_layer_ahead_declines_small_steps(model_runs, mesh):
    tokens, reference, *_ = model_runs
    model = _model(mesh)
    before = _slot_tables(model)
    declining = LayerAhead(LayerAheadConfig(min_tokens_per_device=ROWS * WIDTH // 8 + 1))
    out = _forward(model, tokens, declining)
    assert int(np.asarray(out.weight_copies).sum()) == 0
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(reference.logits))
    for got, want in zip(_slot_tables(model), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_gate_copies_equal_to_the_routers_forecast_as_gate_reuse(model_runs, mesh):
    tokens, *_ = model_runs
    model = _model(mesh)
    layers = model.moe_layers()
    kernels = np.stack([np.asarray(layer.router[...]) for layer in layers])
    copies = LayerAhead(LayerAheadConfig("gate_copies", min_tokens_per_device=0), gate_kernels=kernels)
    hidden = jax.random.normal(jax.random.key(0), (ROWS * WIDTH, MODEL.d_model))
    out = None  # gate forecasts do not read the layer's output
    _, want = GATE_REUSE.forecast(None, 0, hidden, out, layers[1])
    _, got = copies.forecast(None, 0, hidden, out, layers[1])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert float(np.asarray(got).sum()) == ROWS * WIDTH * 2
    with pytest.raises(InputError, match="gate_kernels have shape"):
        LayerAhead(copies.config, gate_kernels=kernels[:1]).check_stack(layers)


def test_model_routing_only_forecaster_runs_in_step(model_runs, mesh):
    tokens, reference, *_ = model_runs
    predictor = RoutingOnly(1).initialise(MODEL.num_layers, 16, 2)
    model = _model(mesh)
    out = _forward(model, tokens, LayerAhead(LayerAheadConfig("routing_only", min_tokens_per_device=0),
                                             routing_only=predictor))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(reference.logits), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="fitted for 4 layers"):
        LayerAhead(LayerAheadConfig("routing_only"), routing_only=RoutingOnly(1).initialise(4, 16, 2)
                   ).check_stack(model.moe_layers())


def test_config_validation_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="forecaster"):
        LayerAheadConfig(forecaster="history")
    with pytest.raises(ConfigError, match="max_moves_per_device"):
        LayerAheadConfig(max_moves_per_device=0)
    with pytest.raises(InputError, match="gate_kernels"):
        LayerAhead(LayerAheadConfig("gate_copies"))
    with pytest.raises(InputError, match="distance"):
        LayerAhead(LayerAheadConfig("routing_only"), routing_only=RoutingOnly(2).initialise(4, 16, 2))
    path = tmp_path / "la.yaml"
    path.write_text("layer_ahead:\n  forecaster: gate_reuse\n  max_moves_per_device: 3\n")
    config = load_config(LayerAheadConfig, path, section="layer_ahead")
    assert dataclasses.replace(config) == LayerAheadConfig(max_moves_per_device=3)
