"""Recording routing traces from the MoE language model: exact routing, real tokens only, batching, I/O."""

import argparse
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moeless_jax.errors import InputError
from moeless_jax.model import ModelConfig, MoESection, MoETransformer, record_cli, save_model
from moeless_jax.model.record import (
    batches_from_arrivals,
    prefill_routing,
    prefill_runs,
    record_trace,
    token_batches,
)
from moeless_jax.model.text import is_heldout
from moeless_jax.model.tokenizer import default_tokenizer
from moeless_jax.moe import make_ep_mesh, route
from moeless_jax.predict import GateReuse, score_batches
from moeless_jax.traces import ArrivalTrace, RoutingTrace, load_trace, save_trace, window_batches

CONFIG = ModelConfig(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_seq_len=16,
    # The ragged kernel and even split compile fastest on CPU; routing does not depend on them.
    moe=MoESection(num_experts=8, top_k=2, d_ff=16, router="mixtral", expert_kernel="ragged", split="even"),
)
LENGTHS = (3, 7, 1, 12, 5, 16)  # 16 = max_seq_len


@pytest.fixture(scope="module")
def model():
    return MoETransformer(CONFIG, mesh=make_ep_mesh(8), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def run(model, prompts):
    """The first five prompts as one prefill: 8 rows on 8 devices (3 dummy rows), width 16."""
    return prefill_routing(model, prompts[:5])


def test_recomputed_routing_is_the_models(model, prompts, run):
    layers, batch, width, k = run.expert_ids.shape
    assert (layers, batch, width, k) == (2, 8, 16, 2) and run.num_real == 5
    np.testing.assert_array_equal(run.lengths, [3, 7, 1, 12, 5, 0, 0, 0])
    # Counts over every row and position, padding and dummy rows included, equal the model's own counts.
    for layer in range(layers):
        counts = np.bincount(run.expert_ids[layer].reshape(-1), minlength=CONFIG.moe.num_experts)
        np.testing.assert_array_equal(counts, run.expert_counts[layer])
    np.testing.assert_array_equal(run.expert_counts.sum(1), batch * width * k)
    # Reference in float64: mixtral routing is the top-k of x @ router, weights the softmax of those logits.
    for layer, moe in enumerate(model.moe_layers()):
        logits = run.gate_inputs[layer].astype(np.float64) @ np.asarray(moe.router[...], np.float64)
        top = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
        np.testing.assert_array_equal(np.sort(run.expert_ids[layer], -1), np.sort(top, -1))
        chosen = np.take_along_axis(logits, run.expert_ids[layer].astype(np.int64), -1)
        want = np.exp(chosen - chosen.max(-1, keepdims=True))
        np.testing.assert_allclose(run.gate_weights[layer], want / want.sum(-1, keepdims=True), atol=1e-5)


def test_a_routing_that_is_not_the_models_is_refused(model, prompts, monkeypatch):
    from moeless_jax.model import record

    def shifted_route(gate_input, router, bias, *, config):  # every token one expert over: counts differ
        routing = route(gate_input, router, top_k=config.top_k)
        return (routing.expert_ids + 1) % config.num_experts, routing.weights

    monkeypatch.setattr(record, "_route", shifted_route)
    with pytest.raises(RuntimeError, match=r"layer 0: the routing recomputed from the gate inputs does not "
                                           r"match the model's expert counts"):
        prefill_routing(model, prompts[:2])


def test_deepseek_v3_bias_and_groups_are_recomputed(prompts):
    """Group-limited sigmoid routing with a load-balancing bias: the recorded routing is still the model's
    (prefill_routing checks the counts), and the bias did change which experts were chosen."""
    moe = dataclasses.replace(CONFIG.moe, router="deepseek_v3", num_expert_groups=4, topk_groups=2,
                              routed_scaling_factor=2.5)
    model = MoETransformer(dataclasses.replace(CONFIG, moe=moe), mesh=make_ep_mesh(8), rngs=nnx.Rngs(3))
    for layer in model.moe_layers():
        layer.update_router_bias(jnp.arange(8), rate=0.3)  # experts 0-3 up, 4-7 down
    run = prefill_routing(model, prompts)
    layer = model.moe_layers()[0]
    unbiased = route(jnp.asarray(run.gate_inputs[0].reshape(-1, CONFIG.d_model)), layer.router[...],
                     top_k=2, kind="deepseek_v3", group_limit=layer.config.group_limit, scaling=2.5)
    assert not np.array_equal(np.asarray(unbiased.expert_ids), run.expert_ids[0].reshape(-1, 2))
    assert run.expert_counts[:, :4].sum() > run.expert_counts[:, 4:].sum()


def test_trace_keeps_only_real_tokens(model, prompts, run):
    trace = record_trace(model, prompts[:5], batches=[[0, 1, 2, 3, 4]], hidden_dtype="float32")
    lengths = LENGTHS[:5]
    assert trace.num_tokens == sum(lengths)
    np.testing.assert_array_equal(trace.request_id, np.repeat(np.arange(5), lengths))
    np.testing.assert_array_equal(trace.position, np.concatenate([np.arange(n) for n in lengths]))
    assert trace.layer_ids == (0, 1) and trace.num_experts == 8 and trace.top_k == 2
    assert trace.hidden.shape == (sum(lengths), 2, CONFIG.d_model) and trace.hidden.dtype == np.float32
    real = np.zeros(run.tokens.shape, bool)  # [B, T] the prompt tokens of the padded batch
    for row, n in enumerate(lengths):
        real[row, :n] = True
    for layer in range(2):
        # Row-major [B, T] order of the real positions is prompt order, then position order.
        np.testing.assert_array_equal(trace.expert_ids[:, layer], run.expert_ids[layer][real])
        np.testing.assert_array_equal(trace.gate_weights[:, layer], run.gate_weights[layer][real])
        np.testing.assert_array_equal(trace.hidden[:, layer], run.gate_inputs[layer][real])
        # What the model counted minus the trace's counts is exactly the padding and dummy rows' share.
        padding = np.bincount(run.expert_ids[layer][~real].reshape(-1), minlength=8)
        traced = np.bincount(trace.expert_ids[:, layer].reshape(-1).astype(np.int64), minlength=8)
        np.testing.assert_array_equal(run.expert_counts[layer] - traced, padding)


def test_prompts_are_recorded_once_in_prompt_order(model, prompts):
    batches = [[3, 1], [1, 1, 5], [3], [0]]  # prompt 2 and 4 never arrive; 1 and 3 arrive twice
    assert prefill_runs(batches) == [[3, 1], [5], [0]]
    trace = record_trace(model, prompts, batches=batches)
    np.testing.assert_array_equal(trace.requests, [0, 1, 3, 5])
    np.testing.assert_array_equal(trace.request_lengths, [LENGTHS[p] for p in (0, 1, 3, 5)])
    assert trace.hidden.dtype == np.float16
    # A prompt's routing does not depend on its batch-mates: same as recording it alone (to float16).
    alone = record_trace(model, prompts, batches=[[5]])
    mine = trace.subset(trace.tokens_of([5]))
    np.testing.assert_array_equal(mine.expert_ids, alone.expert_ids)
    np.testing.assert_allclose(mine.hidden.astype(np.float32), alone.hidden.astype(np.float32), atol=2e-3)
    # token_batches turns prompt batches into the trace's token batches, repeats kept.
    tokens = token_batches(trace, [[3, 1], [1, 1, 5]])
    np.testing.assert_array_equal(trace.request_id[tokens[1]], [1] * 7 + [1] * 7 + [5] * 16)


def test_round_trip_and_layer_aligned_hidden_states(model, prompts, tmp_path):
    trace = record_trace(model, prompts, batches=[[0, 1, 2], [3, 4, 5]], hidden_dtype="float32")
    back = load_trace(save_trace(trace, tmp_path / "own.npz"))
    for field in ("expert_ids", "request_id", "position", "gate_weights", "hidden"):
        np.testing.assert_array_equal(getattr(back, field), getattr(trace, field), err_msg=field)
        assert getattr(back, field).dtype == getattr(trace, field).dtype, field
    assert (back.num_experts, back.layer_ids) == (trace.num_experts, trace.layer_ids)
    # Gate reuse at "distance 0": layer l's own router on layer l's recorded gate input reproduces the
    # recorded loads exactly. GateReuse(d=1) applies kernels[t] to hidden[:, t-1], so shift hidden by one.
    shifted = RoutingTrace(trace.expert_ids, trace.request_id, trace.position, trace.num_experts,
                           trace.layer_ids, hidden=np.roll(trace.hidden, -1, axis=1))
    kernels = np.stack([np.asarray(layer.router[...]) for layer in model.moe_layers()])
    predictor = GateReuse(1, kernels).fit(shifted)
    scores = score_batches(predictor, shifted, token_batches(shifted, [[0, 1], [2, 3, 4], [5, 0]]))
    np.testing.assert_allclose(scores.accuracy, 1.0, rtol=0, atol=1e-12)


def _azure_csv(path, seconds):
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for s in seconds:
        whole, frac = divmod(round(s * 1e7), 10**7)
        lines.append(f"2023-11-16 18:15:{whole:02d}.{frac:07d},100,10")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batches_from_arrivals_windows_like_window_batches(tmp_path, model, prompts):
    csv = _azure_csv(tmp_path / "conv.csv", [0.1, 0.5, 1.2, 1.3, 3.7, 3.9])
    assert batches_from_arrivals(csv, 4) == [[0, 1], [2, 3], [0, 1]]  # arrival i serves prompt i mod 4
    assert batches_from_arrivals(csv, 3, window_s=2.0) == [[0, 1, 2, 0], [1, 2]]
    assert batches_from_arrivals(csv, 3, max_batches=2) == [[0, 1], [2, 0]]
    arrivals = ArrivalTrace(np.array([0.0, 0.2, 1.5, 2.0, 2.1]), np.ones(5, np.int64), np.ones(5, np.int64))
    trace = record_trace(model, prompts, batches=[list(range(6))])
    ours = token_batches(trace, batches_from_arrivals(arrivals, 6))
    theirs = window_batches(trace, arrivals)
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match=r"num_prompts must be a positive integer"):
        batches_from_arrivals(csv, 0)
    with pytest.raises(InputError, match=r"window_s must be > 0"):
        batches_from_arrivals(csv, 2, window_s=0)


