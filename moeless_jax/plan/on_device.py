"""Replica planning inside a jitted step: the scaler and the placer as static-shape JAX, no host round trip.

:func:`plan_on_device` turns one layer's load forecast ``[E]`` and the table in use ``[P]`` into the next
table, as :class:`~moeless_jax.moe.replica_table.TableArrays`. It is pure JAX (no callbacks, no
data-dependent shapes), so it jits, vmaps over a leading layer axis, and runs where the forecast is made.
Every loop runs a fixed number of times, the slots per device ``S`` or a small constant, never ``P`` or
``E``; the work inside a pass is comparisons over ``[D, S, D, S]`` / ``[D, D]`` / ``[E, P]`` arrays, one sort
and one ``top_k``.

Steps (a layer's devices are interchangeable until step 4):

1. Scaler (min-max, fills every slot that helps): giving the next replica to the expert with the highest
   load per replica, at most ``D`` per expert, ``P - E`` times, takes exactly the ``P - E`` largest keys
   ``load_e / r`` (``r = 1 .. D - 1``), because an expert's keys fall as ``r`` grows: one ``top_k``. Ties go
   to the lower expert. Zero keys are left out (a replica of an idle expert would be a weight copy for
   nothing), so slots stay empty when fewer than ``P - E`` keys are positive.
2. Placement in rounds: replicas sorted by load per replica (heaviest first, ties to the lower expert), ``D``
   per round (``S`` rounds, padded with empty replicas): the heaviest replica of a round goes to the lightest
   device, and so on. An expert's replicas are adjacent in that order, so only the first expert of a round
   can already sit on some devices (it started in the round before); its replicas take the lightest devices
   it is not on.
3. Refinement: a few passes that swap one replica (or empty slot) of the most loaded device with one of
   another device, the swap that lowers the larger of the two loads most, while anti-affinity holds.
4. Warm reuse: the planned devices are matched to physical devices by overlap with the previous table
   (mutual-best rounds over the ``[D, D]`` overlap), then pairs of devices swap replicas so more replicas
   land where their expert already is, as long as both devices stay within ``bound`` = the plan's max device
   load + ``warm_slack`` x the mean device load. If the previous table is already within ``bound`` it is kept
   unchanged, so planning twice for the same forecast moves nothing. Inside a device, an expert it already
   held keeps its slot.
5. Move budget (``max_moves_per_device=N``): when the plan copies more than ``N`` slots into some device, the
   previous table is improved instead by a few greedy steps, each the single swap between two devices or
   the single slot re-assignment (a copy of another expert, or clearing a slot) that lowers the forecast's
   max device load most while every device stays within ``N`` copies and the table stays servable. The
   result is never worse than the previous table on the forecast.

Loads are in float32: the forecast's scale does not matter, and ``forecast`` entries that are negative or not
finite count as 0 (the function cannot raise inside a jitted step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moeless_jax.errors import InputError
from moeless_jax.moe.replica_table import TableArrays

__all__ = [
    "moves_per_device",
    "place_rounds",
    "plan_on_device",
    "scale_counts",
    "table_arrays_from_slots",
    "table_device_loads",
]

# Relative margin under which two max device loads count as equal (float32 sums in different orders).
_SAME = 1e-6
# Refinement passes of step 3, warm passes of step 4 (each with up to _WARM_MATCHING pairings), matching
# rounds of the relabelling, greedy steps of step 5: small constants (measured on the DeepSeek-V2-Lite
# trace: fewer refinement passes cost balance, fewer warm passes cost copies).
_REFINE_STEPS = 8
_WARM_STEPS = 8
_WARM_MATCHING = 3
_RELABEL_ROUNDS = 4
_BUDGET_STEPS = 16


def plan_on_device(
    forecast: jax.Array,
    previous: jax.Array,
    *,
    num_devices: int,
    slots_per_device: int,
    max_moves_per_device: int | None = None,
    warm_slack: float = 0.01,
) -> TableArrays:
    """The next replica table for one layer, planned in JAX.

    forecast: ``[E]`` expected load of each expert (>= 0, any scale, all zero allowed). previous: ``[P]``
    int32 slot_to_expert of the table in use (a valid table, ``P = num_devices * slots_per_device``).
    max_moves_per_device: at most this many slots of a device receive a weight copy (``None``: no limit;
    ``0``: the previous table). warm_slack: how much higher than the fresh plan's, as a fraction of the mean
    device load, the max device load may be when that keeps replicas where they are (0: only ties). On the
    DeepSeek-V2-Lite trace (8 devices x 10 slots, perfect forecasts) 0 / 0.005 / 0.01 / 0.02 gave max device
    loads 0.989 / 0.993 / 0.996 / 1.004 x host MoEless's with 51 / 29 / 24 / 19 copies per layer (host: 41).

    Returns int32 :class:`TableArrays` (``expert_slots`` ``[E, D]``). Vmap it for a ``[L, E]`` forecast.
    """
    num_experts, num_slots = _check(forecast, previous, num_devices, slots_per_device)
    if max_moves_per_device is not None and (
        isinstance(max_moves_per_device, bool)
        or not isinstance(max_moves_per_device, int)
        or max_moves_per_device < 0
    ):
        raise InputError(
            f"max_moves_per_device must be an integer >= 0 or None (no limit), got {max_moves_per_device!r}"
        )
    if not isinstance(warm_slack, int | float) or not warm_slack >= 0:
        raise InputError(f"warm_slack must be a number >= 0, got {warm_slack!r}")
    load = _clean(forecast)
    previous = jnp.asarray(previous, jnp.int32)
    d, s = num_devices, slots_per_device
    if max_moves_per_device == 0:
        return table_arrays_from_slots(previous, num_experts, d)

    count = scale_counts(load, num_devices=d, slots_per_device=s)
    share = load / count
    content = place_rounds(share, count, num_devices=d, slots_per_device=s)
    content = _repeat(_REFINE_STEPS, lambda c: _refine_step(c, share), content)
    fresh_max = _content_loads(content, share).max()

    old = previous.reshape(d, s)
    content = _relabel(content, old)
    bound = fresh_max + warm_slack * load.sum() / d
    content = _repeat(_WARM_STEPS, lambda c: _warm_step(c, old, share, bound), content)
    plan = _align(content, old).reshape(num_slots)
    # The margin covers float32 sums taken in another order, so a table planned here is kept next time.
    keep = table_device_loads(previous, load, d).max() <= bound * (1 + _SAME)
    plan = jnp.where(keep, previous, plan)

    if max_moves_per_device is not None and max_moves_per_device < s:  # S copies fit any plan
        plan = _within_budget(plan, previous, load, d, max_moves_per_device)
    return table_arrays_from_slots(plan, num_experts, d)


# --------------------------------------------------------------------------------------------- helpers
def _repeat(steps: int, step, value):
    """``step`` applied ``steps`` times (a constant)."""
    return _loop(steps, lambda _, v: step(v), value)


def _loop(steps: int, body, value):
    """``body(k, value)`` for ``k = 0 .. steps - 1`` as one XLA while loop (a short program, quick to compile;
    ``fori_loop``'s ``unroll`` would trade compile time for a straight-line program)."""
    return jax.lax.fori_loop(0, steps, body, value)


def table_arrays_from_slots(slot_to_expert: jax.Array, num_experts: int, num_devices: int) -> TableArrays:
    """``slot_to_expert [P]`` -> int32 :class:`TableArrays` with ``expert_slots [E, num_devices]``.

    Slots of an expert are listed in ascending order, -1 padded; replicas past ``num_devices`` are counted but
    not listed (a valid table has none). Jittable, no validation.
    """
    slot_to_expert = jnp.asarray(slot_to_expert, jnp.int32)
    num_slots = slot_to_expert.shape[-1]
    slot = jnp.arange(num_slots, dtype=jnp.int32)
    mine = slot_to_expert[None, :] == jnp.arange(num_experts, dtype=jnp.int32)[:, None]  # [E, P]
    listed = jnp.sort(jnp.where(mine, slot, num_slots), axis=-1)
    if num_slots < num_devices:
        listed = jnp.pad(listed, ((0, 0), (0, num_devices - num_slots)), constant_values=num_slots)
    expert_slots = listed[:, :num_devices]
    expert_slots = jnp.where(expert_slots < num_slots, expert_slots, -1).astype(jnp.int32)
    return TableArrays(slot_to_expert, expert_slots, mine.sum(-1).astype(jnp.int32))


def moves_per_device(previous: jax.Array, new: jax.Array, num_devices: int) -> jax.Array:
    """``[D]`` int32 slots of each device that receive a weight copy going from ``previous [P]`` to
    ``new [P]`` (the slot's expert changes and the slot is not left empty)."""
    previous, new = jnp.asarray(previous), jnp.asarray(new)
    copied = (new != previous) & (new >= 0)
    return copied.reshape(*copied.shape[:-1], num_devices, -1).sum(-1).astype(jnp.int32)


def table_device_loads(slot_to_expert: jax.Array, load: jax.Array, num_devices: int) -> jax.Array:
    """``[D]`` float32 load of each device when every expert's ``load [E]`` is split evenly over its
    replicas in ``slot_to_expert [P]`` (as :func:`moeless_jax.plan.metrics.tokens_per_device` with float
    loads)."""
    slot_to_expert = jnp.asarray(slot_to_expert, jnp.int32)
    load = jnp.asarray(load, jnp.float32)
    num_experts = load.shape[-1]
    filled = slot_to_expert >= 0
    count = (slot_to_expert[None, :] == jnp.arange(num_experts)[:, None]).sum(-1)
    expert = jnp.maximum(slot_to_expert, 0)
    share = jnp.where(filled, load[expert] / jnp.maximum(count[expert], 1), 0.0)
    return share.reshape(num_devices, -1).sum(-1)


# ------------------------------------------------------------------------------------------- 1. scaler
def scale_counts(load: jax.Array, *, num_devices: int, slots_per_device: int) -> jax.Array:
    """``[E]`` int32 replicas per expert: one each, plus the ``P - E`` largest positive keys
    ``load_e / r`` (``r = 1 .. D - 1``), ties to the lower expert (the min-max greedy, capped at D)."""
    num_experts = load.shape[-1]
    extra = min(num_devices * slots_per_device - num_experts, num_experts * (num_devices - 1))
    count = jnp.ones(num_experts, jnp.int32)
    if extra <= 0:
        return count
    keys = (load[:, None] / jnp.arange(1, num_devices, dtype=jnp.float32)[None, :]).reshape(-1)
    value, index = jax.lax.top_k(keys, extra)  # equal keys: the lower index, i.e. the lower expert, first
    return count.at[index // (num_devices - 1)].add((value > 0).astype(jnp.int32))


# ----------------------------------------------------------------------------------------- 2. placement
def place_rounds(share: jax.Array, count: jax.Array, *, num_devices: int, slots_per_device: int) -> jax.Array:
    """``[D, S]`` experts of each planned device (-1 empty; devices not yet physical) by rounds of D.

    share: ``[E]`` load of one replica of each expert; count: ``[E]`` replicas (at most D each, P in all).
    """
    d, s = num_devices, slots_per_device
    num_experts = share.shape[-1]
    expert_ids = jnp.arange(num_experts, dtype=jnp.int32)
    order = jnp.lexsort((expert_ids, -share + 0.0)).astype(jnp.int32)  # heaviest first; +0.0 drops -0.0
    ends = jnp.cumsum(count[order])
    position = jnp.arange(d * s)
    rank = (position[:, None] >= ends[None, :]).sum(-1)  # [P] which sorted expert covers each position
    replica = jnp.where(rank < num_experts, order[jnp.minimum(rank, num_experts - 1)], -1)
    replica_share = jnp.where(replica >= 0, share[jnp.maximum(replica, 0)], 0.0)
    device_ids = jnp.arange(d)
    slot_ids = jnp.arange(s)

    def place_round(r, state):
        content, device_load = state
        item = jax.lax.dynamic_slice_in_dim(replica, r * d, d)
        item_share = jax.lax.dynamic_slice_in_dim(replica_share, r * d, d)
        first = item[0]
        # Devices already holding the round's first expert (it may have started in the round before).
        held = (content == first).any(-1) & (first >= 0)
        lead = ((item == first) & (first >= 0)).sum()  # the first expert's replicas in this round
        # The first `lead` items take the lightest devices that lack it, the rest the others lightest first.
        eligible_rank = _rank(jnp.where(held, jnp.inf, device_load))
        to_first = eligible_rank < lead
        other_rank = _rank(jnp.where(to_first, -jnp.inf, device_load))  # first `lead` ranks go to to_first
        slot = jnp.where(to_first, eligible_rank, other_rank)
        pick = slot[:, None] == device_ids[None, :]  # [device, item]
        column = jnp.where(pick, item[None, :], -1).max(-1)
        content = jnp.where(slot_ids[None, :] == r, column[:, None], content)
        return content, device_load + jnp.where(pick, item_share[None, :], 0.0).sum(-1)

    state = (jnp.full((d, s), -1, jnp.int32), jnp.zeros(d, share.dtype))
    return _loop(s, place_round, state)[0]


def _rank(key: jax.Array) -> jax.Array:
    """``[D]`` position of each entry in ascending order of ``key``, ties to the lower index."""
    index = jnp.arange(key.shape[-1])
    tie = (key[None, :] == key[:, None]) & (index[None, :] < index[:, None])
    before = (key[None, :] < key[:, None]) | tie
    return before.sum(-1)


def _content_shares(content: jax.Array, share: jax.Array) -> jax.Array:
    return jnp.where(content >= 0, share[jnp.maximum(content, 0)], 0.0)


def _content_loads(content: jax.Array, share: jax.Array) -> jax.Array:
    return _content_shares(content, share).sum(-1)


def _holds(content: jax.Array, other: jax.Array) -> jax.Array:
    """``[D, S, D]``: whether device ``b`` of ``other [D, S]`` holds the expert in slot ``(a, i)`` of
    ``content [D, S]`` (empty slots hold nothing)."""
    same = content[:, :, None, None] == other[None, None, :, :]
    return same.any(-1) & (content >= 0)[:, :, None]


# ---------------------------------------------------------------------------------------- 3. refinement
def _refine_step(content: jax.Array, share: jax.Array) -> jax.Array:
    """Swap a slot of the most loaded device with a slot of another device, the swap that lowers the larger
    of the two loads most; no change when no swap lowers it."""
    num_devices, slots = content.shape
    item = _content_shares(content, share)
    device_load = item.sum(-1)
    a = jnp.argmax(device_load)
    row, row_item, peak = content[a], item[a], device_load[a]
    x = row[:, None, None]  # [S, 1, 1] leaving a
    y = content[None, :, :]  # [1, D, S] arriving on a
    delta = row_item[:, None, None] - item[None, :, :]
    x_on_b = (content[None, :, :] == row[:, None, None]).any(-1) & (row >= 0)[:, None]  # [S, D]
    y_on_a = (content[:, :, None] == row[None, None, :]).any(-1) & (content >= 0)  # [D, S]
    other = jnp.arange(num_devices)[None, :, None] != a
    ok = other & (x != y) & ~x_on_b[:, :, None] & ~y_on_a[None, :, :] & (delta > 0)
    after = jnp.maximum(peak - delta, device_load[None, :, None] + delta)
    after = jnp.where(ok, after, jnp.inf)
    best = jnp.argmin(after)
    i, b, j = jnp.unravel_index(best, after.shape)
    better = after.reshape(-1)[best] < peak * (1 - _SAME)
    return _swap(content, a, i, b, j, better)


def _swap(content, a, i, b, j, do):
    """``content`` with slots ``(a, i)`` and ``(b, j)`` exchanged where ``do``."""
    device = jnp.arange(content.shape[0])[:, None]
    slot = jnp.arange(content.shape[1])[None, :]
    at_a = (device == a) & (slot == i) & do
    at_b = (device == b) & (slot == j) & do
    return jnp.where(at_a, content[b, j], jnp.where(at_b, content[a, i], content))


# --------------------------------------------------------------------------------------- 4. warm reuse
def _relabel(content: jax.Array, old: jax.Array) -> jax.Array:
    """Permute planned devices onto physical ones to keep most replicas where the old table had them.

    Overlap ``[D, D]`` (planned x physical) is matched by rounds of mutual best choices (ties to the lower
    device); devices still unmatched after the rounds are paired in index order.
    """
    num_devices = content.shape[0]
    overlap = _holds(content, old).sum(1)  # [planned, physical]
    ids = jnp.arange(num_devices)
    matched = jnp.full(num_devices, -1)  # physical device of each planned one
    for _ in range(min(num_devices, _RELABEL_ROUNDS)):
        free_row = matched < 0
        free_col = ~(matched[:, None] == ids[None, :]).any(0)
        score = jnp.where(free_row[:, None] & free_col[None, :], overlap, -1)
        col = jnp.argmax(score, axis=1)  # each free planned device's best physical device
        row = jnp.argmax(score, axis=0)  # each free physical device's best planned device
        mutual = free_row & (row[col] == ids) & (score[ids, col] >= 0)
        matched = jnp.where(mutual, col, matched)
    # Leftovers: the k-th unmatched planned device takes the k-th unmatched physical device.
    free_row = matched < 0
    free_col = ~(matched[:, None] == ids[None, :]).any(0)
    row_rank = jnp.cumsum(free_row) - 1
    col_rank = jnp.cumsum(free_col) - 1
    leftover = ((row_rank[:, None] == col_rank[None, :]) & free_col[None, :]).argmax(1)
    matched = jnp.where(free_row, leftover, matched)
    to_physical = matched[:, None] == ids[None, :]  # [planned, physical]
    source = to_physical.argmax(0)  # planned device shown on each physical device
    return content[source]


def _warm_step(content: jax.Array, old: jax.Array, share: jax.Array, bound: jax.Array) -> jax.Array:
    """Swap replicas between pairs of devices so that more of them sit where the old table had their expert,
    both devices staying within ``bound``; pairs are chosen by rounds of mutual best gain."""
    num_devices, slots = content.shape
    item = _content_shares(content, share)
    device_load = item.sum(-1)
    warm = _holds(content, old).astype(jnp.int32)  # [a, i, b]: old device b held the expert of (a, i)
    here = _holds(content, content)  # [a, i, b]: device b holds it now
    ids = jnp.arange(num_devices)
    own_warm = warm[ids, :, ids]  # [a, i]
    x_full = content[:, :, None, None]
    y_full = content[None, None, :, :]
    # gain[a, i, b, j] = warm(x on b) + warm(y on a) - warm(x on a) - warm(y on b)
    y_on_a_warm = jnp.transpose(warm, (2, 0, 1))  # [a, b, j]: old a held expert of (b, j)
    gain = (
        warm[:, :, :, None]
        + y_on_a_warm[:, None, :, :]
        - own_warm[:, :, None, None]
        - own_warm[None, None, :, :]
    )
    x_on_b = here[:, :, :, None]
    y_on_a = jnp.transpose(here, (2, 0, 1))[:, None, :, :]
    delta = item[:, :, None, None] - item[None, None, :, :]
    after_a = device_load[:, None, None, None] - delta
    after_b = device_load[None, None, :, None] + delta
    pair = ids[:, None, None, None] != ids[None, None, :, None]
    ok = pair & (x_full != y_full) & ~x_on_b & ~y_on_a & (gain > 0)
    ok = ok & (after_a <= bound) & (after_b <= bound)
    scale = jnp.maximum(4 * bound, jnp.finfo(jnp.float32).tiny)
    score = jnp.where(ok, gain - jnp.maximum(after_a, after_b) / scale, -jnp.inf)
    pair_score = score.max(axis=(1, 3))  # [a, b], symmetric
    partner = jnp.full(num_devices, -1)
    for _ in range(_WARM_MATCHING):
        free = partner < 0
        open_score = jnp.where(free[:, None] & free[None, :], pair_score, -jnp.inf)
        best = jnp.argmax(open_score, axis=1)
        mutual = free & (best[best] == ids) & jnp.isfinite(open_score[ids, best])
        partner = jnp.where(mutual, best, partner)
    # One swap per matched pair, chosen on the pair's lower device so both ends agree.
    has = partner >= 0
    other = jnp.maximum(partner, 0)
    low = jnp.minimum(ids, other)
    high = jnp.maximum(ids, other)
    flat = score[low, :, high, :].reshape(num_devices, slots * slots).argmax(-1)
    i_low, j_high = flat // slots, flat % slots
    mine = jnp.where(ids < other, i_low, j_high)
    theirs = jnp.where(ids < other, j_high, i_low)
    incoming = content[other, theirs]
    slot_ids = jnp.arange(slots)[None, :]
    return jnp.where(has[:, None] & (slot_ids == mine[:, None]), incoming[:, None], content)


def _align(content: jax.Array, old: jax.Array) -> jax.Array:
    """Order each device's experts so those the old table had on it keep their slot; newcomers take the
    other slots in order. content, old: ``[D, S]``."""
    kept = (old[:, :, None] == content[:, None, :]).any(-1) & (old >= 0)  # [D, S] old slot stays
    newcomer = ~(content[:, :, None] == old[:, None, :]).any(-1) & (content >= 0)  # [D, S]
    newcomer_rank = jnp.where(newcomer, jnp.cumsum(newcomer, -1) - 1, -1)
    open_rank = jnp.where(kept, -2, jnp.cumsum(~kept, -1) - 1)
    match = open_rank[:, :, None] == newcomer_rank[:, None, :]  # [D, slot, newcomer position]
    incoming = jnp.where(match, content[:, None, :], -1).max(-1)
    return jnp.where(kept, old, incoming).astype(jnp.int32)


# ------------------------------------------------------------------------------------------ 5. budget
def _within_budget(plan, previous, load, num_devices, max_moves):
    """``plan`` when no device copies more than ``max_moves`` slots, else the previous table improved within
    the budget (never worse than ``previous`` on ``load``): the best of the partial plans that take each
    device's hottest ``k <= max_moves`` copies, then greedy budget-respecting steps."""
    fits = (moves_per_device(previous, plan, num_devices) <= max_moves).all()

    def improve_previous(plan):
        old = previous.reshape(num_devices, -1)
        table = _best_partial(plan.reshape(num_devices, -1), old, load, max_moves)
        table = _repeat(_BUDGET_STEPS, lambda t: _budget_step(t, old, load, max_moves), table)
        table = table.reshape(-1)
        peak = table_device_loads(table, load, num_devices).max()
        return jnp.where(peak > table_device_loads(previous, load, num_devices).max(), previous, table)

    # A branch, not a select: a step whose plan fits its budget skips the repair (under vmap both run).
    return jax.lax.cond(fits, lambda plan: plan, improve_previous, plan)


def _best_partial(plan, old, load, max_moves):
    """The previous table ``old [D, S]`` with each device's ``k`` hottest copies of ``plan`` applied
    (forecast load per replica in ``plan``), for the ``k`` in ``1 .. max_moves`` with the lowest max device
    load, or ``old`` when none is servable or lower. An expert that would lose every replica gets its old
    slots back."""
    num_devices, slots = plan.shape
    num_experts = load.shape[-1]
    expert_ids = jnp.arange(num_experts)
    count = (plan.reshape(-1)[None, :] == expert_ids[:, None]).sum(-1)
    heat = jnp.where(plan >= 0, load[jnp.maximum(plan, 0)] / jnp.maximum(count[jnp.maximum(plan, 0)], 1), 0.0)
    copy = (plan >= 0) & (plan != old)
    heat = jnp.where(copy, heat, -jnp.inf)
    slot_ids = jnp.arange(slots)
    hotter = (heat[:, None, :] > heat[:, :, None]) | (
        (heat[:, None, :] == heat[:, :, None]) & (slot_ids[None, None, :] < slot_ids[None, :, None])
    )
    rank = hotter.sum(-1)  # [D, S] position of each copy on its device, hottest first
    best, best_peak = old, table_device_loads(old.reshape(-1), load, num_devices).max()
    for k in range(1, min(max_moves, slots) + 1):
        table = jnp.where(copy & (rank < k), plan, old)
        for _ in range(2):  # restore the old slots of experts left without a replica
            present = (table.reshape(-1)[None, :] == expert_ids[:, None]).any(-1)
            lost = (old >= 0) & ~present[jnp.maximum(old, 0)]
            table = jnp.where(lost, old, table)
        present = (table.reshape(-1)[None, :] == expert_ids[:, None]).any(-1)
        peak = table_device_loads(table.reshape(-1), load, num_devices).max()
        better = present.all() & (peak < best_peak)
        best = jnp.where(better, table, best)
        best_peak = jnp.where(better, peak, best_peak)
    return best


def _budget_step(table, old, load, max_moves):
    """The one swap or slot re-assignment that lowers the max device load most within the budget.

    table, old: ``[D, S]`` the table being improved and the table in use (copies are counted against it).
    """
    num_devices, slots = table.shape
    num_experts = load.shape[-1]
    ids = jnp.arange(num_devices)
    count = (table.reshape(-1)[None, :] == jnp.arange(num_experts)[:, None]).sum(-1)  # [E]
    share = load / jnp.maximum(count, 1)
    item = _content_shares(table, share)
    device_load = item.sum(-1)
    copied = (table >= 0) & (table != old)  # [D, S]
    spare = max_moves - copied.sum(-1)  # [D] copies a device may still receive
    here = _holds(table, table)  # [a, i, b]: device b holds the expert in slot (a, i)
    swap_peak = _swap_peaks(table, old, item, device_load, here, copied, spare)
    assign_peak = _assign_peaks(table, old, load, count, item, device_load, here, copied, spare)

    best_swap = jnp.argmin(swap_peak)
    best_assign = jnp.argmin(assign_peak)
    swap_value = swap_peak.reshape(-1)[best_swap]
    assign_value = assign_peak.reshape(-1)[best_assign]
    use_swap = swap_value <= assign_value
    better = jnp.minimum(swap_value, assign_value) < device_load.max() * (1 - _SAME)
    a, i, b, j = jnp.unravel_index(best_swap, swap_peak.shape)
    table = _swap(table, a, i, b, j, better & use_swap)
    a, i, y = jnp.unravel_index(best_assign, assign_peak.shape)
    target = (ids[:, None] == a) & (jnp.arange(slots)[None, :] == i) & better & ~use_swap
    return jnp.where(target, jnp.where(y < num_experts, y, -1), table).astype(jnp.int32)


def _swap_peaks(table, old, item, device_load, here, copied, spare):
    """``[a, i, b, j]`` max device load after swapping slots ``(a, i)`` and ``(b, j)``; inf where the swap
    breaks anti-affinity or the budget. Replica counts stay, so only devices ``a`` and ``b`` change."""
    num_devices = table.shape[0]
    ids = jnp.arange(num_devices)
    top_value, top_index = jax.lax.top_k(device_load, min(3, num_devices))
    rest = jnp.full((num_devices, num_devices), -jnp.inf, device_load.dtype)  # max load off both a and b
    for k in range(top_value.shape[0] - 1, -1, -1):
        off = (top_index[k] != ids[:, None]) & (top_index[k] != ids[None, :])
        rest = jnp.where(off, top_value[k], rest)
    delta = item[:, :, None, None] - item[None, None, :, :]
    after = jnp.maximum(device_load[:, None, None, None] - delta, device_load[None, None, :, None] + delta)
    after = jnp.maximum(after, rest[:, None, :, None])
    x = table[:, :, None, None]
    y = table[None, None, :, :]
    # A slot's copy count after the swap: it holds a copy when its new expert is not the one it had.
    extra_a = ((y >= 0) & (y != old[:, :, None, None])).astype(jnp.int32) - copied[:, :, None, None]
    extra_b = ((x >= 0) & (x != old[None, None, :, :])).astype(jnp.int32) - copied[None, None, :, :]
    ok = (ids[:, None, None, None] != ids[None, None, :, None]) & (x != y)
    ok = ok & ~here[:, :, :, None] & ~jnp.transpose(here, (2, 0, 1))[:, None, :, :]
    ok = ok & (extra_a <= spare[:, None, None, None]) & (extra_b <= spare[None, None, :, None])
    return jnp.where(ok, after, jnp.inf)


def _assign_peaks(table, old, load, count, item, device_load, here, copied, spare):
    """``[a, i, y]`` max device load after slot ``(a, i)`` drops its expert ``x`` (which keeps a replica
    elsewhere) for expert ``y`` (``y = E``: left empty); inf where that breaks a rule or the budget. ``x``'s
    other replicas and every replica of ``y`` change share, so every device is recomputed."""
    num_devices, slots = table.shape
    num_experts = load.shape[-1]
    ids = jnp.arange(num_devices)
    y_ids = jnp.arange(num_experts + 1)
    holder = (table[:, :, None] == y_ids[None, None, :]).any(1)  # [D, E + 1]; column E (empty) never held
    load_y = jnp.concatenate([load, jnp.zeros(1, load.dtype)])
    count_y = jnp.concatenate([count, jnp.ones(1, count.dtype)])
    new_share_y = load_y / (count_y + 1)  # [E + 1] share of y's replicas once it has one more
    shift_y = new_share_y - load_y / jnp.maximum(count_y, 1)  # change on each device already holding y
    x = jnp.maximum(table, 0)
    count_x = count[x]
    load_x = load[x]
    shift_x = load_x / jnp.maximum(count_x - 1, 1) - load_x / jnp.maximum(count_x, 1)
    shift_x = jnp.where(table >= 0, shift_x, 0.0)  # change on each other device holding x
    others_x = here & (ids[None, None, :] != ids[:, None, None])  # [a, i, d]: other holders of x
    base = device_load[None, :] + jnp.where(others_x, shift_x[:, :, None], 0.0).reshape(-1, num_devices)
    base = base.reshape(num_devices, slots, 1, num_devices)  # [a, i, 1, d]
    on_y = jnp.where(holder.T, shift_y[:, None], 0.0)[None, None, :, :]  # [1, 1, y, d]
    on_a = (ids[:, None, None, None] == ids[None, None, None, :]) * (
        new_share_y[None, None, :, None] - item[:, :, None, None]
    )
    after = (base + on_y + on_a).max(-1)  # [a, i, y]
    y_expert = jnp.where(y_ids < num_experts, y_ids, -1)
    ok = ((table < 0) | (count_x >= 2))[:, :, None] & ~holder[:, None, :]
    ok = ok & (y_expert[None, None, :] != table[:, :, None])
    extra = ((y_expert[None, None, :] >= 0) & (y_expert[None, None, :] != old[:, :, None])).astype(jnp.int32)
    ok = ok & (extra - copied[:, :, None] <= spare[:, None, None])
    return jnp.where(ok, after, jnp.inf)


# -------------------------------------------------------------------------------------------- checks
def _clean(forecast) -> jax.Array:
    load = jnp.asarray(forecast, jnp.float32)
    return jnp.where(jnp.isfinite(load) & (load > 0), load, 0.0)


def _check(forecast, previous, num_devices, slots_per_device) -> tuple[int, int]:
    for name, value in (("num_devices", num_devices), ("slots_per_device", slots_per_device)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    num_slots = num_devices * slots_per_device
    if jnp.ndim(forecast) != 1 or jnp.shape(forecast)[0] == 0:
        raise InputError(
            f"forecast must be one layer's [E] loads, got shape {jnp.shape(forecast)}; vmap over layers"
        )
    num_experts = jnp.shape(forecast)[0]
    if jnp.shape(previous) != (num_slots,):
        raise InputError(
            f"previous must be a [{num_slots}] slot_to_expert (num_devices {num_devices} x slots_per_device "
            f"{slots_per_device}), got shape {jnp.shape(previous)}"
        )
    if num_experts > num_slots:
        raise InputError(
            f"{num_experts} experts do not fit in {num_slots} slots; raise slots_per_device to at least "
            f"{-(-num_experts // num_devices)}"
        )
    return num_experts, num_slots
