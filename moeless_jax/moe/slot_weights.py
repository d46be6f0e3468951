"""Physical slot weights: materialising them for a table, and moving them to a new table.

A move touches only the slots whose expert changed. Each changed slot copies its new expert's weights
from a slot that held that expert in the old table, preferring one on the same device (a local copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moeless_jax.moe.experts import MLPWeights
from moeless_jax.moe.replica_table import ReplicaTable, TableArrays


def materialize_slot_weights(logical: MLPWeights, table: ReplicaTable | TableArrays) -> MLPWeights:
    """Logical expert weights ``[E, ...]`` -> physical slot weights ``[P, ...]`` (empty slots are zero).

    ``table``: a :class:`ReplicaTable`, or its :class:`TableArrays` (then also inside jit, as data).
    Differentiable in ``logical``.
    """
    num_experts = logical.gate.shape[0]
    table_experts = table.replica_count.shape[0]
    if num_experts != table_experts:
        raise ValueError(
            f"logical weights hold {num_experts} experts but the table has {table_experts}; "
            "build the table for the same model"
        )
    index = jnp.maximum(jnp.asarray(table.slot_to_expert), 0)
    filled = jnp.asarray(table.slot_to_expert) >= 0

    def gather(w: jax.Array) -> jax.Array:
        mask = filled.reshape((-1,) + (1,) * (w.ndim - 1))
        return jnp.where(mask, w[index], jnp.zeros((), w.dtype))

    return MLPWeights(*(gather(w) for w in logical))


@dataclass(frozen=True)
class Move:
    """Copy ``expert``'s weights from ``src_slot`` (on ``src_device``) into ``slot`` (on ``dst_device``)."""

    slot: int
    expert: int
    src_slot: int
    src_device: int
    dst_device: int
    bytes: int

    @property
    def local(self) -> bool:
        return self.src_device == self.dst_device


@dataclass(frozen=True)
class MovePlan:
    """The slot copies that turn one table into another. Unchanged slots are not listed."""

    moves: tuple[Move, ...]
    cleared_slots: tuple[int, ...]  # slots that become empty (nothing to copy)

    @property
    def bytes_total(self) -> int:
        return sum(m.bytes for m in self.moves)

    @property
    def num_local(self) -> int:
        return sum(m.local for m in self.moves)

    @property
    def num_remote(self) -> int:
        return len(self.moves) - self.num_local

    def summary(self) -> dict[str, int]:
        return {
            "moves": len(self.moves),
            "local_moves": self.num_local,
            "remote_moves": self.num_remote,
            "bytes": self.bytes_total,
            "cleared_slots": len(self.cleared_slots),
        }


def plan_moves(
    old: ReplicaTable,
    new: ReplicaTable,
    *,
    bytes_per_expert: int,
    node_of_device: np.ndarray | None = None,
    pair_of_device: np.ndarray | None = None,
) -> MovePlan:
    """Slots whose expert changes, each with a source replica in ``old``.

    The source is the closest replica: same device first, then (when given) the same NVLink pair
    (``pair_of_device [D]``), then the same node (``node_of_device [D]``), then the lowest slot.
    """
    if (old.num_experts, old.num_devices, old.slots_per_device) != (
        new.num_experts,
        new.num_devices,
        new.slots_per_device,
    ):
        raise ValueError(f"cannot move between tables of different layouts: {old!r} -> {new!r}")
    slot_device = old.slot_device
    moves, cleared = [], []
    for p in np.flatnonzero(old.slot_to_expert != new.slot_to_expert):
        p = int(p)
        expert = int(new.slot_to_expert[p])
        if expert < 0:
            cleared.append(p)
            continue
        sources = old.expert_slots[expert, : old.replica_count[expert]]
        src = int(
            sources[
                np.argmin(
                    _copy_distance(slot_device[sources], slot_device[p], node_of_device, pair_of_device)
                )
            ]
        )
        moves.append(Move(p, expert, src, int(slot_device[src]), int(slot_device[p]), bytes_per_expert))
    return MovePlan(tuple(moves), tuple(cleared))


def _copy_distance(src_device: np.ndarray, dst_device: int, node_of_device, pair_of_device) -> np.ndarray:
    """0 same device, 1 same pair, 2 same node, 3 elsewhere (argmin then keeps the lowest slot on ties)."""
    distance = np.where(src_device == dst_device, 0, 3)
    if node_of_device is not None:
        node = np.asarray(node_of_device)
        distance = np.where((distance == 3) & (node[src_device] == node[dst_device]), 2, distance)
    if pair_of_device is not None:
        pair = np.asarray(pair_of_device)
        distance = np.where((distance > 0) & (pair[src_device] == pair[dst_device]), 1, distance)
    return distance


def expert_bytes(weights: MLPWeights) -> int:
    """Bytes of one expert's weights in a ``[N, ...]`` stack."""
    return sum(int(np.prod(w.shape[1:])) * w.dtype.itemsize for w in weights)


def _bucket(n: int) -> int:
    """Pad move lists to powers of two so only a few move kernels are ever compiled."""
    return 1 << max(0, (n - 1).bit_length())


@partial(jax.jit, donate_argnums=0)
def _copy_slots(weights, src: jax.Array, dst: jax.Array):
    # Gathers read the old weights before any scatter writes, so swaps and chains are safe;
    # padding entries have dst = P and are dropped.
    return jax.tree.map(lambda w: _copy_rows(w, src, dst), weights)


def _copy_rows(w: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
    # With explicit sharding the gathered rows' layout must be named: replicate the few moved rows.
    sharding = jax.typeof(w).sharding
    if not sharding.mesh.explicit_axes:
        return w.at[dst].set(w[src], mode="drop")
    rows = w.at[src].get(out_sharding=NamedSharding(sharding.mesh, P()))
    return w.at[dst].set(rows, mode="drop", out_sharding=sharding)


def apply_moves(weights, plan: MovePlan):
    """Slot weights after ``plan`` (donates ``weights``; unchanged slots are not rewritten).

    ``weights``: :class:`MLPWeights`, or any pytree of ``[P, ...]`` arrays that follow the slots (e.g. an
    optimizer's moments of the slot weights).
    """
    num_slots = jax.tree.leaves(weights)[0].shape[0]
    n = len(plan.moves)
    if n == 0:
        return weights
    size = _bucket(n)
    src = np.zeros(size, np.int32)
    dst = np.full(size, num_slots, np.int32)
    src[:n] = [m.src_slot for m in plan.moves]
    dst[:n] = [m.slot for m in plan.moves]
    return _copy_slots(weights, jnp.asarray(src), jnp.asarray(dst))
