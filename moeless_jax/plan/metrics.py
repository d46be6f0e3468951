"""How a replica table spreads load over devices, and how balanced that is (DESIGN section 4).

:func:`slot_loads` is the even split the layer performs (:func:`moeless_jax.moe.split.even_quotas`):
integer loads give each replica ``load // count`` tokens and the earliest ``load % count`` replicas (in slot
order) one more; float loads (forecasts) are divided exactly. :func:`tokens_per_device` takes the layer's
``split`` option: ``even`` builds on :func:`slot_loads` (numpy only); ``balanced`` runs the layer's own
quota code (:func:`moeless_jax.moe.split.host_tokens_per_device`, which imports jax) on integer counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moeless_jax.errors import InputError

SPLITS = ("even", "balanced")  # the layer's MoEConfig.split values (moeless_jax.moe.split.SPLITS)

if TYPE_CHECKING:  # planning is numpy only; importing the table module would pull in jax
    from moeless_jax.moe.replica_table import ReplicaTable


def slot_loads(slot_to_expert: np.ndarray, expert_loads: np.ndarray) -> np.ndarray:
    """Tokens each physical slot computes when every expert's load is split evenly over its replicas.

    slot_to_expert: ``[..., P]`` int, -1 for an empty slot; expert_loads: ``[..., E]`` (same leading shape).
    Returns ``[..., P]``, int64 for integer loads and float64 otherwise; empty slots compute 0.
    """
    slot_to_expert = np.asarray(slot_to_expert)
    expert_loads = np.asarray(expert_loads)
    lead, num_slots, num_experts = slot_to_expert.shape[:-1], slot_to_expert.shape[-1], expert_loads.shape[-1]
    if expert_loads.shape[:-1] != lead:
        raise ValueError(
            f"slot_to_expert {slot_to_expert.shape} and expert_loads {expert_loads.shape} disagree"
        )
    rows = int(np.prod(lead, dtype=np.int64))
    s2e = slot_to_expert.reshape(rows, num_slots)
    filled = s2e >= 0
    # One flat key per (row, expert) so a single bincount counts replicas for every row at once.
    key = np.where(filled, s2e + num_experts * np.arange(rows)[:, None], rows * num_experts)
    count = np.bincount(key.ravel(), minlength=rows * num_experts + 1)
    load = np.append(expert_loads.reshape(-1), 0)
    replicas = np.maximum(count[key], 1)
    if load.dtype.kind in "iu":
        flat = key.ravel()
        order = np.argsort(flat, kind="stable")  # slots of one expert, in ascending slot order
        first = np.searchsorted(flat[order], flat[order])
        rank = np.empty(flat.size, np.int64)
        rank[order] = np.arange(flat.size) - first
        rank = rank.reshape(key.shape)
        share = load[key] // replicas + (rank < load[key] % replicas)
    else:
        share = load[key] / replicas
    return np.where(filled, share, 0).reshape(slot_to_expert.shape)


def spread_evenly(total, parts: int) -> np.ndarray:
    """Integer ``total [...]`` spread over ``parts`` places as evenly as integers allow: ``[..., parts]``,
    each ``total // parts`` and the first ``total % parts`` one more (what an Oracle that ignores the gate
    gives every device or slot)."""
    total = np.asarray(total)[..., None]
    return total // parts + (np.arange(parts) < total % parts)


def tokens_per_device(
    slot_to_expert: np.ndarray, expert_loads: np.ndarray, num_devices: int, split: str = "even"
) -> np.ndarray:
    """``[..., D]`` tokens each device computes under the table ``slot_to_expert [..., P]`` when each
    expert's load is split over its replicas by ``split`` (``even``, or ``balanced``: integer loads only)."""
    check_split(split)
    if split == "balanced":
        from moeless_jax.moe.split import host_tokens_per_device

        loads = np.asarray(expert_loads)
        if loads.dtype.kind not in "iu":
            raise InputError(f"split 'balanced' divides token counts: loads must be integers, not "
                             f"{loads.dtype}")
        return host_tokens_per_device(slot_to_expert, loads, num_devices=num_devices, split=split)
    per_slot = slot_loads(slot_to_expert, expert_loads)
    return per_slot.reshape(*per_slot.shape[:-1], num_devices, -1).sum(-1)


def check_split(split: str) -> str:
    """``split`` if it names a split the layer performs, else an error saying which do."""
    if split not in SPLITS:
        raise InputError(f"split: '{split}' is not a split the layer performs; use {' or '.join(SPLITS)}")
    return split


def device_loads(table: ReplicaTable, expert_loads: np.ndarray, split: str = "even") -> np.ndarray:
    """``[D]`` tokens each device of ``table`` computes for ``expert_loads [E]`` under ``split``."""
    return tokens_per_device(table.slot_to_expert, np.asarray(expert_loads), table.num_devices, split)


def balancedness(tokens_per_device: np.ndarray) -> np.ndarray:
    """Mean over devices of tokens computed / max over devices (1.0 is perfect), over the last axis.

    A layer that computes nothing counts as perfectly balanced.
    """
    tokens = np.asarray(tokens_per_device, dtype=np.float64)
    peak = tokens.max(-1)
    return np.where(peak > 0, tokens.mean(-1) / np.where(peak > 0, peak, 1.0), 1.0)


def replica_cv(expert_loads: np.ndarray, replica_count: np.ndarray) -> float:
    """Coefficient of variation (std / mean) of per-replica loads, each expert's load split evenly.

    expert_loads, replica_count: ``[E]``. The population has ``replica_count.sum()`` entries; all-zero loads
    give 0 (nothing to balance).
    """
    loads = np.asarray(expert_loads, dtype=np.float64)
    count = np.asarray(replica_count, dtype=np.float64)
    total, n = loads.sum(), count.sum()
    if total <= 0:
        return 0.0
    mean = total / n
    mean_square = np.sum(loads * loads / count) / n
    return float(np.sqrt(max(mean_square - mean * mean, 0.0)) / mean)
