"""Time the routing_only predictor for one batch -> results/predict/timing_<backend>.json.

Times do not depend on the weights or the routing values, only on the shapes, so this needs no data: it
builds a synthetic routing trace of the model's shape (default DeepSeek-V2-Lite: 26 MoE layers, 64 experts,
top-6) and a predictor of the configured size (restored from ``--checkpoint`` if given, else initialised).
Reported, as medians over ``--repeats`` calls after a compile call:

- ``ms_per_layer``: ``predict`` of every target layer in one call, divided by the number of targets
  (host input preparation and transfers included);
- ``ms_single_layer``: ``predict`` of one target layer alone;
- ``stream_ms_per_layer``: ``LayerStream``, one source layer pushed at a time (what a layer-by-layer
  serving loop calls), per target layer, host work included;
- ``device_ms_per_layer``: the jitted forecast alone on inputs already on the device, per target layer.

Usage (on the machine to time, from the repo root):
  python scripts/time_predictors.py [--checkpoint DIR | --config YAML] [--tokens 1 16 ... 16384]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moeless_jax.bench import time_fn  # noqa: E402
from moeless_jax.config import load_config  # noqa: E402
from moeless_jax.predict import RoutingOnly, RoutingOnlyConfig, time_per_layer  # noqa: E402
from moeless_jax.provenance import write_json  # noqa: E402
from moeless_jax.traces import synthetic_trace  # noqa: E402

TIMES = ("ms_per_layer", "ms_single_layer", "stream_ms_per_layer", "device_ms_per_layer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    how = p.add_mutually_exclusive_group()
    how.add_argument("--checkpoint", type=Path, help="a fitted routing_only checkpoint")
    how.add_argument("--config", type=Path, help="YAML with a routing_only section (default: built-in)")
    p.add_argument("--distance", type=int, default=1)
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 1024, 4096, 16384],
                   help="batch sizes to time (the headline keys are for 4096, or the last size)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out-dir", type=Path, default=Path("results/predict"))
    return p.parse_args(argv)


def build(args, trace):
    if args.checkpoint:
        from moeless_jax.predict import load_predictor  # orbax is needed only here

        return load_predictor(args.checkpoint)
    config = load_config(RoutingOnlyConfig, args.config, section="routing_only") if args.config else \
        RoutingOnlyConfig()
    # Timing depends on shapes only, so untrained parameters of the configured size will do.
    return RoutingOnly(args.distance, config).initialise(trace.num_layers, trace.num_experts, trace.top_k)


def device_time(predictor, trace, batch, repeats: int) -> float:
    """Median ms per target layer of the jitted forecast alone (inputs already on the device)."""
    import jax

    from moeless_jax.predict.routing_only import _forecast, batch_inputs

    inputs = [jax.device_put(array) for array in batch_inputs(trace, batch)]
    targets = tuple(range(predictor.targets.size))

    def call():
        return _forecast(predictor._graphdef, predictor._params, *inputs, targets=targets,
                         num_experts=predictor.num_experts, top_k=predictor.top_k)

    return 1e3 * time_fn(call, warmup=1, repeats=repeats) / len(targets)


def stream_time(predictor, trace, batch, repeats: int) -> float:
    """Median ms per target layer of :class:`LayerStream` over one batch: the stream's set-up plus one
    ``push`` per source layer, as a layer-by-layer serving loop would call it (host work included)."""
    from moeless_jax.predict import LayerStream

    sources = [trace.expert_ids[batch, layer] for layer in range(len(predictor.targets))]

    def run():
        stream = LayerStream(predictor, trace.request_id[batch], trace.position[batch])
        for layer, ids in enumerate(sources):
            stream.push(layer, ids)

    return 1e3 * time_fn(run, warmup=1, repeats=repeats) / len(sources)


def time_batch(args, tokens: int) -> dict:
    """Timings and size of the predictor for one ``tokens``-token batch."""
    per_request = 64
    trace = synthetic_trace(num_requests=-(-tokens // per_request) + 8, mean_tokens=per_request,
                            num_layers=args.layers, num_experts=args.experts, top_k=args.top_k, seed=0)
    predictor = build(args, trace)
    batch = np.arange(tokens, dtype=np.int64) % trace.num_tokens
    result = time_per_layer(predictor, trace, batch_tokens=tokens, repeats=args.repeats)
    result["device_ms_per_layer"] = device_time(predictor, trace, batch, args.repeats)
    result["stream_ms_per_layer"] = stream_time(predictor, trace, batch, args.repeats)
    return result | {"predictor": predictor.name, "distance": predictor.distance,
                     "bytes": predictor.num_bytes(), "config": predictor.settings(),
                     "shape": list(predictor.shape)}


def plot(path: Path, by_tokens: dict[int, dict], device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = sorted(by_tokens)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("ms_per_layer", "all layers in one call, per layer (host prep included)"),
                       ("ms_single_layer", "one layer per call (host prep included)"),
                       ("stream_ms_per_layer", "LayerStream, one layer pushed at a time"),
                       ("device_ms_per_layer", "jitted forecast alone, per layer")):
        ax.plot(tokens, [by_tokens[t][key] for t in tokens], marker="o", label=label)
    ax.axhline(0.2, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the batch")
    ax.set_ylabel("ms")
    ax.set_title(f"RoutingOnly forecast time, {device} (measured)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    import jax

    args = parse_args(argv)
    by_tokens = {tokens: time_batch(args, tokens) for tokens in args.tokens}
    headline = 4096 if 4096 in by_tokens else args.tokens[-1]
    result = {**by_tokens[headline], "repeats": args.repeats,
              "parameters": "restored checkpoint" if args.checkpoint else "initialised, untrained",
              "by_tokens": {str(t): {k: r[k] for k in TIMES} for t, r in by_tokens.items()}}
    backend, device = jax.default_backend(), jax.devices()[0].device_kind
    path = write_json(args.out_dir / f"timing_{backend}.json", result, method="measured",
                      note=f"routing_only forecast time on {device} ({backend}); synthetic routing of the "
                           "model's shape (times depend on shapes only); headline keys for "
                           f"{headline} tokens, by_tokens for every size")
    plot(args.out_dir / f"timing_{backend}.png", by_tokens, device)
    print(f"wrote {path}")
    for tokens, r in by_tokens.items():
        print(f"  {tokens:>6} tokens: " + ", ".join(f"{k} {r[k]:.4g}" for k in TIMES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
