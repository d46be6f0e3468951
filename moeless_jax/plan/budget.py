"""A move budget: apply at most ``max_moves`` weight copies of a proposed table, the most useful first.

A re-plan can change many slots of a layer at once, and every slot that receives a new expert is a weight
copy (MoEless, vLLM and SGLang all pay it between steps). :func:`limit_moves` keeps the table in use and takes
only part of the proposal when the budget does not cover it: the copies that bring the hottest replicas first
(forecast load per replica of the new expert), each accepted only if the table stays servable and the
forecast's peak device load does not rise. Pure numpy and deterministic.
"""

from __future__ import annotations

import numpy as np

from moeless_jax.errors import InputError

__all__ = ["check_table", "copies", "limit_moves", "slot_array"]


def slot_array(slot_to_expert, *, num_devices: int, slots_per_device: int, name: str = "table") -> np.ndarray:
    """``slot_to_expert`` as an int64 ``[P]`` array if it has the layout's shape and holds integers, else
    :class:`InputError` naming ``name`` (the shape and type half of :func:`check_table`)."""
    table = np.asarray(slot_to_expert)
    num_slots = num_devices * slots_per_device
    if table.shape != (num_slots,):
        raise InputError(f"{name}: has shape {table.shape}, expected ({num_slots},) = devices x slots")
    if table.dtype == np.bool_ or table.dtype.kind not in "iu":
        raise InputError(f"{name}: must hold integer expert ids, got dtype {table.dtype}")
    return table.astype(np.int64)


def check_table(
    slot_to_expert, *, num_experts: int, num_devices: int, slots_per_device: int, name: str = "table"
) -> np.ndarray:
    """``slot_to_expert [P]`` as int64 if it is a servable table, else :class:`InputError` naming the fault.

    Servable: every entry in ``-1..E-1``, every expert on at least one slot, no device holding two replicas
    of one expert (the rules of :class:`moeless_jax.moe.ReplicaTable`, checked without jax).
    """
    table = slot_array(slot_to_expert, num_devices=num_devices, slots_per_device=slots_per_device, name=name)
    bad = np.flatnonzero((table < -1) | (table >= num_experts))
    if bad.size:
        p = int(bad[0])
        raise InputError(f"{name}: slot {p} names expert {int(table[p])}, outside -1..{num_experts - 1}")
    count = np.bincount(table[table >= 0], minlength=num_experts)
    missing = np.flatnonzero(count == 0)
    if missing.size:
        raise InputError(f"{name}: expert {int(missing[0])} has no replica; every expert needs a slot")
    filled = np.flatnonzero(table >= 0)
    device_expert = filled // slots_per_device * num_experts + table[filled]
    twice = np.flatnonzero(np.bincount(device_expert) > 1)
    if twice.size:
        device, expert = divmod(int(twice[0]), num_experts)
        raise InputError(f"{name}: device {device} holds two replicas of expert {expert}; at most one")
    return table