@pytest.mark.parametrize(("prompt_ids", "batches", "match"), [
    ([], [[0]], r"prompt_ids is empty"),
    ([[1, 2], []], [[0]], r"prompt 1 is empty"),
    ([[1] * 17], [[0]], r"prompt 0 has 17 tokens, more than max_seq_len=16; truncate it"),
    ([[1, 64]], [[0]], r"prompt 0 holds token 64, outside the vocabulary 0\.\.63"),
    ([[1, 2]], [], r"batches is empty"),
    ([[1, 2]], [[0], []], r"batch 1 is empty"),
    ([[1, 2]], [[0, 1]], r"batch 0 holds 1, not a prompt index in 0\.\.0"),
])
def test_bad_input_is_refused(model, prompt_ids, batches, match):
    with pytest.raises(InputError, match=match):
        record_trace(model, prompt_ids, batches=batches)


def test_bad_hidden_dtype_is_refused(model):
    with pytest.raises(InputError, match=r"hidden_dtype must be one of \('float16', 'float32'\)"):
        record_trace(model, [[1, 2]], batches=[[0]], hidden_dtype="bfloat16")


def test_record_command_writes_the_native_trace(tmp_path, capsys):
    tokenizer = default_tokenizer()
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=16, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=8, max_seq_len=12,
                         moe=MoESection(num_experts=4, top_k=2, d_ff=8, expert_kernel="ragged", split="even"))
    checkpoint = save_model(tmp_path / "model",
                            MoETransformer(config, mesh=make_ep_mesh(1), rngs=nnx.Rngs(1)))
    docs = [f"prompt number {i} " + "word " * (3 * i) for i in range(30)]
    data = tmp_path / "data"
    (data / "sharegpt").mkdir(parents=True)
    (data / "sharegpt" / "s.json").write_text(json.dumps(
        [{"id": str(i), "conversations": [{"from": "human", "value": d}]} for i, d in enumerate(docs)]))
    _azure_csv(tmp_path / "conv.csv", [0.1, 0.2, 0.3, 1.5, 2.5, 2.6, 2.7, 2.8, 4.0])
    parser = argparse.ArgumentParser()
    record_cli.register(parser.add_subparsers())
    out = tmp_path / "trace.npz"
    args = parser.parse_args(["record", "--data-dir", str(data), "--checkpoint", str(checkpoint), "--out",
                              str(out), "--split", "train", "--max-prompts", "6", "--arrivals",
                              str(tmp_path / "conv.csv"), "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    trace = load_trace(out)
    train = [d for d in docs if not is_heldout(d)][:6]
    want = [[tokenizer.bos_id, *tokenizer.encode(d)][:12] for d in train]
    np.testing.assert_array_equal(trace.request_lengths, [len(w) for w in want])
    assert summary["prompts"] == 6 and summary["tokens"] == trace.num_tokens == sum(len(w) for w in want)
    assert summary["truncated_prompts"] == sum(len(tokenizer.encode(d)) + 1 > 12 for d in train)
    assert trace.hidden.shape == (trace.num_tokens, 2, 16) and trace.hidden.dtype == np.float16
    assert summary["prefills"] == 3  # windows [0, 1, 2], [3], [4, 5, 0, 1]: the last brings 4 and 5
