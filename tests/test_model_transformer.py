"""The MoE language model: configs, mesh independence, tables, KV-cache decoding, generation, loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moeless_jax.config import ConfigError
from moeless_jax.errors import InputError
from moeless_jax.model import (
    PRESETS,
    ModelConfig,
    MoESection,
    MoETransformer,
    default_slots_per_device,
    generate,
    loss_fn,
    param_count,
    preset,
)
from moeless_jax.model.attention import batch_sharding
from moeless_jax.moe import (
    ReplicaTable,
    call_dropless,
    default_buffers,
    make_ep_mesh,
    worst_case_buffers,
)

CONFIG = ModelConfig(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_seq_len=16,
    # The ragged expert kernel and the even split compile in a third of the time of the presets' capacity
    # kernel and balanced split (which test_presets_build_and_run_one_step runs); the model code is the same.
    moe=MoESection(num_experts=8, top_k=2, d_ff=16, router="deepseek", num_shared_experts=1, d_ff_shared=8,
                   expert_kernel="ragged", split="even"),
)
BATCH, WIDTH = 8, 8
# float32 on CPU: the same weights on other meshes differ only in reduction order.
MESH_TOL = 1e-5
_step = nnx.jit(lambda model, tokens, buffers: model(tokens, buffers=buffers, return_gate_inputs=True),
                static_argnames="buffers")


def forward(model, tokens):
    """A complete forward pass: larger MoE buffers until nothing overflowed."""
    out, _ = call_dropless(lambda buffers: _step(model, tokens, buffers), model.buffer_ladder(*tokens.shape))
    return out


@pytest.fixture(scope="module")
def model():
    return MoETransformer(CONFIG, mesh=make_ep_mesh(8), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CONFIG.vocab_size, (BATCH, WIDTH)).astype(np.int32)


@pytest.fixture(scope="module")
def reference(model, tokens):
    out = forward(model, tokens)
    assert int(out.overflow) == 0
    return np.asarray(out.logits)


# ---------------------------------------------------------------------------------------------- config
def test_presets_match_yaml_and_fit_the_size_budget():
    for name, config in PRESETS.items():
        assert ModelConfig.from_yaml(f"configs/model_{name}.yaml") == config
        assert preset(name) is config
    assert PRESETS["deepseek_tiny"].moe.num_experts == 64 and PRESETS["deepseek_tiny"].moe.top_k == 6
    assert PRESETS["mixtral_tiny"].moe_config(8).slots_per_device == 2  # 1 + 1 spare
    assert PRESETS["deepseek_tiny"].moe_config(8).slots_per_device == 10  # 8 + 2 spares
    with pytest.raises(ConfigError, match=r"mixtral_tiny"):
        preset("mixtral")


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^num_kv_heads: 3 does not divide num_heads 4"):
        dataclasses.replace(CONFIG, num_kv_heads=3)
    with pytest.raises(ConfigError, match=r"^moe\.top_k: 9 exceeds num_experts 8"):
        dataclasses.replace(CONFIG, moe=dataclasses.replace(CONFIG.moe, top_k=9))
    with pytest.raises(ConfigError, match=r"^moe\.router: 'gshard' is not one of"):
        dataclasses.replace(CONFIG, moe=dataclasses.replace(CONFIG.moe, router="gshard"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("vocab_size: 64\nd_model: 32\nnum_layers: 1\nnum_heads: 2\nnum_kv_heads: 1\nhead_dim: 8\n"
                   "moe: {num_experts: 4, top_k: 2, d_ff: 8, d_fff: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['d_fff'\]"):
        ModelConfig.from_yaml(bad)


def test_moe_section_becomes_the_layer_config():
    v3 = dataclasses.replace(CONFIG.moe, router="deepseek_v3", num_expert_groups=4, topk_groups=2,
                             routed_scaling_factor=2.5, slots_per_device=3)
    layer = dataclasses.replace(CONFIG, moe=v3, dtype="bfloat16").moe_config(4)
    assert (layer.router, layer.num_expert_groups, layer.topk_groups, layer.routed_scaling_factor) == (
        "deepseek_v3", 4, 2, 2.5)
    assert (layer.num_devices, layer.slots_per_device, layer.d_model, layer.dtype) == (4, 3, 32, "bfloat16")
    assert (layer.num_shared_experts, layer.d_ff_shared, layer.expert_kernel, layer.split) == (
        1, 8, "ragged", "even")
    with pytest.raises(ConfigError, match=r"^moe\.num_expert_groups: 3 groups do not divide 8 experts"):
        dataclasses.replace(v3, num_expert_groups=3)
    with pytest.raises(ConfigError, match=r"^moe\.slots_per_device: must be a positive integer or null"):
        dataclasses.replace(v3, slots_per_device=0)


def test_default_slots_hold_every_expert_plus_spares():
    assert default_slots_per_device(8, 1) == 8  # one device: a spare could never hold a second replica
    assert default_slots_per_device(8, 8) == 2
    assert default_slots_per_device(64, 8) == 10
    assert default_slots_per_device(60, 16) == 5  # ceil(60 / 16) = 4 plus 1 spare
    for e, d in [(8, 3), (64, 16), (5, 8)]:
        s = default_slots_per_device(e, d)
        assert d * s >= e + d


# ---------------------------------------------------------------------------------------------- forward
def test_logits_do_not_depend_on_the_mesh(model, tokens, reference):
    """The same weights on 1 device, an 8-device Auto mesh and a 2 x 4 data x ep mesh give the 8-device
    Explicit mesh's logits."""
    state = model.logical_state()
    meshes = {
        "one device": make_ep_mesh(1),
        "auto": make_ep_mesh(8, axis_type=jax.sharding.AxisType.Auto),
        "data x ep": make_ep_mesh(4, data=2),
    }
    for name, mesh in meshes.items():
        other = MoETransformer.from_logical_state(CONFIG, state, mesh=mesh)
        out = forward(other, tokens)
        assert int(out.overflow) == 0
        np.testing.assert_allclose(np.asarray(out.logits), reference, atol=MESH_TOL, rtol=0, err_msg=name)
    out = forward(model, tokens)
    assert out.logits.shape == (BATCH, WIDTH, CONFIG.vocab_size) and out.logits.dtype == jnp.float32
    assert out.expert_counts.shape == (CONFIG.num_layers, CONFIG.moe.num_experts)
    np.testing.assert_array_equal(np.asarray(out.expert_counts).sum(1), BATCH * WIDTH * CONFIG.moe.top_k)
    np.testing.assert_array_equal(np.asarray(out.slot_counts).sum(1), BATCH * WIDTH * CONFIG.moe.top_k)


