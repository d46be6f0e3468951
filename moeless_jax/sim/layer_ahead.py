"""Cost model of replica-table changes: weight copies, and how much of them a step exposes (numpy only).

Installing a new table copies the weights of every slot whose expert changed (a slot left empty costs
nothing). A copy is *local* when the destination device held the expert in another slot of the previous
table, else *remote*: it comes over the links from a device that held the expert. :func:`copy_counts` counts
both per device; :func:`copy_ms` turns counts into time:

    device_ms[d] = local[d] * 2 * expert_bytes / local rate                 (read + write on the device)
                 + [received[d] or sent[d]] * (link latency + max(received[d], sent[d]) * expert_bytes / link)
    move_ms      = max_d device_ms[d]                                        (the slowest device decides)

The link rate is per direction (a device receives and sends at the same time), the latency is paid once per
device per table change (one collective). A remote copy takes its weights from the holder that has sent the
fewest copies so far (ties: the lowest device), so no device's outgoing link is loaded needlessly.

How a step is charged (``layer_ms [L]`` the MoE layers' times, ``move_ms [L]`` each layer's table change):

* between steps (per-step replication, EPLB): copies are not overlapped with anything, so a step costs
  ``sum(layer_ms) + sum(move_ms)`` (:func:`between_steps_ms`);
* layer-ahead: layer ``l + 1``'s table is planned and copied while layer ``l`` runs, so only
  ``max(0, move_ms[l + 1] - layer_ms[l])`` shows; layer 0's table is planned from history at the start of the
  step and its copy is fully exposed; forecasting and planning add ``overhead_ms [L]``
  (:func:`layer_ahead_ms`, per layer :func:`exposed_ahead_ms`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.plan.budget import slot_array

__all__ = [
    "CopyCounts",
    "between_steps_ms",
    "copy_counts",
    "copy_ms",
    "exposed_ahead_ms",
    "layer_ahead_ms",
    "move_ms",
]


@dataclass(frozen=True)
class CopyCounts:
    """Expert copies of one table change, per device.

    local: ``[D]`` copies a device makes from its own previous slots; received / sent: ``[D]`` remote copies
    arriving at / leaving each device (``received.sum() == sent.sum()``).
    """

    local: np.ndarray
    received: np.ndarray
    sent: np.ndarray

    @property
    def copies(self) -> int:
        """Slots that receive weights."""
        return int(self.local.sum() + self.received.sum())


def copy_counts(previous, new, *, num_devices: int, slots_per_device: int) -> CopyCounts:
    """Count the copies that turn table ``previous [P]`` into ``new [P]`` (slot_to_expert, -1 empty).

    Every expert a changed slot receives must have a replica in ``previous`` (true of servable tables).
    """
    previous = _table(previous, "previous", num_devices, slots_per_device)
    new = _table(new, "new", num_devices, slots_per_device)
    device_of_slot = np.arange(previous.size) // slots_per_device
    local = np.zeros(num_devices, np.int64)
    received = np.zeros(num_devices, np.int64)
    sent = np.zeros(num_devices, np.int64)
    for slot in np.flatnonzero((new != previous) & (new >= 0)):
        expert, device = int(new[slot]), int(device_of_slot[slot])
        holders = np.unique(device_of_slot[previous == expert])
        if holders.size == 0:
            raise InputError(
                f"new: slot {int(slot)} receives expert {expert}, which no slot of previous holds; a copy "
                "needs a source (plan from a servable previous table)"
            )
        if device in holders:
            local[device] += 1
            continue
        source = int(holders[np.argmin(sent[holders])])  # argmin keeps the lowest device on ties
        sent[source] += 1
        received[device] += 1
    return CopyCounts(local, received, sent)


def copy_ms(
    counts: CopyCounts, *, expert_bytes: float, local_tbps: float, link_gbps: float, link_latency_us: float
) -> float:
    """Time (ms) to make ``counts``' copies: the slowest device's local copies plus its link time.

    local_tbps: the device's copy rate counting bytes read plus bytes written (so one copy of ``B`` bytes
    moves ``2 B``), TB/s; link_gbps: link rate per direction, GB/s; link_latency_us: paid once by every
    device that sends or receives.
    """
    for name, value in (("expert_bytes", expert_bytes), ("local_tbps", local_tbps), ("link_gbps", link_gbps)):
        if not value > 0:
            raise InputError(f"{name} must be > 0, got {value!r}")
    if not link_latency_us >= 0:
        raise InputError(f"link_latency_us must be >= 0, got {link_latency_us!r}")
    local_ms = counts.local * 2.0 * expert_bytes / (local_tbps * 1e12) * 1e3
    remote = np.maximum(counts.received, counts.sent)
    per_expert_ms = expert_bytes / (link_gbps * 1e9) * 1e3
    link_ms = np.where(remote > 0, link_latency_us / 1e3 + remote * per_expert_ms, 0.0)
    return float(np.max(local_ms + link_ms, initial=0.0))


def move_ms(
    previous,
    new,
    *,
    num_devices: int,
    slots_per_device: int,
    expert_bytes: float,
    local_tbps: float,
    link_gbps: float,
    link_latency_us: float,
) -> float:
    """Time (ms) to install ``new [P]`` over ``previous [P]``: :func:`copy_ms` of :func:`copy_counts`."""
    counts = copy_counts(previous, new, num_devices=num_devices, slots_per_device=slots_per_device)
    return copy_ms(counts, expert_bytes=expert_bytes, local_tbps=local_tbps, link_gbps=link_gbps,
                   link_latency_us=link_latency_us)


def exposed_ahead_ms(layer_ms, move_ms) -> np.ndarray:
    """``[..., L]`` copy time each layer waits for under layer-ahead replication.

    Layer 0's copy is fully exposed (nothing runs before it in the step); layer ``l >= 1``'s copy runs under
    layer ``l - 1`` and shows only past its end: ``max(0, move_ms[l] - layer_ms[l - 1])``.
    """
    layer, move = _pair(layer_ms, move_ms)
    hidden_under = np.concatenate([np.zeros_like(layer[..., :1]), layer[..., :-1]], axis=-1)
    return np.maximum(move - hidden_under, 0.0)


def layer_ahead_ms(layer_ms, move_ms, overhead_ms):
    """Step time (ms) of the MoE layers under layer-ahead replication: layers + exposed copies + overhead.

    layer_ms, move_ms, overhead_ms: ``[..., L]`` (overhead: forecasting and planning each layer's table, on
    the step's critical path). Returns a float for one step, ``[...]`` for several.
    """
    layer, move = _pair(layer_ms, move_ms)
    overhead = np.asarray(overhead_ms, np.float64)
    if overhead.shape != layer.shape:
        raise InputError(f"overhead_ms has shape {overhead.shape}, expected {layer.shape} like layer_ms")
    if np.any(overhead < 0):
        raise InputError("overhead_ms must be >= 0")
    total = layer.sum(-1) + exposed_ahead_ms(layer, move).sum(-1) + overhead.sum(-1)
    return float(total) if total.ndim == 0 else total


def between_steps_ms(layer_ms, move_ms):
    """Step time (ms) of the MoE layers when tables change between steps: every copy is exposed.

    layer_ms, move_ms: ``[..., L]``. Returns a float for one step, ``[...]`` for several.
    """
    layer, move = _pair(layer_ms, move_ms)
    total = layer.sum(-1) + move.sum(-1)
    return float(total) if total.ndim == 0 else total


def _pair(layer_ms, move_ms) -> tuple[np.ndarray, np.ndarray]:
    layer, move = np.asarray(layer_ms, np.float64), np.asarray(move_ms, np.float64)
    if layer.ndim == 0 or layer.shape[-1] == 0:
        raise InputError(f"layer_ms must hold one time per layer [..., L], got shape {layer.shape}")
    if move.shape != layer.shape:
        raise InputError(f"move_ms has shape {move.shape}, expected {layer.shape} like layer_ms")
    if np.any(layer < 0) or np.any(move < 0):
        raise InputError("layer_ms and move_ms must be >= 0")
    return layer, move


def _table(table, name: str, num_devices: int, slots_per_device: int) -> np.ndarray:
    array = slot_array(table, num_devices=num_devices, slots_per_device=slots_per_device, name=name)
    if np.any(array < -1):
        raise InputError(f"{name}: expert ids must be >= -1 (-1 marks an empty slot)")
    return array
