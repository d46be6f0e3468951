"""The exact optimum of splitting tokens over a fixed placement: the LP bound splits are judged by.

Given per-expert token counts and a replica table, choose non-negative per-replica tokens that sum to each
expert's count and minimise the maximum tokens on a device. Host-side (scipy's HiGHS); for evaluation only.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from moeless_jax.moe.replica_table import ReplicaTable


def optimal_max_device_load(expert_totals: np.ndarray, table: ReplicaTable) -> float:
    """Minimum over fractional splits of the maximum tokens on a device (the LP bound).

    expert_totals: [E] tokens routed to each expert in one batch.
    """
    expert_totals = np.asarray(expert_totals, np.float64)
    if expert_totals.shape != (table.num_experts,):
        raise ValueError(f"expert_totals has shape {expert_totals.shape}; expected ({table.num_experts},)")
    experts, replicas = np.nonzero(table.expert_slots >= 0)
    devices = table.expert_slots[experts, replicas] // table.slots_per_device
    n_vars = experts.size + 1  # per-replica tokens, then the max load t
    rows = np.arange(experts.size)
    # sum over a device's replicas - t <= 0
    a_ub = coo_matrix(
        (
            np.concatenate([np.ones(experts.size), -np.ones(table.num_devices)]),
            (
                np.concatenate([devices, np.arange(table.num_devices)]),
                np.concatenate([rows, np.full(table.num_devices, experts.size)]),
            ),
        ),
        shape=(table.num_devices, n_vars),
    )
    a_eq = coo_matrix((np.ones(experts.size), (experts, rows)), shape=(table.num_experts, n_vars))
    cost = np.zeros(n_vars)
    cost[-1] = 1.0
    result = linprog(
        cost,
        A_ub=a_ub,
        b_ub=np.zeros(table.num_devices),
        A_eq=a_eq,
        b_eq=expert_totals,
        bounds=(0, None),
        method="highs",
    )
    if not result.success:
        raise RuntimeError(f"split LP failed: {result.message}")
    return float(result.fun)
