"""Expert-load predictors on our own models' routing -> results/predict/own-model.json and own-model.png.

For each model checkpoint (default: the shipped ``mixtral_tiny`` and ``deepseek_tiny``), prompts from the
chat corpus (``moeless_jax.model.text.load_corpus``: a document's split is fixed by its content hash) are run
through the model's prefill and their routing and gate inputs recorded (``moeless_jax.model.record``):

- fitting trace: ``--train-prompts`` documents of the TRAIN split;
- scoring trace: ``--heldout-prompts`` documents of the HELD-OUT split, so accuracy is measured on prompts
  the predictors never saw.

Both are batched by the Azure LLM conversation trace: arrival i serves prompt i mod R and the arrivals of
each 1-s window form a batch; the scoring batches are the first ``--max-batches`` windows. Each prompt is
BOS plus its tokens, truncated to the model's ``max_seq_len``. For every distance d (1..4, up to L-1 for an
L-layer model) it fits on the fitting trace and scores on the held-out batches, in arrival order:

- ``history``: cumulative load of the batches served so far (fitting-trace mean before the first);
- ``routing_only``: the per-token routing-transition network (window capped at L-1 source layers);
- ``gate_reuse``: layer l+d's own router applied to layer l's gate input (the model's kernels [L, M, E]);
- ``moeless``: gate copies fine-tuned where gate reuse validates below the threshold (MoEless).

Accuracy (1 - total variation of the normalised loads), hot-expert recall (top E/8) and Pearson r are per
batch and target layer. Fine-tuning seconds and forecast time per layer (``time_per_layer``, a
``--timing-tokens`` batch) are measured on whatever jax computes on; ``own-model-timing.json`` names it.

Usage:
  python scripts/eval_own_model_predictors.py --data-dir DATA [--checkpoints mixtral_tiny deepseek_tiny]
      [--out-dir results/predict] [--train-prompts 300] [--heldout-prompts 200] [--max-batches 200]
      [--distances 1 2 3 4] [--config configs/predict.yaml] [--devices 1]

A checkpoint is a shipped name or ``LABEL=DIR`` (a directory written by ``moeless train``). DATA holds
``sharegpt/``, ``moe-beyond/prompt_datasets/`` and ``azure-llm-2023/`` (docs/traces.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PREDICTORS = ("history", "routing_only", "gate_reuse", "moeless")
COLORS = {"history": "tab:orange", "routing_only": "tab:blue", "gate_reuse": "tab:grey", "moeless": "tab:red"}
ARRIVALS = Path("azure-llm-2023") / "AzureLLMInferenceTrace_conv.csv"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True,
                   help="folder with sharegpt/, moe-beyond/prompt_datasets/ and azure-llm-2023/")
    p.add_argument("--checkpoints", nargs="+", default=["mixtral_tiny", "deepseek_tiny"],
                   help="shipped checkpoint names or LABEL=DIR (default: both shipped ones)")
    p.add_argument("--out-dir", type=Path, default=Path("results/predict"))
    p.add_argument("--train-prompts", type=int, default=300, help="train-split prompts to fit on")
    p.add_argument("--heldout-prompts", type=int, default=200, help="held-out prompts to score on")
    p.add_argument("--max-batches", type=int, default=200, help="score the first N arrival windows")
    p.add_argument("--window-s", type=float, default=1.0, help="batching window (seconds)")
    p.add_argument("--distances", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--config", type=Path,
                   help="YAML with routing_only and moeless sections (default: the built-in configs)")
    p.add_argument("--devices", type=int, default=1, help="devices of the model's ep mesh")
    p.add_argument("--timing-tokens", type=int, default=4096)
    p.add_argument("--timing-repeats", type=int, default=10)
    args = p.parse_args(argv)
    for name in ("train_prompts", "heldout_prompts", "max_batches", "devices", "timing_tokens",
                 "timing_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.distances) < 1:
        p.error("--distances must be >= 1")
    return args


def checkpoints(specs: list[str]) -> list[tuple[str, Path]]:
    """``(label, directory)`` of each ``--checkpoints`` entry: a shipped name or ``LABEL=DIR``."""
    from moeless_jax.model.shipped import SHIPPED, shipped_checkpoint

    out = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if sep:
            if not Path(path).is_dir():
                raise SystemExit(f"--checkpoints {spec}: {path} is not a directory")
            out.append((label, Path(path)))
        elif spec in SHIPPED:
            out.append((spec, shipped_checkpoint(spec)))
        else:
            raise SystemExit(f"--checkpoints {spec}: not a shipped checkpoint {list(SHIPPED)}; use LABEL=DIR")
    return out


def encode(docs, tokenizer, max_len: int) -> tuple[list[list[int]], int]:
    """BOS + tokens of each document, truncated to ``max_len``; also how many were truncated."""
    ids = tokenizer.encode_prompts(docs)
    return [row[:max_len] for row in ids], sum(len(row) > max_len for row in ids)


def configs(args):
    from moeless_jax.config import load_config
    from moeless_jax.predict import GateTuneConfig, RoutingOnlyConfig

    if args.config is None:
        return RoutingOnlyConfig(), GateTuneConfig()
    return (load_config(RoutingOnlyConfig, args.config, section="routing_only"),
            load_config(GateTuneConfig, args.config, section="moeless"))


def fit_predictor(name: str, distance: int, fit, kernels, routing_config, tune_config):
    from moeless_jax.predict import GateReuse, History, HistoryConfig, MoElessPredictor, RoutingOnly

    if name == "history":
        return History(distance, HistoryConfig("cumulative")).fit(fit)
    if name == "routing_only":
        window = min(routing_config.window, fit.num_layers - 1)  # a 4-layer model has 3 earlier layers
        config = dataclasses.replace(routing_config, window=window,
                                     own_layers=min(routing_config.own_layers, window))
        return RoutingOnly(distance, config).fit(fit)
    if name == "gate_reuse":
        return GateReuse(distance, kernels).fit(fit)
    return MoElessPredictor(distance, kernels, tune_config).fit(fit)


def evaluate_distance(distance: int, fit, test, batches, kernels, args, routing_config, tune_config) -> dict:
    from moeless_jax.predict import score_batches, time_per_layer

    results = {}
    for name in PREDICTORS:
        start = time.perf_counter()
        predictor = fit_predictor(name, distance, fit, kernels, routing_config, tune_config)
        fit_seconds = time.perf_counter() - start
        scores = score_batches(predictor, test, batches, progress=True, desc=f"  {name} d={distance}")
        summary = scores.summary()
        summary["bytes"] = predictor.num_bytes()
        summary["fit_seconds"] = fit_seconds
        if name == "moeless":
            targets = predictor.targets
            summary["layers_tuned"] = [int(layer) for layer in np.flatnonzero(predictor.tuned)]
            summary["validation_accuracy_gate_reuse"] = _by_layer(predictor.accuracy_before, targets)
            summary["validation_accuracy_kept"] = _by_layer(predictor.accuracy_after, targets)
        if name in ("moeless", "routing_only"):
            summary["timing"] = time_per_layer(predictor, test, batch_tokens=args.timing_tokens,
                                               repeats=args.timing_repeats)
        results[name] = summary
        print(f"  d={distance} {name:>12}: accuracy {summary['accuracy_mean']:.4f}, recall "
              f"{summary['recall_mean']:.4f}, pearson {summary['pearson_mean']:.4f}, {summary['bytes']} B, "
              f"fit {fit_seconds:.1f} s", flush=True)
    return results


def _by_layer(values: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    return {str(int(t)): float(values[t]) for t in targets}


def evaluate_model(label: str, path: Path, corpus, arrivals, mesh, args, routing_config, tune_config) -> dict:
    from moeless_jax.model import load_model
    from moeless_jax.model.record import batches_from_arrivals, prefill_runs, record_trace, token_batches
    from moeless_jax.model.tokenizer import default_tokenizer

    model = load_model(path, mesh=mesh)
    config = model.config
    tokenizer = default_tokenizer()
    train_ids, train_cut = encode(corpus.train[: args.train_prompts], tokenizer, config.max_seq_len)
    test_ids, test_cut = encode(corpus.heldout[: args.heldout_prompts], tokenizer, config.max_seq_len)
    train_batches = batches_from_arrivals(arrivals, len(train_ids), window_s=args.window_s)
    test_batches = batches_from_arrivals(arrivals, len(test_ids), window_s=args.window_s,
                                         max_batches=args.max_batches)
    start = time.perf_counter()
    fit = record_trace(model, train_ids, batches=train_batches, progress=True, desc=f"{label} train")
    test = record_trace(model, test_ids, batches=test_batches, progress=True, desc=f"{label} held-out")
    record_seconds = time.perf_counter() - start
    batches = token_batches(test, test_batches)
    kernels = np.stack([np.asarray(layer.router[...], np.float32) for layer in model.moe_layers()])  # [L,M,E]
    distances = [d for d in args.distances if d < config.num_layers]
    print(f"{label}: {config.num_layers} layers, top-{config.moe.top_k} of {config.moe.num_experts} experts "
          f"({config.moe.router} router); fit {fit.requests.size} prompts / {fit.num_tokens} tokens, test "
          f"{test.requests.size} prompts / {test.num_tokens} tokens in {len(batches)} batches of "
          f"{np.mean([b.size for b in batches]):.0f} tokens; recorded in {record_seconds:.0f} s", flush=True)
    per_distance = {d: evaluate_distance(d, fit, test, batches, kernels, args, routing_config, tune_config)
                    for d in distances}
    return {
        **flatten(per_distance),
        "model": {"checkpoint": label, "config": config.to_dict()},
        "data": {
            "fit": {"split": "train", "prompts": int(fit.requests.size), "tokens": fit.num_tokens,
                    "truncated_prompts": train_cut, "prefills": len(prefill_runs(train_batches))},
            "test": {"split": "heldout", "prompts": int(test.requests.size), "tokens": test.num_tokens,
                     "truncated_prompts": test_cut, "prefills": len(prefill_runs(test_batches)),
                     "batches": len(batches),
                     "tokens_per_batch_mean": float(np.mean([b.size for b in batches]))},
            "record_seconds": record_seconds,
        },
        "distances_skipped": [d for d in args.distances if d >= config.num_layers],
        "per_distance": {str(d): results for d, results in per_distance.items()},
    }


def flatten(per_distance: dict[int, dict]) -> dict:
    """The headline keys of one model."""
    flat = {}
    for distance, results in per_distance.items():
        for name, summary in results.items():
            flat[f"{name}_acc_d{distance}_mean"] = summary["accuracy_mean"]
            flat[f"{name}_recall_d{distance}_mean"] = summary["recall_mean"]
            flat[f"{name}_pearson_d{distance}_mean"] = summary["pearson_mean"]
        ours, reuse = results["moeless"]["accuracy_per_layer"], results["gate_reuse"]["accuracy_per_layer"]
        # "Beats" as the target states it: at least gate reuse's accuracy (an untuned layer keeps the gate
        # copy, so it ties); the strictly better layers are counted beside it.
        flat[f"layers_moeless_beats_gate_reuse_d{distance}"] = sum(ours[k] >= reuse[k] for k in ours)
        flat[f"layers_moeless_strictly_better_d{distance}"] = sum(ours[k] > reuse[k] for k in ours)
        flat[f"layers_tuned_d{distance}"] = len(results["moeless"]["layers_tuned"])
        flat[f"moeless_fine_tune_seconds_d{distance}"] = results["moeless"]["fit_seconds"]
        flat[f"moeless_bytes_d{distance}"] = results["moeless"]["bytes"]
    first = per_distance[min(per_distance)]
    flat["layers_total"] = len(first["moeless"]["accuracy_per_layer"])
    flat["moeless_ms_per_layer"] = first["moeless"]["timing"]["ms_per_layer"]
    flat["routing_only_ms_per_layer"] = first["routing_only"]["timing"]["ms_per_layer"]
    flat["routing_only_bytes"] = first["routing_only"]["bytes"]
    return flat


def plot(path: Path, models: dict[str, dict]) -> None:
    """Per model: mean accuracy against distance, and per-layer accuracy at the smallest distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(models), figsize=(4.8 * len(models), 7.5), squeeze=False)
    for column, (label, result) in enumerate(models.items()):
        per_distance = {int(d): r for d, r in result["per_distance"].items()}
        distances = sorted(per_distance)
        top, bottom = axes[0, column], axes[1, column]
        for name, color in COLORS.items():
            top.plot(distances, [per_distance[d][name]["accuracy_mean"] for d in distances], marker="o",
                     color=color, label=name)
            per_layer = per_distance[distances[0]][name]["accuracy_per_layer"]
            bottom.plot([int(k) for k in per_layer], list(per_layer.values()), marker=".", color=color,
                        label=f"{name} ({per_distance[distances[0]][name]['accuracy_mean']:.3f})")
        top.set_title(f"{label}: mean over batches and layers", fontsize=10)
        top.set_xlabel("distance d")
        top.set_xticks(distances)
        bottom.set_title(f"{label}: per target layer, d = {distances[0]}", fontsize=10)
        bottom.set_xlabel("target layer")
        bottom.set_xticks([int(k) for k in per_layer])
        for ax in (top, bottom):
            ax.legend(fontsize=8, loc="best")
            ax.set_ylabel("accuracy = 1 - TV")
    fig.suptitle("Expert-load forecasts on our models' routing, held-out prompts in 1-s Azure windows "
                 "(computed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    from moeless_jax.devices import local_devices

    devices = local_devices(args.devices)  # before anything else starts jax
    from moeless_jax.model.text import load_corpus
    from moeless_jax.moe import make_ep_mesh
    from moeless_jax.provenance import compute_device_name, write_json
    from moeless_jax.traces import read_azure_arrivals

    specs = checkpoints(args.checkpoints)
    routing_config, tune_config = configs(args)
    corpus = load_corpus(args.data_dir)
    arrivals = read_azure_arrivals(args.data_dir / ARRIVALS)
    mesh = make_ep_mesh(args.devices, devices)
    models = {label: evaluate_model(label, path, corpus, arrivals, mesh, args, routing_config, tune_config)
              for label, path in specs}
    device = compute_device_name()
    headline = {f"{name}_acc_d1_mean": float(np.mean([m[f"{name}_acc_d1_mean"] for m in models.values()]))
                for name in PREDICTORS if all(f"{name}_acc_d1_mean" in m for m in models.values())}
    summary = {
        **headline,
        "models": models,
        "setup": {
            "prompts": "BOS + tokens of load_corpus documents (split by content hash), truncated to "
                       "max_seq_len; fit on train-split prompts, scored on held-out prompts",
            "batches": f"{args.window_s} s windows over {ARRIVALS.name}: arrival i serves prompt i mod R; "
                       f"scoring: the first {args.max_batches} windows",
            "distances": args.distances,
            "layers_total": "target layers at d = 1 (L - 1)",
            "hot_experts_for_recall": "E / 8",
            "routing_only_config": dataclasses.asdict(routing_config),
            "moeless_config": dataclasses.asdict(tune_config),
            "history": "cumulative loads of the served batches (fitting-trace mean before the first)",
            "timing": f"{args.timing_tokens}-token batch, median of {args.timing_repeats} calls after a "
                      "compile call; ms_per_layer = one call forecasting every target layer / their number; "
                      "includes host input preparation",
            "mesh_devices": args.devices,
            "device": device,
        },
    }
    note = f"accuracy, recall and Pearson r computed from recorded routing; fine-tuning and times on {device}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = write_json(args.out_dir / "own-model.json", summary, method="computed", device=device, note=note)
    timing = {label: {
        "moeless_fine_tune_seconds": {d: r["moeless"]["fit_seconds"] for d, r in m["per_distance"].items()},
        "moeless_timing": {d: r["moeless"]["timing"] for d, r in m["per_distance"].items()},
        "routing_only_timing": {d: r["routing_only"]["timing"] for d, r in m["per_distance"].items()},
    } for label, m in models.items()}
    write_json(args.out_dir / "own-model-timing.json", timing, method="measured", device=device,
               note=f"MoEless fine-tuning (fit incl. validation) and forecast times on {device}")
    try:
        plot(args.out_dir / "own-model.png", models)
    except ImportError as err:
        print(f"no plot ({err})")
    print(f"wrote {path}, {args.out_dir / 'own-model-timing.json'} and {args.out_dir / 'own-model.png'}")
    for label, m in models.items():
        first = min(int(d) for d in m["per_distance"])
        accuracy = ", ".join(f"{name} {m[f'{name}_acc_d{first}_mean']:.4f}" for name in PREDICTORS)
        print(f"  {label} (d={first}): {accuracy}; moeless beats gate reuse on "
              f"{m[f'layers_moeless_beats_gate_reuse_d{first}']} of {m['layers_total']} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
