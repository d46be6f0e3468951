"""Planner configs: the slot layout, the device topology and each policy's knobs.

All are frozen dataclasses that validate themselves (see :mod:`moeless_jax.config`); ``configs/plan.yaml``
holds an example of each, one top-level section per class, for :func:`moeless_jax.load_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeless_jax.config import is_positive_int, require, require_positive_ints


@dataclass(frozen=True)
class SlotLayout:
    """E logical experts on D devices with S physical slots each (P = D * S slots, slot p on device p // S).

    ``max_replicas`` is the layer's slot (memory) cap: how many slots one layer may fill, ``E <= cap <= P``;
    ``None`` means every slot.
    """

    num_experts: int
    num_devices: int
    slots_per_device: int
    max_replicas: int | None = None

    def __post_init__(self) -> None:
        require_positive_ints(self, "num_experts", "num_devices", "slots_per_device")
        require(
            self.num_slots >= self.num_experts,
            "slots_per_device",
            f"{self.num_devices} devices x {self.slots_per_device} slots = {self.num_slots} slots cannot "
            f"hold {self.num_experts} experts once each; use slots_per_device >= "
            f"{-(-self.num_experts // self.num_devices)}",
        )
        if self.max_replicas is not None:
            require(
                is_positive_int(self.max_replicas)
                and self.num_experts <= self.max_replicas <= self.num_slots,
                "max_replicas",
                f"must be between num_experts {self.num_experts} and the {self.num_slots} slots, "
                f"got {self.max_replicas!r}",
            )

    @property
    def num_slots(self) -> int:
        return self.num_devices * self.slots_per_device

    @property
    def replica_cap(self) -> int:
        """Slots one layer may fill."""
        return self.num_slots if self.max_replicas is None else self.max_replicas


@dataclass(frozen=True)
class TopologyConfig:
    """Devices grouped into nodes (and, inside a node, into pairs joined by NVLink).

    ``devices_per_node``: ``None`` puts every device in one node. ``pairs``: devices ``2i`` and ``2i + 1``
    share a fast link (pairwise-NVLink boxes such as the MoEless paper's 8x A6000). ``locality_slack``: how
    much heavier, as a fraction of the replica's own load, a device may be and still be preferred because a
    copy to it stays closer (same pair, then same node) than a copy to the least-loaded device.
    """

    devices_per_node: int | None = None
    pairs: bool = False
    locality_slack: float = 0.0

    def __post_init__(self) -> None:
        require(
            self.devices_per_node is None or is_positive_int(self.devices_per_node),
            "devices_per_node",
            f"must be a positive integer or null, got {self.devices_per_node!r}",
        )
        require(isinstance(self.pairs, bool), "pairs", f"must be true or false, got {self.pairs!r}")
        require(
            self.devices_per_node is None or not self.pairs or self.devices_per_node % 2 == 0,
            "pairs",
            f"pairs need an even devices_per_node, got {self.devices_per_node}",
        )
        require(
            isinstance(self.locality_slack, int | float)
            and math.isfinite(self.locality_slack)
            and self.locality_slack >= 0,
            "locality_slack",
            f"must be a finite number >= 0, got {self.locality_slack!r}",
        )


@dataclass(frozen=True)
class MoElessConfig:
    """MoEless: forecast -> scaler (Alg. 1) -> placer (Alg. 2), every batch.

    ``cv_target``: the scaler adds replicas until the coefficient of variation (std / mean) of per-replica
    loads is at most this (paper: V = 0.2). ``reuse_warm``: keep replicas already placed by the previous
    table (``false`` is the ablation that places every replica afresh). ``warm_slack``: a warm replica stays
    where it is if its device carries at most this fraction of the mean device load more than the least-loaded
    device
    it could go to instead; ``null`` keeps every warm replica, as the paper's Alg. 2 does (balance then
    drifts while replica counts stay the same).
    """

    cv_target: float = 0.2
    reuse_warm: bool = True
    warm_slack: float | None = 0.03

    def __post_init__(self) -> None:
        require(
            isinstance(self.cv_target, int | float) and math.isfinite(self.cv_target) and self.cv_target >= 0,
            "cv_target",
            f"must be a finite number >= 0, got {self.cv_target!r}",
        )
        require(
            isinstance(self.reuse_warm, bool), "reuse_warm", f"must be true or false, got {self.reuse_warm!r}"
        )
        require(
            self.warm_slack is None
            or (
                isinstance(self.warm_slack, int | float)
                and math.isfinite(self.warm_slack)
                and self.warm_slack >= 0
            ),
            "warm_slack",
            f"must be a finite number >= 0 or null, got {self.warm_slack!r}",
        )


@dataclass(frozen=True)
class EPLBConfig:
    """DeepSeek EPLB: re-plan from the summed loads of the last ``window`` batches every ``period`` batches.

    It fills every slot (the redundant-slot budget is ``D * S - E``). ``num_groups``: expert groups of the
    model (DeepSeek-V3: 8; 1 when the model has none). ``num_nodes``: server nodes. The hierarchical policy
    is used when ``num_groups`` is a multiple of ``num_nodes``, else the global one (as in EPLB). vLLM's
    defaults are a 1000-step window and a 3000-step period.
    """

    window: int = 1000
    period: int = 1
    num_groups: int = 1
    num_nodes: int = 1

    def __post_init__(self) -> None:
        require_positive_ints(self, "window", "period", "num_groups", "num_nodes")


@dataclass(frozen=True)
class TokenDropConfig:
    """Token dropping: each expert computes at most ``ceil(capacity_factor * assignments / E)`` tokens."""

    capacity_factor: float = 1.0

    def __post_init__(self) -> None:
        require(
            isinstance(self.capacity_factor, int | float)
            and math.isfinite(self.capacity_factor)
            and self.capacity_factor > 0,
            "capacity_factor",
            f"must be a finite number > 0, got {self.capacity_factor!r}",
        )


@dataclass(frozen=True)
class ReplicateConfig:
    """The fixed-replication baseline: every expert gets ``replicas`` replicas, placed once.

    ``None``: as many as the layout allows, ``min(D, replica cap // E)``.
    """

    replicas: int | None = None

    def __post_init__(self) -> None:
        require(
            self.replicas is None or is_positive_int(self.replicas),
            "replicas",
            f"must be a positive integer or null (as many as fit), got {self.replicas!r}",
        )
