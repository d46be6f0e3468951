"""Expert placer: which slot each replica goes to (MoEless Alg. 2).

Replicas are taken heaviest first (load per replica, ties to the lower expert index). A replica of an expert
that the previous table holds may reuse that warm slot (no copy); otherwise it goes to the least-loaded
device that has a free slot and no replica of the same expert (anti-affinity), ties to the lower device. Three
rules decide when a warm slot is reused:

- ``warm_slack=None`` (the paper's rule): always. Warm replicas are pinned first and the others placed after,
  so a cold replica sees every device's warm load and never takes a slot a warm replica needs; an expert with
  fewer replicas than before keeps those on the devices least loaded by the replicas that stay. Balance
  drifts while replica counts stay the same, because nothing warm ever moves.
- ``warm_slack=x``: one replica at a time, a warm slot is reused if its device carries at most ``x`` more
  load than the least-loaded eligible device, so the result stays within ``x`` of greedy
  longest-processing-time placement while unchanged replicas stay put. Each replica's warm candidate is its
  expert's least-loaded warm device.
- ``reuse_warm=False`` (ablation): never; every replica is placed afresh (a replica landing where its expert
  was still keeps that slot, so it costs no copy).

Placing a table again with its own counts returns it unchanged under each rule (for ``warm_slack=x``: every
replica finds its warm device within the slack, because the state before each expert is the same as when
the table was made), so planning twice for the same loads moves nothing. A run that had to repair a corner
(below) is placed once more from its result to restore that property.

Greedy choices can paint themselves into a corner: the free slots left all sit on devices that already hold
the expert. Placement is then completed by an augmenting path that moves already-placed replicas along (a
bipartite b-matching step). Every expert has at most D replicas and at most P are placed, so a complete
placement always exists.

With a :class:`~moeless_jax.plan.topology.Topology`, a cold replica may go to a device up to
``locality_slack`` x its own load heavier than the least-loaded one when that shortens the weight copy (same
pair, then same node as a replica of the previous table).

The ``warm_slack`` rule without a topology has a fast path, :func:`_place_slack`, that makes the same choices
(slot for slot, the property tests compare the two) with less work per replica; it hands a cornered run to
the general one. Its greedy, :func:`_slack_greedy`, is one loop over numpy arrays, compiled with numba where
numba is installed (see :mod:`~moeless_jax.plan._compiled`) and run as plain Python, with the same results,
where it is not. The general path (:class:`_Placement`) is plain Python.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.plan._compiled import njit
from moeless_jax.plan.topology import Topology

if TYPE_CHECKING:
    from moeless_jax.moe.replica_table import ReplicaTable
    from moeless_jax.moe.slot_weights import MovePlan

# A one-by-one run that needed an augmenting path is placed again from its result at most this many times.
_MAX_REPLACE = 3


def place_replicas(
    replica_count: np.ndarray,
    expert_loads: np.ndarray,
    *,
    num_devices: int,
    slots_per_device: int,
    previous: np.ndarray | None = None,
    reuse_warm: bool = True,
    warm_slack: float | None = None,
    topology: Topology | None = None,
) -> np.ndarray:
    """Place ``replica_count [E]`` replicas of experts with ``expert_loads [E]`` into ``D * S`` slots.

    previous: ``[P]`` slot_to_expert of the table in use (or ``None``). reuse_warm, warm_slack: when a warm
    slot is reused (see the module doc; ``warm_slack`` is in ``expert_loads`` units). Returns
    ``slot_to_expert [P]`` int64, -1 for empty slots.
    """
    count, share, previous = _check(replica_count, expert_loads, num_devices, slots_per_device, previous)
    slot_to_expert, _ = place_checked(
        count, share, num_devices, slots_per_device, previous, reuse_warm, warm_slack, topology
    )
    return slot_to_expert


def place_checked(
    count: np.ndarray,
    share: np.ndarray,
    num_devices: int,
    slots_per_device: int,
    previous: np.ndarray | None = None,
    reuse_warm: bool = True,
    warm_slack: float | None = None,
    topology: Topology | None = None,
) -> tuple[np.ndarray, list[float]]:
    """:func:`place_replicas` on checked inputs (the hot path).

    count: ``[E]`` int64 replicas per expert; share: ``[E]`` float64 load of one replica of each expert;
    previous: ``[P]`` int64 or None. Returns ``(slot_to_expert [P] int64, device_load [D])`` where
    ``device_load`` sums ``share`` over each device's replicas.
    """
    if previous is None or not reuse_warm:
        state = _Placement(count, share, num_devices, slots_per_device, previous, topology)
        state.place_missing(warm_slots=previous is not None)
        return state.result()
    if warm_slack is None or slots_per_device == 1:
        # With one slot per device a device's load is its replica's, wherever it sits: keeping every warm
        # replica costs no balance, so the paper's rule is also the slack rule's answer there.
        state = _Placement(count, share, num_devices, slots_per_device, previous, topology)
        state.pin_warm()
        state.place_missing(warm_slots=False)
        return state.result()
    fast = topology is None and warm_slack >= 0
    for _ in range(_MAX_REPLACE):
        if fast:
            placed = _place_slack(count, share, num_devices, slots_per_device, previous, warm_slack)
            if placed is not None:
                return placed
        state = _Placement(count, share, num_devices, slots_per_device, previous, topology)
        state.place_one_by_one(warm_slack)
        if not state.augmented:
            break
        # A repaired corner moved replicas placed earlier; settle on a table that places back onto itself.
        previous = state.result()[0]
    return state.result()


def _check(replica_count, expert_loads, num_devices, slots_per_device, previous):
    count = np.asarray(replica_count)
    loads = np.asarray(expert_loads)
    if count.ndim != 1 or loads.shape != count.shape or count.size == 0:
        raise InputError(f"replica_count {count.shape} and expert_loads {loads.shape} must both be [E]")
    if count.dtype.kind not in "iu" or count.min() < 1 or count.max() > num_devices:
        raise InputError(f"every expert needs 1..{num_devices} replicas (one per device at most)")
    num_slots = num_devices * slots_per_device
    if int(count.sum()) > num_slots:
        raise InputError(f"{int(count.sum())} replicas do not fit in {num_slots} slots")
    if loads.dtype.kind not in "iuf" or not np.isfinite(loads).all() or loads.min() < 0:
        raise InputError("expert_loads must be finite numbers >= 0")
    if previous is not None:
        previous = np.asarray(previous).astype(np.int64, copy=False)
        if previous.shape != (num_slots,) or previous.min() < -1 or previous.max() >= count.size:
            raise InputError(
                f"previous must be a [{num_slots}] slot_to_expert with entries in -1..{count.size - 1}"
            )
        filled = np.flatnonzero(previous >= 0)
        keys = filled // slots_per_device * count.size + previous[filled]
        if np.unique(keys).size != keys.size:
            raise InputError("previous has two replicas of one expert on a device")
    count = count.astype(np.int64)
    return count, loads.astype(np.float64) / count, previous


_INF = float("inf")


def _place_slack(
    count: np.ndarray,
    share: np.ndarray,
    num_devices: int,
    slots_per_device: int,
    previous: np.ndarray,
    warm_slack: float,
) -> tuple[np.ndarray, list[float]] | None:
    """``_Placement.place_one_by_one`` without a topology, choice for choice; ``None`` when cornered.

    The greedy runs in :func:`_slack_greedy` (compiled with numba where it is installed); this passes it
    contiguous int64 / float64 arrays and plain numbers, so it compiles once.
    """
    out = np.full(num_devices * slots_per_device, -1, np.int64)
    load = np.empty(num_devices)
    placed = _slack_greedy(
        np.ascontiguousarray(count, np.int64),
        np.ascontiguousarray(share, np.float64),
        np.ascontiguousarray(previous, np.int64),
        int(num_devices),
        int(slots_per_device),
        float(warm_slack),
        out,
        load,
    )
    if not placed:
        return None
    return out, load.tolist()


@njit
def _slack_greedy(count, share, previous, num_devices, s, warm_slack, out, load):
    """The heaviest-first greedy of :func:`_place_slack`: fills ``out [P]`` (all -1 on entry) and ``load [D]``
    (the device loads, summed in placement order); False when cornered.

    The same choices as ``_Placement.place_one_by_one`` with less bookkeeping per replica:

    - ``lf[d]``: the load of device ``d`` while it has a free slot, inf once full. The least-loaded device is
      the first minimum of ``lf``. The reference's tie rule (prefer a device with a free slot no expert still
      to come holds warm) only runs when the lowest of the tied devices has no such slot.
    - The least load never decreases, so a bound ``lim`` (an earlier least load plus the slack) settles most
      warm reuses without a search: at or under it, a warm slot is within the slack.
    - ``avail``: per device, a queue of its free slots that no expert still to come holds warm, in the
      reference's take order (slots empty before first, then the slots experts left behind, as they leave
      them). Device ``d``'s queue is ``avail[d * s + head[d] : d * s + tail[d]]``; every slot joins one queue
      at most once, so ``s`` entries per device suffice. A cold replica takes the first; with none it evicts
      the free warm slot of the expert placed last on ``d``, ``take[top[d]]`` (the slots of each device
      ordered by when their previous expert is placed).
    - An expert's warm candidates are its free warm slots, least-loaded first (ties: lower slot); those it
      does not use join the queues once it is placed. An expert with several replicas changes no load but
      those of the devices it takes; those are masked (inf in ``lf``) until all its replicas are placed.

    Plain loops over arrays, so that it compiles with numba and runs unchanged as Python without it.
    """
    num_experts = count.size
    num_slots = num_devices * s
    order = np.argsort(-share, kind="mergesort")  # heaviest first, ties to the lower expert (stable)
    rank = np.empty(num_experts, np.int64)
    for i in range(num_experts):
        rank[order[i]] = i
    # take[d * s : (d + 1) * s]: device d's slots, empty ones first, then by the rank of their previous expert
    take = np.empty(num_slots, np.int64)
    key = np.empty(num_slots, np.int64)
    for p in range(num_slots):
        k = -1 if previous[p] < 0 else rank[previous[p]]
        i = p
        base = p - p % s
        while i > base and key[i - 1] > k:
            key[i] = key[i - 1]
            take[i] = take[i - 1]
            i -= 1
        key[i] = k
        take[i] = p
    top = np.empty(num_devices, np.int64)
    for d in range(num_devices):
        top[d] = d * s + s - 1
    # Warm slots of expert e, ascending: by_expert[bounds[e + 1] : bounds[e + 2]] (empty slots: bounds[0:2]).
    bounds = np.zeros(num_experts + 2, np.int64)
    for p in range(num_slots):
        bounds[previous[p] + 2] += 1
    for i in range(1, num_experts + 2):
        bounds[i] += bounds[i - 1]
    cursor = bounds.copy()
    by_expert = np.empty(num_slots, np.int64)
    for p in range(num_slots):
        by_expert[cursor[previous[p] + 1]] = p
        cursor[previous[p] + 1] += 1
    avail = np.empty(num_slots, np.int64)
    head = np.zeros(num_devices, np.int64)
    tail = np.zeros(num_devices, np.int64)
    for i in range(bounds[1]):
        p = by_expert[i]
        d = p // s
        avail[d * s + tail[d]] = p
        tail[d] += 1
    lf = np.zeros(num_devices)
    free = np.full(num_devices, s, np.int64)
    cand_load = np.empty(num_devices)
    cand_slot = np.empty(num_devices, np.int64)
    used = np.empty(num_devices, np.int64)
    lim = warm_slack
    for e in order:
        x = share[e]
        num_warm = 0  # e's free warm slots (one per device at most), least-loaded first, ties: lower slot
        for i in range(bounds[e + 1], bounds[e + 2]):
            q = by_expert[i]
            if out[q] < 0:
                v = lf[q // s]
                c = num_warm
                while c > 0 and (cand_load[c - 1] > v or (cand_load[c - 1] == v and cand_slot[c - 1] > q)):
                    cand_load[c] = cand_load[c - 1]
                    cand_slot[c] = cand_slot[c - 1]
                    c -= 1
                cand_load[c] = v
                cand_slot[c] = q
                num_warm += 1
        j = 0
        for k in range(count[e]):
            if j < num_warm and cand_load[j] <= lim:  # within the slack of the least load: no search
                d = cand_slot[j] // s
                out[cand_slot[j]] = e
                j += 1
            else:
                m = lf[0]  # the least load and the first device at it (the devices e holds are masked)
                d = 0
                for c in range(1, num_devices):
                    if lf[c] < m:
                        m = lf[c]
                        d = c
                if k == 0:  # nothing masked: m is the least load
                    lim = m + warm_slack
                if j < num_warm and cand_load[j] <= m + warm_slack:
                    d = cand_slot[j] // s
                    out[cand_slot[j]] = e
                    j += 1
                elif m == _INF:  # cornered: every device with a free slot holds e
                    return False
                else:
                    # Cold. Among the devices at m, the first with a free slot that no expert still to come
                    # holds warm; if none has one, evict the expert placed last on the first.
                    c = d
                    while c < num_devices and (lf[c] != m or head[c] == tail[c]):
                        c += 1
                    if c < num_devices:
                        out[avail[c * s + head[c]]] = e
                        head[c] += 1
                        d = c
                    else:
                        out[take[top[d]]] = e
                        top[d] -= 1
            used[k] = d
            load[d] = lf[d] + x  # e's load on d, masked until all its replicas are placed
            lf[d] = _INF
        for k in range(count[e]):
            d = used[k]
            free[d] -= 1
            if free[d] > 0:
                lf[d] = load[d]
        for i in range(j, num_warm):  # e's unused warm slots are free for anyone now
            q = cand_slot[i]
            avail[q // s * s + tail[q // s]] = q
            tail[q // s] += 1
    for d in range(num_devices):
        if free[d] > 0:
            load[d] = lf[d]
    return True


class _Placement:
    """The table being built. Bulk steps are numpy; the one-replica-at-a-time greedy uses plain Python
    lists, because numpy scalar access costs more than the work itself at this grain."""

    def __init__(self, count, share, num_devices, slots_per_device, previous, topology):
        self.count, self.share = count, share
        self.num_experts, self.num_devices, self.slots = len(count), num_devices, slots_per_device
        self.previous, self.topology = previous, topology
        self.out = np.full(num_devices * slots_per_device, -1, np.int64)  # slot_to_expert
        self.device_load = np.zeros(num_devices)
        self.placed = np.zeros(self.num_experts, np.int64)
        self.slot_to_expert: list[int] | None = None  # the list form, once the greedy runs
        self.augmented = False

    def result(self) -> tuple[np.ndarray, list[float]]:
        if self.slot_to_expert is not None:
            return np.array(self.slot_to_expert, np.int64), self.device_load
        return self.out, self.device_load.tolist()

    # -- the paper's rule: pin every warm replica, then place the rest ---------------------------------
    def pin_warm(self) -> None:
        """Keep the previous table's replicas that the new counts still want (no move).

        An expert with fewer replicas than before keeps those on the devices least loaded by the replicas
        that stay (ties: lower slot).
        """
        count, share = self.count, self.share
        slot = np.flatnonzero(self.previous >= 0)
        expert = self.previous[slot]
        device = slot // self.slots
        had = np.bincount(expert, minlength=self.num_experts)
        keep = count[expert] >= had[expert]
        if not keep.all():
            base_load = np.bincount(device[keep], weights=share[expert[keep]], minlength=self.num_devices)
            order = np.lexsort((slot, base_load[device], expert))  # by expert, then device load, then slot
            rank = np.empty(slot.size, np.int64)
            rank[order] = np.arange(slot.size) - np.searchsorted(expert[order], expert[order])
            keep = rank < count[expert]
        slot, expert, device = slot[keep], expert[keep], device[keep]
        self.out[slot] = expert
        self.device_load = np.bincount(device, weights=share[expert], minlength=self.num_devices)
        self.placed = np.bincount(expert, minlength=self.num_experts)

    def place_missing(self, warm_slots: bool) -> None:
        """The replicas not pinned, heaviest expert first, each on the least-loaded eligible device."""
        need = self.count - self.placed
        if not need.any():
            return
        cold = np.flatnonzero(need)
        cold = cold[np.lexsort((cold, -self.share[cold]))].tolist()  # heaviest first, ties: lower index
        self._to_lists(warm_slots)
        need, share = need.tolist(), self.share_list
        s, out, device_load, free_count = self.slots, self.slot_to_expert, self.device_load, self.free_count
        heap = self._heap()
        heappop, heappush = heapq.heappop, heapq.heappush
        for e in cold:
            load_e = share[e]
            for _ in range(need[e]):
                if self.sources is None:
                    load, _, d = heappop(heap) if heap else (0.0, 0, -1)
                    if d >= 0 and e in out[d * s : (d + 1) * s]:  # anti-affinity: look further down the heap
                        heappush(heap, (load, 0, d))
                        d = self._pick(heap, e)
                else:
                    d = self._pick(heap, e)
                if d < 0:  # cornered: free a slot by moving placed replicas along
                    self._augment(e)
                    heap = self._heap()
                    continue
                left = free_count[d]
                # With nothing placed before, a device fills its slots in order (until an augmenting path
                # leaves a hole), so the next free slot is known without a scan.
                out[d * s + s - left if self.compact else self._free_slot(d, e)] = e
                load = device_load[d] = device_load[d] + load_e
                free_count[d] = left - 1
                if left > 1:
                    heappush(heap, (load, 0, d))

    # -- warm slack: one replica at a time -------------------------------------------------------------
    def place_one_by_one(self, warm_slack: float) -> None:
        """Heaviest replica first: reuse the warm slot of its expert on the least-loaded such device if that
        device carries at most ``warm_slack`` more than the least-loaded eligible device, else go there.

        Among equally loaded devices, a cold replica prefers one with a free slot that no expert still to be
        placed holds warm, so it does not evict a replica that could have stayed.
        """
        num_experts, num_devices, s = self.num_experts, self.num_devices, self.slots
        order = np.lexsort((np.arange(num_experts), -self.share)).tolist()
        self._to_lists(warm_slots=True)
        out, device_load, free_count, flag = self.slot_to_expert, self.device_load, self.free_count, self.flag
        share, count, prev = self.share_list, self.count.tolist(), self.prev_list
        # Warm slots grouped by expert: by_expert[start[e] : start[e] + had[e]].
        filled = np.flatnonzero(self.previous >= 0)
        had = np.bincount(self.previous[filled], minlength=num_experts)
        by_expert = filled[np.argsort(self.previous[filled], kind="stable")].tolist()
        start, had = (np.cumsum(had) - had).tolist(), had.tolist()
        # The order in which a cold replica takes a device's free slots: those empty before, then those whose
        # previous expert is placed earliest (placed experts' leftover slots before warm slots still wanted;
        # among those, the expert placed last is evicted). take[d * s : (d + 1) * s] lists device d's slots;
        # cursor[d] skips the ones filled since.
        rank = np.empty(num_experts + 1, np.int64)
        rank[order] = np.arange(num_experts)
        rank[num_experts] = -1
        slot = np.arange(len(out))
        take = slot[np.lexsort((slot, rank[self.previous], slot // s))].tolist()
        cursor = list(range(0, len(out), s))
        # reserved[d]: free slots of d still held warm by an expert not placed yet.
        reserved = np.bincount(filled // s, minlength=num_devices).tolist()
        for d in range(num_devices):
            flag[d] = int(reserved[d] >= free_count[d])
        self.done = done = [False] * num_experts
        holds = self.holds = set()  # d * E + e of every placed replica
        heap = self._heap()
        heappop, heappush = heapq.heappop, heapq.heappush
        plain = self.sources is None
        for e in order:
            load_e, first, warm = share[e], start[e], had[e]
            for _ in range(count[e]):
                p = d = -1  # the free warm slot of e on its least-loaded device
                if warm == 1:
                    if out[by_expert[first]] < 0:
                        p = by_expert[first]
                        d = p // s
                else:
                    for q in by_expert[first : first + warm]:
                        if out[q] < 0 and (p < 0 or device_load[q // s] < device_load[d]):
                            p, d = q, q // s
                # The least-loaded eligible device, peeked when the heap top qualifies. Entries go stale when
                # a device's load or flag changes (a fresher entry is on the heap too) and are dropped here.
                while heap:
                    top_load, top_flag, coldest = heap[0]
                    if free_count[coldest] and top_load == device_load[coldest] and top_flag == flag[coldest]:
                        break
                    heappop(heap)
                popped = not (plain and heap and coldest * num_experts + e not in holds)
                if popped:
                    coldest = self._pick(heap, e)
                    least = self.least_load
                else:
                    least = device_load[coldest]
                # A cold replica may land up to the locality slack above the least-loaded device; warm reuse
                # gets the same room, so that a table placed again keeps every replica.
                room = warm_slack if plain else max(warm_slack, self.topology.locality_slack * load_e)
                if p >= 0 and (coldest < 0 or device_load[d] <= least + room):
                    if popped and coldest >= 0:
                        heappush(heap, (device_load[coldest], flag[coldest], coldest))
                    reserved[d] -= 1
                else:
                    if coldest < 0:  # cornered: free a slot by moving placed replicas along
                        self._augment(e)
                        holds.clear()
                        holds.update(
                            d * num_experts + x
                            for d in range(num_devices)
                            for x in out[d * s : (d + 1) * s]
                            if x >= 0
                        )
                        cursor = list(range(0, len(out), s))
                        heap = self._heap()
                        continue
                    d = coldest
                    if not popped:
                        heappop(heap)
                    i = cursor[d]
                    while out[take[i]] >= 0:
                        i += 1
                    p = take[i]
                    if prev[p] >= 0 and not done[prev[p]]:
                        # Every free slot here is still held warm: evict the expert placed last (the last free
                        # slot in take order).
                        i = (d + 1) * s - 1
                        while out[take[i]] >= 0:
                            i -= 1
                        p = take[i]
                    else:
                        cursor[d] = i + 1
                    if prev[p] >= 0 and not done[prev[p]]:
                        reserved[d] -= 1  # taken from an expert still to come (or e's own warm slot)
                out[p] = e
                holds.add(d * num_experts + e)
                device_load[d] += load_e
                free_count[d] -= 1
                if free_count[d]:
                    flag[d] = int(reserved[d] >= free_count[d])
                    heappush(heap, (device_load[d], flag[d], d))
            done[e] = True
            for q in by_expert[first : first + warm]:  # e's unused warm slots are free for anyone now
                if out[q] < 0:
                    d = q // s
                    reserved[d] -= 1
                    if flag[d] != int(reserved[d] >= free_count[d]):
                        flag[d] ^= 1
                        heappush(heap, (device_load[d], flag[d], d))

    # -- shared bookkeeping ---------------------------------------------------------------------------
    def _to_lists(self, warm_slots: bool) -> None:
        s = self.slots
        used = np.bincount(np.flatnonzero(self.out >= 0) // s, minlength=self.num_devices)
        self.free_count = (s - used).tolist()
        self.slot_to_expert = self.out.tolist()
        self.device_load = self.device_load.tolist()
        self.share_list = self.share.tolist()
        self.warm_slots = warm_slots
        self.prev_list = None if self.previous is None else self.previous.tolist()
        self.was_empty = None if self.previous is None else (self.previous < 0).tolist()
        self.compact = not used.any() and self.previous is None
        self.sources = self._sources()
        self.done: list[bool] | None = None  # one-by-one: experts whose replicas are all placed
        self.flag = [0] * self.num_devices  # 1: every free slot of the device is still held warm

    def _free_slot(self, d: int, e: int) -> int:
        """A free slot of device ``d`` for expert ``e``: where ``e`` was (no copy), else one that was empty,
        else one whose previous expert is placed in full already (no replica evicted that could have stayed),
        else the lowest."""
        s, out, prev = self.slots, self.slot_to_expert, self.prev_list
        free = [p for p in range(d * s, (d + 1) * s) if out[p] < 0]
        if prev is None:
            return free[0]
        if self.warm_slots:
            for p in free:
                if prev[p] == e:
                    return p
        for p in free:
            if self.was_empty[p]:
                return p
        if self.done is not None:
            for p in free:
                if self.done[prev[p]]:
                    return p
        return free[0]

    def _holds(self, d: int, e: int) -> bool:
        return e in self.slot_to_expert[d * self.slots : (d + 1) * self.slots]

    def _heap(self) -> list[tuple[float, int, int]]:
        """(load, flag, device) of every device with a free slot: least-loaded first, unreserved on ties."""
        heap = [(self.device_load[d], self.flag[d], d) for d in range(self.num_devices) if self.free_count[d]]
        heapq.heapify(heap)
        return heap

    def _sources(self) -> dict[int, list[int]] | None:
        """Devices holding each expert in the previous table (copy sources), when locality matters."""
        if self.topology is None or self.previous is None:
            return None
        sources: dict[int, list[int]] = {}
        for p, e in enumerate(self.previous.tolist()):
            if e >= 0:
                sources.setdefault(e, []).append(p // self.slots)
        return sources

    def _pick(self, heap, e: int) -> int:
        """Pop the least-loaded device with a free slot and no replica of ``e``; with a topology, the closest
        to a source among those within the slack. -1 when there is none. Devices passed over go back; the
        least eligible load is left in ``least_load``."""
        topology = self.topology if self.sources is not None else None
        sources = None if topology is None else self.sources.get(e)
        skipped, candidates, limit = [], [], 0.0
        while heap:
            entry = heapq.heappop(heap)
            d = entry[2]
            if self.free_count[d] == 0 or entry[0] != self.device_load[d] or entry[1] != self.flag[d]:
                continue  # stale: a fresher entry for d is on the heap, or d is full
            if candidates and entry[0] > limit:
                skipped.append(entry)
                break
            if self._holds(d, e):
                skipped.append(entry)
                continue
            if not candidates:
                limit = entry[0] + (
                    topology.locality_slack * self.share_list[e] if topology is not None else 0.0
                )
            candidates.append(entry)
            if topology is None or not sources or not heap or heap[0][0] > limit:
                break
        self.least_load = candidates[0][0] if candidates else 0.0
        best = 0
        if len(candidates) > 1:
            distance = [topology.copy_distance(sources, c[2]) for c in candidates]
            best = min(range(len(candidates)), key=lambda i: (distance[i], candidates[i]))
        skipped.extend(c for i, c in enumerate(candidates) if i != best)
        for entry in skipped:
            heapq.heappush(heap, entry)
        return candidates[best][2] if candidates else -1

    def _augment(self, e: int) -> None:
        """Place ``e`` on a full device by shifting one replica per hop towards a device with a free slot.

        Breadth-first search over devices: an edge a -> b moves the replica in some slot q of a to b (b lacks
        its expert). This is an augmenting path of the bipartite b-matching of replicas to devices.
        """
        s, out = self.slots, self.slot_to_expert
        self.compact, self.augmented = False, True
        roots = [d for d in range(self.num_devices) if not self._holds(d, e)]
        parent: dict[int, tuple[int, int] | None] = dict.fromkeys(roots)
        queue, end = deque(roots), -1
        while queue and end < 0:
            a = queue.popleft()
            for q in range(a * s, (a + 1) * s):
                for b in range(self.num_devices):
                    if b not in parent and not self._holds(b, out[q]):
                        parent[b] = (a, q)
                        if self.free_count[b]:
                            end = b
                            break
                        queue.append(b)
                if end >= 0:
                    break
        if end < 0:
            raise RuntimeError(f"no device can take a replica of expert {e}; the counts exceed the layout")
        self.free_count[end] -= 1
        b = end
        while parent[b] is not None:
            a, q = parent[b]
            x = out[q]
            self._move(q, self._free_slot(b, x), x)
            b = a
        self._move(-1, self._free_slot(b, e), e)

    def _move(self, src: int, dst: int, e: int) -> None:
        """Move expert ``e``'s replica from slot ``src`` (-1: a new replica) to the free slot ``dst``."""
        s, share = self.slots, self.share_list[e]
        if src >= 0:
            self.slot_to_expert[src] = -1
            self.device_load[src // s] -= share
        self.slot_to_expert[dst] = e
        self.device_load[dst // s] += share


# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """A placer's answer: the new table and the weight copies that turn the previous table into it.

    warm_hits: replicas that stay in their slot (no copy). cold_moves: slots that receive a copy.
    """

    table: ReplicaTable
    moves: MovePlan
    warm_hits: int
    cold_moves: int
    bytes: int

    def summary(self) -> dict[str, int]:
        return {
            "warm_hits": self.warm_hits,
            "cold_moves": self.cold_moves,
            "bytes": self.bytes,
            **self.moves.summary(),
        }


def place(
    replica_count: np.ndarray,
    expert_loads: np.ndarray,
    *,
    num_devices: int,
    slots_per_device: int,
    previous: ReplicaTable | None = None,
    reuse_warm: bool = True,
    warm_slack: float | None = None,
    topology: Topology | None = None,
    bytes_per_expert: int = 0,
) -> Placement:
    """:func:`place_replicas`, returned as a validated :class:`ReplicaTable` with its move plan.

    Without a previous table, the move plan is taken from the static table (every slot that differs from
    it is a copy).
    """
    from moeless_jax.moe.replica_table import ReplicaTable

    num_experts = len(np.asarray(replica_count))
    slot_to_expert = place_replicas(
        replica_count,
        expert_loads,
        num_devices=num_devices,
        slots_per_device=slots_per_device,
        previous=None if previous is None else previous.slot_to_expert,
        reuse_warm=reuse_warm,
        warm_slack=warm_slack,
        topology=topology,
    )
    layout = {"num_experts": num_experts, "num_devices": num_devices, "slots_per_device": slots_per_device}
    table = ReplicaTable.from_slot_to_expert(slot_to_expert, **layout)
    if previous is None:
        previous = ReplicaTable.static(**layout)
    return placement_of(previous, table, topology=topology, bytes_per_expert=bytes_per_expert)


def placement_of(
    previous: ReplicaTable,
    table: ReplicaTable,
    *,
    topology: Topology | None = None,
    bytes_per_expert: int = 0,
) -> Placement:
    """The :class:`Placement` that goes from ``previous`` to ``table``."""
    from moeless_jax.moe.slot_weights import plan_moves

    moves = plan_moves(
        previous,
        table,
        bytes_per_expert=bytes_per_expert,
        node_of_device=None if topology is None else topology.node_of_device,
        pair_of_device=None if topology is None else topology.pair_of_device,
    )
    filled = table.slot_to_expert >= 0
    warm = int(np.sum(filled & (table.slot_to_expert == previous.slot_to_expert)))
    return Placement(table, moves, warm, len(moves.moves), moves.bytes_total)
