"""Planner benchmark -> results/plan/summary.json and summary.png.

Two parts, one summary:

1. Decision time per layer (measured on this machine's CPU): MoEless (scaler + placer + static-EP guard, from
   the table in use; default warm slack, and the paper's keep-every-warm-replica rule) and the numpy port of
   DeepSeek's EPLB (``rebalance_experts`` on one layer), over
   ``--plans`` consecutive plans of synthetic skewed loads, for (E, D, S) = (8, 8, 2), (64, 8, 10),
   (256, 64, 5), (256, 320, 1). Both get the same loads; calls alternate so machine noise hits both alike.
   Medians of wall-clock and of thread CPU time are reported. Checking the load matrix, common to both, is
   not timed.
2. Balancedness on real routing (computed): DeepSeek-V2-Lite routing from MoE-Beyond cut into batches of
   about ``--batch-tokens`` tokens, on ``--devices`` devices with ``--slots-per-device`` slots: static EP,
   EPLB (same slots, planned from the previous batches' loads), MoEless with perfect forecasts (the batch's
   true loads), MoEless with the paper's unconditional warm reuse, and the output-changing Oracle and token
   drop for reference. Skipped when ``--data-dir`` is not given.

Usage:
  python scripts/bench_plan.py --data-dir DATA [--out-dir results/plan]

DATA is the folder holding ``moe-beyond/`` (see docs/traces.md for where the traces come from).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moeless_jax.plan import (  # noqa: E402
    EPLBConfig,
    MoElessConfig,
    SlotLayout,
    TokenDropConfig,
    make_policy,
    rebalance_experts,
)
from moeless_jax.provenance import cpu_name, write_json  # noqa: E402

# (experts, devices, slots per device, top-k, name): Mixtral-8x7B on 8 devices, DeepSeek-V2-Lite on 8,
# DeepSeek-V3 on 64, and DeepSeek-V3 as deployed for decoding on 320 GPUs (one slot each; 64 redundant).
TIMING_CONFIGS = (
    (8, 8, 2, 2, "8x8"),
    (64, 8, 10, 6, "64x8"),
    (256, 64, 5, 8, "256x64"),
    (256, 320, 1, 8, "256x320"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", help="folder holding moe-beyond/ (balancedness part; skipped without it)")
    p.add_argument("--out-dir", default="results/plan")
    p.add_argument("--plans", type=int, default=1000, help="plans timed per configuration")
    p.add_argument(
        "--tokens-per-plan", type=int, default=4096, help="tokens behind each synthetic load vector"
    )
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--slots-per-device", type=int, default=9, help="64 experts + 1 redundant slot per device")
    p.add_argument("--eplb-window", type=int, default=1000, help="batches of history EPLB sums")
    p.add_argument("--eplb-period", type=int, default=1, help="EPLB re-plans every this many batches")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ decision time
def synthetic_loads(
    rng: np.random.Generator, experts: int, top_k: int, tokens: int, plans: int
) -> np.ndarray:
    """``[plans, E]`` token counts: a fixed skewed popularity, re-drawn around it for every batch."""
    popularity = rng.dirichlet(np.full(experts, 0.5))
    batch_popularity = rng.dirichlet(popularity * experts * 2.0, size=plans)
    return np.stack([rng.multinomial(tokens * top_k, p) for p in batch_popularity]).astype(np.int64)


def time_config(experts, devices, slots, top_k, args, rng) -> dict:
    """Median decision times over ``args.plans`` consecutive plans, each policy from its own last table."""
    loads = synthetic_loads(rng, experts, top_k, args.tokens_per_plan, args.plans)
    layout = SlotLayout(experts, devices, slots)
    planners = {
        "moeless": make_policy("moeless", layout, 1),
        "moeless_paper": make_policy("moeless", layout, 1, moeless=MoElessConfig(warm_slack=None)),
    }
    previous = {name: planner.static.copy() for name, planner in planners.items()}
    wall: dict[str, list[float]] = {name: [] for name in (*planners, "eplb")}
    cpu: dict[str, list[float]] = {name: [] for name in wall}
    used, fallbacks = [], 0
    for row in tqdm(loads, desc=f"time E={experts} D={devices} S={slots}", leave=False):
        for name, planner in planners.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            table, fell_back = planner.plan_layer(row, previous[name])
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.thread_time() - c0)
            previous[name] = table
            if name == "moeless":
                fallbacks += fell_back
        w0, c0 = time.perf_counter(), time.thread_time()
        rebalance_experts(row[None, :], layout.num_slots, 1, 1, devices)
        wall["eplb"].append(time.perf_counter() - w0)
        cpu["eplb"].append(time.thread_time() - c0)
        used.append(int((previous["moeless"] >= 0).sum()))
    row = {"experts": experts, "devices": devices, "slots_per_device": slots, "top_k": top_k}
    for name in wall:
        row[f"{name}_wall_us"] = 1e6 * float(np.median(wall[name]))
        row[f"{name}_cpu_us"] = 1e6 * float(np.median(cpu[name]))
        row[f"{name}_wall_p99_us"] = 1e6 * float(np.quantile(wall[name], 0.99))
    row["moeless_slots_used_mean"] = float(np.mean(used))
    row["moeless_fallbacks"] = fallbacks
    return row


def timing_part(args) -> tuple[dict, dict]:
    rng = np.random.default_rng(args.seed)
    rows = {name: time_config(e, d, s, k, args, rng) for e, d, s, k, name in TIMING_CONFIGS}
    flat = {}
    for name, row in rows.items():
        scale, unit = (1e-3, "ms") if name == "256x320" else (1.0, "us")
        for policy in ("moeless", "moeless_paper", "eplb"):
            flat[f"{policy}_{unit}_per_layer_{name}"] = row[f"{policy}_wall_us"] * scale
            flat[f"{policy}_cpu_{unit}_per_layer_{name}"] = row[f"{policy}_cpu_us"] * scale
    flat["moeless_never_slower_than_eplb"] = all(
        r["moeless_wall_us"] <= r["eplb_wall_us"] and r["moeless_cpu_us"] <= r["eplb_cpu_us"]
        for r in rows.values()
    )
    return flat, rows


# ------------------------------------------------------------------------------------------ balancedness
def trace_loads(data_dir: Path, batch_tokens: int) -> np.ndarray:
    from moeless_jax.traces import expert_loads, read_moe_beyond, token_budget_batches

    trace = read_moe_beyond(data_dir / "moe-beyond")
    return expert_loads(trace, token_budget_batches(trace, batch_tokens))  # [B, L, E]


def balance_part(loads: np.ndarray, args) -> tuple[dict, dict]:
    num_batches, num_layers, num_experts = loads.shape
    layout = SlotLayout(num_experts, args.devices, args.slots_per_device)
    eplb_config = EPLBConfig(window=args.eplb_window, period=args.eplb_period)
    policies = {
        "static": make_policy("static", layout, num_layers),
        "eplb": make_policy("eplb", layout, num_layers, eplb=eplb_config),
        "moeless": make_policy("moeless", layout, num_layers),
        "moeless_paper": make_policy("moeless", layout, num_layers, moeless=MoElessConfig(warm_slack=None)),
        "oracle": make_policy("oracle", layout, num_layers),
        "tokendrop": make_policy("tokendrop", layout, num_layers, tokendrop=TokenDropConfig(1.0)),
    }
    per_batch = {name: [] for name in policies}
    slots = {name: [] for name in policies}
    moved = {name: [] for name in policies}
    dropped, fallbacks = 0, 0
    for batch in tqdm(loads, desc="balancedness", leave=False):
        for name, policy in policies.items():
            decision = policy.plan(batch if name.startswith("moeless") else None)  # perfect forecast
            outcome = policy.observe(batch)
            per_batch[name].append(outcome.balancedness)  # [L]
            slots[name].append(decision.slots_used)
            moved[name].append(decision.moved_slots)
            if name == "tokendrop":
                dropped += int(outcome.dropped_tokens.sum())
            if name == "moeless":
                fallbacks += decision.fallbacks
    curves = {name: np.stack(v) for name, v in per_batch.items()}  # [B, L]
    summary = {f"balancedness_{name}_mean": float(v.mean()) for name, v in curves.items()}
    summary |= {f"balancedness_{name}_min": float(v.min()) for name, v in curves.items()}
    summary |= {
        "slots_static": layout.num_experts,
        "slots_eplb": layout.num_slots,
        "slots_eplb_mean": float(np.mean(slots["eplb"])),
        "slots_moeless_mean": float(np.mean(slots["moeless"])),
        "slots_moeless_max": int(np.max(slots["moeless"])),
        "moved_slots_per_layer_batch_eplb": float(np.mean(moved["eplb"])),
        "moved_slots_per_layer_batch_moeless": float(np.mean(moved["moeless"])),
        "moved_slots_per_layer_batch_moeless_paper": float(np.mean(moved["moeless_paper"])),
        "moeless_fallback_layers": fallbacks,
        "tokendrop_dropped_fraction": dropped / float(loads.sum()),
        "trace": {
            "source": "MoE-Beyond DeepSeek-V2-Lite-Chat routing (Puffin prompts), prefill",
            "batches": num_batches,
            "layers": num_layers,
            "experts": num_experts,
            "batch_tokens": args.batch_tokens,
            "devices": args.devices,
            "slots_per_device": args.slots_per_device,
            "eplb_window_batches": args.eplb_window,
            "eplb_period_batches": args.eplb_period,
            "eplb_first_batch": "static table (no history yet)",
            "moeless_forecast": "perfect (the batch's true loads)",
            "tokendrop_capacity_factor": 1.0,
        },
    }
    return summary, curves


# ------------------------------------------------------------------------------------------------- output
POLICY_ORDER = ("static", "eplb", "moeless_paper", "moeless", "tokendrop", "oracle")
POLICY_COLORS = ("grey", "tab:orange", "tab:cyan", "tab:blue", "tab:red", "tab:green")


def plot(path: Path, rows: dict, curves: dict | None) -> None:
    """Decision time per configuration; with a trace, mean balancedness per policy and per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if curves else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.4), squeeze=False)
    ax = axes[0, 0]
    names = list(rows)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [rows[n]["moeless_wall_us"] for n in names], 0.4, label="MoEless")
    ax.bar(x + 0.2, [rows[n]["eplb_wall_us"] for n in names], 0.4, label="EPLB port")
    ax.set_xticks(x, [f"E x D\n{n}" for n in names])
    ax.set_yscale("log")
    ax.set_ylabel("median decision time per layer (us)")
    ax.set_title("Planning time (measured, CPU)")
    ax.legend()
    if curves:
        ax = axes[0, 1]
        means = [curves[n].mean() for n in POLICY_ORDER]
        ax.bar(POLICY_ORDER, means, color=POLICY_COLORS)
        for i, m in enumerate(means):
            ax.text(i, m + 0.005, f"{m:.3f}", ha="center", fontsize=8)
        ax.set_ylim(0.7, 1.02)
        ax.set_ylabel("mean balancedness (mean / max device tokens)")
        ax.set_title("DeepSeek-V2-Lite routing, 8 devices (computed)")
        ax.tick_params(axis="x", rotation=30)
        ax = axes[0, 2]
        for name, color in zip(POLICY_ORDER, POLICY_COLORS, strict=True):
            ax.plot(curves[name].mean(-1), marker=".", color=color, label=name)
        ax.set_xlabel("batch (about 4096 tokens)")
        ax.set_ylabel("balancedness, mean over layers")
        ax.set_title("Per batch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    timing, rows = timing_part(args)
    summary = {"methods": {"decision_time": "measured", "balancedness": "computed"}, **timing}
    curves = None
    if args.data_dir:
        balance, curves = balance_part(trace_loads(Path(args.data_dir), args.batch_tokens), args)
        summary |= balance
    summary["timing_detail"] = rows
    summary["timing_setup"] = {
        "plans": args.plans,
        "tokens_per_plan": args.tokens_per_plan,
        "loads": "multinomial(tokens * top_k, Dirichlet(2E * p)), p ~ Dirichlet(0.5), fixed per config",
        "moeless": "MoEless.plan_layer: scaler + placer + static-EP guard, from the table in use",
        "moeless_paper": "the same with warm_slack=None (keep every warm replica, the paper's Alg. 2)",
        "eplb": "rebalance_experts on one layer (global policy: 1 group, 1 node), all slots filled",
        "clock": "median of time.perf_counter (wall) and time.thread_time (CPU) per call",
    }
    device = cpu_name()
    note = (
        "decision times measured on the CPU named in 'device' (shared machine: wall times include "
        "contention, CPU times do not); balancedness computed from the routing trace"
    )
    path = write_json(out_dir / "summary.json", summary, method="measured", device=device, note=note)
    plot(out_dir / "summary.png", rows, curves)
    print(f"wrote {path} and {out_dir / 'summary.png'}")
    for key in (
        "moeless_us_per_layer_64x8",
        "eplb_us_per_layer_64x8",
        "moeless_ms_per_layer_256x320",
        "eplb_ms_per_layer_256x320",
        "balancedness_static_mean",
        "balancedness_eplb_mean",
        "balancedness_moeless_mean",
        "slots_eplb",
        "slots_moeless_mean",
    ):
        if key in summary:
            print(f"  {key}: {summary[key]:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
