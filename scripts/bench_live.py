"""Generation with the replication controller on and off, same prompts -> results/live/summary.json (+ PNG).

For each shipped model: held-out prompts (truncated to ``--prompt-tokens``) in batches of ``--batch`` are
continued greedily by ``--new-tokens`` tokens, once with static expert parallelism and once with the
controller (MoEless policy) re-planning between steps. Reported: whether the tokens are identical, the
balancedness per layer (mean / max tokens per device, from the slot counts the devices computed) with and
without the controller, slots and bytes moved, and the controller's overhead: the wall time of the run with
it over the run without it, and its own planning + install seconds per step. Each configuration runs once to
compile, then is timed.

Usage:
  python scripts/bench_live.py --data-dir DATA [--out-dir results/live] [--devices 8] [--batch 8]
      [--batches 2] [--prompt-tokens 48] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moeless_jax.devices import local_devices  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--out-dir", type=Path, default=Path("results/live"))
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-moves", type=int, default=4, help="controller move budget per layer")
    parser.add_argument("--rebalance-intervals", type=int, nargs="+", default=[1, 8],
                        help="controller runs, one per interval; the first is the headline")
    args = parser.parse_args(argv)
    devices = local_devices(args.devices)

    import numpy as np
    from tqdm import tqdm

    from moeless_jax.model.shipped import SHIPPED, shipped_checkpoint
    from moeless_jax.model.text import load_corpus
    from moeless_jax.model.tokenizer import default_tokenizer
    from moeless_jax.moe import make_ep_mesh
    from moeless_jax.provenance import compute_device_name, write_json
    from moeless_jax.replication import ControllerConfig

    tokenizer = default_tokenizer()
    documents = load_corpus(args.data_dir).heldout[: args.batch * args.batches]
    prompts = tokenizer.encode_prompts(documents, args.prompt_tokens)
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    mesh = make_ep_mesh(args.devices, devices)
    summary = {"devices": args.devices, "batch": args.batch, "batches": len(batches),
               "new_tokens": args.new_tokens, "prompt_tokens_max": args.prompt_tokens, "models": {}}
    for name in tqdm(SHIPPED, desc="models"):
        path = shipped_checkpoint(name)
        static_runs, static_seconds = _timed_runs(path, mesh, batches, args.new_tokens, None)
        by_interval = []
        for interval in args.rebalance_intervals:
            config = ControllerConfig(policy="moeless", rebalance_interval=interval, history_window=4,
                                      max_moves_per_layer=args.max_moves, split=_split(path, mesh))
            live, seconds = _timed_runs(path, mesh, batches, args.new_tokens, config)
            steps = sum(r.balancedness.shape[0] for r in live)
            own = sum(r.controller["planning_seconds"] + r.controller["install_seconds"] for r in live)
            by_interval.append({
                "rebalance_interval": interval,
                "tokens_identical": all(a.tokens == b.tokens for a, b in zip(static_runs, live, strict=True)),
                "steps": steps,
                "controller_seconds": seconds,
                "controller_overhead_pct": 100 * (seconds / static_seconds - 1),
                "controller_own_ms_per_step": 1e3 * own / steps,
                "balancedness_per_layer_controller": _per_layer(live),
                "balancedness_mean_controller": float(np.mean([r.balancedness.mean() for r in live])),
                "slots_moved": sum(r.controller["slots_moved"] for r in live),
                "bytes_moved": sum(r.controller["bytes_moved"] for r in live),
                "rebalances": sum(r.controller["rebalances"] for r in live),
            })
        steps = sum(r.balancedness.shape[0] for r in static_runs)
        summary["models"][name] = {
            **by_interval[0],  # the first interval is the headline (the controller's default is 1)
            "static_seconds": static_seconds,
            "step_ms_static": 1e3 * static_seconds / steps,
            "balancedness_per_layer_static": _per_layer(static_runs),
            "balancedness_mean_static": float(np.mean([r.balancedness.mean() for r in static_runs])),
            "by_rebalance_interval": by_interval,
        }
    models = summary["models"]
    summary["tokens_identical"] = all(m["tokens_identical"] for m in models.values())
    summary["controller_overhead_pct"] = max(m["controller_overhead_pct"] for m in models.values())
    device = compute_device_name()
    write_json(args.out_dir / "summary.json", summary, method="measured", device=device,
               note=f"{args.devices} devices of {device}; controller overhead is wall time with it over "
                    "wall time without it, same prompts, after compilation")
    plot(summary, args.out_dir / "summary.png")
    for name, m in models.items():
        print(f"{name}: tokens identical {m['tokens_identical']}; balancedness "
              f"{m['balancedness_mean_static']:.3f} -> {m['balancedness_mean_controller']:.3f}; overhead "
              f"{m['controller_overhead_pct']:.1f} % ({m['controller_own_ms_per_step']:.1f} ms of controller "
              f"per {m['step_ms_static']:.1f} ms step)")
    return 0


def _per_layer(runs) -> list[float]:
    import numpy as np

    return np.mean([r.balancedness.mean(0) for r in runs], 0).tolist()


def _split(path, mesh) -> str:
    from moeless_jax.model import read_checkpoint

    return read_checkpoint(path).config.moe_config(mesh.shape["ep"]).split


def _timed_runs(path, mesh, batches, new_tokens, controller):
    """Generate every batch from a freshly loaded (static-table) model, after one untimed compile run:
    (runs, seconds)."""
    from moeless_jax.model import load_model
    from moeless_jax.serve import generate_live

    generate_live(load_model(path, mesh=mesh), batches[0], new_tokens, controller=controller)
    model = load_model(path, mesh=mesh)
    start = time.perf_counter()
    runs = [generate_live(model, batch, new_tokens, controller=controller) for batch in batches]
    return runs, time.perf_counter() - start


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items(), strict=True):
        layers = range(len(m["balancedness_per_layer_static"]))
        ax.plot(layers, m["balancedness_per_layer_static"], "o-", label="static EP")
        for run in m["by_rebalance_interval"]:
            ax.plot(layers, run["balancedness_per_layer_controller"], "o-",
                    label=f"controller, re-plan every {run['rebalance_interval']} step(s): "
                          f"{run['controller_overhead_pct']:+.0f} % time")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("layer")
        ax.set_ylabel("balancedness (mean / max tokens per device)")
        ax.set_title(f"{name}, {summary['devices']} devices")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
