"""Emulated 8-device MoE-layer latency on one GPU, real-trace routing -> results/emulate/summary.json (+ PNG).

DeepSeek-V2-Lite routing (MoE-Beyond), prompts split 70:30 (seed 0), the test prompts served in windows of
``--window-s`` seconds of the Azure conversation arrivals (a larger window than the paper's 1 s gives
serving-sized batches). A sample of (batch, layer) pairs is served on ``--devices`` devices with
``--slot-budget`` x E slots by each policy:

* ``static``: one replica per expert, round-robin (static EP);
* ``eplb``: DeepSeek EPLB re-planned every batch from the loads of all batches before;
* ``moeless``: MoEless tables planned from the RoutingOnly forecast (distance 1; layer 0 from history);
* ``moeless_perfect``: MoEless tables planned from the batch's true loads (forecast upper bound);
* ``oracle``: every slot gets the same rows (changes outputs; the balance bound).

each with the ``even`` and the ``balanced`` split (same quota code as the layer). For each, every device's
share of the expert computation is run and timed on the local GPU (:mod:`moeless_jax.sim.emulate`), for the
``capacity`` kernel (each device the smallest of its compiled slot capacities that holds its fullest slot,
as the kernel picks it in the step) and the ``ragged`` kernel; the layer's
latency = slowest device's measured compute + modelled dispatch and combine all-to-alls (the calibration's
NVLink constants). The calibrated latency model's prediction for the same rows is reported beside it.

Usage (on the GPU, from the repo root):
  python scripts/emulate_layer.py --data-dir DATA [--out-dir results/emulate] [--samples 48]
  python scripts/emulate_layer.py --check-model [--out-dir results/emulate]    # anywhere, no GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name: (d_model, d_ff) of one routed expert; the routing trace fixes E = 64, K = 6.
SHAPES = {"dsv2lite": (2048, 1408), "tiny": (64, 128)}  # tiny: quick runs on a CPU
POLICIES = ("static", "eplb", "moeless", "moeless_perfect", "oracle")
SPLITS = ("even", "balanced")
KERNELS = ("capacity", "ragged")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, help="folder with moe-beyond/ and azure-llm-2023/")
    p.add_argument("--check-model", action="store_true",
                   help="no GPU: score OUT/summary.json's samples with the latency model -> model_check.json")
    p.add_argument("--out-dir", type=Path, default=Path("results/emulate"))
    p.add_argument("--calibration", type=Path, default=Path("results/gpu/calibration-h200.json"))
    p.add_argument("--window-s", type=float, default=16.0, help="arrival window per batch (seconds)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--slot-budget", type=float, default=1.25, help="slots = budget x experts")
    p.add_argument("--samples", type=int, default=48, help="(batch, layer) pairs emulated")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    p.add_argument("--shape", choices=sorted(SHAPES), default="dsv2lite")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, help="YAML with a routing_only section (default: built-in config)")
    return p.parse_args(argv)


def batches_and_forecasts(args):
    """The served (test) trace, its batches, their true loads ``[B, L, E]`` and the RoutingOnly forecasts
    ``[B, L, E]``."""
    from tqdm import tqdm

    from moeless_jax.config import load_config
    from moeless_jax.predict import RoutingOnly, RoutingOnlyConfig
    from moeless_jax.traces import expert_loads, read_azure_arrivals, read_moe_beyond, window_batches

    trace = read_moe_beyond(args.data_dir / "moe-beyond")
    fit, test = trace.split_by_request(0.7, seed=0)
    arrivals = read_azure_arrivals(args.data_dir / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv")
    batches = window_batches(test, arrivals, window_s=args.window_s)
    loads = expert_loads(test, batches)
    config = load_config(RoutingOnlyConfig, args.config, section="routing_only") if args.config else None
    predictor = RoutingOnly(distance=1, config=config).fit(fit)
    forecast = np.zeros(loads.shape, np.float64)
    past = np.zeros(loads.shape[1:], np.float64)
    for b, batch in enumerate(tqdm(batches, desc="forecasts")):
        first = past[0] if past[0].sum() > 0 else np.ones(loads.shape[2])
        forecast[b, 0] = first / first.sum() * loads[b, 0].sum()  # no source layer: history
        forecast[b, 1:] = predictor.predict(test, batch)
        predictor.observe(loads[b])
        past += loads[b]
    return test, batches, loads, forecast


def plan_tables(loads: np.ndarray, forecast: np.ndarray, args):
    """(``[B, L, P]`` slot_to_expert per policy (oracle: the static table), the slot layout)."""
    from moeless_jax.plan import MoElessConfig, SlotLayout, make_policy

    num_batches, num_layers, num_experts = loads.shape
    slots = round(args.slot_budget * num_experts / args.devices)
    layout = SlotLayout(num_experts, args.devices, slots)
    moeless = MoElessConfig(cv_target=0.0)  # use the whole slot budget, as EPLB does
    policies = {
        "static": make_policy("static", layout, num_layers),
        "eplb": make_policy("eplb", layout, num_layers),
        "moeless": make_policy("moeless", layout, num_layers, moeless=moeless),
        "moeless_perfect": make_policy("moeless", layout, num_layers, moeless=moeless),
    }
    tables = {name: np.empty((num_batches, num_layers, layout.num_slots), np.int64) for name in policies}
    for b in range(num_batches):
        casts = {"moeless": forecast[b], "moeless_perfect": loads[b].astype(np.float64)}
        for name, policy in policies.items():
            tables[name][b] = policy.plan(casts.get(name)).slot_to_expert
            policy.observe(loads[b])
    tables["oracle"] = tables["static"]
    return tables, layout


def slot_tokens(policy: str, split: str, table: np.ndarray, loads: np.ndarray, layout) -> np.ndarray:
    """``[P]`` tokens per slot for one layer call."""
    from moeless_jax.moe.split import host_slot_tokens
    from moeless_jax.plan.metrics import spread_evenly

    if policy == "oracle":
        return spread_evenly(int(loads.sum()), layout.num_slots)
    return host_slot_tokens(table, loads, num_devices=layout.num_devices, split=split)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_model:
        return check_model(args)
    if args.data_dir is None:
        raise SystemExit("--data-dir is required to emulate: the folder with moe-beyond/ and azure-llm-2023/")
    from tqdm import tqdm

    from moeless_jax.moe.capacity import slot_capacities
    from moeless_jax.moe.config import SLOT_CAPACITY_RATIO
    from moeless_jax.provenance import compute_device_name, write_json
    from moeless_jax.sim import LatencyModel
    from moeless_jax.sim.emulate import DeviceEmulator, ExpertShape, emulate_layer

    model = LatencyModel.from_file(args.calibration)
    _, batches, loads, forecast = batches_and_forecasts(args)
    tables, layout = plan_tables(loads, forecast, args)
    rng = np.random.default_rng(args.seed)
    first = min(len(batches) - 1, 8)  # let EPLB's history and the forecasters warm up first
    pairs = np.stack([rng.integers(first, len(batches), args.samples),
                      rng.integers(0, loads.shape[1], args.samples)], 1)
    work = {}  # (policy, split, sample) -> [P] slot tokens
    for i, (b, layer) in enumerate(pairs):
        for policy in POLICIES:
            for split in SPLITS if policy not in ("static", "oracle") else ("even",):
                work[policy, split, i] = slot_tokens(policy, split, tables[policy][b, layer], loads[b, layer],
                                                     layout)
    fullest = max(int(w.reshape(args.devices, -1).sum(-1).max()) for w in work.values())
    rows_buffer = 1024 * -(-fullest // 1024)
    shape = ExpertShape(*SHAPES[args.shape])
    emulator = DeviceEmulator(shape, layout.slots_per_device, rows_buffer, repeats=args.repeats)
    results: dict[str, dict] = {}
    for (policy, split, i), tokens in tqdm(sorted(work.items(), key=lambda kv: kv[0][2]), desc="emulate"):
        b, layer = pairs[i]
        balanced_rows = loads[b, layer].sum() / layout.num_slots
        ladder = slot_capacities(balanced_rows, max(1.0, tokens.max() / balanced_rows),
                                 SLOT_CAPACITY_RATIO)
        rows = tokens.reshape(args.devices, -1).sum(-1)
        for kernel in KERNELS:
            call = emulate_layer(emulator, tokens, kernel=kernel, all_to_all_ms=model.all_to_all_ms,
                                 ladder=ladder)
            entry = results.setdefault(f"{policy}_{split}_{kernel}", {
                "layer_ms": [], "compute_ms": [], "all_to_all_ms": [], "model_ms": [], "static_model_ms": [],
                "max_rows": [], "capacity": []})
            entry["layer_ms"].append(call.layer_ms)
            entry["compute_ms"].append(float(call.compute_ms.max()))
            entry["all_to_all_ms"].append(call.all_to_all_ms)
            model_ms, static_ms = modelled(model, args.shape, kernel, int(rows.max()), call.capacity,
                                           layout.slots_per_device, rows_buffer)
            entry["model_ms"].append(model_ms)
            entry["static_model_ms"].append(static_ms)
            entry["max_rows"].append(int(rows.max()))
            entry["capacity"].append(call.capacity)
    summary = summarise(results, args, layout, loads, pairs)
    summary["setup"]["rows_buffer"] = rows_buffer
    device = compute_device_name()
    note = ("per-device expert compute measured on one GPU, one emulated device at a time; all-to-all "
            "modelled from the calibration's NVLink constants (not measured); tables and splits computed")
    path = write_json(args.out_dir / "summary.json", summary, method="emulated", device=device, note=note)
    plot(args.out_dir / "summary.png", summary)
    print(f"wrote {path} and {args.out_dir / 'summary.png'}")
    for key in sorted(k for k in summary if k.endswith("_ms_mean") and "capacity" in k):
        print(f"  {key}: {summary[key]:.3f}")
    return 0


def modelled(model, shape: str, kernel: str, max_rows: int, capacity: int | None, slots: int,
             rows_buffer: int) -> tuple[float, float]:
    """The calibrated latency model's layer time for one call: charging the fullest device's rows
    (``layer_ms``) and charging what the static shapes compute (``layer_ms_static``); NaN for an
    uncalibrated shape."""
    if shape not in model.calibration["expert_compute"]:
        return float("nan"), float("nan")
    from moeless_jax.sim.emulate import ExpertShape

    bytes_per_row = ExpertShape(*SHAPES[shape]).bytes_per_row
    rows = np.array([max_rows])
    return (model.layer_ms(shape, kernel, rows, bytes_per_row=bytes_per_row),
            model.layer_ms_static(shape, kernel, rows, bytes_per_row=bytes_per_row, slots=slots,
                                  capacity=capacity, rows_buffer=rows_buffer))


def check_model(args) -> int:
    """Re-score an earlier run's samples with the current calibration -> model_check.json (no GPU)."""
    import json

    from moeless_jax.provenance import write_json
    from moeless_jax.sim import LatencyModel

    model = LatencyModel.from_file(args.calibration)
    emulated = json.loads((args.out_dir / "summary.json").read_text())
    setup, samples = emulated["setup"], emulated["per_sample"]
    fullest = max(max(e["max_rows"]) for e in samples.values())
    rows_buffer = setup.get("rows_buffer") or 1024 * -(-fullest // 1024)  # as the run sized it
    check: dict = {"emulation": str(args.out_dir / "summary.json"), "rows_buffer": rows_buffer}
    errors = {kernel: {"rows": [], "static": []} for kernel in KERNELS}
    for name, entry in samples.items():
        kernel = name.rsplit("_", 1)[1]
        for max_rows, capacity, layer_ms in zip(entry["max_rows"], entry["capacity"], entry["layer_ms"],
                                                strict=True):
            by_rows, static = modelled(model, args.shape, kernel, max_rows, capacity,
                                       setup["slots_per_device"], rows_buffer)
            errors[kernel]["rows"].append((by_rows - layer_ms) / layer_ms)
            errors[kernel]["static"].append((static - layer_ms) / layer_ms)
    for kernel, by_model in errors.items():
        for how, rel in by_model.items():
            rel = np.asarray(rel)
            check[f"{kernel}_{how}_model_mean_rel_err"] = float(rel.mean())
            check[f"{kernel}_{how}_model_mean_abs_rel_err"] = float(np.abs(rel).mean())
            check[f"{kernel}_{how}_model_max_abs_rel_err"] = float(np.abs(rel).max())
    note = ("computed: the latency model's layer times against the emulated ones of the same samples; 'rows' "
            "charges the fullest device's rows, 'static' what the static shapes compute")
    path = write_json(args.out_dir / "model_check.json", check, method="computed", device="cpu", note=note)
    print(json.dumps(check, indent=1))
    print(f"wrote {path}")
    return 0


def latency_stats(name: str, layer_ms) -> dict[str, float]:
    """``<name>_ms_mean``, ``_ms_p50`` and ``_ms_p99`` of per-call layer times."""
    layer = np.asarray(layer_ms, np.float64)
    return {f"{name}_ms_mean": float(layer.mean()), f"{name}_ms_p50": float(np.median(layer)),
            f"{name}_ms_p99": float(np.quantile(layer, 0.99))}


def summarise(results: dict, args, layout, loads, pairs) -> dict:
    from moeless_jax.moe.config import SLOT_CAPACITY_RATIO

    summary: dict = {
        "setup": {
            "trace": "MoE-Beyond DeepSeek-V2-Lite-Chat routing (64 experts, top-6), 30% held-out prompts",
            "batches": f"Azure conversation arrivals in {args.window_s:g}-s windows",
            "tokens_per_batch_mean": float(loads[:, 0].sum(-1).mean() / 6),
            "samples": int(len(pairs)),
            "devices": args.devices,
            "slots_per_device": layout.slots_per_device,
            "expert_shape": dict(zip(("d_model", "d_ff"), SHAPES[args.shape], strict=True)),
            "dtype": "bfloat16",
            "capacity_ladder": f"ratio {SLOT_CAPACITY_RATIO} from the balanced rows per slot up to the "
                               "fullest slot, multiples of 64; each device picks its own",
            "calibration": str(args.calibration),
        },
    }
    for name, entry in results.items():
        summary |= latency_stats(name, entry["layer_ms"])
        summary[f"{name}_compute_ms_mean"] = float(np.mean(entry["compute_ms"]))
        summary[f"{name}_all_to_all_ms_mean"] = float(np.mean(entry["all_to_all_ms"]))
        summary[f"{name}_model_ms_mean"] = float(np.mean(entry["model_ms"]))
        summary[f"{name}_static_model_ms_mean"] = float(np.mean(entry["static_model_ms"]))
        summary[f"{name}_max_rows_mean"] = float(np.mean(entry["max_rows"]))
    for kernel in KERNELS:
        static = summary[f"static_even_{kernel}_ms_mean"]
        for policy in POLICIES[1:]:
            for split in SPLITS if policy != "oracle" else ("even",):
                key = f"{policy}_{split}_{kernel}"
                summary[f"speedup_vs_static_{key}"] = static / summary[f"{key}_ms_mean"]
    summary["per_sample"] = {name: entry for name, entry in results.items()}
    return summary


def plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{p}_{s}" for p in POLICIES for s in (SPLITS if p not in ("static", "oracle") else ("even",))]
    fig, axes = plt.subplots(1, len(KERNELS), figsize=(6.5 * len(KERNELS), 4), squeeze=False)
    for ax, kernel in zip(axes[0], KERNELS, strict=True):
        compute = [summary[f"{n}_{kernel}_compute_ms_mean"] for n in names]
        a2a = [summary[f"{n}_{kernel}_all_to_all_ms_mean"] for n in names]
        ax.barh(names, compute, color="tab:blue", label="slowest device's compute (measured)")
        ax.barh(names, a2a, left=compute, color="tab:gray", label="dispatch + combine (modelled)")
        ax.invert_yaxis()
        ax.set_xlabel("mean layer latency (ms)")
        ax.set_title(f"{kernel} kernel")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Emulated 8-device DeepSeek-V2-Lite MoE layer on one GPU "
                 f"({summary['setup']['tokens_per_batch_mean']:.0f} tokens/batch, emulated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
