"""Operations on ``slot_to_expert`` arrays: the static layout, keeping slots in place across tables, and
repairing tables that put two replicas of an expert on one device.

These work on plain int arrays (``[P]``, -1 = empty slot, slot ``p`` on device ``p // S``) so planning needs
no jax; :class:`moeless_jax.moe.replica_table.ReplicaTable` validates the result where a table is built.
"""

from __future__ import annotations

import numpy as np

from moeless_jax.layout import static_slot_to_expert

__all__ = ["align_slots", "repair_anti_affinity", "static_slot_to_expert"]


def align_slots(slot_to_expert: np.ndarray, previous: np.ndarray, slots_per_device: int) -> np.ndarray:
    """Permute each device's slots so replicas the previous table already had there stay put.

    Only the order of slots inside a device changes (loads do not). A replica new to its device takes a slot
    that was empty before if there is one, else the lowest free slot. Both arrays are ``[P]``.
    """
    num_slots = slot_to_expert.size
    num_experts = int(max(slot_to_expert.max(), previous.max())) + 1
    slot = np.flatnonzero(slot_to_expert >= 0)
    key = slot // slots_per_device * num_experts + slot_to_expert[slot]  # (device, expert), ascending device
    prev_slot = np.flatnonzero(previous >= 0)
    prev_key = prev_slot // slots_per_device * num_experts + previous[prev_slot]
    by_key = np.argsort(prev_key)
    prev_slot, prev_key = prev_slot[by_key], prev_key[by_key]
    if prev_key.size:
        at = np.minimum(np.searchsorted(prev_key, key), prev_key.size - 1)
        stays = prev_key[at] == key
    else:
        at, stays = np.zeros(key.size, np.int64), np.zeros(key.size, bool)
    aligned = np.full(num_slots, -1, np.int64)
    aligned[prev_slot[at[stays]]] = slot_to_expert[slot[stays]]
    moving = slot[~stays]
    if moving.size:
        moving_device = moving // slots_per_device
        free = np.flatnonzero(aligned < 0)
        free = free[np.lexsort((free, previous[free] >= 0, free // slots_per_device))]
        rank = np.arange(moving.size) - np.searchsorted(moving_device, moving_device)
        aligned[free[np.searchsorted(free // slots_per_device, moving_device) + rank]] = slot_to_expert[
            moving
        ]
    return aligned


def repair_anti_affinity(
    slot_to_expert: np.ndarray,
    share: np.ndarray,
    slots_per_device: int,
    node_of_device: np.ndarray | None = None,
) -> tuple[np.ndarray | None, int]:
    """Swap replicas until no device holds two replicas of one expert.

    slot_to_expert: ``[P]``; share: ``[E]`` load of one replica of each expert. A duplicate replica of expert
    ``e`` on device ``d`` swaps with the replica ``x`` on another device ``d'`` (same node first) such that
    ``d`` lacks ``x`` and ``d'`` lacks ``e``, choosing the ``x`` whose replica load is closest to ``e``'s so
    device loads barely change (ties: lower slot). Returns ``(slot_to_expert, swaps)``, with ``None`` for the
    table when a duplicate has no such partner.
    """
    s2e = slot_to_expert.copy()
    num_slots = s2e.size
    num_devices = num_slots // slots_per_device
    node = np.zeros(num_devices, np.int64) if node_of_device is None else np.asarray(node_of_device)
    slot_device = np.arange(num_slots) // slots_per_device
    swaps = 0
    while True:
        duplicate = _first_duplicate(s2e, slots_per_device)
        if duplicate < 0:
            return s2e, swaps
        e, d = int(s2e[duplicate]), int(slot_device[duplicate])
        holders = np.zeros((num_devices, share.size + 1), bool)  # [D, E + 1]; column E is "empty"
        holders[slot_device, s2e] = True
        x = s2e
        ok = (slot_device != d) & (x != e) & ((x < 0) | ~holders[d, x]) & ~holders[slot_device, e]
        if not ok.any():
            return None, swaps
        cost = np.where(ok, np.abs(np.where(x >= 0, share[x], 0.0) - share[e]), np.inf)
        other_node = node[slot_device] != node[d]
        q = int(np.lexsort((np.arange(num_slots), cost, other_node | ~ok))[0])
        s2e[duplicate], s2e[q] = s2e[q], e
        swaps += 1


def _first_duplicate(slot_to_expert: np.ndarray, slots_per_device: int) -> int:
    """Slot of the first replica that repeats an expert already on its device, or -1."""
    per_device = slot_to_expert.reshape(-1, slots_per_device)
    order = np.argsort(per_device, axis=1, kind="stable")
    ranked = np.take_along_axis(per_device, order, 1)
    repeat = (ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)
    if not repeat.any():
        return -1
    device, position = np.argwhere(repeat)[0]
    return int(device * slots_per_device + order[device, position + 1])
