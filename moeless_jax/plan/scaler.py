"""Expert scaler: how many replicas each expert gets (MoEless Alg. 1, and a fixed-budget min-max variant).

Both start from one replica per expert and repeatedly give one more replica to the expert with the highest
load per replica, kept in a max-heap. Ties go to the lower expert index, so zero and equal loads give one
answer. An expert never gets more than ``max_per_expert`` replicas (one per device).

Adding a replica to expert ``e`` at count ``r`` changes the sum of squared per-replica loads
``Q = sum_e L_e^2 / r_e`` by ``L_e^2 / (r + 1) - L_e^2 / r``, so the coefficient of variation is updated in
O(1) per step instead of recomputed over all replicas. The CV rule's loop, :func:`_grow_to_cv`, runs over
numpy arrays, compiled with numba where numba is installed (see :mod:`~moeless_jax.plan._compiled`) and as
plain Python, with the same counts, where it is not.
"""

from __future__ import annotations

import heapq

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.plan._compiled import njit


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

    The sums that start the CV test are numpy's (as in the reference loop); the picks run in
    :func:`_grow_to_cv`, compiled with numba where it is installed.
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
    count = np.ones(num_experts, np.int64)
    _grow_to_cv(
        np.ascontiguousarray(loads, np.float64), square_sum, limit, int(budget), int(max_per_expert), count
    )
    return count


@njit
def _grow_to_cv(loads, square_sum, limit, budget, max_per_expert, count):
    """Alg. 1's loop: while ``replicas * square_sum > limit``, give ``count [E]`` (all 1 on entry) one more
    replica of the expert with the highest ``load / count`` (ties: lower expert), at most ``budget`` in all
    and ``max_per_expert`` per expert. Stops when the highest is 0: only idle experts are left to grow, and
    another replica of one would only lower the mean.

    A binary max-heap of experts keyed by ``(load / count, -expert)``, started sorted (a sorted array is a
    heap); plain loops over arrays, so that it compiles with numba and runs unchanged as Python without it.
    """
    key = loads.copy()  # load per replica
    heap = np.argsort(-loads, kind="mergesort")  # highest first, ties to the lower expert (stable)
    size = loads.size if max_per_expert > 1 else 0
    replicas = loads.size
    added = 0
    while added < budget and size > 0 and replicas * square_sum > limit:
        e = heap[0]
        if key[e] == 0.0:
            break
        load = loads[e]
        r = count[e]
        square_sum -= load * load / (r * (r + 1))
        count[e] = r + 1
        replicas += 1
        added += 1
        if r + 1 < max_per_expert:
            key[e] = load / (r + 1)
        else:  # capped: the last entry takes its place
            size -= 1
            e = heap[size]
        i = 0  # sift e down from the top
        while True:
            child = 2 * i + 1
            if child >= size:
                break
            c = heap[child]
            if child + 1 < size:
                other = heap[child + 1]
                if key[other] > key[c] or (key[other] == key[c] and other < c):
                    child += 1
                    c = other
            if key[e] > key[c] or (key[e] == key[c] and e < c):
                break
            heap[i] = c
            i = child
        heap[i] = e


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
