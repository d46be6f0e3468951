"""What serving costs, in the two views the MoEless paper and a cloud bill use.

- **GB·s** (the paper's proxy): the sum over MoE-layer calls of the call's latency times the memory of the
  expert replicas alive during it. A serverless policy holds only its live replicas; a serverful one holds its
  whole deployment for every call.
- **Dollars**: GPU time paid for, priced per GPU-second (``Prices``, from a config). Serverful: every device
  for the whole span of the trace, idle gaps included. Serverless: each replica pays for its warm-up, its busy
  time and its keep-alive, as the share of one GPU's memory it holds.

Pure numpy; times in seconds, sizes in bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moeless_jax.config import require
from moeless_jax.errors import InputError

__all__ = ["Prices", "gb_seconds", "serverful_dollars", "serverless_dollars"]

GB = 1e9


@dataclass(frozen=True)
class Prices:
    """Prices of GPU time (YAML: a ``prices:`` section, e.g. ``configs/prices.yaml``).

    gpu_second_usd: the price of one GPU for one second; gpu_memory_bytes: one GPU's memory, the unit a
    serverless replica's share is measured in (a replica of ``b`` bytes pays ``b / gpu_memory_bytes`` of a
    GPU).
    """

    gpu_second_usd: float
    gpu_memory_bytes: float

    def __post_init__(self) -> None:
        for name in ("gpu_second_usd", "gpu_memory_bytes"):
            value = getattr(self, name)
            require(isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0, name, f"must be a positive number, got {value!r}")


def _non_negative(name: str, value) -> np.ndarray:
    array = np.asarray(value, np.float64)
    if array.dtype.kind not in "f" or not np.isfinite(array).all() or (array < 0).any():
        raise InputError(f"{name} must be finite numbers >= 0")
    return array


def gb_seconds(latency_s, live_bytes) -> float:
    """GB·s of a run: ``sum(latency_s [N] * live_bytes [N]) / 1e9`` over its N MoE-layer calls."""
    latency, live = _non_negative("latency_s", latency_s), _non_negative("live_bytes", live_bytes)
    if latency.shape != live.shape:
        raise InputError(f"latency_s {latency.shape} and live_bytes {live.shape} must have one entry per "
                         "call")
    return float(np.sum(latency * live) / GB)


def serverful_dollars(num_devices: int, span_s: float, prices: Prices) -> float:
    """Dollars of ``num_devices`` GPUs held for the whole ``span_s`` (first arrival to last completion)."""
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise InputError(f"num_devices must be a positive integer, got {num_devices!r}")
    span = float(_non_negative("span_s", span_s))
    return num_devices * span * prices.gpu_second_usd


def serverless_dollars(replica_seconds, replica_bytes, prices: Prices) -> float:
    """Dollars of replicas that each paid for ``replica_seconds [R]`` (warm-up + busy + keep-alive) holding
    ``replica_bytes [R]``: each pays its share of one GPU's memory for its time."""
    seconds = _non_negative("replica_seconds", replica_seconds)
    size = _non_negative("replica_bytes", replica_bytes)
    if seconds.shape != size.shape:
        raise InputError(f"replica_seconds {seconds.shape} and replica_bytes {size.shape} must match")
    return float(np.sum(seconds * size / prices.gpu_memory_bytes) * prices.gpu_second_usd)
