"""The predictors: deterministic, well-shaped forecasts; each one does what it claims on synthetic data."""

import numpy as np
import pytest

from moeless_jax.errors import InputError
from moeless_jax.predict import (
    GateReuse,
    GateTuneConfig,
    History,
    HistoryConfig,
    MoElessPredictor,
    Oracle,
    RoutingOnly,
    RoutingOnlyConfig,
    make_predictor,
    score_batches,
    synthetic_gated_trace,
    true_loads,
)
from moeless_jax.traces import RoutingTrace, synthetic_trace, token_budget_batches

TINY = RoutingOnlyConfig(hidden=32, window=2, own_layers=1, steps=150, tokens_per_step=64, warmup_steps=10,
                         learning_rate=1e-2, dropout=0.0)


def transition_trace(num_requests=40, tokens=24, num_layers=3, num_experts=8, seed=0) -> RoutingTrace:
    """Top-2 routing where layer l+1's experts are a fixed permutation of layer l's, and each request
    prefers its own experts at layer 0 (so batches differ and history cannot know them)."""
    rng = np.random.default_rng(seed)
    ids = np.empty((num_requests * tokens, num_layers, 2), np.int64)
    for request in range(num_requests):
        favourite = rng.permutation(num_experts)[:3]  # each request draws from 3 experts
        rows = slice(request * tokens, (request + 1) * tokens)
        ids[rows, 0] = np.stack([rng.choice(favourite, 2, replace=False) for _ in range(tokens)])
    for layer in range(1, num_layers):
        ids[:, layer] = rng.permutation(num_experts)[ids[:, layer - 1]]
    return RoutingTrace(expert_ids=ids, request_id=np.repeat(np.arange(num_requests), tokens),
                        position=np.tile(np.arange(tokens), num_requests), num_experts=num_experts,
                        layer_ids=tuple(range(1, num_layers + 1)))


@pytest.fixture(scope="module")
def transitions():
    trace = transition_trace()
    fit, test = trace.split_by_request(0.7, seed=0)
    return fit, test, token_budget_batches(test, 48)


@pytest.fixture(scope="module")
def routing_only(transitions):
    fit, _, _ = transitions
    return RoutingOnly(1, TINY).fit(fit)


def test_forecasts_are_well_shaped_and_sum_to_the_batch_assignments(transitions, routing_only):
    fit, test, batches = transitions
    for predictor in (History(2).fit(fit), Oracle(1).fit(fit), routing_only):
        forecast = predictor.predict(test, batches[0])
        assert forecast.shape == (test.num_layers - predictor.distance, test.num_experts)
        assert forecast.dtype == np.float64 and (forecast >= 0).all()
        np.testing.assert_allclose(forecast.sum(axis=1), len(batches[0]) * test.top_k)
        one = predictor.predict(test, batches[0], targets=[test.num_layers - 1])
        np.testing.assert_allclose(one[0], forecast[-1], rtol=1e-5)


def test_routing_only_is_deterministic(transitions, routing_only):
    fit, test, batches = transitions
    again = RoutingOnly(1, TINY).fit(fit)
    for batch in batches[:3]:
        first = routing_only.predict(test, batch)
        np.testing.assert_array_equal(first, routing_only.predict(test, batch))
        np.testing.assert_array_equal(first, again.predict(test, batch))


def test_routing_only_learns_transitions_that_history_cannot_know(transitions, routing_only):
    fit, test, batches = transitions
    learned = score_batches(routing_only, test, batches).summary()["accuracy_mean"]
    history = score_batches(History(1).fit(fit), test, batches).summary()["accuracy_mean"]
    assert learned > 0.97
    assert learned > history + 0.1


def test_routing_only_bytes_follow_param_dtype(transitions):
    fit, _, _ = transitions
    config = RoutingOnlyConfig(hidden=8, window=2, own_layers=0, steps=2, warmup_steps=0)
    half = RoutingOnly(1, config).fit(fit)
    # per target (T = 2): embed 8x8, window_scale 2x8, context 8x8, position 10x8, bias 8, head 8x8 + 8
    params = 2 * (64 + 16 + 64 + 80 + 8 + 64 + 8)
    assert half.num_bytes() == 2 * params
    assert all(array.dtype == np.float16 for array in half.state().values())


def test_oracle_is_exact(transitions):
    fit, test, batches = transitions
    summary = score_batches(Oracle(1).fit(fit), test, batches).summary()
    assert summary["accuracy_mean"] == pytest.approx(1.0)
    assert summary["recall_mean"] == pytest.approx(1.0)