def test_replica_tables_do_not_change_the_logits(model, tokens, reference):
    static = [layer.replica_table() for layer in model.moe_layers()]
    rng = np.random.default_rng(7)
    for _ in range(2):
        for layer in model.moe_layers():
            c = layer.config
            table = ReplicaTable.random(rng, num_experts=c.num_experts, num_devices=c.num_devices,
                                        slots_per_device=c.slots_per_device)
            assert table.replica_count.sum() > c.num_experts  # some expert really is replicated
            layer.set_table(table)
        out = forward(model, tokens)
        assert int(out.overflow) == 0
        np.testing.assert_allclose(np.asarray(out.logits), reference, atol=1e-6, rtol=0)
        slots = np.asarray(out.slot_counts)
        for i, layer in enumerate(model.moe_layers()):  # slot counts follow the new table
            owner = layer.replica_table().slot_to_expert
            per_expert = np.bincount(owner[owner >= 0], weights=slots[i][owner >= 0], minlength=8)
            np.testing.assert_array_equal(per_expert, np.asarray(out.expert_counts)[i])
    for layer, table in zip(model.moe_layers(), static, strict=True):
        layer.set_table(table)


def test_gate_inputs_are_what_each_router_saw(model, tokens):
    out = forward(model, tokens)
    gate = np.asarray(out.gate_inputs)
    assert gate.shape == (CONFIG.num_layers, BATCH, WIDTH, CONFIG.d_model)
    # RMSNorm output with scale 1 at init: each row has unit root-mean-square.
    np.testing.assert_allclose(np.sqrt((gate**2).mean(-1)), 1.0, rtol=1e-4)

    @jax.jit
    def first_router_input(x):  # by hand: the normed embedding plus attention
        block = model.layers[0]
        h, _ = block.attn(block.attn_norm(x), jnp.broadcast_to(jnp.arange(WIDTH), tokens.shape))
        return block.moe_norm(x + h)

    embedded = jax.device_put(np.asarray(model.embed[...])[tokens], batch_sharding(model.mesh, 3))
    with jax.set_mesh(model.mesh):
        np.testing.assert_allclose(gate[0], np.asarray(first_router_input(embedded)), atol=1e-6)


