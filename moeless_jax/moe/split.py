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

from moeless_jax.moe.config import SPLITS


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
    j = jnp.arange(r_max, dtype=jnp.int32)
    n = jnp.maximum(replica_count, 1)[:, None]
    base, extra = expert_totals[:, None] // n, expert_totals[:, None] % n
    quotas = base + (j[None, :] < extra).astype(jnp.int32)
    return jnp.where(j[None, :] < replica_count[:, None], quotas, 0).astype(jnp.int32)


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
    """Pour ``amount[e]`` over the replicas of row ``e`` so the lowest levels rise together.

    base: [E, R] current level of each replica's device without this expert; amount: [E]; valid: [E, R].
    Returns [E, R] non-negative allocations summing to ``amount`` per row, levelling ``base + alloc``
    over the replicas that receive anything. Sort-free (pairwise [E, R, R]) so it fuses on accelerators.
    """
    big = jnp.finfo(base.dtype).max / 4
    b = jnp.where(valid, base, big)
    # Water needed to raise every replica up to breakpoint b_k: sum_j max(0, b_k - b_j).
    below = b[:, None, :] <= b[:, :, None]  # [E, k, j]: b_j <= b_k
    need = jnp.sum(jnp.where(below, b[:, :, None] - b[:, None, :], 0), axis=-1)  # [E, k]
    feasible = valid & (need <= amount[:, None])
    top = jnp.max(jnp.where(feasible, b, -big), axis=-1)  # highest breakpoint reachable
    active = valid & (b <= top[:, None])
    level = (amount + jnp.sum(jnp.where(active, b, 0), axis=-1)) / jnp.maximum(jnp.sum(active, axis=-1), 1)
    return jnp.where(valid, jnp.maximum(level[:, None] - b, 0), 0)


def balanced_quotas(
    expert_totals: jax.Array,
    expert_slots: jax.Array,
    replica_count: jax.Array,
    *,
    slots_per_device: int,
    num_devices: int,
    iterations: int = 24,
    fused: bool = True,
) -> jax.Array:
    """Integer quotas [E, R] that level device loads, for the experts' true token counts.

    Minimises sum_d load_d^2 over splits of each expert's tokens among its replicas. The achievable load
    vectors form the base polytope of a coverage polymatroid, where the minimiser of a separable convex
    function also minimises the maximum load, so this is the min-max split (the LP optimum).

    Method: parallel water-filling. Each round, every replicated expert computes the split that would
    level its own replicas' devices given everyone else's tokens, and moves a step ``1 / n`` toward it,
    where ``n`` is the most replicated experts sharing one of its devices. By convexity the simultaneous
    steps never increase sum_d load_d^2, so the rounds descend monotonically from the even split. The
    result is rounded to integers per expert (largest remainders) and, as a safeguard, the even split is
    kept if it has the lower maximum. Only experts with several replicas can move, and there are at most
    ``P - E`` of them, so the rounds run on those rows alone.

    expert_totals: [E] tokens per expert; expert_slots: [E, R] (-1 padded); replica_count: [E].
    ``fused`` runs the rounds as one Pallas kernel on CUDA GPUs (same result, a few kernels instead of ~100;
    see :mod:`moeless_jax.moe.split_kernel`); other platforms always run the XLA rounds.
    """
    num_experts, r_max = expert_slots.shape
    even = even_quotas(expert_totals, replica_count, r_max)
    num_movable = min(num_experts, num_devices * slots_per_device - num_experts)
    if num_movable <= 0:
        return even
    device, valid = replica_devices(expert_slots, slots_per_device)
    worst = lambda q: jnp.max(device_loads(q, device, valid, num_devices))  # noqa: E731

    rows = jax.lax.top_k(replica_count, num_movable)[1]  # every replicated expert is among these
    m_device, m_valid, m_totals = device[rows], valid[rows], expert_totals[rows].astype(jnp.float32)
    fixed = device_loads(even.astype(jnp.float32), device, valid, num_devices) - device_loads(
        even[rows].astype(jnp.float32), m_device, m_valid, num_devices
    )
    movable = (replica_count[rows] > 1)[:, None] & m_valid
    sharing = jnp.zeros(num_devices, jnp.float32).at[m_device].add(movable.astype(jnp.float32))
    step = 1.0 / jnp.maximum(jnp.max(jnp.where(m_valid, sharing[m_device], 1.0), axis=-1), 1.0)  # [M]

    rounds_args = (even[rows].astype(jnp.float32), m_device, m_valid, m_totals, step, fixed)
    xla = partial(water_fill_rounds, iterations=iterations)
    if fused:  # one Pallas kernel on GPU; the XLA rounds elsewhere
        from moeless_jax.moe.split_kernel import fused_rounds

        fractional = jax.lax.platform_dependent(
            *rounds_args, cuda=partial(fused_rounds, iterations=iterations), default=xla
        )
    else:
        fractional = xla(*rounds_args)
    balanced = even.at[rows].set(round_quotas(fractional, expert_totals[rows], m_valid))
    return jnp.where(worst(balanced) <= worst(even), balanced, even)


def water_fill_rounds(
    q: jax.Array,
    device: jax.Array,
    valid: jax.Array,
    totals: jax.Array,
    step: jax.Array,
    fixed: jax.Array,
    *,
    iterations: int,
) -> jax.Array:
    """The balanced split's rounds over the replicated experts' rows.

    q, device, valid: [M, R] quotas, replica devices, validity; totals, step: [M]; fixed: [D] device loads of
    the experts that cannot move. Returns the fractional quotas after ``iterations`` rounds.
    """
    num_devices = fixed.shape[0]

    def round_(_, q):
        loads = fixed + device_loads(q, device, valid, num_devices)
        target = water_fill(loads[device] - q, totals, valid)
        return q + step[:, None] * (target - q)

    return jax.lax.fori_loop(0, iterations, round_, q, unroll=True)


def round_quotas(fractional: jax.Array, expert_totals: jax.Array, valid: jax.Array) -> jax.Array:
    """Integer quotas per row summing to ``expert_totals``: floors plus the largest remainders."""
    floors = jnp.where(valid, jnp.floor(fractional), 0).astype(jnp.int32)
    missing = expert_totals.astype(jnp.int32) - jnp.sum(floors, axis=-1)  # [E], 0 <= missing < R
    remainder = jnp.where(valid, fractional - floors, -1.0)
    # Rank of each replica's remainder within its row (largest first, lower index wins ties).
    r = remainder.shape[1]
    idx = jnp.arange(r)
    ahead = (remainder[:, None, :] > remainder[:, :, None]) | (
        (remainder[:, None, :] == remainder[:, :, None]) & (idx[None, None, :] < idx[None, :, None])
    )
    rank = jnp.sum(ahead, axis=-1)  # [E, R]
    return floors + (valid & (rank < missing[:, None])).astype(jnp.int32)


def split_quotas(
    expert_totals: jax.Array,
    expert_slots: jax.Array,
    replica_count: jax.Array,
    *,
    slots_per_device: int,
    num_devices: int,
    split: str,
    iterations: int = 24,
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
    iterations: int = 24,
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
    iterations: int = 24,
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
    iterations: int = 24,
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
    iterations: int = 24,
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
