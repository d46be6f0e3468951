"""In-step forecasts equal their host twins: gate forecasts (gate reuse / MoEless copies) and RoutingOnly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moeless_jax.errors import InputError
from moeless_jax.moe import MoEConfig, make_ep_mesh, route
from moeless_jax.predict import RoutingOnly, RoutingOnlyConfig
from moeless_jax.predict.gate import _gate_loads
from moeless_jax.predict.in_step import RoutingOnlyStream, gate_loads
from moeless_jax.predict.layer_stream import LayerStream


def _config(router="mixtral", **kw):
    return MoEConfig(num_experts=16, top_k=2, d_model=32, d_ff=16, num_devices=8, slots_per_device=3,
                     router=router, **kw)


@pytest.mark.parametrize("data", [1, 2])
def test_gate_loads_match_host_gate_forecast(devices, data):
    config = _config() if data == 1 else dataclasses.replace(_config(), num_devices=4, slots_per_device=4)
    mesh = make_ep_mesh(config.num_devices, devices, data=data)
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(64, config.d_model)).astype(np.float32)
    kernel = rng.normal(size=(config.d_model, config.num_experts)).astype(np.float32)
    got = np.asarray(jax.jit(lambda h, w: gate_loads(h, w, mesh=mesh, config=config))(hidden, kernel))
    want = _gate_loads(hidden, kernel, config.top_k, config.num_experts)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == 64 * config.top_k


def test_gate_loads_follow_deepseek_v3_bias(devices):
    config = _config("deepseek_v3")
    mesh = make_ep_mesh(8, devices)
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(64, config.d_model)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(config.d_model, config.num_experts)), jnp.float32)
    bias = jnp.zeros(config.num_experts).at[3].set(100.0)  # expert 3 chosen by every token
    got = np.asarray(gate_loads(hidden, kernel, mesh=mesh, config=config, bias=bias))
    ids = route(hidden, kernel, top_k=2, kind="deepseek_v3", bias=bias).expert_ids
    np.testing.assert_array_equal(got, np.bincount(np.asarray(ids).ravel(), minlength=16))
    assert got[3] == 64


def test_gate_loads_reject_wrong_shapes(devices):
    config = _config()
    mesh = make_ep_mesh(8, devices)
    with pytest.raises(InputError, match="kernel"):
        gate_loads(jnp.zeros((64, 32)), jnp.zeros((32, 15)), mesh=mesh, config=config)


def test_routing_only_stream_matches_host_layer_stream(devices):
    """Rows of 4 tokens (one request each), 16 rows over 8 devices: each device holds two whole requests."""
    num_layers, num_experts, top_k, rows, time = 4, 16, 2, 16, 4
    predictor = RoutingOnly(1, RoutingOnlyConfig(online_alpha=0.0)).initialise(num_layers, num_experts, top_k)
    rng = np.random.default_rng(2)
    ids = np.stack([np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(num_layers)])
                    for _ in range(rows * time)]).astype(np.int32)  # [N, L, K]
    positions = np.tile(np.arange(time, dtype=np.int32) + 3, (rows, 1))
    request = np.repeat(np.arange(rows), time)
    host = LayerStream(predictor, request, positions.reshape(-1))
    mesh = make_ep_mesh(8, devices)
    stream = RoutingOnlyStream(predictor)
    inputs = stream.inputs_for_rows(rows, time, jnp.asarray(positions), mesh)
    state = stream.init(rows * time, mesh)
    for layer in range(num_layers - 1):
        state, got = stream.forecast(state, layer, jnp.asarray(ids[:, layer]), inputs, mesh=mesh)
        want = host.push(layer, ids[:, layer])
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-4)
    with pytest.raises(InputError, match="past the last layer"):
        stream.forecast(state, num_layers - 1, jnp.asarray(ids[:, 0]), inputs, mesh=mesh)


def test_routing_only_stream_needs_a_fitted_predictor():
    with pytest.raises(InputError, match="not fitted"):
        RoutingOnlyStream(RoutingOnly(1))
