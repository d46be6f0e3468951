"""``moeless plan``: one planning decision for a layers x experts load matrix.

``moeless plan --loads FILE --devices D --slots-per-device S --policy NAME [--cv 0.2] [--split even]
[--config YAML] [--json]``

FILE (``.npy`` or ``.csv``) holds the loads of one batch. MoEless takes them as its (perfect) forecast; EPLB
takes them as its history window; static EP, replicate, Oracle and token drop ignore them when planning. The
tables are then scored on the same loads, each expert's tokens divided over its replicas by ``--split``
(``even``, or ``balanced``: the layer's in-step quotas; integer token counts only). ``--json`` prints one
JSON object (``balancedness`` per layer, ``replica_count [L][E]``, ``slot_to_expert [L][P]``, ``seconds`` of
planning, ...); otherwise a short table. Imports no jax unless ``--split balanced`` (planning is numpy).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

POLICY_NAMES = ("static", "eplb", "moeless", "oracle", "tokendrop", "replicate")  # moeless_jax.plan.policies
SPLIT_NAMES = ("even", "balanced")  # moeless_jax.plan.metrics.SPLITS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="plan replica tables for a layers x experts load matrix",
        description="Plan one batch's replica tables with a policy and report their balancedness.",
    )
    parser.add_argument("--loads", required=True, type=Path, help="layers x experts loads (.npy or .csv)")
    parser.add_argument("--devices", required=True, type=int, help="devices D on the expert-parallel axis")
    parser.add_argument(
        "--slots-per-device", required=True, type=int, help="physical expert slots S per device"
    )
    parser.add_argument("--policy", required=True, choices=POLICY_NAMES, help="planning policy")
    parser.add_argument(
        "--cv", type=float, help="MoEless scaler target: CV of per-replica loads (default 0.2)"
    )
    parser.add_argument(
        "--split",
        choices=SPLIT_NAMES,
        default="even",
        help="how the layer divides an expert's tokens over its replicas (default even)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML with optional sections moeless, eplb, tokendrop, replicate, topology (configs/plan.yaml)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moeless_jax.plan import SlotLayout, make_policy, read_loads

    loads = read_loads(args.loads)
    num_layers, num_experts = loads.shape
    layout = SlotLayout(num_experts, args.devices, args.slots_per_device)
    configs = _configs(args, layout.num_devices)
    policy = make_policy(args.policy, layout, num_layers, **configs, split=args.split)
    if args.policy == "eplb":
        policy.observe(loads)  # the file is EPLB's history window
    start = time.perf_counter()
    decision = policy.plan(loads if args.policy == "moeless" else None)
    seconds = time.perf_counter() - start
    outcome = policy.observe(loads)
    slot_to_expert = decision.slot_to_expert
    replica_count = np.stack([np.bincount(row[row >= 0], minlength=num_experts) for row in slot_to_expert])
    result = {
        "policy": args.policy,
        "layers": num_layers,
        "experts": num_experts,
        "devices": layout.num_devices,
        "slots_per_device": layout.slots_per_device,
        "changes_outputs": policy.changes_outputs,
        "split": policy.split,
        "balancedness": outcome.balancedness.tolist(),
        "balancedness_mean": float(outcome.balancedness.mean()),
        "max_device_tokens": outcome.tokens_per_device.max(-1).tolist(),
        "dropped_tokens": outcome.dropped_tokens.tolist(),
        "slots_used": decision.slots_used.tolist(),
        "replica_count": replica_count.tolist(),
        "slot_to_expert": slot_to_expert.tolist(),
        "seconds": seconds,
    }
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0


def _configs(args: argparse.Namespace, num_devices: int) -> dict:
    """Policy configs from ``--config`` sections, with ``--cv`` overriding the MoEless target."""
    import dataclasses

    from moeless_jax.config import ConfigError, load_config
    from moeless_jax.plan import (
        EPLBConfig,
        MoElessConfig,
        ReplicateConfig,
        TokenDropConfig,
        Topology,
        TopologyConfig,
    )

    sections = {
        "moeless": MoElessConfig,
        "eplb": EPLBConfig,
        "tokendrop": TokenDropConfig,
        "replicate": ReplicateConfig,
    }
    configs: dict = {name: None for name in sections}
    topology = None
    if args.config is not None:
        import yaml

        if not args.config.is_file():
            raise ConfigError(f"{args.config}: no such config file")
        present = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(present, dict):
            raise ConfigError(f"{args.config}: expected a mapping of sections")
        unknown = sorted(set(present) - {*sections, "topology"})
        if unknown:
            raise ConfigError(
                f"{args.config}: unknown section(s) {unknown}; known: {', '.join(sections)}, topology"
            )
        for name, cls in sections.items():
            if name in present:
                configs[name] = load_config(cls, args.config, section=name)
        if "topology" in present:
            topology = Topology.build(
                num_devices, load_config(TopologyConfig, args.config, section="topology")
            )
    if args.cv is not None:
        configs["moeless"] = dataclasses.replace(configs["moeless"] or MoElessConfig(), cv_target=args.cv)
    return {**configs, "topology": topology}


def _print_table(result: dict) -> None:
    changes = " (changes model outputs)" if result["changes_outputs"] else ""
    print(
        f"policy {result['policy']}{changes}: {result['layers']} layers, {result['experts']} experts, "
        f"{result['devices']} devices x {result['slots_per_device']} slots, {result['split']} split"
    )
    print(f"{'layer':>5}  {'balancedness':>12}  {'slots used':>10}  {'max device tokens':>17}")
    for layer, (bal, used, peak) in enumerate(
        zip(result["balancedness"], result["slots_used"], result["max_device_tokens"], strict=True)
    ):
        print(f"{layer:>5}  {bal:>12.4f}  {used:>10}  {peak:>17.6g}")
    print(f"mean balancedness {result['balancedness_mean']:.4f}; planned in {result['seconds'] * 1e3:.3f} ms")
