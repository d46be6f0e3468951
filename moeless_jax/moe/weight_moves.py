"""Slot weight moves inside a jitted step: a fixed-capacity ``all_to_all``.

:mod:`moeless_jax.moe.slot_weights` plans and applies moves on the host. When a layer's next table is planned
inside the step (from a forecast), the copy must happen there too, as a collective that XLA can schedule
next to the previous layer's compute. Here both halves are jittable and take tables as data:

1. :func:`slot_moves` turns (old table, new ``slot_to_expert``) into a per-slot source, with the same
   choice as :func:`~moeless_jax.moe.slot_weights.plan_moves`: a replica on the same device first, else the
   lowest slot that held the expert.
2. :func:`move_slot_weights` copies the rows in one ``shard_map``: each device packs, per destination device,
   up to ``N = max_moves_per_device`` source rows into a ``[D, N, ...]`` send buffer, one ``all_to_all``
   per leaf delivers them, and each destination scatters the received rows into its changed slots. Copies
   whose source is on the destination device are read locally and skip the buffer.

The copy is exact (gathers, scatters and the collective move bits, they compute nothing), so the result
equals the host ``apply_moves(plan_moves(...))`` bit for bit, and it is differentiable: the gradient of a
copied row flows back to its source row through the transposed collective.

Capacity. A collective has static shapes, so the number of copies per step is capped. When some device would
receive more than ``N`` copies, the weights come back unchanged and ``fits`` is False: the caller keeps the
old table, so table and weights never disagree. Nothing is half-moved.

Backends. Only the dense ``all_to_all`` is implemented; it runs on every platform (XLA:CPU has no
``ragged_all_to_all``). A ragged variant would send only the rows that move instead of ``D * N`` rows.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moeless_jax.moe.layer import EP_AXIS, place
from moeless_jax.moe.replica_table import TableArrays
from moeless_jax.moe.split import rank_within_group


class SlotMoves(NamedTuple):
    """The copies that turn an old table's slot weights into a new table's (replicated, jittable).

    source_slot: [P] int32 slot of the OLD table whose weights slot p receives; -1 = no copy (the slot
                 keeps its expert, or becomes empty).
    per_device:  [D] int32 copies each device receives (local and remote).
    remote:      []  int32 copies whose source is on another device.
    unsourced:   []  int32 changed slots whose new expert has no replica in the old table (0 whenever the
                 old table is valid); :func:`move_slot_weights` refuses to move when it is not 0.
    """

    source_slot: jax.Array
    per_device: jax.Array
    remote: jax.Array
    unsourced: jax.Array


def slot_moves(old: TableArrays, new_slot_to_expert: jax.Array, *, slots_per_device: int) -> SlotMoves:
    """Per-slot copy sources from ``old`` to ``new_slot_to_expert [P] int32`` (jittable).

    A slot copies when its expert changes to a real expert (>= 0). Its source is the old replica of that
    expert on the same device if there is one, else the expert's lowest old slot (as ``plan_moves``).
    """
    old_s2e = jnp.asarray(old.slot_to_expert, jnp.int32)
    new = jnp.asarray(new_slot_to_expert, jnp.int32)
    num_slots = old_s2e.shape[0]
    if new.shape != (num_slots,):
        raise ValueError(
            f"new_slot_to_expert has shape {new.shape}; expected ({num_slots},) like old.slot_to_expert"
        )
    if slots_per_device < 1 or num_slots % slots_per_device:
        raise ValueError(
            f"slots_per_device={slots_per_device} does not divide the table's {num_slots} slots; "
            "pass the layer's slots_per_device"
        )
    num_devices = num_slots // slots_per_device
    slot = jnp.arange(num_slots, dtype=jnp.int32)
    device = slot // slots_per_device
    changed = (new != old_s2e) & (new >= 0)
    candidates = jnp.asarray(old.expert_slots, jnp.int32)[jnp.maximum(new, 0)]  # [P, R_max]
    held = candidates >= 0
    # At most one replica of an expert per device, so the same-device candidate is unique.
    same_device = held & (candidates // slots_per_device == device[:, None])
    local = jnp.max(jnp.where(same_device, candidates, -1), axis=1)
    lowest = jnp.min(jnp.where(held, candidates, num_slots), axis=1)
    lowest = jnp.where(lowest < num_slots, lowest, -1)
    source = jnp.where(changed, jnp.where(local >= 0, local, lowest), -1)
    copies = source >= 0
    per_device = copies.reshape(num_devices, slots_per_device).sum(axis=1, dtype=jnp.int32)
    remote = jnp.sum(copies & (source // slots_per_device != device), dtype=jnp.int32)
    unsourced = jnp.sum(changed & ~copies, dtype=jnp.int32)
    return SlotMoves(source, per_device, remote, unsourced)


def move_slot_weights(weights, moves: SlotMoves, *, mesh: jax.sharding.Mesh, max_moves_per_device: int):
    """Apply ``moves`` to ``weights``; returns ``(new_weights, fits [] bool)``.

    One ``shard_map``, one ``all_to_all`` per leaf of ``weights``.

    ``weights``: :class:`~moeless_jax.moe.MLPWeights` or any pytree of ``[P, ...]`` arrays that follow the
    slots (e.g. optimizer moments), sharded ``P("ep")`` on ``mesh`` (an ``ep`` or ``(data, ep)`` mesh,
    Explicit or Auto; on ``(data, ep)`` every data group moves its own copy identically).

    When every device receives at most ``N = max_moves_per_device`` copies (and every changed slot has a
    source), ``fits`` is True and ``new[p] = old[source_slot[p]]`` bit for bit for each copying slot; every
    other slot keeps its row. Otherwise ``fits`` is False and the weights come back unchanged.

    Memory: per device, a send and a receive buffer of ``D * N`` rows each, i.e. ``2 * D * N * b`` bytes
    where ``b`` is one expert's bytes over all leaves (``all_to_all`` fixes the rows per device pair, so
    the buffer is sized for N copies from every source), plus a few ``N``-row temporaries for the scatter.
    For DeepSeek-V2-Lite (17 MB per expert) with D = 8, N = 2: 544 MB per device while the move is in
    flight.
    """
    leaves = jax.tree.leaves(weights)
    if not leaves:
        raise ValueError("weights holds no arrays; pass the slot weights (or state) to move")
    if EP_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; it needs an '{EP_AXIS}' axis (make_ep_mesh)")
    if max_moves_per_device < 1:
        raise ValueError(f"max_moves_per_device must be >= 1, got {max_moves_per_device}")
    num_slots = moves.source_slot.shape[0]
    num_devices = mesh.shape[EP_AXIS]
    for leaf in leaves:
        if leaf.ndim < 1 or leaf.shape[0] != num_slots:
            raise ValueError(
                f"every weights array needs a leading slot axis of {num_slots} (moves.source_slot's "
                f"length); got shape {leaf.shape}"
            )
    if num_slots % num_devices or moves.per_device.shape != (num_devices,):
        raise ValueError(
            f"moves are for {num_slots} slots over {moves.per_device.shape[0]} devices but the mesh's "
            f"'{EP_AXIS}' axis has {num_devices}; build the moves for this mesh's layout"
        )
    fits = jnp.all(moves.per_device <= max_moves_per_device) & (moves.unsourced == 0)
    source = place(jnp.asarray(moves.source_slot, jnp.int32), mesh, P())
    by_slot = jax.tree.map(lambda _: P(EP_AXIS), weights)
    weights = jax.tree.map(lambda a: place(a, mesh, P(EP_AXIS)), weights)
    shard = partial(
        _move_shard,
        slots_per_device=num_slots // num_devices,
        num_devices=num_devices,
        capacity=max_moves_per_device,
    )
    moved = jax.shard_map(shard, mesh=mesh, in_specs=(by_slot, P(), P()), out_specs=by_slot)(
        weights, source, place(fits, mesh, P())
    )
    return moved, fits


class _Routes(NamedTuple):
    """One device's index lists for a move.

    send_slot:  [D, N] local slot to send to each destination in each buffer row (padding: 0, ignored).
    dst_slot:   [N] local slot each received copy lands in (S = no copy).
    from_local: [N] bool, the copy's source is on this device.
    local_slot: [N] local source slot of a local copy.
    recv_from:  [N] source device of a remote copy.  recv_row: [N] its row in that device's buffer.
    """

    send_slot: jax.Array
    dst_slot: jax.Array
    from_local: jax.Array
    local_slot: jax.Array
    recv_from: jax.Array
    recv_row: jax.Array


def _routes(source: jax.Array, fits: jax.Array, *, slots_per_device: int, num_devices: int,
            capacity: int) -> _Routes:
    """Where every copy's row is read, sent and written, as seen by this device (ints only, cheap)."""
    s, d, n = slots_per_device, num_devices, capacity
    me = jax.lax.axis_index(EP_AXIS)
    slot = jnp.arange(source.shape[0], dtype=jnp.int32)
    dst_dev, src_dev = slot // s, jnp.maximum(source, 0) // s
    copies = (source >= 0) & fits
    remote = copies & (src_dev != dst_dev)
    # Buffer rows of one (source, destination) pair, and received copies per destination, both in slot
    # order; with fits, every rank stays below N.
    pair_rank, _ = rank_within_group(jnp.where(remote, src_dev * d + dst_dev, d * d), d * d)
    copy_rank, _ = rank_within_group(jnp.where(copies, dst_dev, d), d)

    sending = remote & (src_dev == me)
    send_slot = jnp.zeros((d, n), jnp.int32).at[
        jnp.where(sending, dst_dev, d), pair_rank
    ].set(source % s, mode="drop")

    into = jnp.where(copies & (dst_dev == me), copy_rank, n)

    def at_copy(values: jax.Array, fill) -> jax.Array:
        return jnp.full(n, fill, values.dtype).at[into].set(values, mode="drop")

    return _Routes(
        send_slot=send_slot,
        dst_slot=at_copy(slot % s, s),
        from_local=at_copy(copies & ~remote, False),
        local_slot=at_copy(jnp.maximum(source, 0) % s, 0),
        recv_from=at_copy(src_dev, 0),
        recv_row=at_copy(pair_rank, 0),
    )


