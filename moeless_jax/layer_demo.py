"""``moeless demo-layer``: the replicated MoE layer on a skewed batch, static table against a MoEless table.

Runs on host CPU devices (8 by default) with an embedded config; no download, no data. The MoEless table is
planned from the batch's own expert counts (a perfect forecast, to show what replication can do), then the
same tokens run through it with the even split and with the balanced split. All three outputs must agree.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from moeless_jax.config import load_config, require, require_positive_ints
from moeless_jax.devices import local_devices


@dataclass(frozen=True)
class DemoConfig:
    """The demo's layer and batch (defaults: the embedded demo; ``configs/demo_layer.yaml`` repeats them)."""

    tokens: int = 2048
    d_model: int = 64
    d_ff: int = 128
    num_experts: int = 8
    top_k: int = 2
    num_devices: int = 8
    slots_per_device: int = 2
    hot_fraction: float = 0.6  # share of tokens pulled toward two hot experts
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive_ints(
            self,
            "tokens", "d_model", "d_ff", "num_experts", "top_k", "num_devices", "slots_per_device"
        )
        require(
            self.tokens % self.num_devices == 0,
            "tokens",
            f"must be divisible by num_devices={self.num_devices}",
        )
        require(
            0.0 <= self.hot_fraction <= 1.0, "hot_fraction", f"must be in [0, 1], got {self.hot_fraction}"
        )


def register(subparsers) -> None:
    p = subparsers.add_parser("demo-layer", help="the replicated MoE layer on a skewed batch (CPU devices)")
    p.add_argument("--config", help="YAML file with DemoConfig fields (default: the embedded demo)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(DemoConfig, args.config) if args.config else DemoConfig()
    report = run_demo(config)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def skewed_tokens(config: DemoConfig, router):
    """Tokens whose ``hot_fraction`` lean toward experts 0 and 1 (a per-batch hot spot)."""
    import jax
    import jax.numpy as jnp

    k_x, k_hot = jax.random.split(jax.random.key(config.seed + 1))
    x = jax.random.normal(k_x, (config.tokens, config.d_model))
    hot_direction = router[:, 0] + router[:, 1]
    hot_direction = hot_direction / jnp.linalg.norm(hot_direction)
    is_hot = jax.random.uniform(k_hot, (config.tokens,)) < config.hot_fraction
    return x + jnp.where(is_hot[:, None], 4.0 * hot_direction * jnp.sqrt(config.d_model), 0.0)


def run_demo(config: DemoConfig) -> dict:
    devices = local_devices(config.num_devices)
    import jax
    import numpy as np
    from flax import nnx

    from moeless_jax.moe import MoEConfig, MoELayer, ReplicaTable, init_mlp_weights, make_ep_mesh
    from moeless_jax.plan import MoEless, SlotLayout, balancedness

    mesh = make_ep_mesh(config.num_devices, devices)
    layer_config = MoEConfig(
        d_model=config.d_model,
        d_ff=config.d_ff,
        num_experts=config.num_experts,
        top_k=config.top_k,
        num_devices=config.num_devices,
        slots_per_device=config.slots_per_device,
    )
    experts = init_mlp_weights(
        jax.random.key(config.seed), (config.num_experts,), config.d_model, config.d_ff, "float32"
    )
    layers = {
        split: MoELayer(
            MoEConfig(**{**asdict(layer_config), "split": split}),
            mesh=mesh,
            rngs=nnx.Rngs(config.seed),
            logical_experts=experts,
        )
        for split in ("even", "balanced")
    }
    step = nnx.jit(lambda layer, x: layer(x))
    x = skewed_tokens(config, layers["even"].router[...])
    with jax.default_device(devices[0]):
        static = step(layers["even"], x)
        counts = np.asarray(static.expert_counts)
        layout = SlotLayout(config.num_experts, config.num_devices, config.slots_per_device)
        table = MoEless(layout, num_layers=1).plan(counts[None]).slot_to_expert[0]
        replicated = ReplicaTable.from_slot_to_expert(
            table,
            num_experts=config.num_experts,
            num_devices=config.num_devices,
            slots_per_device=config.slots_per_device,
        )
        plans = {split: layer.set_table(replicated) for split, layer in layers.items()}
        runs = {"static": static, **{f"moeless_{s}": step(layer, x) for s, layer in layers.items()}}

    def per_device(out):
        return np.asarray(out.slot_counts).reshape(config.num_devices, config.slots_per_device).sum(axis=1)

    report = {
        "config": asdict(config),
        "expert_counts": counts.tolist(),
        "replica_count": replicated.replica_count.tolist(),
    }
    for name, out in runs.items():
        tokens = per_device(out)
        report[name] = {
            "tokens_per_device": tokens.tolist(),
            "balancedness": float(balancedness(tokens)),
            "max_abs_diff_vs_static": float(np.max(np.abs(np.asarray(out.y) - np.asarray(static.y)))),
            "overflow": int(out.overflow),
        }
    report["move_plan"] = plans["even"].summary()
    return report


def format_report(report: dict) -> str:
    lines = [
        f"MoE layer: {report['config']['num_experts']} experts, top-{report['config']['top_k']}, "
        f"{report['config']['num_devices']} devices x {report['config']['slots_per_device']} slots, "
        f"{report['config']['tokens']} tokens (skewed)",
        f"tokens per expert: {report['expert_counts']}",
        f"replicas per expert (MoEless plan from this batch's counts): {report['replica_count']}",
        f"move plan: {report['move_plan']}",
        "",
        f"{'table / split':<18} {'tokens per device':<48} {'balancedness':>12} {'max |y - y_static|':>19}",
    ]
    for name in ("static", "moeless_even", "moeless_balanced"):
        r = report[name]
        lines.append(
            f"{name:<18} {str(r['tokens_per_device']):<48} {r['balancedness']:>12.3f} "
            f"{r['max_abs_diff_vs_static']:>19.2e}"
        )
    return "\n".join(lines)
