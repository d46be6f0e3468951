"""Generation with the replication controller in the loop.

:func:`generate_live` runs :func:`moeless_jax.model.generate` and, at every step (the prefill, then each
decode step), hands the step's expert and slot counts to a :class:`~moeless_jax.replication.
ReplicationController`, which re-plans and installs tables between steps. Replicas hold the same weights as
their experts, so the generated tokens are those of the static tables; what changes is how evenly the
devices are loaded, which the run records per step and layer from the slot counts the layers report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moeless_jax.model.transformer import ModelOutput, MoETransformer, generate
from moeless_jax.replication import ControllerConfig, LayerAhead, ReplicationController


@dataclass(frozen=True)
class LiveRun:
    """One generation run.

    tokens: the new tokens of each prompt. balancedness: ``[steps, L]`` mean / max tokens per device of each
    step (prefill first) and layer, measured from the layers' slot counts. seconds: wall time of the run.
    controller: the controller's summary (None without one). weight_copies: ``[steps, L]`` slot weights
    copied inside each step by layer-ahead replication (zeros without it).
    """

    tokens: list[list[int]]
    balancedness: np.ndarray
    seconds: float
    controller: dict[str, Any] | None
    weight_copies: np.ndarray | None = None

    def summary(self) -> dict[str, Any]:
        per_layer = self.balancedness.mean(axis=0)
        return {
            "steps": int(self.balancedness.shape[0]),
            "balancedness_mean": float(per_layer.mean()),
            "balancedness_per_layer": per_layer.round(4).tolist(),
            "seconds": self.seconds,
            "controller": self.controller,
            "layer_ahead_weight_copies": (
                None if self.weight_copies is None else int(self.weight_copies.sum())
            ),
        }


def device_balancedness(slot_counts: np.ndarray, num_devices: int) -> np.ndarray:
    """``slot_counts [L, P]`` -> ``[L]`` mean / max tokens per device (1.0 for a layer with no tokens)."""
    per_device = np.asarray(slot_counts, np.float64).reshape(slot_counts.shape[0], num_devices, -1).sum(-1)
    peak = per_device.max(axis=1)
    return np.where(peak > 0, per_device.mean(axis=1) / np.where(peak > 0, peak, 1), 1.0)


def generate_live(
    model: MoETransformer,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    controller: ControllerConfig | None = None,
    layer_ahead: LayerAhead | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> LiveRun:
    """Generate with ``controller`` driving the model's replica tables between steps and ``layer_ahead``
    inside them (either, both or neither: None leaves the tables as they are)."""
    live = None
    if controller is not None:
        live = ReplicationController(model, controller, tables_change_in_step=layer_ahead is not None)
    devices = model.moe_layers()[0].config.num_devices
    slot_counts: list[Any] = []
    copies: list[Any] = []

    def on_step(out: ModelOutput) -> None:
        slot_counts.append(out.slot_counts)
        copies.append(out.weight_copies)
        if live is not None:
            live.observe(out.expert_counts, out.slot_counts)

    start = time.perf_counter()
    tokens = generate(model, prompt_ids, max_new_tokens, temperature=temperature, seed=seed, eos_id=eos_id,
                      on_step=on_step, layer_ahead=layer_ahead)
    if live is not None:
        live.flush()
    seconds = time.perf_counter() - start
    balance = np.stack([device_balancedness(np.asarray(c), devices) for c in slot_counts])
    per_step = np.stack([np.asarray(c).sum(axis=1) for c in copies])  # [steps, L]
    return LiveRun(tokens, balance, seconds, None if live is None else live.summary(),
                   per_step if layer_ahead is not None else None)