def test_param_count_counts_the_logical_state(model):
    assert param_count(CONFIG) == sum(int(np.prod(a.shape)) for a in model.logical_state().values())


def test_batch_not_a_multiple_of_the_devices_is_refused(model):
    with pytest.raises(InputError, match=r"batch of 6 sequences is not a multiple of the mesh's 8 devices; "
                                         r"pad it to 8 rows"):
        model(np.zeros((6, 4), np.int32))
    with pytest.raises(InputError, match=r"tokens must be integer ids"):
        model(np.zeros((8, 4), np.float32))


def test_presets_build_and_run_one_step():
    for name, config in PRESETS.items():
        small = dataclasses.replace(config, num_layers=1, vocab_size=64)
        net = MoETransformer(small, mesh=make_ep_mesh(8), rngs=nnx.Rngs(1))
        tokens = np.arange(8 * 4, dtype=np.int32).reshape(8, 4) % 64
        out = forward(net, tokens)
        assert out.logits.shape == (8, 4, 64), name
        assert np.isfinite(np.asarray(out.logits)).all(), name
        assert int(out.overflow) == 0, name
        assert int(np.asarray(out.expert_counts).sum()) == 8 * 4 * config.moe.top_k, name


def test_loss_is_masked_cross_entropy_plus_weighted_aux_losses(model, tokens):
    inputs = tokens
    targets = np.random.default_rng(1).integers(0, CONFIG.vocab_size, tokens.shape).astype(np.int32)
    mask = np.ones(targets.shape, np.float32)
    mask[:, 5:] = 0  # e.g. padding at the end of each row
    grad_fn = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))
    with jax.set_mesh(model.mesh):
        (loss, metrics), grads = grad_fn(model, inputs, targets, mask)
    out = forward(model, inputs)
    logits = np.asarray(out.logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    ce = -(picked * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(metrics["cross_entropy"]), ce, rtol=1e-5)
    moe = CONFIG.moe
    want = ce + moe.load_balance_weight * float(out.load_balance_loss) + moe.router_z_weight * float(
        out.router_z_loss)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["num_tokens"]) == mask.sum() and int(metrics["overflow"]) == 0
    norms = {name: float(jnp.abs(g).max()) for name, g in nnx.to_flat_state(nnx.state(grads, nnx.Param))}
    assert all(np.isfinite(v) for v in norms.values())
    assert norms[("embed",)] > 0 and norms[("layers", 0, "moe", "experts", "gate")] > 0


# ---------------------------------------------------------------------------------------------- decoding
PROMPTS = [[5, 9, 2], [1, 2, 3, 4], [11], [3, 3], [60, 1, 7, 2]]
NEW = 4


