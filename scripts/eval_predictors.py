"""Expert-load predictors on real routing -> results/predict/summary.json and summary.png.

DeepSeek-V2-Lite routing from MoE-Beyond (26 MoE layers, 64 experts, top-6, prefill of 499 chat prompts)
is split by prompt: 70% to fit, 30% to test. Test batches are the paper's: the prompts of the Azure LLM
conversation trace's arrivals that fall in the same 1-s window (arrival i serves test prompt i mod R).
For each distance d = 1..4 it fits and scores, on the same batches in arrival order:

- ``history``: cumulative load of the batches served so far (the fitting trace's mean before the first);
  ``history_window`` sums the last 1000 batches (vLLM's window), ``history_ema`` averages with weight 0.05;
- ``routing_only``: the per-token routing-transition network (configs/predict.yaml, section routing_only),
  with its online error correction; at d = 1 also ``routing_only_raw``, the same network without it;
- ``oracle``: the true load (upper bound).

Accuracy (1 - total variation of the normalised load vectors), hot-expert recall (top 8 of 64) and Pearson r
are computed per batch and target layer. Predictor bytes are the stored parameter bytes; time per layer is
measured on whatever jax computes on (a 4096-token batch, ``timing.json`` names the device). On a 2-core CPU
fitting takes several minutes per distance and scoring every batch about as long (progress bars show both);
on a GPU both take well under a minute. Each distance's results are kept in ``OUT/per_distance/d<D>.json``;
``--resume`` reuses them, so the distances can be run in separate invocations.

Usage:
  python scripts/eval_predictors.py --data-dir DATA [--out-dir results/predict] [--distances 1 2 3 4]
      [--config configs/predict.yaml] [--max-batches N] [--checkpoint-dir DIR] [--resume]

DATA is the folder holding ``moe-beyond/`` and ``azure-llm-2023/`` (docs/traces.md says where they come from).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moeless_jax.config import load_config  # noqa: E402
from moeless_jax.predict import (  # noqa: E402
    History,
    HistoryConfig,
    Oracle,
    RoutingOnly,
    RoutingOnlyConfig,
    save_predictor,
    score_batches,
    time_per_layer,
)
from moeless_jax.provenance import compute_device_name, write_json  # noqa: E402
from moeless_jax.traces import read_azure_arrivals, read_moe_beyond, window_batches  # noqa: E402

PREDICTORS = ("history", "history_window", "history_ema", "routing_only", "oracle")
ABLATION_DISTANCE = 1  # routing_only without its online correction is also scored at this distance
HISTORIES = {"history": HistoryConfig("cumulative"), "history_window": HistoryConfig("window", window=1000),
             "history_ema": HistoryConfig("ema", ema_alpha=0.05)}
PLOTTED = {"history": "tab:orange", "routing_only": "tab:blue", "oracle": "tab:green"}
TARGETS = {"routing_only_acc_d1_mean": 0.90, "routing_only_bytes": 5e6, "routing_only_ms_per_layer": 0.2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, help="folder with moe-beyond/ and azure-llm-2023/")
    p.add_argument("--out-dir", type=Path, default=Path("results/predict"))
    p.add_argument("--distances", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--config", type=Path, help="YAML with a routing_only section (default: built-in config)")
    p.add_argument("--split", type=float, default=0.7, help="fraction of prompts to fit on")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt split")
    p.add_argument("--window-s", type=float, default=1.0, help="batching window (seconds)")
    p.add_argument("--max-batches", type=int, help="score only the first N batches (quick runs)")
    p.add_argument("--timing-tokens", type=int, default=4096)
    p.add_argument("--timing-repeats", type=int, default=10)
    p.add_argument("--checkpoint-dir", type=Path, help="also save each fitted routing_only predictor here")
    p.add_argument("--plot-only", action="store_true",
                   help="only redraw OUT/summary.png from OUT/summary.json (when the run had no matplotlib)")
    p.add_argument("--resume", action="store_true",
                   help="reuse OUT/per_distance/d<D>.json from an earlier run with the same data and config")
    return p.parse_args(argv)


def load_data(args):
    trace = read_moe_beyond(args.data_dir / "moe-beyond")
    arrivals = read_azure_arrivals(args.data_dir / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv")
    fit, test = trace.split_by_request(args.split, seed=args.seed)
    batches = window_batches(test, arrivals, window_s=args.window_s)
    if args.max_batches:
        batches = batches[: args.max_batches]
    return fit, test, batches


def evaluate_distance(distance: int, config: RoutingOnlyConfig, fit, test, batches, args) -> dict:
    """Fit and score every predictor at one distance; returns their summaries plus fit seconds."""
    results = {}
    for name in PREDICTORS:
        start = time.perf_counter()
        if name == "routing_only":
            predictor = RoutingOnly(distance, config).fit(fit)
        elif name in HISTORIES:
            predictor = History(distance, HISTORIES[name]).fit(fit)
        else:
            predictor = Oracle(distance).fit(fit)
        fit_seconds = time.perf_counter() - start
        scores = score_batches(predictor, test, batches, progress=True, desc=f"{name} d={distance}")
        summary = scores.summary()
        summary["bytes"] = predictor.num_bytes()
        summary["fit_seconds"] = fit_seconds
        summary["accuracy_per_batch_mean"] = np.nanmean(scores.accuracy, axis=1).tolist()
        if name == "routing_only":
            summary["timing"] = time_per_layer(predictor, test, batch_tokens=args.timing_tokens,
                                               repeats=args.timing_repeats)
            if args.checkpoint_dir:
                save_predictor(predictor, args.checkpoint_dir / f"routing_only_d{distance}", overwrite=True,
                               note={"split": args.split, "seed": args.seed})
        results[name] = summary
        if name == "routing_only" and distance == ABLATION_DISTANCE and config.online_alpha:
            raw = without_online_correction(predictor)
            results["routing_only_raw"] = score_batches(raw, test, batches, progress=True,
                                                        desc=f"routing_only_raw d={distance}").summary()
        print(f"  d={distance} {name:>12}: accuracy {summary['accuracy_mean']:.4f}, recall "
              f"{summary['recall_mean']:.4f}, pearson {summary['pearson_mean']:.4f}, {summary['bytes']} B, "
              f"fit {fit_seconds:.0f} s", flush=True)
    return results


def distance_results(distance: int, config: RoutingOnlyConfig, fit, test, batches, args) -> dict:
    """One distance's results: evaluated now, or read back from an earlier run when ``--resume`` is set."""
    path = args.out_dir / "per_distance" / f"d{distance}.json"
    identity = {"routing_only_config": config.__dict__, "num_batches": len(batches), "split": args.split,
                "seed": args.seed, "window_s": args.window_s}
    if args.resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("identity") != identity:
            raise SystemExit(f"{path} was produced with different settings ({saved.get('identity')}); "
                             "delete it or run without --resume")
        print(f"  d={distance}: reusing {path}", flush=True)
        return saved["results"]
    results = evaluate_distance(distance, config, fit, test, batches, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"identity": identity, "results": results}, default=float) + "\n")
    return json.loads(path.read_text())["results"]  # the same (string-keyed) form a resumed run sees


