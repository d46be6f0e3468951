"""Placement for the balanced split: account replicated experts as divisible load (an experiment).

The default placer (:mod:`~moeless_jax.plan.placer`) levels *per-replica forecasts*: each replica adds
``load / count`` to its device, as the even split will divide it. Under the layer's balanced split an
expert's tokens flow to whichever of its replicas' devices is lighter, so a replicated expert is divisible
load. :func:`place_divisible` places experts heaviest (per replica) first like the default greedy; an expert
with ``r`` replicas takes the ``r`` least-loaded devices with a free slot (anti-affinity holds by
construction) and its load is *water-filled* over them, the lowest rising first, instead of divided evenly.
Later, lighter experts then see the device loads the balanced split will produce.

It places from scratch (no warm reuse) and returns ``None`` where the greedy corners itself (the free slots
left sit on fewer devices than an expert has replicas); callers keep the default placement then.
``scripts/split_placement.py`` measures it against the default placer on real traces.
"""

from __future__ import annotations

import numpy as np


def water_fill_levels(base: np.ndarray, amount: float) -> np.ndarray:
    """Per-entry additions ``>= 0`` summing to ``amount`` that raise the lowest of ``base [r]`` together."""
    order = np.argsort(base, kind="stable")
    sorted_base = base[order]
    add = np.zeros_like(base, dtype=np.float64)
    for k in range(1, base.size + 1):
        # Level if the k lowest share the amount; valid when it does not pass the next entry.
        level = (amount + sorted_base[:k].sum()) / k
        if k == base.size or level <= sorted_base[k]:
            add[order[:k]] = level - sorted_base[:k]
            return add
    return add  # unreachable: k == size always returns


def place_divisible(
    replica_count: np.ndarray, expert_loads: np.ndarray, num_devices: int, slots_per_device: int
) -> np.ndarray | None:
    """``slot_to_expert [D * S]`` (-1 empty) for ``replica_count [E]`` replicas of experts with forecast
    ``expert_loads [E]``, replicated experts water-filled over their devices; ``None`` when cornered."""
    count = np.asarray(replica_count, np.int64)
    loads = np.asarray(expert_loads, np.float64)
    share = loads / count
    order = np.argsort(-share, kind="stable")
    device_load = np.zeros(num_devices)
    free = np.full(num_devices, slots_per_device)
    out = np.full(num_devices * slots_per_device, -1, np.int64)
    for e in order.tolist():
        r = int(count[e])
        open_devices = np.flatnonzero(free > 0)
        if open_devices.size < r:
            return None
        # The r least-loaded open devices, ties to the lower device.
        chosen = open_devices[np.argsort(device_load[open_devices], kind="stable")[:r]]
        device_load[chosen] += water_fill_levels(device_load[chosen], float(loads[e])) if r > 1 else loads[e]
        for d in chosen.tolist():
            out[d * slots_per_device + slots_per_device - free[d]] = e
            free[d] -= 1
    return out
