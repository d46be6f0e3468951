"""How an expert's tokens are split across its replicas.

Every (token, k) assignment to expert ``e`` gets a *global rank* within ``e``: its position among all of
``e``'s assignments on all devices, ordered by device and then by flat position ``t * K + k``. A split
gives each replica ``j`` of ``e`` a quota ``q[e, j]`` with ``sum_j q[e, j] = count[e]``; the assignment of
rank ``r`` goes to the replica whose cumulative quota range holds ``r``. The rule is deterministic and
needs only the per-expert counts of every device (an all_gather of E integers), so every device knows
where every one of its assignments goes without a host round trip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
