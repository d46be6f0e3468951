"""Token dispatch to physical slots: one contract, two backends.

All functions here run *inside* ``shard_map`` over the expert-parallel axis. The contract:

1. :func:`assign_slots` maps each local (token, k) assignment to a physical slot with the replica table
   and a split rule (see :mod:`moeless_jax.moe.split`).
2. A backend's ``send`` moves each assignment's token row to its slot's device and returns the rows this
   device must compute, with their local slot ids and a state for the return trip.
3. :func:`moeless_jax.moe.experts.grouped_swiglu` computes them.
4. The backend's ``receive`` brings results back to the assignment order of the sender.

Backends:

* ``dense``: a fixed-capacity ``all_to_all`` with a ``[D, C, M]`` buffer (C rows per device pair). Runs on
  every platform, CPU included.
* ``ragged``: ``ragged_all_to_all`` with a ``[C_recv, M]`` receive buffer. GPU/TPU only (XLA:CPU has no
  ragged-all-to-all).

Capacity. Static buffers are sized in :mod:`moeless_jax.moe.capacity`. Assignments past a buffer's end are
not computed, and their number is returned as ``overflow``: the caller retries with larger buffers
(:func:`moeless_jax.moe.capacity.call_dropless` does). Nothing is dropped silently.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moeless_jax.moe.config import SPLIT_ITERATIONS, Split
from moeless_jax.moe.replica_table import TableArrays
from moeless_jax.moe.split import global_expert_rank, rank_within_group, replica_for_rank, split_quotas


class Assignments(NamedTuple):
    """Where each local (token, k) assignment goes; N = T * K, flattened as ``t * K + k``.

    token: [N] local token row.       expert: [N] logical expert.
    slot:  [N] global physical slot.  device: [N] destination device.  local_slot: [N] slot on it.
    expert_totals: [E] assignments per expert over all devices.
    """

    token: jax.Array
    expert: jax.Array
    slot: jax.Array
    device: jax.Array
    local_slot: jax.Array
    expert_totals: jax.Array


def assign_slots(
    expert_ids: jax.Array,
    table: TableArrays,
    *,
    slots_per_device: int,
    axis_name: str,
    split: Split = "even",
    split_iterations: int = SPLIT_ITERATIONS,
) -> Assignments:
    """Map local routing ``expert_ids [T, K]`` to physical slots by the ``split`` rule."""
    num_tokens, top_k = expert_ids.shape
    num_experts, r_max = table.expert_slots.shape
    expert = expert_ids.reshape(-1).astype(jnp.int32)
    rank, expert_totals, _ = global_expert_rank(expert, num_experts, axis_name)
    quotas = split_quotas(
        expert_totals,
        table.expert_slots,
        table.replica_count,
        slots_per_device=slots_per_device,
        num_devices=r_max,  # R_max = D: at most one replica of an expert per device
        split=split,
        iterations=split_iterations,
    )
    replica = replica_for_rank(rank, expert, quotas)
    slot = table.expert_slots[expert, replica]
    token = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), top_k)
    return Assignments(token, expert, slot, slot // slots_per_device, slot % slots_per_device, expert_totals)


class DispatchState(NamedTuple):
    """What the return trip needs (MaxText calls its twin the combine struct)."""

    device: jax.Array  # [N] destination of each assignment (dense) / send order (ragged)
    position: jax.Array  # [N] row within the destination's buffer (dense) / inverse order (ragged)
    send_sizes: jax.Array  # [D] rows actually sent to each device
    recv_sizes: jax.Array  # [D] rows actually received from each device
    send_offsets: jax.Array  # [D] where each destination's rows start in the send buffer
    recv_offsets: jax.Array  # [D] where each source's rows start in the receive buffer
    overflow: jax.Array  # [] assignments of this device that did not fit


# ---------------------------------------------------------------------------------------------- dense
def dense_send(
    x: jax.Array, a: Assignments, *, num_devices: int, slots_per_device: int, capacity: int, axis_name: str
) -> tuple[jax.Array, jax.Array, DispatchState]:
    """Fixed-capacity all_to_all. Returns (rows [D*C, M], local slot [D*C] with S = padding, state)."""
    position, _ = rank_within_group(a.device, num_devices)
    fits = position < capacity
    send_rows = jnp.zeros((num_devices, capacity, x.shape[-1]), x.dtype)
    send_rows = send_rows.at[a.device, position].set(x[a.token], mode="drop")
    send_slot = jnp.full((num_devices, capacity), slots_per_device, jnp.int32)
    send_slot = send_slot.at[a.device, position].set(a.local_slot, mode="drop")
    recv_rows = jax.lax.all_to_all(send_rows, axis_name, 0, 0)
    recv_slot = jax.lax.all_to_all(send_slot, axis_name, 0, 0)
    zeros = jnp.zeros(num_devices, jnp.int32)
    state = DispatchState(a.device, position, zeros, zeros, zeros, zeros, jnp.sum(~fits).astype(jnp.int32))
    return recv_rows.reshape(-1, x.shape[-1]), recv_slot.reshape(-1), state


def dense_receive(y_rows: jax.Array, state: DispatchState, *, num_devices: int, axis_name: str) -> jax.Array:
    """Return trip of :func:`dense_send`: [D*C, M] rows -> [N, M] per assignment (0 if overflowed)."""
    y = jax.lax.all_to_all(y_rows.reshape(num_devices, -1, y_rows.shape[-1]), axis_name, 0, 0)
    capacity = y.shape[1]
    fits = state.position < capacity
    out = y[state.device, jnp.minimum(state.position, capacity - 1)]
    return jnp.where(fits[:, None], out, 0)


# ---------------------------------------------------------------------------------------------- ragged
def _exclusive_cumsum(v: jax.Array, axis: int) -> jax.Array:
    return jnp.cumsum(v, axis=axis) - v


def ragged_send(
    x: jax.Array, a: Assignments, *, num_devices: int, slots_per_device: int, capacity: int, axis_name: str
) -> tuple[jax.Array, jax.Array, DispatchState]:
    """ragged_all_to_all dispatch. Returns (rows [C, M], local slot [C] with S = padding, state)."""
    me = jax.lax.axis_index(axis_name)
    order = jnp.argsort(a.device, stable=True)
    counts = jnp.zeros(num_devices, jnp.int32).at[a.device].add(1)
    traffic = jax.lax.all_gather(counts, axis_name)  # [src, dst]
    # Rows past a receiver's capacity are not sent; clamping keeps every write in bounds.
    start_at_dst = _exclusive_cumsum(traffic, axis=0)  # where src's rows start on dst
    sent = jnp.clip(capacity - start_at_dst, 0, traffic)
    send_offsets = _exclusive_cumsum(counts, axis=0)
    state = DispatchState(
        device=order,
        position=jnp.argsort(order),
        send_sizes=sent[me],
        recv_sizes=sent[:, me],
        send_offsets=send_offsets,
        recv_offsets=start_at_dst[:, me],
        overflow=jnp.sum(counts - sent[me]).astype(jnp.int32),
    )
    operand = x[a.token[order]]
    rows = jax.lax.ragged_all_to_all(
        operand,
        jnp.zeros((capacity, x.shape[-1]), x.dtype),
        send_offsets,
        state.send_sizes,
        start_at_dst[me],
        state.recv_sizes,
        axis_name=axis_name,
    )
    slot = jax.lax.ragged_all_to_all(
        a.local_slot[order][:, None],
        jnp.full((capacity, 1), slots_per_device, jnp.int32),
        send_offsets,
        state.send_sizes,
        start_at_dst[me],
        state.recv_sizes,
        axis_name=axis_name,
    )
    return rows, slot[:, 0], state


def ragged_receive(y_rows: jax.Array, state: DispatchState, *, num_devices: int, axis_name: str) -> jax.Array:
    """Return trip of :func:`ragged_send`: [C, M] computed rows -> [N, M] per assignment (0 if overflowed)."""
    num_assignments = state.device.shape[0]
    back = jax.lax.ragged_all_to_all(
        y_rows,
        jnp.zeros((num_assignments, y_rows.shape[-1]), y_rows.dtype),
        state.recv_offsets,
        state.recv_sizes,
        _source_send_offsets(state, axis_name),
        state.send_sizes,
        axis_name=axis_name,
    )
    return back[state.position]


def _source_send_offsets(state: DispatchState, axis_name: str) -> jax.Array:
    """For each source s: where s's rows for this device started in s's own send buffer."""
    me = jax.lax.axis_index(axis_name)
    return jax.lax.all_gather(state.send_offsets, axis_name)[:, me]


BACKENDS = {"dense": (dense_send, dense_receive), "ragged": (ragged_send, ragged_receive)}
