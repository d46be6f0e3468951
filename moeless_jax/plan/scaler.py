"""Expert scaler: how many replicas each expert gets (MoEless Alg. 1, and a fixed-budget min-max variant).

Both start from one replica per expert and repeatedly give one more replica to the expert with the highest
load per replica, kept in a max-heap. Ties go to the lower expert index, so zero and equal loads give one
answer. An expert never gets more than ``max_per_expert`` replicas (one per device).

Adding a replica to expert ``e`` at count ``r`` changes the sum of squared per-replica loads
``Q = sum_e L_e^2 / r_e`` by ``L_e^2 / (r + 1) - L_e^2 / r``, so the coefficient of variation is updated in
O(1) per step instead of recomputed over all replicas. The CV rule sorts the candidate picks with numpy
instead of popping a heap (same picks in the same order).
"""

from __future__ import annotations

import heapq
from functools import lru_cache

import numpy as np

from moeless_jax.errors import InputError


def scale_to_cv(
    expert_loads: np.ndarray, *, cv_target: float, max_replicas: int, max_per_expert: int
) -> np.ndarray:
    """MoEless Alg. 1: add replicas until the CV of per-replica loads is <= ``cv_target`` or a cap is hit.

    expert_loads: ``[E]`` >= 0. ``max_replicas``: the layer's slot cap (>= E). ``max_per_expert``: at most
    this many replicas of one expert (the number of devices). Returns ``replica_count [E]`` int64.
    """
    loads = _check(expert_loads, max_replicas, max_per_expert)
    return cv_counts(loads, cv_target, max_replicas, max_per_expert)


def cv_counts(loads: np.ndarray, cv_target: float, max_replicas: int, max_per_expert: int) -> np.ndarray:
    """:func:`scale_to_cv` on a checked float64 ``[E]`` vector (the hot path).

    The heap pops replicas in descending order of ``load_e / r`` (the load per replica before the pick), ties
    to the lower expert, so the order of every possible pick is known up front: numpy sorts the candidates,
    and only the CV test runs pick by pick, with the same float operations as the heap loop.
    """
    num_experts = loads.size
    budget = min(max_replicas - num_experts, num_experts * (max_per_expert - 1))
    total = float(loads.sum())
    if budget <= 0 or total <= 0:
        return np.ones(num_experts, np.int64)
    # CV > V  <=>  n * Q > T^2 * (1 + V^2), with Q = sum_e L_e^2 / r_e: no square root or division per step.
    square_sum = float(np.dot(loads, loads))
    limit = total * total * (1.0 + cv_target * cv_target)
    if num_experts * square_sum <= limit:
        return np.ones(num_experts, np.int64)
    # The first `budget` picks all have keys >= kth, the budget-th largest load (the top experts' first picks
    # are `budget` such keys), so only experts with load >= kth and their first load_max / kth picks count.
    steps = min(max_per_expert - 1, budget)
    if budget < num_experts:
        part = loads.copy()
        part.partition(num_experts - budget)
        kth = float(part[num_experts - budget])
        top = (loads >= kth).nonzero()[0]
        if kth > 0 and steps > 8:  # (a narrower candidate table only pays when it is wide)
            steps = min(steps, int(float(loads.max()) // kth) + 1)
    else:
        kth = 0.0
        top = loads.nonzero()[0]  # idle experts never get a second replica
    top_load = loads[top]
    # [expert, r - 1]: minus the load per replica before the pick; row-major, so ties go to the lower expert.
    picks = np.divide.outer(top_load, _minus_divisors(steps)).ravel().argsort(kind="stable")
    picks = picks[:budget].tolist()
    top, top_load = top.tolist(), top_load.tolist()
    replicas = num_experts
    grown = []
    for pick in picks:
        if replicas * square_sum <= limit:
            break
        i, r = divmod(pick, steps)
        load = top_load[i]
        r += 1
        if kth <= 0 and load / r == 0.0:  # (keys >= kth > 0 otherwise)
            break  # only idle experts can still grow; another replica would only lower the mean
        square_sum -= load * load / (r * (r + 1))
        replicas += 1
        grown.append(top[i])
    count = np.bincount(grown, minlength=num_experts)
    count += 1
    return count


@lru_cache(maxsize=64)
def _minus_divisors(steps: int) -> np.ndarray:
    """``-1, -2, ..., -steps`` as float64 (``load / -r`` is exactly ``-(load / r)``)."""
    divisors = -np.arange(1, steps + 1, dtype=np.float64)
    divisors.flags.writeable = False
    return divisors


def scale_min_max(expert_loads: np.ndarray, *, extra_replicas: int, max_per_expert: int) -> np.ndarray:
    """Give exactly ``extra_replicas`` more replicas, each to the expert with the highest load per replica.

    This minimises the maximum load per replica for the budget (EPLB's replicate step, here with the
    one-replica-per-device cap). Fewer are added only when every expert is at ``max_per_expert``.
    Returns ``replica_count [E]`` int64.
    """
    if (
        isinstance(extra_replicas, bool)
        or not isinstance(extra_replicas, int | np.integer)
        or extra_replicas < 0
    ):
        raise InputError(f"extra_replicas must be an integer >= 0, got {extra_replicas!r}")
    loads = _check(expert_loads, np.asarray(expert_loads).size + int(extra_replicas), max_per_expert)
    count = np.ones(loads.size, np.int64)
    budget = min(int(extra_replicas), loads.size * (max_per_expert - 1))
    heap = _heap(loads, budget, max_per_expert)
    values = loads.tolist()
    for _ in range(budget):
        e = heap[0][1]
        count[e] += 1
        if count[e] < max_per_expert:
            heapq.heapreplace(heap, (-values[e] / int(count[e]), e))
        else:
            heapq.heappop(heap)
    return count


def _check(expert_loads: np.ndarray, max_replicas: int, max_per_expert: int) -> np.ndarray:
    loads = np.asarray(expert_loads)
    if loads.ndim != 1 or loads.size == 0:
        raise InputError(f"expert_loads must be a non-empty [E] vector, got shape {loads.shape}")
    if loads.dtype.kind not in "iuf" or not np.all(np.isfinite(loads)) or np.any(loads < 0):
        raise InputError("expert_loads must be finite numbers >= 0")
    if max_replicas < loads.size:
        raise InputError(f"the slot cap {max_replicas} cannot hold {loads.size} experts once each")
    if max_per_expert < 1:
        raise InputError(f"max_per_expert must be >= 1, got {max_per_expert}")
    return loads.astype(np.float64)


def _heap(loads: np.ndarray, budget: int, max_per_expert: int) -> list[tuple[float, int]]:
    """Max-heap (negated keys) of load per replica over experts that can receive one of ``budget`` replicas.

    Ties pop the lower expert index first. The top ``budget`` loads are themselves ``budget`` candidates, so
    an expert lighter than the ``budget``-th heaviest can never be chosen; leaving it out keeps the heap
    small.
    """
    if max_per_expert <= 1 or budget <= 0:
        return []
    if budget < loads.size:
        kth = np.partition(loads, loads.size - budget)[loads.size - budget]
        experts = np.flatnonzero(loads >= kth)
    else:
        experts = np.arange(loads.size)
    heap = list(zip((-loads[experts]).tolist(), experts.tolist(), strict=True))
    heapq.heapify(heap)
    return heap