def _full_logits(model, sequences: list[list[int]]) -> np.ndarray:
    """Logits of each whole sequence in one causal pass (rows right-padded to WIDTH)."""
    padded = np.zeros((BATCH, WIDTH), np.int32)
    for row, seq in enumerate(sequences):
        padded[row, : len(seq)] = seq
    return np.asarray(forward(model, padded).logits)


def test_cached_decoding_equals_full_recomputation(model):
    """Prefill with ragged prompts, then one token per step through the KV cache: every step's logits
    equal those of the whole sequence recomputed without a cache."""
    outputs = []
    generated = generate(model, PROMPTS, NEW, on_step=outputs.append)
    assert [len(g) for g in generated] == [NEW] * len(PROMPTS)
    assert len(outputs) == NEW
    sequences = [p + g for p, g in zip(PROMPTS, generated, strict=True)]
    full = _full_logits(model, sequences)
    prefill = np.asarray(outputs[0].logits)
    for row, prompt in enumerate(PROMPTS):
        n = len(prompt)
        np.testing.assert_allclose(prefill[row, :n], full[row, :n], atol=1e-5, rtol=0)
        for step in range(1, NEW):
            np.testing.assert_allclose(np.asarray(outputs[step].logits)[row, 0], full[row, n + step - 1],
                                       atol=1e-5, rtol=0)
        # Greedy: each emitted token is the argmax of the full pass at the position before it.
        np.testing.assert_array_equal(generated[row], full[row, n - 1 : n - 1 + NEW].argmax(-1))
    # Each step's counts cover the whole padded batch: 8 rows x 8 prefill columns (the prompts padded to a
    # multiple of 8), then 8 rows x 1.
    for step, out in enumerate(outputs):
        counts = np.asarray(out.expert_counts)
        assert counts.shape == (CONFIG.num_layers, CONFIG.moe.num_experts)
        np.testing.assert_array_equal(counts.sum(1), BATCH * (WIDTH if step == 0 else 1) * CONFIG.moe.top_k)


def test_ragged_batch_generates_what_each_prompt_generates_alone(model):
    together = generate(model, PROMPTS, NEW)
    for prompt, got in zip(PROMPTS, together, strict=True):
        assert generate(model, [prompt], NEW) == [got]


def test_generation_stops_at_eos_and_samples_reproducibly(model):
    greedy = generate(model, PROMPTS[:2], 4)
    eos = greedy[0][1]
    stopped = generate(model, PROMPTS[:2], 4, eos_id=eos)
    assert stopped[0] == greedy[0][: greedy[0].index(eos) + 1]
    first = generate(model, PROMPTS[:2], 4, temperature=1.0, seed=3)
    assert generate(model, PROMPTS[:2], 4, temperature=1.0, seed=3) == first
    assert all(0 <= t < CONFIG.vocab_size for row in first for t in row)


def test_generate_refuses_bad_prompts(model):
    with pytest.raises(InputError, match=r"prompt 1 is empty"):
        generate(model, [[1], []], 2)
    with pytest.raises(InputError, match=r"prompt_ids is empty"):
        generate(model, [], 2)
    with pytest.raises(InputError, match=r"prompt 0 holds token 64, outside the vocabulary 0..63"):
        generate(model, [[64]], 2)
    with pytest.raises(InputError, match=r"exceeds max_seq_len=16"):
        generate(model, [[1] * 12], 5)


def test_buffer_ladder_ends_with_buffers_that_cannot_overflow():
    net = MoETransformer(PRESETS["mixtral_tiny"], mesh=make_ep_mesh(8), rngs=nnx.Rngs(0))
    ladder = net.buffer_ladder(8, 16)
    layer_config = net.moe_layers()[0].config
    assert ladder[0] == default_buffers(layer_config, 16) and ladder[0].slot_rows is not None
    assert ladder[-1] == worst_case_buffers(layer_config, 16)
    with pytest.raises(InputError, match=r"batch of 4 sequences"):
        net.buffer_ladder(4, 16)