def without_online_correction(predictor: RoutingOnly) -> RoutingOnly:
    """The same fitted network with ``online_alpha = 0`` (the ablation of the online correction)."""
    raw = RoutingOnly(predictor.distance, dataclasses.replace(predictor.config, online_alpha=0.0))
    raw.shape = predictor.shape
    raw.set_state(predictor.state())
    return raw


def flatten(per_distance: dict[int, dict]) -> dict:
    """The headline keys of summary.json."""
    flat = {}
    for distance, results in per_distance.items():
        for name, summary in results.items():
            flat[f"{name}_acc_d{distance}_mean"] = summary["accuracy_mean"]
            flat[f"{name}_acc_d{distance}_min_layer"] = min(summary["accuracy_per_layer"].values())
            flat[f"{name}_recall_d{distance}_mean"] = summary["recall_mean"]
            flat[f"{name}_pearson_d{distance}_mean"] = summary["pearson_mean"]
        ours = results["routing_only"]["accuracy_per_layer"]
        history = results["history"]["accuracy_per_layer"]
        flat[f"layers_routing_only_beats_history_d{distance}"] = sum(ours[k] > history[k] for k in ours)
        best = {k: max(results[name]["accuracy_per_layer"][k] for name in HISTORIES) for k in ours}
        if "routing_only_raw" in results:
            raw = results["routing_only_raw"]["accuracy_per_layer"]
            flat[f"layers_routing_only_raw_beats_history_d{distance}"] = sum(raw[k] > history[k] for k in raw)
        flat[f"layers_routing_only_beats_best_history_d{distance}"] = sum(ours[k] > best[k] for k in ours)
        flat[f"layers_total_d{distance}"] = len(ours)
        flat[f"routing_only_bytes_d{distance}"] = results["routing_only"]["bytes"]
        flat[f"routing_only_fit_seconds_d{distance}"] = results["routing_only"]["fit_seconds"]
    first = per_distance[min(per_distance)]["routing_only"]
    flat["layers_total"] = len(first["accuracy_per_layer"])
    flat["routing_only_bytes"] = first["bytes"]
    flat["routing_only_ms_per_layer"] = first["timing"]["ms_per_layer"]
    flat["routing_only_ms_single_layer"] = first["timing"]["ms_single_layer"]
    flat["routing_only_ms_per_layer_eval_batches"] = first["ms_per_layer"]
    return flat


