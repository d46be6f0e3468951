"""The static expert-parallel slot layout, shared by the planner (numpy only) and the layer's tables."""

from __future__ import annotations

import numpy as np


def static_slot_to_expert(num_experts: int, num_devices: int, slots_per_device: int) -> np.ndarray:
    """``[P]`` int64 static expert parallelism: expert ``e`` on device ``e % D``, local slot ``e // D``;
    -1 for the slots left empty (P = D * S must hold every expert)."""
    slot_to_expert = np.full(num_devices * slots_per_device, -1, np.int64)
    expert = np.arange(num_experts)
    slot_to_expert[expert % num_devices * slots_per_device + expert // num_devices] = expert
    return slot_to_expert
