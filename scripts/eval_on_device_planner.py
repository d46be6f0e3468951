"""On-device planner vs the host planners on real routing -> results/layer_ahead/plan_quality.json (+ .png).

DeepSeek-V2-Lite routing from MoE-Beyond, cut into batches of about ``--batch-tokens`` tokens ([B, L, E]
expert loads, read as scripts/bench_plan.py reads them). For each layout (8 devices x 10 and x 9 slots) and
every (batch, layer), each planner gets the batch's true loads as its forecast and starts from its own table
of the batch before (the static table before the first batch):

- ``moeless_host``: host MoEless (``make_policy("moeless")``, default config), the reference;
- ``eplb_host``: host EPLB on the same single batch's loads (window 1, period 1);
- ``on_device``: :func:`moeless_jax.plan.on_device.plan_on_device`, jitted and vmapped over the layers,
  without a move budget and with ``--budgets`` copies per device at most.

Reported per planner: max device load (each expert's load split evenly over its replicas) over host
MoEless's, mean and p99 over (batch, layer); mean balancedness (mean / max device load); slots copied per
layer; and ``plan_quality_vs_host``, the mean ratio of the unbudgeted on-device planner. Also the CPU time of
one jitted on-device plan of all layers after warm-up (CPU, measured) and host MoEless's planning time.

Usage:
  python scripts/eval_on_device_planner.py --data-dir DATA [--out results/layer_ahead/plan_quality.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moeless_jax.plan import EPLBConfig, SlotLayout, balancedness, make_policy, tokens_per_device  # noqa: E402
from moeless_jax.plan.on_device import plan_on_device  # noqa: E402
from moeless_jax.provenance import cpu_name, write_json  # noqa: E402

LAYOUTS = ((8, 10), (8, 9))  # (devices, slots per device)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding moe-beyond/")
    p.add_argument("--out", default="results/layer_ahead/plan_quality.json")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--budgets", type=int, nargs="*", default=[1, 2, 4], help="copies per device at most")
    p.add_argument("--timing-repeats", type=int, default=50, help="timed on-device plans per variant")
    return p.parse_args(argv)


def trace_loads(data_dir: Path, batch_tokens: int) -> np.ndarray:
    from moeless_jax.traces import expert_loads, read_moe_beyond, token_budget_batches

    trace = read_moe_beyond(data_dir / "moe-beyond")
    return expert_loads(trace, token_budget_batches(trace, batch_tokens))  # [B, L, E]


def variant_name(budget: int | None) -> str:
    return "on_device" if budget is None else f"on_device_budget{budget}"


def on_device_planners(devices: int, slots: int, budgets: list[int]) -> dict:
    return {
        variant_name(budget): jax.jit(
            jax.vmap(
                partial(
                    plan_on_device, num_devices=devices, slots_per_device=slots, max_moves_per_device=budget
                )
            )
        )
        for budget in [None, *budgets]
    }


def evaluate_layout(loads: np.ndarray, devices: int, slots: int, args) -> tuple[dict, dict]:
    """Per-planner summary and ``[B, L]`` max device loads for one layout."""
    num_batches, num_layers, num_experts = loads.shape
    layout = SlotLayout(num_experts, devices, slots)
    moeless = make_policy("moeless", layout, num_layers)
    eplb = make_policy("eplb", layout, num_layers, eplb=EPLBConfig(window=1, period=1))
    planners = on_device_planners(devices, slots, args.budgets)
    tables = {name: jnp.asarray(moeless.static, jnp.int32)[None].repeat(num_layers, 0) for name in planners}
    peak = {name: [] for name in ("moeless_host", "eplb_host", *planners)}
    balance = {name: [] for name in peak}
    moved = {name: [] for name in peak}
    host_seconds = []
    for batch in tqdm(loads, desc=f"{devices} x {slots} slots", leave=False):
        exact = batch.astype(np.float64)
        decision = moeless.plan(batch)  # perfect forecast: the batch's true loads
        host_seconds.append(decision.seconds)
        results = {"moeless_host": (decision.slot_to_expert, decision.moved_slots)}
        eplb.observe(batch)  # EPLB plans from what it has seen: this batch alone (window 1)
        decision = eplb.plan()
        results["eplb_host"] = (decision.slot_to_expert, decision.moved_slots)
        forecast = jnp.asarray(batch, jnp.float32)
        for name, plan in planners.items():
            new = plan(forecast, tables[name]).slot_to_expert
            old = np.asarray(tables[name])
            table = np.asarray(new)
            results[name] = (table, ((table != old) & (table >= 0)).sum(-1))
            tables[name] = new
        for name, (table, copies) in results.items():
            tokens = tokens_per_device(table, exact, devices)  # [L, D]
            peak[name].append(tokens.max(-1))
            balance[name].append(balancedness(tokens))
            moved[name].append(np.asarray(copies))
    peak = {name: np.stack(v) for name, v in peak.items()}  # [B, L]
    reference = peak["moeless_host"]
    summary = {}
    for name in peak:
        ratio = peak[name] / reference
        summary[name] = {
            "max_load_vs_moeless_host_mean": float(ratio.mean()),
            "max_load_vs_moeless_host_p99": float(np.quantile(ratio, 0.99)),
            "max_load_vs_moeless_host_max": float(ratio.max()),
            "balancedness_mean": float(np.mean(balance[name])),
            "moved_slots_per_layer_mean": float(np.mean(moved[name])),
        }
    summary["plan_quality_vs_host"] = summary["on_device"]["max_load_vs_moeless_host_mean"]
    summary["timing"] = time_planners(planners, loads, tables, args.timing_repeats)
    summary["timing"]["moeless_host_ms_per_batch_median"] = 1e3 * float(np.median(host_seconds))  # all layers
    return summary, peak


def time_planners(planners: dict, loads: np.ndarray, tables: dict, repeats: int) -> dict:
    """Median wall time of one jitted plan of all layers (CPU, measured), after a warm-up call."""
    forecast = jnp.asarray(loads[-1], jnp.float32)
    timing = {}
    for name, plan in planners.items():
        jax.block_until_ready(plan(forecast, tables[name]))
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(plan(forecast, tables[name]))
            seconds.append(time.perf_counter() - start)
        timing[f"{name}_ms_per_plan_all_layers_median"] = 1e3 * float(np.median(seconds))
        timing[f"{name}_us_per_layer_median"] = 1e6 * float(np.median(seconds)) / loads.shape[1]
    return timing


def planner_names(budgets: list[int]) -> list[str]:
    return ["moeless_host", "eplb_host", *(variant_name(b) for b in [None, *budgets])]


def plot(path: Path, summaries: dict, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / len(summaries)
    x = np.arange(len(names))
    for k, (label, summary) in enumerate(summaries.items()):
        offset = (k - (len(summaries) - 1) / 2) * width
        mean = [summary[n]["max_load_vs_moeless_host_mean"] for n in names]
        p99 = [summary[n]["max_load_vs_moeless_host_p99"] for n in names]
        axes[0].bar(x + offset, mean, width, label=f"{label} mean")
        axes[0].scatter(x + offset, p99, marker="_", s=200, color="black", zorder=3)
        moved = [summary[n]["moved_slots_per_layer_mean"] for n in names]
        axes[1].bar(x + offset, moved, width, label=label)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylim(0.9, max(1.1, axes[0].get_ylim()[1]))
    axes[0].set_ylabel("max device load / host MoEless's (bar: mean, tick: p99)")
    axes[0].set_title("Plan quality, DeepSeek-V2-Lite routing (computed)")
    axes[1].set_ylabel("slots copied per layer per batch")
    axes[1].set_title("Weight copies")
    for ax in axes:
        ax.set_xticks(x, names, rotation=25, ha="right")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    loads = trace_loads(Path(args.data_dir), args.batch_tokens)
    num_batches, num_layers, num_experts = loads.shape
    summaries = {}
    for devices, slots in LAYOUTS:
        summaries[f"{devices}x{slots}"], _ = evaluate_layout(loads, devices, slots, args)
    out = Path(args.out)
    summary = {
        "methods": {"quality": "computed", "on_device_time": "CPU, measured", "host_time": "CPU, measured"},
        "layouts": summaries,
        "plan_quality_vs_host": {name: s["plan_quality_vs_host"] for name, s in summaries.items()},
        "setup": {
            "trace": "MoE-Beyond DeepSeek-V2-Lite-Chat routing (Puffin prompts), prefill",
            "batches": num_batches,
            "layers": num_layers,
            "experts": num_experts,
            "batch_tokens": args.batch_tokens,
            "forecast": "perfect (each batch's true loads), for every planner",
            "previous_table": "each planner's own table of the batch before, per layer; static at first",
            "moeless_host": "make_policy('moeless'), default MoElessConfig",
            "eplb_host": "make_policy('eplb') with window 1, period 1: planned from the same batch's loads",
            "on_device": "plan_on_device jitted and vmapped over layers, default warm_slack; budgets: "
            f"{args.budgets} copies per device",
            "max_load": "tokens_per_device with float loads (even split), max over devices",
            "timing": f"median of {args.timing_repeats} jitted calls planning all {num_layers} layers, after "
            "a warm-up call; label: CPU, measured",
        },
    }
    note = (
        "plan quality computed from the routing trace; on-device planner times measured on the CPU named in "
        "'device' (CPU, measured; not a GPU figure)"
    )
    path = write_json(out, summary, method="computed", device=cpu_name(), note=note)
    plot(out.with_suffix(".png"), summaries, planner_names(args.budgets))
    print(f"wrote {path} and {out.with_suffix('.png')}")
    for name, s in summaries.items():
        print(f"  {name}: plan_quality_vs_host {s['plan_quality_vs_host']:.4f}")
        for planner in planner_names(args.budgets):
            r = s[planner]
            print(
                f"    {planner:22s} ratio mean {r['max_load_vs_moeless_host_mean']:.4f} "
                f"p99 {r['max_load_vs_moeless_host_p99']:.4f}  balancedness {r['balancedness_mean']:.4f}  "
                f"moves/layer {r['moved_slots_per_layer_mean']:.1f}"
            )
        for key, value in s["timing"].items():
            print(f"    {key}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
