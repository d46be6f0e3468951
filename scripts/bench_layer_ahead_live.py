"""Prefill batches of the shipped models, layer-ahead replication on -> results/layer_ahead/live.json (+ PNG).

For each shipped model, held-out prompts (``--rows`` per batch, each cut or padded to ``--width`` tokens) are
run as prefill steps on ``--devices`` devices, batch after batch, four ways on freshly loaded models:

* ``static``: static expert parallelism, the tables never change;
* ``per_step``: the replication controller (MoEless, history of the last batch) re-plans between batches,
  with the same copy budget per layer as layer-ahead (``--max-moves`` x devices);
* ``layer_ahead``: inside each step, layer ``l + 1``'s table is planned from layer ``l``'s gate input through
  layer ``l + 1``'s router (gate reuse) and its weights moved (``--max-moves`` per device), tables persisting
  from batch to batch; layer 0 keeps its table;
* ``layer_ahead_moeless``: the same with MoEless gate copies (fine-tuned where gate reuse validates poorly);
* ``layer_ahead_routing_only``: the same with RoutingOnly forecasts from layer ``l``'s routing;
* ``both``: the controller between batches and gate-reuse layer-ahead inside them.

The two fitted forecasters (distance 1) are fitted on the routing of ``--train-prompts`` TRAIN-split prompts,
recorded from the model's own prefills; the batches served are HELD-OUT prompts.

Reported per way: balancedness (mean / max tokens per device, from the slot counts the devices computed) per
layer and averaged over layers 1.. (the layers layer-ahead plans) and over all layers; weight copies per
layer and step; the largest logit difference from ``static`` (replicas hold their experts' weights, so it is
float rounding only). Balance is a count: the same on any hardware; 8 host CPU devices compute it here.

Usage:
  python scripts/bench_layer_ahead_live.py --data-dir DATA [--out-dir results/layer_ahead]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moeless_jax.devices import local_devices  # noqa: E402

WAYS = ("static", "per_step", "layer_ahead", "layer_ahead_moeless", "layer_ahead_routing_only", "both")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--out-dir", type=Path, default=Path("results/layer_ahead"))
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rows", type=int, default=16, help="prompts per prefill batch")
    p.add_argument("--width", type=int, default=64, help="tokens per prompt (cut or padded)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--max-moves", type=int, default=4, help="layer-ahead copies per device, layer and step")
    p.add_argument("--train-prompts", type=int, default=256, help="TRAIN prompts to fit on")
    return p.parse_args(argv)


def batches(corpus, args) -> list:
    import numpy as np

    from moeless_jax.model.tokenizer import default_tokenizer

    documents = corpus.heldout[: args.rows * args.batches]
    if len(documents) < args.rows * args.batches:
        raise SystemExit(f"only {len(documents)} held-out documents; lower --rows or --batches")
    rows = np.zeros((len(documents), args.width), np.int32)  # padded with id 0, which loads experts too
    for i, ids in enumerate(default_tokenizer().encode_prompts(documents, args.width)):
        rows[i, : len(ids)] = ids
    return [rows[i : i + args.rows] for i in range(0, len(rows), args.rows)]


def fitted_forecasters(path, mesh, corpus, args) -> dict:
    """LayerAhead objects for MoEless gate copies and RoutingOnly, fitted on TRAIN-split prefills."""
    import dataclasses

    import numpy as np

    from moeless_jax.model import load_model
    from moeless_jax.model.record import record_trace
    from moeless_jax.model.tokenizer import default_tokenizer
    from moeless_jax.predict import MoElessPredictor, RoutingOnly, RoutingOnlyConfig
    from moeless_jax.replication import LayerAhead, LayerAheadConfig

    model = load_model(path, mesh=mesh)
    ids = default_tokenizer().encode_prompts(corpus.train[: args.train_prompts], args.width)
    groups = [list(range(i, min(i + args.rows, len(ids)))) for i in range(0, len(ids), args.rows)]
    fit = record_trace(model, ids, batches=groups, progress=True, desc="record train prompts")
    kernels = np.stack([np.asarray(layer.router[...], np.float32) for layer in model.moe_layers()])
    moeless = MoElessPredictor(1, kernels).fit(fit)
    window = min(RoutingOnlyConfig().window, fit.num_layers - 1)  # a 4-layer model has 3 earlier layers
    config = dataclasses.replace(RoutingOnlyConfig(), window=window,
                                 own_layers=min(RoutingOnlyConfig().own_layers, window))
    routing_only = RoutingOnly(1, config).fit(fit)
    settings = {"max_moves_per_device": args.max_moves, "min_tokens_per_device": 0}
    return {
        "layer_ahead_moeless": LayerAhead(LayerAheadConfig("gate_copies", **settings),
                                          gate_kernels=moeless.kernels),
        "layer_ahead_routing_only": LayerAhead(LayerAheadConfig("routing_only", **settings),
                                               routing_only=routing_only),
    }


def run_way(way: str, path, mesh, token_batches, args, fitted: dict):
    """Per batch: (logits, balancedness [L], weight copies [L])."""
    import jax
    import numpy as np
    from flax import nnx

    from moeless_jax.model import load_model
    from moeless_jax.replication import ControllerConfig, LayerAhead, LayerAheadConfig, ReplicationController
    from moeless_jax.serve import device_balancedness

    model = load_model(path, mesh=mesh)
    layer_config = model.moe_layers()[0].config
    controller = None
    if way in ("per_step", "both"):
        # The same copy budget per layer as layer-ahead's (N per device), so both may move as much.
        config = ControllerConfig(policy="moeless", split=layer_config.split,
                                  max_moves_per_layer=args.max_moves * layer_config.num_devices)
        controller = ReplicationController(model, config, tables_change_in_step=way == "both")
    ahead = fitted.get(way)
    if way in ("layer_ahead", "both"):
        ahead = LayerAhead(LayerAheadConfig(max_moves_per_device=args.max_moves, min_tokens_per_device=0))
    step = nnx.jit(lambda model, tokens, layer_ahead: model(tokens, layer_ahead=layer_ahead),
                   static_argnames="layer_ahead")
    devices = layer_config.num_devices
    results = []
    for tokens in token_batches:
        out = step(model, jax.device_put(tokens), ahead)
        if int(out.overflow):
            raise RuntimeError("a prefill overflowed its MoE buffers; the default buffers should not")
        if controller is not None:
            controller.observe(out.expert_counts, out.slot_counts)
            controller.flush()
        results.append((np.asarray(out.logits), device_balancedness(np.asarray(out.slot_counts), devices),
                        np.asarray(out.weight_copies).sum(axis=1)))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    devices = local_devices(args.devices)
    import numpy as np
    from tqdm import tqdm

    from moeless_jax.model.shipped import SHIPPED, shipped_checkpoint
    from moeless_jax.model.text import load_corpus
    from moeless_jax.moe import make_ep_mesh
    from moeless_jax.provenance import compute_device_name, write_json

    mesh = make_ep_mesh(args.devices, devices)
    corpus = load_corpus(args.data_dir)
    token_batches = batches(corpus, args)
    summary = {"devices": args.devices, "rows": args.rows, "width": args.width, "batches": len(token_batches),
               "tokens_per_device": args.rows * args.width // args.devices,
               "max_moves_per_device": args.max_moves, "train_prompts": args.train_prompts, "models": {}}
    for name in tqdm(SHIPPED, desc="models"):
        path = shipped_checkpoint(name)
        fitted = fitted_forecasters(path, mesh, corpus, args)
        runs = {way: run_way(way, path, mesh, token_batches, args, fitted)
                for way in tqdm(WAYS, desc=name, leave=False)}
        model_summary = {}
        for way, results in runs.items():
            balance = np.stack([r[1] for r in results])  # [batches, L]
            copies = np.stack([r[2] for r in results])
            logit_diff = max(float(np.abs(r[0] - s[0]).max()) for r, s in zip(results, runs["static"],
                                                                              strict=True))
            model_summary[way] = {
                "balancedness_per_layer": balance.mean(0).round(4).tolist(),
                "balancedness_mean": float(balance.mean()),
                "balancedness_mean_layers_1_on": float(balance[:, 1:].mean()),
                "weight_copies_per_layer_step": float(copies[:, 1:].mean()),
                "max_abs_logit_diff_vs_static": logit_diff,
            }
        summary["models"][name] = model_summary
    device = compute_device_name()
    write_json(args.out_dir / "live.json", summary, method="measured", device=device,
               note=f"{args.devices} devices of {device}: balancedness counts the tokens each device "
                    "computed (hardware-independent); no timing")
    plot(summary, args.out_dir / "live.png")
    for name, ways in summary["models"].items():
        print(name + ": balancedness, layers 1..: " + ", ".join(
            f"{way} {m['balancedness_mean_layers_1_on']:.3f}" for way, m in ways.items()))
    return 0


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, (name, ways) in zip(axes[0], models.items(), strict=True):
        for way, m in ways.items():
            ax.plot(m["balancedness_per_layer"], "o-", label=way)
        ax.set_title(f"{name}: prefill, {summary['tokens_per_device']} tokens/device")
        ax.set_xlabel("layer")
        ax.set_ylabel("balancedness (mean / max tokens per device)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
