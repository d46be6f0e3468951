"""How an expert's tokens are split across its replicas.

Every (token, k) assignment to expert ``e`` gets a *global rank* within ``e``: its position among all of
``e``'s assignments on all devices, ordered by device and then by flat position ``t * K + k``. A split
gives each replica ``j`` of ``e`` a quota ``q[e, j]`` with ``sum_j q[e, j] = count[e]``; the assignment of
rank ``r`` goes to the replica whose cumulative quota range holds ``r``. The rule is deterministic and
needs only the per-expert counts of every device (an all_gather of E integers), so every device knows
where every one of its assignments goes without a host round trip.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from moeless_jax.moe.config import SPLIT_ITERATIONS, SPLITS


def rank_within_group(group: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """Position of each element among the elements of its group, in array order.

    group: [N] int32 in ``0..num_groups-1`` (values >= num_groups are ignored in the counts).
    Returns (rank [N] int32, counts [num_groups] int32).
    """
    n = group.shape[0]
    counts = jnp.zeros(num_groups, jnp.int32).at[group].add(1, mode="drop")
    order = jnp.argsort(group, stable=True)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(n, dtype=jnp.int32) - starts.at[group[order]].get(mode="fill", fill_value=0)
    return jnp.zeros(n, jnp.int32).at[order].set(rank_sorted), counts


def global_expert_rank(
    expert: jax.Array, num_experts: int, axis_name: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Global rank of each local assignment within its expert across the ``axis_name`` devices.

    expert: [N] int32 logical expert of each local assignment.
    Returns (rank [N], expert_totals [E] over all devices, counts_by_device [D, E]).
    """
    local_rank, local_counts = rank_within_group(expert, num_experts)
    counts_by_device = jax.lax.all_gather(local_counts, axis_name)  # [D, E]
    me = jax.lax.axis_index(axis_name)
    before_me = jnp.arange(counts_by_device.shape[0]) < me
    offset = jnp.sum(jnp.where(before_me[:, None], counts_by_device, 0), axis=0)
    return offset[expert] + local_rank, jnp.sum(counts_by_device, axis=0), counts_by_device


def even_quotas(expert_totals: jax.Array, replica_count: jax.Array, r_max: int) -> jax.Array:
    """Split each expert's tokens as evenly as possible over its replicas (earlier replicas take the +1).

    expert_totals: [E]; replica_count: [E] (>= 1). Returns quotas [E, r_max] int32, zero past the count.
    """
    return even_quotas_2d(expert_totals.astype(jnp.int32)[:, None], replica_count.astype(jnp.int32)[:, None],
                          r_max)


def replica_for_rank(rank: jax.Array, expert: jax.Array, quotas: jax.Array) -> jax.Array:
    """Replica index ``j`` whose cumulative quota range holds each assignment's rank.

    rank, expert: [N]; quotas: [E, R]. Returns [N] int32 in ``0..R-1``.
    """
    cumulative = jnp.cumsum(quotas, axis=1)[expert]  # [N, R]
    j = jnp.sum(rank[:, None] >= cumulative, axis=1).astype(jnp.int32)
    return jnp.minimum(j, quotas.shape[1] - 1)


