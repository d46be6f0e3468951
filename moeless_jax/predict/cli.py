"""``moeless predict``: fit expert-load predictors and evaluate them on routing traces.

- ``moeless predict fit --routing-trace PATH --format {native,moe-beyond} --predictor NAME --distance D
  --checkpoint DIR [--config YAML] [--split 0.7] [--seed 0] [--gates FILE.npz] [--overwrite]``
- ``moeless predict eval --routing-trace PATH --format {native,moe-beyond} --predictor NAME --distance D
  [--checkpoint DIR] [--batch-tokens N | --arrivals FILE [--window-s 1]] [--split 0.7] [--seed 0] [--json]``

Both split the trace's requests with ``RoutingTrace.split_by_request(split, seed)``: ``fit`` learns from the
first part; ``eval`` scores on the second, after fitting on the first (or restoring ``--checkpoint``, which
should have been fitted with the same split and seed). ``--json`` prints one JSON object with
``accuracy_per_layer``, ``accuracy_mean``, ``recall_mean``, ``pearson_mean``, ``bytes`` and ``ms_per_layer``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PREDICTOR_NAMES = ("history", "routing_only", "gate_reuse", "moeless", "oracle")  # see predict.registry


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="fit and evaluate expert-load predictors")
    commands = parser.add_subparsers(dest="predict_command", required=True, metavar="ACTION")

    fit = commands.add_parser("fit", help="fit a predictor on a routing trace and save it with orbax")
    _common(fit)
    fit.add_argument("--checkpoint", required=True, type=Path, help="output checkpoint directory")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint directory")
    fit.add_argument("--json", action="store_true", help="print one JSON object")
    fit.set_defaults(func=_fit)

    evaluate = commands.add_parser("eval", help="score a predictor on the held-out requests of a trace")
    _common(evaluate)
    evaluate.add_argument("--checkpoint", type=Path, help="restore this fitted predictor instead of fitting")
    how = evaluate.add_mutually_exclusive_group()
    how.add_argument("--batch-tokens", type=int, help="token budget per batch (default 512)")
    how.add_argument("--arrivals", type=Path, help="arrival trace (Azure .csv, Mooncake .jsonl)")
    evaluate.add_argument("--window-s", type=float, default=1.0, help="batching window with --arrivals")
    evaluate.add_argument("--max-batches", type=int, help="score only the first N batches")
    evaluate.add_argument("--hot", type=int, help="hot experts for recall (default: a eighth of the experts)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=_eval)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--routing-trace", required=True, type=Path, help="native .npz or MoE-Beyond folder")
    parser.add_argument("--format", required=True, choices=["native", "moe-beyond"], help="trace format")
    parser.add_argument("--predictor", required=True, choices=PREDICTOR_NAMES)
    parser.add_argument("--distance", type=int, default=1, help="forecast layer l+D from l (default 1)")
    parser.add_argument("--config", type=Path, help="YAML, one section per predictor")
    parser.add_argument("--gates", type=Path, help="gate_reuse/moeless: .npz with 'kernels' [L, M, E]")
    parser.add_argument("--split", type=float, default=0.7, help="fraction of requests fitted on")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request split (default 0)")


def _load_trace(args):
    from moeless_jax.traces import load_trace, read_moe_beyond

    if args.format == "native":
        return load_trace(args.routing_trace)
    return read_moe_beyond(args.routing_trace, progress=False)


def _new_predictor(args):
    import numpy as np

    from moeless_jax.config import load_config
    from moeless_jax.errors import InputError
    from moeless_jax.predict.registry import CONFIGS, make_predictor

    config = None
    if args.config is not None and args.predictor in CONFIGS:
        config = load_config(CONFIGS[args.predictor], args.config, section=args.predictor)
    kernels = None
    if args.gates is not None:
        if not args.gates.is_file():
            raise FileNotFoundError(f"{args.gates}: no such gates file")
        with np.load(args.gates, allow_pickle=False) as data:
            if "kernels" not in data.files:
                raise InputError(f"{args.gates}: expected an array 'kernels' [L, M, E], found {data.files}")
            kernels = data["kernels"]
    return make_predictor(args.predictor, args.distance, config, kernels=kernels)


def _fit(args: argparse.Namespace) -> int:
    from moeless_jax.predict.checkpoint import save_predictor

    trace = _load_trace(args)
    fit_trace, _ = trace.split_by_request(args.split, seed=args.seed)
    predictor = _new_predictor(args).fit(fit_trace)
    note = {"routing_trace": str(args.routing_trace), "split": args.split, "seed": args.seed,
            "fit_requests": int(fit_trace.requests.size), "fit_tokens": fit_trace.num_tokens}
    path = save_predictor(predictor, args.checkpoint, overwrite=args.overwrite, note=note)
    result = {"predictor": predictor.name, "distance": predictor.distance, "checkpoint": str(path),
              "bytes": predictor.num_bytes(), **note}
    print(json.dumps(result) if args.json else f"saved {predictor.name} (d={predictor.distance}, "
          f"{result['bytes']} bytes) to {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moeless_jax.errors import InputError
    from moeless_jax.predict.checkpoint import load_predictor
    from moeless_jax.predict.metrics import score_batches

    trace = _load_trace(args)
    fit_trace, test_trace = trace.split_by_request(args.split, seed=args.seed)
    if args.checkpoint is not None:
        predictor = load_predictor(args.checkpoint)
        if (predictor.name, predictor.distance) != (args.predictor, args.distance):
            raise InputError(f"{args.checkpoint}: holds {predictor.name} at distance {predictor.distance}, "
                             f"not --predictor {args.predictor} --distance {args.distance}")
    else:
        predictor = _new_predictor(args).fit(fit_trace)
    batches = _batches(args, test_trace)
    scores = score_batches(predictor, test_trace, batches, hot=args.hot)
    result = {"predictor": predictor.name, "distance": predictor.distance, "split": args.split,
              "seed": args.seed, "test_requests": int(test_trace.requests.size), **scores.summary(),
              "bytes": predictor.num_bytes()}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{predictor.name} d={predictor.distance}: accuracy {result['accuracy_mean']:.4f}, recall "
              f"{result['recall_mean']:.4f}, pearson {result['pearson_mean']:.4f} over {result['batches']} "
              f"batches; {result['bytes']} bytes, {result['ms_per_layer']:.3f} ms per layer")
        for layer, value in result["accuracy_per_layer"].items():
            print(f"  layer {layer:>4}: {value:.4f}")
    return 0


def _batches(args, trace):
    from moeless_jax.errors import InputError
    from moeless_jax.traces import (
        read_azure_arrivals,
        read_mooncake_arrivals,
        token_budget_batches,
        window_batches,
    )

    if args.arrivals is not None:
        reader = read_mooncake_arrivals if args.arrivals.suffix == ".jsonl" else read_azure_arrivals
        batches = window_batches(trace, reader(args.arrivals), window_s=args.window_s)
    else:
        batches = token_budget_batches(trace, args.batch_tokens or 512)
    if args.max_batches is not None:
        if args.max_batches < 1:
            raise InputError(f"--max-batches must be >= 1, got {args.max_batches}")
        batches = batches[: args.max_batches]
    return batches
