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
        water_fill(jnp.array([base], jnp.float32), jnp.array([amount], jnp.float32), valid[None])
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


def test_fused_rounds_kernel_matches_the_xla_rounds():
    from moeless_jax.moe.split import water_fill_rounds
    from moeless_jax.moe.split_kernel import fused_rounds

    rng = np.random.default_rng(3)
    table = table_for(3, 4)
    counts = jnp.asarray(skewed_counts(rng))
    rows = jax.lax.top_k(jnp.asarray(table.replica_count), 12)[1]
    device, valid = replica_devices(jnp.asarray(table.expert_slots), 4)
    q0 = even_quotas(counts, jnp.asarray(table.replica_count), D)[rows].astype(jnp.float32)
    args = (
        q0,
        device[rows],
        valid[rows],
        counts[rows].astype(jnp.float32),
        jnp.full(12, 0.25),
        jnp.asarray(rng.uniform(0, 200, D), jnp.float32),
    )
    want = water_fill_rounds(*args, iterations=10)
    got = fused_rounds(*args, iterations=10, interpret=True)  # the kernel's own arithmetic, run on CPU
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


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