def targets_met(flat: dict) -> dict:
    acc, size, ms = (flat.get(key) for key in TARGETS)
    beats = flat.get("layers_routing_only_beats_history_d1")
    return {
        "routing_only_acc_d1_mean >= 0.90": acc is not None and acc >= 0.90,
        "routing_only beats history on every layer at d=1": beats == flat.get("layers_total_d1"),
        "routing_only_bytes <= 5 MB": size is not None and size <= 5e6,
        "routing_only_ms_per_layer <= 0.2 (4096 tokens)": ms is not None and ms <= 0.2,
    }


def plot(path: Path, per_distance: dict[int, dict]) -> None:
    """Per-layer accuracy, one panel per distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distances = sorted(per_distance)
    fig, axes = plt.subplots(1, len(distances), figsize=(4.6 * len(distances), 4), squeeze=False, sharey=True)
    for ax, distance in zip(axes[0], distances, strict=True):
        for name, color in PLOTTED.items():
            per_layer = per_distance[distance][name]["accuracy_per_layer"]
            mean = per_distance[distance][name]["accuracy_mean"]
            ax.plot([int(k) for k in per_layer], list(per_layer.values()), marker=".", color=color,
                    label=f"{name} ({mean:.3f})")
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set_title(f"d = {distance}")
        ax.set_xlabel("target layer")
        ax.legend(fontsize=8, loc="lower right")
    axes[0, 0].set_ylabel("accuracy = 1 - TV (mean over batches)")
    axes[0, 0].set_ylim(0.6, 1.01)
    fig.suptitle("Expert-load forecasts, DeepSeek-V2-Lite routing, held-out prompts in 1-s Azure windows "
                 "(computed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)




def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        saved = json.loads((args.out_dir / "summary.json").read_text())["per_distance"]
        plot(args.out_dir / "summary.png", {int(d): results for d, results in saved.items()})
        print(f"wrote {args.out_dir / 'summary.png'}")
        return 0
    if args.data_dir is None:
        raise SystemExit("--data-dir is required: the folder holding moe-beyond/ and azure-llm-2023/")
    config = load_config(RoutingOnlyConfig, args.config, section="routing_only") if args.config else \
        RoutingOnlyConfig()
    fit, test, batches = load_data(args)
    print(f"fit: {fit.requests.size} prompts, {fit.num_tokens} tokens; test: {test.requests.size} prompts, "
          f"{len(batches)} batches of {np.mean([len(b) for b in batches]):.0f} tokens on average", flush=True)
    per_distance = {d: distance_results(d, config, fit, test, batches, args) for d in args.distances}
    flat = flatten(per_distance)
    device = compute_device_name()
    summary = {
        **flat,
        "targets_met": targets_met(flat),
        "setup": {
            "trace": "MoE-Beyond DeepSeek-V2-Lite-Chat routing (26 layers, 64 experts, top-6), prefill",
            "split": f"split_by_request({args.split}, seed={args.seed}): {fit.requests.size} fit prompts "
                     f"({fit.num_tokens} tokens), {test.requests.size} test prompts "
                     f"({test.num_tokens} tokens)",
            "batches": f"{len(batches)} windows of {args.window_s} s over the Azure conversation arrivals",
            "tokens_per_batch_mean": float(np.mean([len(b) for b in batches])),
            "hot_experts_for_recall": 8,
            "routing_only_config": config.__dict__,
            "history": "cumulative loads of the served batches (fitting-trace mean before the first); "
                       "history_window: the last 1000 batches; history_ema: EMA with weight 0.05",
            "timing": f"{args.timing_tokens}-token batch, median of {args.timing_repeats} calls after a "
                      "compile call; ms_per_layer = one call forecasting every target layer / their number, "
                      "ms_single_layer = one call forecasting one layer; includes host input preparation",
        },
        "per_distance": {str(d): results for d, results in per_distance.items()},
    }
    note = (f"accuracy, recall and Pearson r computed from the routing trace; fitting and times on {device}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = write_json(args.out_dir / "summary.json", summary, method="computed", device=device, note=note)
    timing = {f"d{d}": results["routing_only"]["timing"] for d, results in per_distance.items()}
    write_json(args.out_dir / "timing.json", timing, method="measured", device=device,
               note=f"routing_only forecast time on {device}")
    try:
        plot(args.out_dir / "summary.png", per_distance)
    except ImportError as err:
        print(f"no plot ({err}); draw it later with --plot-only --out-dir {args.out_dir}")
    print(f"wrote {path}, {args.out_dir / 'timing.json'} and {args.out_dir / 'summary.png'}")
    for key in ("routing_only_acc_d1_mean", "history_acc_d1_mean", "oracle_acc_d1_mean",
                "layers_routing_only_beats_history_d1", "layers_total", "routing_only_bytes",
                "routing_only_ms_per_layer"):
        print(f"  {key}: {flat[key]:.4g}")
    for target, met in summary["targets_met"].items():
        print(f"  target {target}: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