# ------------------------------------------------------------------------------------- balanced split
def replica_devices(expert_slots: jax.Array, slots_per_device: int) -> tuple[jax.Array, jax.Array]:
    """[E, R] device of each replica (0 where padded) and [E, R] validity mask."""
    valid = expert_slots >= 0
    return jnp.where(valid, expert_slots // slots_per_device, 0), valid


def device_loads(quotas: jax.Array, device: jax.Array, valid: jax.Array, num_devices: int) -> jax.Array:
    """[E, R] per-replica tokens -> [D] tokens per device."""
    return jnp.zeros(num_devices, quotas.dtype).at[device].add(jnp.where(valid, quotas, 0))


def water_fill(base: jax.Array, amount: jax.Array, valid: jax.Array) -> jax.Array:
    """Pour ``amount[m]`` over the replicas of row ``m`` so the lowest levels rise together.

    base: [M, R] current level of each replica's device without this expert; amount: [M, 1]; valid: [M, R].
    Returns [M, R] non-negative allocations summing to ``amount`` per row, levelling ``base + alloc``
    over the replicas that receive anything. Sort-free (pairwise [M, R, R]) so it also runs inside a kernel.
    """
    big = jnp.finfo(base.dtype).max / 4
    b = jnp.where(valid, base, big)
    # Water needed to raise every replica up to breakpoint b_k: sum_j max(0, b_k - b_j).
    below = b[:, None, :] <= b[:, :, None]  # [M, k, j]: b_j <= b_k
    need = jnp.sum(jnp.where(below, b[:, :, None] - b[:, None, :], 0.0), axis=2)  # [M, k]
    feasible = valid & (need <= amount)
    top = jnp.max(jnp.where(feasible, b, -big), axis=1, keepdims=True)  # highest breakpoint reachable
    active = valid & (b <= top)
    count = jnp.maximum(jnp.sum(active.astype(base.dtype), axis=1, keepdims=True), 1.0)
    level = (amount + jnp.sum(jnp.where(active, b, 0.0), axis=1, keepdims=True)) / count
    return jnp.where(valid, jnp.maximum(level - b, 0.0), 0.0)


def balanced_quotas(
    expert_totals: jax.Array,
    expert_slots: jax.Array,
    replica_count: jax.Array,
    *,
    slots_per_device: int,
    num_devices: int,
    iterations: int = SPLIT_ITERATIONS,
    fused: bool = True,
) -> jax.Array:
    """Integer quotas [E, R] that level device loads, for the experts' true token counts.

    Minimises sum_d load_d^2 over splits of each expert's tokens among its replicas. The achievable load
    vectors form the base polytope of a coverage polymatroid, where the minimiser of a separable convex
    function also minimises the maximum load, so this is the min-max split (the LP optimum).

    Method: parallel water-filling with an exact line search (:func:`levelled_quotas`). ``iterations``
    rounds start from the even split; the result is rounded to integers per expert and, as a safeguard, the
    even split is kept if it has the lower maximum.

    expert_totals: [E] tokens per expert; expert_slots: [E, R] (-1 padded); replica_count: [E].
    ``fused`` runs the whole computation as one Pallas kernel on CUDA GPUs when its tensors fit one program
    (same arithmetic, one launch instead of dozens; see :mod:`moeless_jax.moe.split_kernel`); other
    platforms, and larger tables, run the same function under XLA.
    """
    num_experts, r_max = expert_slots.shape
    num_movable = min(num_experts, num_devices * slots_per_device - num_experts)
    if num_movable <= 0:
        return even_quotas(expert_totals, replica_count, r_max)
    kw = dict(slots_per_device=slots_per_device, num_devices=num_devices, num_movable=num_movable,
              iterations=iterations)
    args = (expert_totals.astype(jnp.int32)[:, None], expert_slots.astype(jnp.int32),
            replica_count.astype(jnp.int32)[:, None])
    xla = partial(levelled_quotas, **kw)
    from moeless_jax.moe.split_kernel import fits_one_program, fused_levelled_quotas

    if not (fused and fits_one_program(num_experts, r_max, num_devices, num_movable)):
        return xla(*args)
    return jax.lax.platform_dependent(*args, cuda=partial(fused_levelled_quotas, **kw), default=xla)


def levelled_quotas(
    totals: jax.Array,
    expert_slots: jax.Array,
    replica_count: jax.Array,
    *,
    slots_per_device: int,
    num_devices: int,
    num_movable: int,
    iterations: int,
) -> jax.Array:
    """The balanced split in broadcast-only form (no gather, scatter or sort), so that the same function
    runs under XLA and as the body of the Pallas kernel.

    totals: [E, 1] int32 tokens per expert; expert_slots: [E, R] int32 (-1 padded); replica_count: [E, 1].
    ``num_movable`` (static) bounds the experts with several replicas (``min(E, P - E)``): where they are few
    (:func:`round_rows`), the rounds run on those rows alone, gathered and scattered back with a one-hot
    selection. Returns [E, R] int32 quotas.

    Each round, every replicated expert computes the split that would level its own replicas' devices given
    everyone else's tokens (:func:`water_fill`); all experts then move together along that direction by the
    step that minimises sum_d load_d^2 exactly (the objective is quadratic in the step; clipped to [0, 1]).
    Every expert's own move is a descent direction, so their sum is one too, and the exact step is at least
    as good as the safe simultaneous step ``1 / n`` (``n``: most movable experts sharing a device): the
    rounds descend monotonically.
    """
    num_experts, r_max = expert_slots.shape
    valid = expert_slots >= 0
    device = jnp.where(valid, expert_slots // slots_per_device, -1)  # [E, R]; -1 matches no device
    even = even_quotas_2d(totals, replica_count, r_max)

    movable = replica_count > 1  # [E, 1]
    take, put = _row_selection(movable, round_rows(num_experts, num_movable))
    m_device = take(device + 1) - 1  # unselected rows: -1
    m_valid = m_device >= 0
    m_even = take(even)
    m_count = jnp.sum(m_even, axis=1, keepdims=True)  # = the rows' totals: even quotas add up to them
    m_totals = m_count.astype(jnp.float32)
    on_device = _one_hot_devices(m_device, num_devices)  # [M, R, D]
    m_loads = lambda q: _device_sums(q[:, :, None] * on_device)  # noqa: E731  [M, R] -> [1, D]
    even_loads = _device_sums(even.astype(jnp.float32)[:, :, None] * _one_hot_devices(device, num_devices))
    q0 = m_even.astype(jnp.float32)
    fixed = even_loads - m_loads(q0)

    def round_(carry):
        q, loads = carry
        base = jnp.sum(loads[:, None, :] * on_device, axis=2) - q  # [M, R]
        delta = jnp.where(m_valid, water_fill(base, m_totals, m_valid) - q, 0.0)
        delta_loads = m_loads(delta)
        slope = jnp.sum(loads * delta_loads, axis=1, keepdims=True)  # [1, 1]
        curvature = jnp.sum(delta_loads * delta_loads, axis=1, keepdims=True)
        step = jnp.where(curvature > 0, jnp.clip(-slope / jnp.maximum(curvature, 1e-30), 0.0, 1.0), 0.0)
        return q + step * delta, loads + step * delta_loads

    carry = (q0, fixed + m_loads(q0))
    for _ in range(iterations):  # unrolled when traced: few rounds, and Triton lowers no unrolled loops
        carry = round_(carry)
    fractional, _ = carry
    m_quotas = round_quotas(fractional, m_count, m_valid)
    balanced = jnp.where(movable, put(m_quotas), even)
    worst_balanced = jnp.max(fixed + m_loads(m_quotas.astype(jnp.float32)))
    return jnp.where(worst_balanced <= jnp.max(even_loads), balanced, even).astype(jnp.int32)


def round_rows(num_experts: int, num_movable: int) -> int:
    """Rows the rounds run on: the movable experts' when that is at most a quarter of the experts, else all.

    Gathering rows costs an ``[M, E, R]`` product, which only pays when the rounds shrink a lot; rows with
    one replica are fixed points of the rounds, so keeping them changes nothing."""
    return num_movable if 4 * num_movable <= num_experts else num_experts


def _row_selection(movable: jax.Array, num_rows: int):
    """(take [E, C] -> [M, C], put [M, C] -> [E, C]) for the rows of the movable experts (``movable [E, 1]``),
    as one-hot products (kernel-friendly); the identity when ``num_rows`` is every row."""
    num_experts = movable.shape[0]
    if num_rows >= num_experts:
        return (lambda x: x), (lambda x: x)
    e_before = jax.lax.broadcasted_iota(jnp.int32, (num_experts, num_experts), 0)
    e_after = jax.lax.broadcasted_iota(jnp.int32, (num_experts, num_experts), 1)
    as_row = lambda col: jnp.sum(jnp.where(e_before == e_after, col, 0), axis=0, keepdims=True)  # noqa: E731
    rank = jnp.sum(jnp.where((e_before < e_after) & movable, 1, 0), axis=0, keepdims=True)  # [1, E]
    m_index = jax.lax.broadcasted_iota(jnp.int32, (num_rows, num_experts), 0)
    # select[m, e]: expert e is the m-th movable expert.
    select = ((m_index == rank) & (as_row(movable.astype(jnp.int32)) > 0)).astype(jnp.int32)  # [M, E]
    take = lambda x: jnp.sum(select[:, :, None] * x[None, :, :], axis=1)  # noqa: E731
    put = lambda x: jnp.sum(select[:, :, None] * x[:, None, :], axis=0)  # noqa: E731
    return take, put


def even_quotas_2d(totals: jax.Array, replica_count: jax.Array, r_max: int) -> jax.Array:
    """:func:`even_quotas` on column vectors ``totals, replica_count [E, 1]`` (kernel-friendly)."""
    j = jax.lax.broadcasted_iota(jnp.int32, (1, r_max), 1)
    n = jnp.maximum(replica_count, 1)
    quotas = totals // n + (j < totals % n).astype(jnp.int32)
    return jnp.where(j < replica_count, quotas, 0)


def _one_hot_devices(device: jax.Array, num_devices: int) -> jax.Array:
    """[M, R] device (-1: none) -> [M, R, D] float32 one-hot."""
    d = jax.lax.broadcasted_iota(jnp.int32, (1, 1, num_devices), 2)
    return (device[:, :, None] == d).astype(jnp.float32)


def _device_sums(per_replica_device: jax.Array) -> jax.Array:
    """[M, R, D] -> [1, D] sum over replicas."""
    return jnp.sum(jnp.sum(per_replica_device, axis=1), axis=0, keepdims=True)


def round_quotas(fractional: jax.Array, expert_totals: jax.Array, valid: jax.Array) -> jax.Array:
    """Integer quotas per row summing to ``expert_totals [M, 1]``: floors plus the largest remainders."""
    floors = jnp.where(valid, jnp.floor(fractional), 0.0).astype(jnp.int32)
    missing = expert_totals - jnp.sum(floors, axis=1, keepdims=True)  # [M, 1], 0 <= missing < R
    remainder = jnp.where(valid, fractional - floors.astype(fractional.dtype), -1.0)
    # Rank of each replica's remainder within its row (largest first, lower index wins ties).
    r = remainder.shape[1]
    k_index = jax.lax.broadcasted_iota(jnp.int32, (1, r, r), 1)
    j_index = jax.lax.broadcasted_iota(jnp.int32, (1, r, r), 2)
    ahead = (remainder[:, None, :] > remainder[:, :, None]) | (
        (remainder[:, None, :] == remainder[:, :, None]) & (j_index < k_index)
    )
    rank = jnp.sum(ahead.astype(jnp.int32), axis=2)  # [M, R]
    return floors + (valid & (rank < missing)).astype(jnp.int32)


def split_quotas(
    expert_totals: jax.Array,
    expert_slots: jax.Array,
    replica_count: jax.Array,
    *,
    slots_per_device: int,
    num_devices: int,
    split: str,
    iterations: int = SPLIT_ITERATIONS,
) -> jax.Array:
    """[E, R] tokens each replica takes under ``split`` (``even`` or ``balanced``)."""
    if split == "even":
        return even_quotas(expert_totals, replica_count, expert_slots.shape[1])
    if split == "balanced":
        return balanced_quotas(
            expert_totals,
            expert_slots,
            replica_count,
            slots_per_device=slots_per_device,
            num_devices=num_devices,
            iterations=iterations,
        )
    raise ValueError(f"split '{split}' is not even|balanced")


def split_slot_tokens(
    expert_totals: jax.Array,
    expert_slots: jax.Array,
    replica_count: jax.Array,
    *,
    slots_per_device: int,
    num_devices: int,
    split: str,
    iterations: int = SPLIT_ITERATIONS,
) -> jax.Array:
    """[E] expert token counts -> [P] tokens each slot computes under ``split`` (0 for empty slots)."""
    quotas = split_quotas(
        expert_totals,
        expert_slots,
        replica_count,
        slots_per_device=slots_per_device,
        num_devices=num_devices,
        split=split,
        iterations=iterations,
    )
    num_slots = slots_per_device * num_devices
    valid = expert_slots >= 0
    tokens = jnp.zeros(num_slots + 1, jnp.int32).at[jnp.where(valid, expert_slots, num_slots)]
    return tokens.add(jnp.where(valid, quotas, 0))[:num_slots]


def split_device_loads(
    expert_totals: jax.Array,
    expert_slots: jax.Array,
    replica_count: jax.Array,
    *,
    slots_per_device: int,
    num_devices: int,
    split: str,
    iterations: int = SPLIT_ITERATIONS,
) -> jax.Array:
    """[..., E] per-batch expert token counts -> [..., D] tokens per device under ``split``, for one table
    (leading batch axes are vmapped); the layer's own quota code."""

    def one(totals):
        tokens = split_slot_tokens(
            totals,
            expert_slots,
            replica_count,
            slots_per_device=slots_per_device,
            num_devices=num_devices,
            split=split,
            iterations=iterations,
        )
        return tokens.reshape(num_devices, slots_per_device).sum(-1)

    fn = one
    for _ in range(expert_totals.ndim - 1):
        fn = jax.vmap(fn)
    return fn(expert_totals)


def host_tokens_per_device(
    slot_to_expert: np.ndarray,
    expert_loads: np.ndarray,
    *,
    num_devices: int,
    split: str,
    iterations: int = SPLIT_ITERATIONS,
) -> np.ndarray:
    """numpy in, numpy out: ``[..., D]`` tokens each device computes when the integer token counts
    ``expert_loads [..., E]`` are split over the tables ``slot_to_expert [..., P]`` by ``split``.

    The quota code the layer runs, compiled once per shape, for host-side consumers of tables: planner
    policies, evaluation scripts, the simulator and the per-device emulation.
    """
    tokens = host_slot_tokens(slot_to_expert, expert_loads, num_devices=num_devices, split=split,
                              iterations=iterations)
    return tokens.reshape(*tokens.shape[:-1], num_devices, -1).sum(-1)


def host_slot_tokens(
    slot_to_expert: np.ndarray,
    expert_loads: np.ndarray,
    *,
    num_devices: int,
    split: str,
    iterations: int = SPLIT_ITERATIONS,
) -> np.ndarray:
    """``[..., P]`` tokens each slot computes (0 for empty slots); see :func:`host_tokens_per_device`."""
    from moeless_jax.moe.replica_table import expert_slot_arrays

    if split not in SPLITS:
        raise ValueError(f"split '{split}' is not one of {'|'.join(SPLITS)}")
    slot_to_expert, expert_loads = np.asarray(slot_to_expert), np.asarray(expert_loads)
    if expert_loads.dtype.kind not in "iu":
        raise ValueError(f"the {split} split divides token counts: expert_loads must be integers, "
                         f"got {expert_loads.dtype}")
    lead, num_slots, num_experts = expert_loads.shape[:-1], slot_to_expert.shape[-1], expert_loads.shape[-1]
    if slot_to_expert.shape[:-1] != lead or num_slots % num_devices:
        raise ValueError(f"slot_to_expert {slot_to_expert.shape} and expert_loads {expert_loads.shape} "
                         f"disagree, or {num_slots} slots do not divide over {num_devices} devices")
    expert_slots, replica_count = expert_slot_arrays(slot_to_expert, num_experts, num_devices)
    flat = (expert_loads.reshape(-1, num_experts).astype(np.int32),
            expert_slots.reshape(-1, num_experts, num_devices), replica_count.reshape(-1, num_experts))
    tokens = _host_slot_tokens(*flat, num_slots=num_slots, num_devices=num_devices, split=split,
                               iterations=iterations)
    return np.asarray(tokens, np.int64).reshape(*lead, num_slots)


@partial(jax.jit, static_argnames=("num_slots", "num_devices", "split", "iterations"))
def _host_slot_tokens(expert_totals, expert_slots, replica_count, *, num_slots, num_devices, split,
                      iterations):
    one = partial(split_slot_tokens, slots_per_device=num_slots // num_devices, num_devices=num_devices,
                  split=split, iterations=iterations)
    return jax.vmap(one)(expert_totals, expert_slots, replica_count)
