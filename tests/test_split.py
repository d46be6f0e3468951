"""Splitting an expert's tokens over its replicas: even and balanced quotas, against the LP optimum."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moeless_jax.moe import ReplicaTable
from moeless_jax.moe.split import (
    balanced_quotas,
    device_loads,
    even_quotas,
    replica_devices,
    split_device_loads,
    water_fill,
)
from moeless_jax.plan.split_bound import optimal_max_device_load

E, D = 16, 8


def skewed_counts(
    rng: np.random.Generator, tokens: int = 512, top_k: int = 4, skew: float = 0.5
) -> np.ndarray:
    popularity = rng.dirichlet(np.full(E, skew))
    return rng.multinomial(tokens * top_k, popularity).astype(np.int32)


def table_for(seed: int, slots_per_device: int) -> ReplicaTable:
    return ReplicaTable.random(
        np.random.default_rng(seed), num_experts=E, num_devices=D, slots_per_device=slots_per_device
    )


@partial(jax.jit, static_argnames=("slots_per_device", "split"))
def loads(counts, expert_slots, replica_count, *, slots_per_device, split):
    return split_device_loads(
        counts, expert_slots, replica_count, slots_per_device=slots_per_device, num_devices=D, split=split
    )


@partial(jax.jit, static_argnames="slots_per_device")
def quotas_balanced(counts, expert_slots, replica_count, *, slots_per_device):
    return balanced_quotas(
        counts, expert_slots, replica_count, slots_per_device=slots_per_device, num_devices=D
    )


@given(
    base=st.lists(st.floats(0, 100), min_size=4, max_size=4),
    amount=st.floats(0, 500),
    n_valid=st.integers(1, 4),
)
def test_water_fill_levels_the_lowest(base, amount, n_valid):
    valid = jnp.arange(4) < n_valid
    alloc = np.asarray(
        water_fill(jnp.array([base], jnp.float32), jnp.array([[amount]], jnp.float32), valid[None])
    )[0]
    assert np.all(alloc >= 0) and np.all(alloc[n_valid:] == 0)
    np.testing.assert_allclose(alloc.sum(), amount, rtol=1e-5, atol=1e-3)
    level = np.array(base[:n_valid]) + alloc[:n_valid]
    filled = alloc[:n_valid] > 1e-4
    if filled.any():  # every receiving replica ends at the same level, no lower than any non-receiving one
        top = level[filled].max()
        np.testing.assert_allclose(level[filled], top, rtol=1e-4, atol=1e-2)
        assert np.all(np.array(base[:n_valid])[~filled] >= top - 1e-2)


@given(seed=st.integers(0, 10**6), slots=st.sampled_from([2, 3, 4]), skew=st.sampled_from([0.1, 0.5, 2.0]))
def test_quotas_sum_to_counts_and_never_lose_to_even(seed, slots, skew):
    rng = np.random.default_rng(seed)
    table = table_for(seed, slots)
    counts = jnp.asarray(skewed_counts(rng, skew=skew))
    args = (counts, jnp.asarray(table.expert_slots), jnp.asarray(table.replica_count))
    q = np.asarray(quotas_balanced(*args, slots_per_device=slots))
    assert q.dtype == np.int32 and (q >= 0).all()
    np.testing.assert_array_equal(q.sum(axis=1), np.asarray(counts))
    np.testing.assert_array_equal(q[table.expert_slots < 0], 0)
    balanced = loads(*args, slots_per_device=slots, split="balanced")
    even = loads(*args, slots_per_device=slots, split="even")
    assert int(balanced.sum()) == int(even.sum()) == int(counts.sum())
    assert int(balanced.max()) <= int(even.max())


def test_even_quotas_differ_by_at_most_one():
    q = np.asarray(even_quotas(jnp.array([10, 3, 0]), jnp.array([3, 2, 1]), 4))
    assert q.tolist() == [[4, 3, 3, 0], [2, 1, 0, 0], [0, 0, 0, 0]]


def test_balanced_split_is_within_one_percent_of_the_lp_bound():
    rng = np.random.default_rng(0)
    ratios, even_ratios = [], []
    for seed in range(12):
        table = table_for(seed, 3)
        counts = skewed_counts(rng, tokens=2048, skew=0.3)
        args = (jnp.asarray(counts), jnp.asarray(table.expert_slots), jnp.asarray(table.replica_count))
        bound = optimal_max_device_load(counts, table)
        ratios.append(float(loads(*args, slots_per_device=3, split="balanced").max()) / bound)
        even_ratios.append(float(loads(*args, slots_per_device=3, split="even").max()) / bound)
    assert min(ratios) >= 1.0 - 1e-9, "no split can beat the LP optimum"
    assert np.mean(ratios) <= 1.01, f"balanced split averages {np.mean(ratios):.4f} x the LP bound"
    assert np.mean(even_ratios) > np.mean(ratios)


def test_split_device_loads_batches_like_single_calls():
    table = table_for(1, 3)
    rng = np.random.default_rng(1)
    batch = jnp.asarray(np.stack([skewed_counts(rng) for _ in range(3)]))
    slots, count = jnp.asarray(table.expert_slots), jnp.asarray(table.replica_count)
    together = loads(batch, slots, count, slots_per_device=3, split="balanced")
    one_by_one = jnp.stack([loads(b, slots, count, slots_per_device=3, split="balanced") for b in batch])
    np.testing.assert_array_equal(together, one_by_one)
    device, valid = replica_devices(slots, 3)
    q = quotas_balanced(batch[0], slots, count, slots_per_device=3)
    np.testing.assert_array_equal(device_loads(q, device, valid, D), together[0])


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    shape=st.sampled_from([(16, 8, 3), (12, 6, 3), (10, 5, 4), (16, 8, 4)]),
)
def test_fused_kernel_matches_the_xla_path(seed, shape):
    """The Pallas kernel (run in interpret mode: its own arithmetic, on CPU) against the same function under
    XLA, including sizes that the kernel pads to powers of two."""
    from moeless_jax.moe.split import levelled_quotas
    from moeless_jax.moe.split_kernel import fits_one_program, fused_levelled_quotas

    num_experts, num_devices, slots = shape
    rng = np.random.default_rng(seed)
    table = ReplicaTable.random(rng, num_experts=num_experts, num_devices=num_devices, slots_per_device=slots)
    counts = rng.multinomial(1024, rng.dirichlet(np.full(num_experts, 0.3))).astype(np.int32)
    args = (jnp.asarray(counts)[:, None], jnp.asarray(table.expert_slots),
            jnp.asarray(table.replica_count)[:, None])
    kw = dict(slots_per_device=slots, num_devices=num_devices,
              num_movable=min(num_experts, num_devices * slots - num_experts), iterations=6)
    assert fits_one_program(num_experts, num_devices, num_devices, kw["num_movable"])
    want = levelled_quotas(*args, **kw)
    got = fused_levelled_quotas(*args, **kw, interpret=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(got).sum(1), counts)


def test_more_rounds_never_raise_the_levelled_objective():
    """Each round's exact line search descends: sum_d load_d^2 of the quotas falls (up to integer rounding)
    as rounds are added, and the maximum load with them."""
    rng = np.random.default_rng(5)
    table = table_for(5, 3)
    counts = jnp.asarray(skewed_counts(rng, tokens=4096, skew=0.3))
    es, rc = jnp.asarray(table.expert_slots), jnp.asarray(table.replica_count)
    device, valid = replica_devices(es, 3)
    squares, worst = [], []
    for iterations in (1, 2, 4, 8, 16):
        q = balanced_quotas(counts, es, rc, slots_per_device=3, num_devices=D, iterations=iterations)
        load = np.asarray(device_loads(q, device, valid, D), np.float64)
        squares.append(float((load**2).sum()))
        worst.append(float(load.max()))
    rounding = 2 * D * float(counts.max())  # integer rounding moves each device by < R tokens
    assert all(b <= a + rounding for a, b in zip(squares, squares[1:], strict=False)), squares
    assert worst[-1] <= worst[0]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 12), n=st.integers(1, 300))
def test_rank_within_group_counts_earlier_members(seed, groups, n):
    from moeless_jax.moe.split import rank_within_group

    group = np.random.default_rng(seed).integers(0, groups, n).astype(np.int32)
    rank, counts = rank_within_group(jnp.asarray(group), groups)
    expected = np.zeros(n, np.int64)
    seen = np.zeros(groups, np.int64)
    for i, g in enumerate(group):
        expected[i] = seen[g]
        seen[g] += 1
    np.testing.assert_array_equal(np.asarray(rank), expected)
    np.testing.assert_array_equal(np.asarray(counts), seen)


def test_fused_kernel_inside_shard_map_takes_the_inputs_varying_axes():
    """Per-device counts (varying over the mesh axis) with a replicated table: the kernel's output type must
    match the XLA path's, or ``platform_dependent`` (which traces every platform's branch) cannot pick."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moeless_jax.moe.split import levelled_quotas
    from moeless_jax.moe.split_kernel import fused_levelled_quotas

    mesh = jax.make_mesh((len(jax.devices()),), ("ep",))
    table = table_for(7, 3)
    rng = np.random.default_rng(7)
    counts = np.concatenate([skewed_counts(rng)[:, None] for _ in range(len(jax.devices()))])
    kw = dict(slots_per_device=3, num_devices=D, num_movable=min(E, D * 3 - E), iterations=4)

    def both(totals, slots, count):
        branch = jax.lax.platform_dependent(totals, slots, count, cuda=partial(fused_levelled_quotas, **kw),
                                            default=partial(levelled_quotas, **kw))
        return branch, levelled_quotas(totals, slots, count, **kw)

    fn = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=(P("ep"), P(), P()), out_specs=P("ep")))
    branch, xla = fn(
        jax.device_put(jnp.asarray(counts), NamedSharding(mesh, P("ep"))),
        jnp.asarray(table.expert_slots),
        jnp.asarray(table.replica_count)[:, None],
    )
    np.testing.assert_array_equal(branch, xla)
