"""The replica table: which logical expert each physical slot serves.

Layout. ``D`` devices on mesh axis ``ep`` hold ``S`` physical slots each, ``P = D * S`` slots in all; slot
``p`` lives on device ``p // S``. A slot serves one logical expert or is empty (``-1``). Every expert has at
least one replica and at most one per device, so an expert has at most ``R_max = D`` replicas.

The table is host-side, immutable and validated on construction. :meth:`ReplicaTable.arrays` turns it into
int32 arrays that jitted code takes as *data*: changing the table never recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moeless_jax.layout import static_slot_to_expert

EMPTY = -1


class ReplicaTableError(ValueError):
    """A replica table that cannot be served; the message names the slot, expert or device at fault."""


class TableArrays(NamedTuple):
    """The table as device data (a pytree of int32 arrays).

    slot_to_expert: [P]        logical expert of each slot, -1 if empty.
    expert_slots:   [E, R_max] slots of each expert in ascending order, padded with -1.
    replica_count:  [E]        number of replicas of each expert (>= 1).
    """

    slot_to_expert: jax.Array
    expert_slots: jax.Array
    replica_count: jax.Array


@dataclass(frozen=True, eq=False)
class ReplicaTable:
    """A validated map from physical slots to logical experts.

    Build it with :meth:`from_slot_to_expert` (the usual way), :meth:`static` (one replica per expert,
    round-robin over devices), or the constructor when all three arrays are at hand (they are checked
    against each other).
    """

    slot_to_expert: np.ndarray  # [P] int32
    expert_slots: np.ndarray  # [E, R_max] int32, -1 padded
    replica_count: np.ndarray  # [E] int32
    num_devices: int
    slots_per_device: int

    def __post_init__(self) -> None:
        for name in ("slot_to_expert", "expert_slots", "replica_count"):
            value = np.asarray(getattr(self, name))
            if not np.issubdtype(value.dtype, np.integer):
                raise ReplicaTableError(f"{name} must hold integers, got dtype {value.dtype}")
            frozen = value.astype(np.int32, copy=True)
            frozen.setflags(write=False)
            object.__setattr__(self, name, frozen)
        _validate(self)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_slot_to_expert(
        cls, slot_to_expert, *, num_experts: int, num_devices: int, slots_per_device: int
    ) -> ReplicaTable:
        """Derive ``expert_slots`` and ``replica_count`` from ``slot_to_expert`` and validate."""
        slot_to_expert = np.asarray(slot_to_expert)
        _check_layout(num_experts, num_devices, slots_per_device)
        num_slots = num_devices * slots_per_device
        if slot_to_expert.shape != (num_slots,):
            raise ReplicaTableError(
                f"slot_to_expert has shape {slot_to_expert.shape}, expected ({num_slots},) = "
                f"num_devices {num_devices} x slots_per_device {slots_per_device}"
            )
        if not np.issubdtype(slot_to_expert.dtype, np.integer):
            raise ReplicaTableError(f"slot_to_expert must hold integers, got dtype {slot_to_expert.dtype}")
        _check_slot_experts(slot_to_expert, num_experts)
        expert_slots, replica_count = expert_slot_arrays(slot_to_expert, num_experts, num_devices)
        crowded = np.flatnonzero(replica_count > num_devices)
        if crowded.size:
            raise ReplicaTableError(
                f"expert {int(crowded[0])} has more than {num_devices} replicas; "
                "at most one per device is allowed"
            )
        return cls(slot_to_expert, expert_slots, replica_count, num_devices, slots_per_device)

    @classmethod
    def static(cls, *, num_experts: int, num_devices: int, slots_per_device: int) -> ReplicaTable:
        """One replica per expert, expert ``e`` on device ``e % D`` (static expert parallelism)."""
        _check_layout(num_experts, num_devices, slots_per_device)
        if num_experts > num_devices * slots_per_device:
            raise ReplicaTableError(
                f"{num_experts} experts do not fit in {num_devices} devices x {slots_per_device} slots; "
                f"raise slots_per_device to at least {-(-num_experts // num_devices)}"
            )
        slot_to_expert = static_slot_to_expert(num_experts, num_devices, slots_per_device).astype(np.int32)
        return cls.from_slot_to_expert(
            slot_to_expert,
            num_experts=num_experts,
            num_devices=num_devices,
            slots_per_device=slots_per_device,
        )

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        *,
        num_experts: int,
        num_devices: int,
        slots_per_device: int,
        extra_replicas: int | None = None,
    ) -> ReplicaTable:
        """A random valid table: every expert once, then up to ``extra_replicas`` more (default: fill).

        Extra replicas go to random experts on random devices that have a free slot and no replica of
        that expert yet; for tests, benchmarks and fuzzing.
        """
        _check_layout(num_experts, num_devices, slots_per_device)
        num_slots = num_devices * slots_per_device
        if num_experts > num_slots:
            raise ReplicaTableError(f"{num_experts} experts do not fit in {num_slots} slots")
        slot_to_expert = np.full(num_slots, EMPTY, np.int32)
        slot_to_expert[rng.choice(num_slots, num_experts, replace=False)] = rng.permutation(num_experts)
        budget = (
            num_slots - num_experts
            if extra_replicas is None
            else min(extra_replicas, num_slots - num_experts)
        )
        for _ in range(budget):
            e = int(rng.integers(num_experts))
            hosts = set((np.flatnonzero(slot_to_expert == e) // slots_per_device).tolist())
            free = [p for p in np.flatnonzero(slot_to_expert == EMPTY) if p // slots_per_device not in hosts]
            if free:
                slot_to_expert[free[int(rng.integers(len(free)))]] = e
        return cls.from_slot_to_expert(
            slot_to_expert,
            num_experts=num_experts,
            num_devices=num_devices,
            slots_per_device=slots_per_device,
        )

    # ------------------------------------------------------------------ views
    @property
    def num_experts(self) -> int:
        return int(self.replica_count.shape[0])

    @property
    def num_slots(self) -> int:
        return self.num_devices * self.slots_per_device

    @property
    def slot_device(self) -> np.ndarray:
        """[P] device of each slot."""
        return np.arange(self.num_slots, dtype=np.int32) // self.slots_per_device

    def device_experts(self, device: int) -> np.ndarray:
        """Experts served on ``device`` (empty slots left out), in slot order."""
        s = self.slots_per_device
        local = self.slot_to_expert[device * s : (device + 1) * s]
        return local[local >= 0]

    def arrays(self, sharding: jax.sharding.Sharding | None = None) -> TableArrays:
        """The table as int32 device arrays (replicated when ``sharding`` is given)."""
        host = TableArrays(self.slot_to_expert, self.expert_slots, self.replica_count)
        if sharding is None:
            return TableArrays(*(jnp.asarray(a) for a in host))
        return TableArrays(*(jax.device_put(a, sharding) for a in host))

    def check_layout(self, *, num_experts: int, num_devices: int, slots_per_device: int) -> None:
        """Raise unless this table fits a layer of the given (E, D, S)."""
        want = (num_experts, num_devices, slots_per_device)
        have = (self.num_experts, self.num_devices, self.slots_per_device)
        if want != have:
            raise ReplicaTableError(
                f"table has (experts, devices, slots_per_device) = {have} but the layer has {want}; "
                "build the table for the layer's config"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReplicaTable):
            return NotImplemented
        return (
            self.num_devices == other.num_devices
            and self.slots_per_device == other.slots_per_device
            and np.array_equal(self.slot_to_expert, other.slot_to_expert)
            and np.array_equal(self.expert_slots, other.expert_slots)
        )

    def __hash__(self) -> int:
        return hash((self.num_devices, self.slots_per_device, self.slot_to_expert.tobytes()))

    def __repr__(self) -> str:
        return (
            f"ReplicaTable(E={self.num_experts}, D={self.num_devices}, S={self.slots_per_device}, "
            f"replicas={int(self.replica_count.sum())}, max_replicas={int(self.replica_count.max())})"
        )


def expert_slot_arrays(slot_to_expert, num_experts: int, r_max: int) -> tuple[np.ndarray, np.ndarray]:
    """``slot_to_expert [..., P]`` -> ``expert_slots [..., E, r_max]`` (-1 padded) and ``replica_count``.

    Vectorised over leading axes, for turning many planned tables into split inputs at once. Slots are
    listed in ascending order; replicas past ``r_max`` are counted but not listed. No validation.
    """
    s2e = np.asarray(slot_to_expert)
    lead, num_slots = s2e.shape[:-1], s2e.shape[-1]
    flat = s2e.reshape(-1, num_slots)
    rows, slots = np.nonzero(flat >= 0)  # row-major, so slots ascend within a row
    experts = flat[rows, slots].astype(np.int64)
    key = rows * num_experts + experts
    order = np.argsort(key, kind="stable")
    first = np.searchsorted(key[order], key[order], side="left")
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size) - first
    count = np.bincount(key, minlength=flat.shape[0] * num_experts).reshape(flat.shape[0], num_experts)
    out = np.full((flat.shape[0], num_experts, r_max), EMPTY, np.int32)
    listed = rank < r_max
    out[rows[listed], experts[listed], rank[listed]] = slots[listed]
    return out.reshape(*lead, num_experts, r_max), count.reshape(*lead, num_experts).astype(np.int32)


def _check_layout(num_experts: int, num_devices: int, slots_per_device: int) -> None:
    for name, value in (
        ("num_experts", num_experts),
        ("num_devices", num_devices),
        ("slots_per_device", slots_per_device),
    ):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ReplicaTableError(f"{name} must be a positive integer, got {value!r}")


def _check_slot_experts(slot_to_expert: np.ndarray, num_experts: int) -> None:
    bad = np.flatnonzero((slot_to_expert < EMPTY) | (slot_to_expert >= num_experts))
    if bad.size:
        p = int(bad[0])
        raise ReplicaTableError(
            f"slot {p} names expert {int(slot_to_expert[p])}, outside 0..{num_experts - 1} "
            "(use -1 for an empty slot)"
        )


def _validate(table: ReplicaTable) -> None:
    """Check the three arrays against each other and the layout rules."""
    _check_layout(table.num_experts, table.num_devices, table.slots_per_device)
    slot_to_expert, expert_slots, replica_count = (
        table.slot_to_expert,
        table.expert_slots,
        table.replica_count,
    )
    num_experts, num_slots, s = table.num_experts, table.num_slots, table.slots_per_device
    if slot_to_expert.shape != (num_slots,):
        raise ReplicaTableError(
            f"slot_to_expert has shape {slot_to_expert.shape}, expected ({num_slots},) = "
            f"num_devices {table.num_devices} x slots_per_device {s}"
        )
    if expert_slots.ndim != 2 or expert_slots.shape[0] != num_experts:
        raise ReplicaTableError(
            f"expert_slots has shape {expert_slots.shape}, expected ({num_experts}, R_max) to match "
            f"replica_count's {num_experts} experts"
        )
    if expert_slots.shape[1] != table.num_devices:
        raise ReplicaTableError(
            f"expert_slots has {expert_slots.shape[1]} columns; R_max must equal num_devices "
            f"{table.num_devices} (at most one replica of an expert per device)"
        )
    _check_slot_experts(slot_to_expert, num_experts)
    out_of_range = np.argwhere((expert_slots < EMPTY) | (expert_slots >= num_slots))
    if out_of_range.size:
        e, j = out_of_range[0]
        raise ReplicaTableError(
            f"expert {e} replica {j} names slot {int(expert_slots[e, j])}, outside 0..{num_slots - 1}"
        )
    seen_slot: dict[int, int] = {}
    for e in range(num_experts):
        n = int(replica_count[e])
        if n < 1:
            raise ReplicaTableError(f"expert {e} has no replica; every expert needs at least one slot")
        row = expert_slots[e]
        if np.any(row[:n] < 0) or np.any(row[n:] != EMPTY):
            raise ReplicaTableError(
                f"expert {e}: replica_count is {n} but expert_slots row is {row.tolist()}; "
                f"the first {n} entries must be slots and the rest -1"
            )
        devices_used: dict[int, int] = {}
        for p in (int(q) for q in row[:n]):
            if p in seen_slot:
                raise ReplicaTableError(f"slot {p} is given twice (to expert {seen_slot[p]} and expert {e})")
            seen_slot[p] = e
            if slot_to_expert[p] != e:
                raise ReplicaTableError(
                    f"expert_slots lists slot {p} for expert {e} but slot_to_expert[{p}] = "
                    f"{int(slot_to_expert[p])}"
                )
            device = p // s
            if device in devices_used:
                raise ReplicaTableError(
                    f"expert {e} has two replicas on device {device} (slots {devices_used[device]} and {p}); "
                    "at most one replica of an expert per device"
                )
            devices_used[device] = p
    filled = np.flatnonzero(slot_to_expert >= 0)
    for p in filled:
        if int(p) not in seen_slot:
            raise ReplicaTableError(
                f"slot {int(p)} serves expert {int(slot_to_expert[p])} but is missing from expert_slots"
            )