def _move_shard(weights, source: jax.Array, fits: jax.Array, *, slots_per_device: int, num_devices: int,
                capacity: int):
    """One device: its slot rows ``[S, ...]`` per leaf -> the rows after the move."""
    r = _routes(source, fits, slots_per_device=slots_per_device, num_devices=num_devices, capacity=capacity)

    def move(w: jax.Array) -> jax.Array:
        received = jax.lax.all_to_all(w[r.send_slot], EP_AXIS, 0, 0)  # [D (source), N, ...]
        select = r.from_local.reshape((-1,) + (1,) * (w.ndim - 1))
        rows = jnp.where(select, w[r.local_slot], received[r.recv_from, r.recv_row])
        # Every read above sees the old rows, so swaps and chains of copies are safe.
        return w.at[r.dst_slot].set(rows, mode="drop")

    return jax.tree.map(move, weights)


def moved_bytes(moves: SlotMoves, weights, *, remote_only: bool = False) -> jax.Array:
    """Bytes the copies write: copies x one slot's bytes over all leaves of ``weights`` ([] float32).

    ``remote_only``: count only copies that cross devices (the interconnect's share). Equals
    ``MovePlan.bytes_total`` for the same tables (float32: exact up to 2**24 bytes, then to 6e-8).
    """
    per_slot = sum(int(a.size // a.shape[0]) * a.dtype.itemsize for a in jax.tree.leaves(weights))
    count = moves.remote if remote_only else jnp.sum(moves.per_device)
    return jnp.asarray(count, jnp.float32) * jnp.float32(per_slot)