def copies(previous: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``[..., P]`` bool: slots of ``table`` that receive a weight copy coming from ``previous``."""
    previous, table = np.asarray(previous), np.asarray(table)
    return (table != previous) & (table >= 0)


def limit_moves(
    previous,
    proposed,
    loads,
    *,
    num_experts: int,
    num_devices: int,
    slots_per_device: int,
    max_moves: int | None,
) -> np.ndarray:
    """A table between ``previous [P]`` and ``proposed [P]`` with at most ``max_moves`` weight copies.

    loads: ``[E]`` forecast load of each expert (any scale). Returns ``[P]`` int64, a servable table.

    - ``max_moves=None``: ``proposed``. ``max_moves=0``: ``previous`` (the table is frozen).
    - The budget covers the proposal (its copies, slots that get a new expert, are at most ``max_moves``;
      slots that become empty cost nothing): ``proposed``.
    - Otherwise the proposal's copies are tried hottest first (forecast load per replica of the new expert in
      ``proposed``; ties by slot), in passes until the budget is spent or a pass accepts nothing. A copy is
      accepted when the table stays servable (the replaced expert keeps a replica, the new one is not on that
      device yet) and the peak device load of ``loads`` split evenly over replicas does not rise, so the
      result is never worse than ``previous`` on the forecast. Filled slots stay within those of
      ``previous`` or ``proposed``, whichever is more (a slot cap both respect holds): a copy into an empty
      slot beyond that takes one of the proposal's free clears along, the one that leaves the lowest peak.
    """
    layout = {"num_experts": num_experts, "num_devices": num_devices, "slots_per_device": slots_per_device}
    previous = check_table(previous, name="previous", **layout)
    proposed = check_table(proposed, name="proposed", **layout)
    load = _check_expert_loads(loads, num_experts)
    if max_moves is None:
        return proposed.copy()
    if isinstance(max_moves, bool) or not isinstance(max_moves, int | np.integer) or max_moves < 0:
        raise InputError(f"max_moves: must be an integer >= 0 or None (no limit), got {max_moves!r}")
    if max_moves == 0:
        return previous.copy()
    wanted = np.flatnonzero(copies(previous, proposed))
    if wanted.size <= max_moves:
        return proposed.copy()
    return _Budget(previous, proposed, load, num_experts, slots_per_device).run(wanted, int(max_moves))


class _Budget:
    """Greedy application of a proposal's copies to the table in use (see :func:`limit_moves`)."""

    def __init__(self, previous, proposed, load, num_experts: int, slots_per_device: int):
        self.proposed, self.load = proposed, load
        self.num_experts, self.slots = num_experts, slots_per_device
        self.table = previous.copy()
        self.fill_limit = max(int((previous >= 0).sum()), int((proposed >= 0).sum()))
        self.clears = [int(q) for q in np.flatnonzero((proposed != previous) & (proposed < 0))]
        self.peak = self._peak(self.table)

    def run(self, wanted: np.ndarray, max_moves: int) -> np.ndarray:
        per_replica = self.load / np.bincount(self.proposed[self.proposed >= 0], minlength=self.num_experts)
        heat = per_replica[self.proposed[wanted]]
        pending = [int(p) for p in wanted[np.lexsort((wanted, -heat))]]
        moves = 0
        while moves < max_moves:
            accepted = []
            for p in pending:
                if moves == max_moves:
                    break
                trial = self._try(p)
                if trial is not None:
                    self.table, self.peak = trial
                    self.clears = [q for q in self.clears if self.table[q] >= 0]
                    accepted.append(p)
                    moves += 1
            if not accepted:
                break
            pending = [p for p in pending if p not in accepted]
        return self.table

    def _try(self, slot: int) -> tuple[np.ndarray, float] | None:
        """The table with ``slot`` copied in (and a clear, if a slot cap needs one) and its peak, or None."""
        table, new = self.table, int(self.proposed[slot])
        old = int(table[slot])
        device = slot // self.slots
        if np.any(table[device * self.slots : (device + 1) * self.slots] == new):
            return None
        if old >= 0 and np.count_nonzero(table == old) < 2:
            return None
        trial = table.copy()
        trial[slot] = new
        options = [trial]
        if old < 0 and int((trial >= 0).sum()) > self.fill_limit:
            options = [self._cleared(trial, q) for q in self.clears if trial[q] >= 0]
            options = [t for t in options if t is not None]
        best = None
        for option in options:
            peak = self._peak(option)
            if peak <= self.peak and (best is None or peak < best[1]):
                best = (option, peak)
        return best

    def _cleared(self, table: np.ndarray, slot: int) -> np.ndarray | None:
        if np.count_nonzero(table == table[slot]) < 2:  # the expert would lose its last replica
            return None
        out = table.copy()
        out[slot] = -1
        return out

    def _peak(self, table: np.ndarray) -> float:
        filled = table >= 0
        expert = np.maximum(table, 0)
        count = np.maximum(np.bincount(table[filled], minlength=self.num_experts), 1)
        share = np.where(filled, self.load[expert] / count[expert], 0.0)
        return float(share.reshape(-1, self.slots).sum(-1).max())


def _check_expert_loads(loads, num_experts: int) -> np.ndarray:
    array = np.asarray(loads)
    if array.dtype == np.bool_ or array.dtype.kind not in "iuf":
        raise InputError(f"loads: expected numbers, got dtype {array.dtype}")
    if array.shape != (num_experts,):
        raise InputError(f"loads: has shape {array.shape}, expected ({num_experts},) = one load per expert")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise InputError("loads: must be finite and >= 0")
    return array
