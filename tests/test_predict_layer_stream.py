"""RoutingOnly one layer at a time gives the forecasts of ``predict``, compiles once, and checks its input."""

import numpy as np
import pytest

from moeless_jax.errors import InputError
from moeless_jax.predict import LayerStream, RoutingOnly, RoutingOnlyConfig
from moeless_jax.predict.layer_stream import _step
from moeless_jax.traces import synthetic_trace

CONFIG = RoutingOnlyConfig(hidden=32, window=3, own_layers=2, steps=30, tokens_per_step=64, warmup_steps=5,
                           online_alpha=0.1)


@pytest.fixture(scope="module")
def fitted():
    trace = synthetic_trace(num_requests=24, mean_tokens=20, num_layers=6, num_experts=8, top_k=2, seed=3)
    return trace, RoutingOnly(distance=1, config=CONFIG).fit(trace)


@pytest.mark.parametrize("own_layers", [2, 0])
def test_stream_matches_predict_layer_by_layer_and_compiles_once(fitted, own_layers):
    trace, _ = fitted
    config = RoutingOnlyConfig(**{**CONFIG.__dict__, "own_layers": own_layers})
    predictor = RoutingOnly(distance=1, config=config).fit(trace)
    batch = np.arange(5, 5 + 70)
    for rounds in range(2):  # the second round runs with the online correction learned from the first
        want = predictor.predict(trace, batch)  # [T, E], all targets in one call
        stream = LayerStream(predictor, trace.request_id[batch], trace.position[batch])
        compiled = _step._cache_size()
        got = np.stack([stream.push(layer, trace.expert_ids[batch, layer]) for layer in range(len(want))])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        if rounds:
            assert _step._cache_size() == compiled  # every layer and batch of this size: one compiled step
        predictor.observe(np.stack([np.bincount(trace.expert_ids[batch, layer].ravel(), minlength=8)
                                    for layer in range(trace.num_layers)]))


def test_stream_refuses_out_of_order_or_malformed_layers(fitted):
    trace, predictor = fitted
    batch = np.arange(30)
    stream = LayerStream(predictor, trace.request_id[batch], trace.position[batch])
    with pytest.raises(InputError, match="in order"):
        stream.push(1, trace.expert_ids[batch, 1])
    with pytest.raises(InputError, match="expert_ids must be"):
        stream.push(0, trace.expert_ids[batch, 0][:, :1])
    for layer in range(5):
        stream.push(layer, trace.expert_ids[batch, layer])
    with pytest.raises(InputError, match="in order|past the last"):
        stream.push(5, trace.expert_ids[batch, 5])
    with pytest.raises(InputError, match="not fitted"):
        LayerStream(RoutingOnly(distance=1, config=CONFIG), trace.request_id[batch], trace.position[batch])
