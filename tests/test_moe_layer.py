"""The replicated MoE layer against the dense reference: values, gradients, tables, counts, capacity."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeless_jax.moe import (
    Buffers,
    MLPWeights,
    MoEConfig,
    MoEParams,
    ReplicaTable,
    ShapeError,
    buffer_ladder,
    call_dropless,
    default_buffers,
    dense_moe_reference,
    init_mlp_weights,
    make_ep_mesh,
    materialize_slot_weights,
    moe_forward,
)

TOKENS = 64
CONFIGS = {
    "mixtral": MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, num_devices=8, slots_per_device=2),
    "deepseek": MoEConfig(
        d_model=16,
        d_ff=8,
        num_experts=16,
        top_k=4,
        num_devices=8,
        slots_per_device=3,
        router="deepseek",
        num_shared_experts=2,
        d_ff_shared=8,
    ),
    "one_device": MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, num_devices=1, slots_per_device=5),
    "mixtral_balanced": MoEConfig(
        d_model=16, d_ff=32, num_experts=8, top_k=2, num_devices=8, slots_per_device=2, split="balanced"
    ),
    "deepseek_balanced": MoEConfig(
        d_model=16,
        d_ff=8,
        num_experts=16,
        top_k=4,
        num_devices=8,
        slots_per_device=3,
        router="deepseek",
        num_shared_experts=2,
        d_ff_shared=8,
        split="balanced",
    ),
    "deepseek_capacity": MoEConfig(
        d_model=16,
        d_ff=8,
        num_experts=16,
        top_k=4,
        num_devices=8,
        slots_per_device=3,
        router="deepseek",
        split="balanced",
        expert_kernel="capacity",
        slot_capacity_factor=1.0,
        overflow_fraction=0.1,
    ),
}
TRACES = {"count": 0}


class Model:
    """Logical weights of one config plus jitted layer/reference functions (compiled once per config)."""

    def __init__(self, config: MoEConfig, seed: int = 0):
        self.config = config
        self.mesh = make_ep_mesh(config.num_devices)
        k_router, k_experts, k_shared = jax.random.split(jax.random.key(seed), 3)
        self.router = jax.random.normal(k_router, (config.d_model, config.num_experts))
        self.experts = init_mlp_weights(
            k_experts, (config.num_experts,), config.d_model, config.d_ff, jnp.float32
        )
        self.shared = (
            init_mlp_weights(k_shared, (), config.d_model, config.shared_hidden, jnp.float32)
            if config.num_shared_experts
            else None
        )
        self.forward = jax.jit(self._forward, static_argnames="buffers")
        self.reference = jax.jit(partial(dense_moe_reference, config=config))

    def _forward(self, params, table, x, buffers=None):
        TRACES["count"] += 1
        return moe_forward(params, table, x, config=self.config, mesh=self.mesh, buffers=buffers)

    def params(self, table: ReplicaTable) -> MoEParams:
        return MoEParams(self.router, materialize_slot_weights(self.experts, table), self.shared)

    def run(self, table: ReplicaTable, x, buffers=None):
        return self.forward(self.params(table), table.arrays(), x, buffers=buffers)

    def random_table(self, seed: int) -> ReplicaTable:
        c = self.config
        return ReplicaTable.random(
            np.random.default_rng(seed),
            num_experts=c.num_experts,
            num_devices=c.num_devices,
            slots_per_device=c.slots_per_device,
            extra_replicas=int(np.random.default_rng(seed + 1).integers(0, 9)),
        )


MODELS = {name: Model(config) for name, config in CONFIGS.items()}


def tokens(seed: int, config: MoEConfig, n: int = TOKENS) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (n, config.d_model))


@pytest.mark.parametrize("name", list(CONFIGS))
@given(table_seed=st.integers(0, 10**6), x_seed=st.integers(0, 10**6))
def test_matches_dense_reference(name, table_seed, x_seed):
    model = MODELS[name]
    x = tokens(x_seed, model.config)
    out, _ = call_dropless(
        lambda b: model.run(model.random_table(table_seed), x, b),
        buffer_ladder(model.config, TOKENS // model.config.num_devices),
    )
    expected = model.reference(model.router, model.experts, model.shared, x)
    np.testing.assert_allclose(out.y, expected, rtol=2e-5, atol=2e-5)
    assert int(out.overflow) == 0


@pytest.mark.parametrize("name", ["mixtral", "deepseek", "deepseek_balanced", "deepseek_capacity"])
def test_gradients_match_dense_reference(name):
    model = MODELS[name]
    c = model.config
    table = model.random_table(7)
    x = tokens(3, c)
    cotangent = jax.random.normal(jax.random.key(5), x.shape)

    def layer_loss(router, experts, shared, x):
        params = MoEParams(router, materialize_slot_weights(experts, table), shared)
        return jnp.sum(moe_forward(params, table.arrays(), x, config=c, mesh=model.mesh).y * cotangent)

    def reference_loss(router, experts, shared, x):
        return jnp.sum(dense_moe_reference(router, experts, shared, x, config=c) * cotangent)

    args = (model.router, model.experts, model.shared, x)
    with jax.set_mesh(model.mesh):
        got = jax.jit(jax.grad(layer_loss, argnums=(0, 1, 2, 3)))(*args)
    want = jax.jit(jax.grad(reference_loss, argnums=(0, 1, 2, 3)))(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mixtral", "mixtral_balanced"])
def test_two_tables_same_output_and_no_recompile(name):
    model = MODELS[name]
    x = tokens(11, model.config)
    model.run(model.random_table(0), x)  # warm
    before, cached = TRACES["count"], model.forward._cache_size()
    outputs = [model.run(model.random_table(seed), x) for seed in (1, 2, 3)]
    outputs.append(model.run(ReplicaTable.static(num_experts=8, num_devices=8, slots_per_device=2), x))
    assert TRACES["count"] == before, "changing the replica table must not retrace or recompile"
    for out in outputs[1:]:
        np.testing.assert_allclose(out.y, outputs[0].y, rtol=1e-5, atol=1e-5)
    assert model.forward._cache_size() == cached


@pytest.mark.parametrize("name", list(CONFIGS))
def test_slot_counts_sum_to_assignments_when_every_token_picks_the_same_experts(name):
    model = MODELS[name]
    c = model.config
    x = jnp.ones((TOKENS, c.d_model))  # identical tokens -> identical top-k for all
    table = model.random_table(42)
    out = model.run(table, x)
    assert int(out.slot_counts.sum()) == TOKENS * c.top_k
    assert int(out.expert_counts.sum()) == TOKENS * c.top_k
    assert int(np.count_nonzero(out.expert_counts)) == c.top_k
    if c.split == "even":  # each hot expert's tokens are spread evenly over its replicas
        for e in np.flatnonzero(np.asarray(out.expert_counts)):
            slots = table.expert_slots[e, : table.replica_count[e]]
            per_replica = np.asarray(out.slot_counts)[slots]
            assert per_replica.max() - per_replica.min() <= 1
    np.testing.assert_allclose(
        out.y, model.reference(model.router, model.experts, model.shared, x), rtol=2e-5, atol=2e-5
    )


@pytest.mark.parametrize("name", ["mixtral", "deepseek_capacity"])
def test_small_buffers_report_overflow_and_dropless_call_recovers(name):
    model = MODELS[name]
    c = model.config
    x = jnp.ones((TOKENS, c.d_model))  # every token picks the same top-k experts...
    static = ReplicaTable.static(
        num_experts=c.num_experts, num_devices=8, slots_per_device=c.slots_per_device
    )
    hot = np.flatnonzero(np.asarray(model.run(static, x).expert_counts))
    # ...and device 0 holds as many of them as fit: every device sends most of its assignments there.
    first = list(hot[: c.slots_per_device])
    rest = [e for e in range(c.num_experts) if e not in first]
    slot_to_expert = np.full(c.num_slots, -1)
    slot_to_expert[: len(first)] = first
    slot_to_expert[c.slots_per_device : c.slots_per_device + len(rest)] = rest
    table = ReplicaTable.from_slot_to_expert(
        slot_to_expert, num_experts=c.num_experts, num_devices=8, slots_per_device=c.slots_per_device
    )
    ladder = buffer_ladder(c, TOKENS // c.num_devices)
    first = model.run(table, x, Buffers(dispatch_rows=4, slot_rows=ladder[0].slot_rows, overflow_rows=8))
    assert int(first.overflow) > 0, "an undersized buffer must report what it did not compute"
    out, used = call_dropless(lambda b: model.run(table, x, b), [first_rung(ladder), *ladder])
    assert int(out.overflow) == 0
    np.testing.assert_allclose(
        out.y, model.reference(model.router, model.experts, model.shared, x), rtol=2e-5, atol=2e-5
    )


def first_rung(ladder):
    """A rung smaller than the config's, to force at least one retry."""
    b = ladder[0]
    return Buffers(max(1, b.dispatch_rows // 4), None if b.slot_rows is None else 8, 8)


def test_ladder_ends_with_the_worst_case():
    for config in CONFIGS.values():
        ladder = buffer_ladder(config, TOKENS // config.num_devices)
        assert ladder[-1].slot_rows is None
        assert ladder[-1].dispatch_rows == TOKENS // config.num_devices * min(
            config.top_k, config.slots_per_device
        )
        assert len(set(ladder)) == len(ladder)


def test_capacity_kernel_matches_ragged_kernel_with_and_without_spill():
    from moeless_jax.moe import capacity_swiglu, grouped_swiglu

    rng = np.random.default_rng(0)
    w = init_mlp_weights(jax.random.key(0), (4,), 8, 16, jnp.float32)
    rows = jax.random.normal(jax.random.key(1), (50, 8))
    slot = jnp.asarray(rng.choice(5, 50, p=[0.5, 0.2, 0.1, 0.1, 0.1]), jnp.int32)  # 4 = padding
    want = grouped_swiglu(rows, slot, w)
    for capacity, overflow_rows in [(64, 8), (8, 64), (1, 50)]:
        y, lost = capacity_swiglu(rows, slot, w, capacity=capacity, overflow_rows=overflow_rows)
        assert int(lost) == 0
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    y, lost = capacity_swiglu(rows, slot, w, capacity=8, overflow_rows=10)
    n_spill = sum(max(0, int(np.sum(np.asarray(slot) == s)) - 8) for s in range(4))
    assert int(lost) == n_spill - 10 > 0


@given(
    shares=st.lists(st.integers(0, 40), min_size=5, max_size=5),
    capacities=st.lists(st.integers(1, 48), min_size=1, max_size=4, unique=True),
    overflow_rows=st.integers(1, 64),
)
def test_capacity_buckets_compute_every_row_that_fits_and_count_the_rest(shares, capacities, overflow_rows):
    from moeless_jax.moe import capacity_swiglu, grouped_swiglu

    capacities = tuple(sorted(capacities))
    slot = np.random.default_rng(sum(shares)).permutation(np.repeat(np.arange(5), shares))  # 4 = padding
    if slot.size == 0:
        return
    slot, w = jnp.asarray(slot, jnp.int32), CAPACITY_WEIGHTS
    rows = jax.random.normal(jax.random.key(slot.size), (slot.size, 8))
    call = jax.jit(partial(capacity_swiglu, capacity=capacities, overflow_rows=overflow_rows))
    y, lost = call(rows, slot, w)
    spilled = sum(max(0, n - capacities[-1]) for n in shares[:4])
    assert int(lost) == max(0, spilled - overflow_rows)
    if int(lost) == 0:  # whatever capacity was picked, every row is exact
        np.testing.assert_allclose(y, grouped_swiglu(rows, slot, w), rtol=1e-5, atol=1e-5)


CAPACITY_WEIGHTS = init_mlp_weights(jax.random.key(0), (4,), 8, 16, jnp.float32)


def test_capacity_buckets_at_their_edges():
    """The fullest slot exactly at a capacity, one row past it, and past the largest."""
    from moeless_jax.moe import capacity_swiglu, grouped_swiglu

    capacities = (4, 8, 12)
    for fullest in (1, 4, 5, 8, 9, 12, 13, 20):
        slot = jnp.asarray(np.concatenate([np.zeros(fullest), [1, 1, 2, 4, 4]]), jnp.int32)
        rows = jax.random.normal(jax.random.key(fullest), (slot.size, 8))
        y, lost = capacity_swiglu(rows, slot, CAPACITY_WEIGHTS, capacity=capacities, overflow_rows=8)
        assert int(lost) == 0
        np.testing.assert_allclose(y, grouped_swiglu(rows, slot, CAPACITY_WEIGHTS), rtol=1e-5, atol=1e-5)


def test_slot_capacities_and_their_checks():
    from moeless_jax.moe.capacity import checked_capacities, pick_capacity, slot_capacities

    assert slot_capacities(8192, 1.1, 1.05) == (8192, 8640, 9024)
    assert slot_capacities(8192, 1.1, None) == (9024,)
    assert slot_capacities(8192, 1.0, 1.05) == (8192,)
    assert slot_capacities(10, 1.1, 1.05) == (64,)  # small loads: one rounded buffer, no switch
    assert slot_capacities(100, 2.0, 1.5, multiple=8) == (104, 152, 200)
    assert pick_capacity((8192, 8640, 9024), 8193) == 8640
    assert pick_capacity((8192, 8640, 9024), 10_000) == 9024
    with pytest.raises(ValueError, match="ratio must be > 1"):
        slot_capacities(8192, 1.1, 1.0)
    for bad in ((), (0, 8), (8, 8), (16, 8), (True,), (8.0,)):
        with pytest.raises(ValueError, match="slot capacities"):
            checked_capacities(bad)
    assert Buffers(4, 64).slot_rows == (64,)
    with pytest.raises(ValueError, match="ascending"):
        Buffers(4, (64, 32))
    from moeless_jax.config import ConfigError

    with pytest.raises(ConfigError, match="slot_capacity_ratio"):
        MoEConfig(**{**CONFIGS["mixtral"].__dict__, "slot_capacity_ratio": 1.0})


def test_ladder_keeps_the_small_capacities_when_it_grows():
    config = MoEConfig(**{**CONFIGS["deepseek_capacity"].__dict__, "slot_capacity_factor": 1.1})
    ladder = buffer_ladder(config, 8192)
    first, grown = ladder[0].slot_rows, ladder[1].slot_rows
    assert len(first) > 1 and set(first) < set(grown)
    balanced = 8192 * config.top_k / config.slots_per_device
    assert grown[-1] == 64 * -(-2.2 * balanced // 64)  # twice the largest, rounded up to 64 rows
    steps = np.diff(grown) / np.asarray(grown[:-1])
    assert steps.max() <= 0.05 + 64 / balanced  # the grown sizes keep the ladder's 5 % steps


SEVERAL_CAPACITIES = Buffers(dispatch_rows=32, slot_rows=(12, 16, 24, 64), overflow_rows=32)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_layer_with_several_slot_capacities_matches_the_reference(seed):
    """Each device picks its own capacity in the step (a switch on device-local data inside shard_map)."""
    from moeless_jax.moe.capacity import pick_capacity

    model = MODELS["deepseek_capacity"]
    x = tokens(seed, model.config).at[: TOKENS // 4].set(1.0)  # a hot expert set: uneven slots
    out = model.run(model.random_table(seed), x, SEVERAL_CAPACITIES)
    assert int(out.overflow) == 0
    expected = model.reference(model.router, model.experts, model.shared, x)
    np.testing.assert_allclose(out.y, expected, rtol=2e-5, atol=2e-5)
    fullest = np.asarray(out.slot_counts).reshape(model.config.num_devices, -1).max(axis=1)
    picked = {pick_capacity(SEVERAL_CAPACITIES.slot_rows, int(f)) for f in fullest}
    assert len(picked) >= 2, f"devices should pick different capacities here, got {picked}"


def test_gradients_through_several_slot_capacities():
    model = MODELS["deepseek_capacity"]
    c = model.config
    table, x = model.random_table(7), tokens(3, c)
    cotangent = jax.random.normal(jax.random.key(5), x.shape)

    def layer_loss(experts, x):
        params = MoEParams(model.router, materialize_slot_weights(experts, table), model.shared)
        out = moe_forward(params, table.arrays(), x, config=c, mesh=model.mesh, buffers=SEVERAL_CAPACITIES)
        return jnp.sum(out.y * cotangent)

    def reference_loss(experts, x):
        return jnp.sum(dense_moe_reference(model.router, experts, model.shared, x, config=c) * cotangent)

    with jax.set_mesh(model.mesh):
        got = jax.jit(jax.grad(layer_loss, argnums=(0, 1)))(model.experts, x)
    want = jax.jit(jax.grad(reference_loss, argnums=(0, 1)))(model.experts, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_shape_errors_name_the_problem():
    model = MODELS["mixtral"]
    c = model.config
    table = ReplicaTable.static(num_experts=8, num_devices=8, slots_per_device=2)
    with pytest.raises(ShapeError, match="not divisible by the mesh.s 8 devices"):
        model.run(table, tokens(0, c, n=60))
    with pytest.raises(ShapeError, match="expected \\[tokens, d_model=16\\]"):
        model.run(table, jnp.ones((64, 15)))
    bad = model.params(table)._replace(router=jnp.ones((16, 7)))
    with pytest.raises(ShapeError, match="router has shape"):
        moe_forward(bad, table.arrays(), tokens(0, c), config=c, mesh=model.mesh)


def test_weights_must_cover_the_table_layout():
    model = MODELS["mixtral"]
    with pytest.raises(ValueError, match="logical weights hold 8 experts but the table has 4"):
        materialize_slot_weights(
            model.experts, ReplicaTable.static(num_experts=4, num_devices=8, slots_per_device=2)
        )


def test_mlp_weights_shapes():
    w = init_mlp_weights(jax.random.key(0), (3,), 4, 6, jnp.bfloat16)
    assert isinstance(w, MLPWeights)
    assert w.gate.shape == (3, 4, 6) and w.down.shape == (3, 6, 4) and w.up.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["mixtral", "mixtral_balanced", "deepseek_balanced"])
def test_layer_device_loads_follow_the_split(name):
    from moeless_jax.moe.split import split_device_loads

    model = MODELS[name]
    c = model.config
    x = tokens(5, c).at[: TOKENS // 2].set(1.0)  # half the tokens identical: a hot pair of experts
    table = model.random_table(9)
    out = model.run(table, x)
    per_device = np.asarray(out.slot_counts).reshape(c.num_devices, c.slots_per_device).sum(axis=1)
    want = split_device_loads(
        out.expert_counts,
        jnp.asarray(table.expert_slots),
        jnp.asarray(table.replica_count),
        slots_per_device=c.slots_per_device,
        num_devices=c.num_devices,
        split=c.split,
        iterations=c.split_iterations,
    )
    np.testing.assert_array_equal(per_device, np.asarray(want))


def test_auto_expert_kernel_resolves_per_backend():
    from moeless_jax.moe.capacity import default_buffers, resolve_expert_kernel

    config = CONFIGS["mixtral"]
    auto = MoEConfig(**{**config.__dict__, "expert_kernel": "auto"})
    assert resolve_expert_kernel(auto, "cpu") == "ragged"
    assert resolve_expert_kernel(auto, "gpu") == resolve_expert_kernel(auto, "tpu") == "capacity"
    assert resolve_expert_kernel(auto) == "ragged"  # these tests run on CPU
    assert default_buffers(auto, TOKENS, "cpu").slot_rows is None
    gpu = default_buffers(auto, TOKENS, "gpu")
    assert gpu.slot_rows is not None and gpu.overflow_rows > 0
    assert default_buffers(config, TOKENS, "gpu").slot_rows is None  # an explicit kernel is kept
    with pytest.raises(ValueError, match="expert_kernel"):
        MoEConfig(**{**config.__dict__, "expert_kernel": "fastest"})


@pytest.mark.parametrize("name", ["mixtral", "deepseek_capacity"])
def test_replayed_routing_gives_the_routers_output_and_any_given_routing_is_exact(name):
    from moeless_jax.moe.router import route

    model = MODELS[name]
    c = model.config
    table, x = model.random_table(3), tokens(11, c)
    params = model.params(table)
    run = jax.jit(lambda p, t, x, r: moe_forward(p, t, x, config=c, mesh=model.mesh, routing=r,
                                                 buffers=buffer_ladder(c, TOKENS // c.num_devices)[-1]))
    own = route(x, model.router, top_k=c.top_k, kind=c.router, renormalize=c.renormalize)
    replayed = run(params, table.arrays(), x, (own.expert_ids, own.weights))
    expected = model.reference(model.router, model.experts, model.shared, x)
    np.testing.assert_allclose(replayed.y, expected, rtol=2e-5, atol=2e-5)
    # A routing no router would produce: token t goes to experts t, t+1, ... (mod E) with equal weights.
    ids = (np.arange(TOKENS)[:, None] + np.arange(c.top_k)[None, :]) % c.num_experts
    weights = np.full((TOKENS, c.top_k), 1.0 / c.top_k, np.float32)
    out = run(params, table.arrays(), x, (jnp.asarray(ids, jnp.int32), jnp.asarray(weights)))
    shared = 0.0 if model.shared is None else jax.vmap(lambda r: swiglu_ref(r, model.shared))(x)
    want = sum(weights[:, k, None] * jax.vmap(swiglu_ref)(x, expert_slice(model.experts, ids[:, k]))
               for k in range(c.top_k)) + shared
    np.testing.assert_allclose(out.y, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(out.expert_counts, np.bincount(ids.ravel(), minlength=c.num_experts))


def swiglu_ref(row, w):
    return (jax.nn.silu(row @ w.gate) * (row @ w.up)) @ w.down


def expert_slice(experts, ids):
    return MLPWeights(experts.gate[ids], experts.up[ids], experts.down[ids])


def test_replayed_routing_is_checked():
    model = MODELS["mixtral"]
    c = model.config
    table, x = model.random_table(0), tokens(0, c)
    params = model.params(table)
    ids = np.tile(np.arange(c.top_k, dtype=np.int32), (TOKENS, 1))
    weights = np.ones((TOKENS, c.top_k), np.float32)
    call = partial(moe_forward, params, table.arrays(), x, config=c, mesh=model.mesh)
    with pytest.raises(ShapeError, match="expected \\[tokens, top_k\\]"):
        call(routing=(ids[:, :1], weights[:, :1]))
    with pytest.raises(ShapeError, match="must lie in"):
        call(routing=(ids + c.num_experts, weights))
    with pytest.raises(ShapeError, match="distinct"):
        call(routing=(np.zeros_like(ids), weights))


@pytest.mark.parametrize("kernel", ["capacity", "ragged"])
def test_default_buffers_are_dropless_in_one_call_under_extreme_skew(kernel):
    """Every token picks the same two experts: their slots hold 8x a balanced slot's rows, far past the
    capacity kernel's largest slot buffer (2x, 64 rows). With the config's default buffers one call is
    complete."""
    config = MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, num_devices=8, slots_per_device=2,
                       expert_kernel=kernel, split="balanced")
    model = Model(config, seed=3)
    x = jnp.tile(tokens(1, config, 1), (4 * TOKENS, 1))
    out = model.run(ReplicaTable.static(num_experts=8, num_devices=8, slots_per_device=2), x)
    assert int(out.overflow) == 0
    largest = max(default_buffers(config, 4 * TOKENS // 8).slot_rows or (0,))
    assert int(np.max(out.slot_counts)) > 2 * largest or kernel == "ragged", "the test must force a spill"
    np.testing.assert_allclose(out.y, model.reference(model.router, model.experts, model.shared, x),
                               rtol=2e-5, atol=2e-5)


def test_a_bounded_overflow_buffer_is_an_explicit_choice_and_overflow_is_counted():
    config = MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, num_devices=8, slots_per_device=2,
                       expert_kernel="capacity", overflow_fraction=0.1)
    model = Model(config, seed=3)
    x = jnp.tile(tokens(1, config, 1), (4 * TOKENS, 1))
    table = ReplicaTable.static(num_experts=8, num_devices=8, slots_per_device=2)
    bounded = model.run(table, x)
    assert int(bounded.overflow) > 0, "a bounded overflow buffer must report the rows it did not compute"
    out, _ = call_dropless(lambda b: model.run(table, x, b), buffer_ladder(config, 4 * TOKENS // 8))
    assert int(out.overflow) == 0
    np.testing.assert_allclose(out.y, model.reference(model.router, model.experts, model.shared, x),
                               rtol=2e-5, atol=2e-5)
