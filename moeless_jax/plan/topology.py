"""Where devices sit: nodes, and NVLink pairs inside a node. Used to prefer short weight copies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.plan.config import TopologyConfig

# Copy distances, shortest first.
SAME_DEVICE, SAME_PAIR, SAME_NODE, OTHER_NODE = 0, 1, 2, 3


@dataclass(frozen=True, eq=False)
class Topology:
    """``node_of_device [D]`` and ``pair_of_device [D]`` (every device its own pair when there are none)."""

    node_of_device: np.ndarray
    pair_of_device: np.ndarray
    locality_slack: float = 0.0

    @classmethod
    def build(cls, num_devices: int, config: TopologyConfig | None = None) -> Topology:
        config = config or TopologyConfig()
        per_node = config.devices_per_node or num_devices
        if num_devices % per_node:
            raise InputError(
                f"{num_devices} devices do not split into nodes of {per_node} (devices_per_node)"
            )
        if config.pairs and num_devices % 2:
            raise InputError(f"pairs need an even number of devices, got {num_devices}")
        device = np.arange(num_devices)
        pair = device // 2 if config.pairs else device
        return cls(device // per_node, pair, float(config.locality_slack))

    def __post_init__(self) -> None:
        # Plain-list copies for the placer's inner loop.
        object.__setattr__(self, "_node", np.asarray(self.node_of_device).tolist())
        object.__setattr__(self, "_pair", np.asarray(self.pair_of_device).tolist())

    def copy_distance(self, sources: list[int], device: int) -> int:
        """Distance from the closest of ``sources`` (devices) to ``device``."""
        node, pair = self._node, self._pair
        best = OTHER_NODE
        for src in sources:
            if src == device:
                return SAME_DEVICE
            if pair[src] == pair[device]:
                best = SAME_PAIR
            elif node[src] == node[device] and best > SAME_NODE:
                best = SAME_NODE
        return best

    @property
    def num_devices(self) -> int:
        return len(self.node_of_device)

    def distance(self, src: np.ndarray | int, dst: np.ndarray | int) -> np.ndarray:
        """Copy distance between devices (broadcasts): 0 same device, 1 same pair, 2 same node, 3 remote."""
        src, dst = np.asarray(src), np.asarray(dst)
        return np.select(
            [
                src == dst,
                self.pair_of_device[src] == self.pair_of_device[dst],
                self.node_of_device[src] == self.node_of_device[dst],
            ],
            [SAME_DEVICE, SAME_PAIR, SAME_NODE],
            OTHER_NODE,
        )