def test_history_modes_match_hand_computation():
    trace = synthetic_trace(num_requests=4, num_layers=3, num_experts=4, top_k=1, seed=1)
    batch = np.arange(4)
    first = np.array([[4, 0, 0, 0], [0, 4, 0, 0], [1, 1, 1, 1]], float)
    second = np.array([[0, 0, 0, 4], [0, 4, 0, 0], [2, 2, 0, 0]], float)
    cases = {
        HistoryConfig("cumulative"): first + second,
        HistoryConfig("window", window=1): second,
        HistoryConfig("ema", ema_alpha=0.25): 0.75 * first + 0.25 * second,
    }
    for config, summary in cases.items():
        predictor = History(1, config).fit(trace)
        prior = predictor.predict(trace, batch)
        np.testing.assert_allclose(prior.sum(1), 4.0)
        for loads in (first, second):
            predictor.observe(loads)
        expected = summary[1:] / summary[1:].sum(1, keepdims=True) * 4
        np.testing.assert_allclose(predictor.predict(trace, batch), expected)
        predictor.reset()
        np.testing.assert_allclose(predictor.predict(trace, batch), prior)


def test_history_prior_is_the_fitting_trace_mean_load():
    trace = synthetic_trace(num_requests=6, num_layers=2, num_experts=4, top_k=2, seed=3)
    forecast = History(1).fit(trace).predict(trace, np.arange(trace.num_tokens))
    np.testing.assert_allclose(forecast[0], true_loads(trace, np.arange(trace.num_tokens))[1])


def test_gate_reuse_is_exact_when_the_residual_stream_does_not_move():
    trace, kernels = synthetic_gated_trace(num_requests=6, num_layers=3, mixing=0.0, noise=0.0, seed=2)
    batches = token_budget_batches(trace, 64)
    predictor = GateReuse(1, kernels).fit(trace)
    assert score_batches(predictor, trace, batches).summary()["accuracy_mean"] == pytest.approx(1.0)
    assert predictor.num_bytes() == 0  # it runs the model's own gates


def test_moeless_fine_tuning_repairs_a_weakened_gate():
    trace, kernels = synthetic_gated_trace(num_requests=48, num_layers=3, hidden_size=16, num_experts=8,
                                           mixing=0.5, skew=0.5, seed=0)
    fit, test = trace.split_by_request(0.7, seed=0)
    batches = token_budget_batches(test, 64)
    weak = kernels.copy()
    weak[1:] = kernels[1:][:, :, np.random.default_rng(1).permutation(8)]  # targets' gates, experts shuffled
    reuse = score_batches(GateReuse(1, weak).fit(fit), test, batches).summary()
    tuned = MoElessPredictor(1, weak, GateTuneConfig(steps=200)).fit(fit)
    result = score_batches(tuned, test, batches).summary()
    assert tuned.tuned.tolist() == [False, True, True]
    assert (tuned.accuracy_after[1:] > tuned.accuracy_before[1:] + 0.2).all()
    assert result["accuracy_mean"] > reuse["accuracy_mean"] + 0.2
    assert tuned.num_bytes() == 2 * 16 * 8 * 4  # one float32 gate copy per target layer


def test_moeless_leaves_layers_above_the_threshold_alone():
    trace, kernels = synthetic_gated_trace(num_requests=12, num_layers=3, mixing=0.0, noise=0.0, seed=4)
    predictor = MoElessPredictor(1, kernels, GateTuneConfig(threshold=0.8, steps=5)).fit(trace)
    assert not predictor.tuned.any()
    np.testing.assert_array_equal(predictor.kernels, kernels)


def test_predictors_refuse_bad_input(transitions, routing_only):
    fit, test, batches = transitions
    with pytest.raises(InputError, match="not fitted"):
        History(1).predict(test, batches[0])
    with pytest.raises(InputError, match="hidden states"):
        GateReuse(1, np.zeros((3, 4, 8), np.float32)).fit(fit)
    with pytest.raises(InputError, match="gate kernels"):
        make_predictor("gate_reuse", 1).fit(synthetic_gated_trace(num_layers=2)[0])
    with pytest.raises(InputError, match="targets must be"):
        routing_only.predict(test, batches[0], targets=[0])
    with pytest.raises(InputError, match="fitted on"):
        routing_only.predict(synthetic_trace(num_layers=3, num_experts=16), np.arange(4))
    with pytest.raises(InputError, match="more than 3 layers"):
        History(3).fit(fit)
    with pytest.raises(InputError, match="distance"):
        History(0)
    with pytest.raises(InputError, match="unknown predictor"):
        make_predictor("lstm")


def test_routing_only_online_correction_learns_its_error(transitions):
    fit, test, batches = transitions
    config = RoutingOnlyConfig(hidden=8, window=2, own_layers=0, steps=5, warmup_steps=0, online_alpha=1.0)
    predictor = RoutingOnly(1, config).fit(fit)
    batch = batches[0]
    raw = predictor.predict(test, batch)
    truth = true_loads(test, batch)
    predictor.observe(truth)
    # with alpha = 1 the correction is the whole last error, so the same batch is now forecast exactly
    np.testing.assert_allclose(predictor.predict(test, batch), truth[1:], atol=1e-9)
    predictor.reset()
    np.testing.assert_allclose(predictor.predict(test, batch), raw)
