"""The shipped language models on held-out text -> results/model/summary.json and summary.png.

For each shipped checkpoint: perplexity on all held-out documents (the 10 % of the corpus neither the
tokenizer nor the models trained on), next to an add-one unigram model fitted on the train split (the
baseline each model must halve); the routing skew the models learned: per held-out batch and layer, the
hottest expert's load over the mean load (``max_over_mean_load``); and the training seconds and steps from
each checkpoint's training summary. Runs on 1 device (or ``--devices``) on whatever jax computes on.

Usage:
  python scripts/eval_models.py --data-dir DATA [--out-dir results/model] [--batch-size 16] [--seq-len 128]

DATA is the folder with ``sharegpt/`` and ``moe-beyond/prompt_datasets/`` (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moeless_jax.devices import local_devices  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--out-dir", type=Path, default=Path("results/model"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args(argv)
    devices = local_devices(args.devices)

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tqdm import tqdm

    from moeless_jax.model import load_model, read_checkpoint
    from moeless_jax.model.shipped import SHIPPED, shipped_checkpoint
    from moeless_jax.model.text import load_corpus, pack_tokens, unigram_perplexity
    from moeless_jax.model.tokenizer import default_tokenizer
    from moeless_jax.model.train import evaluate
    from moeless_jax.moe import make_ep_mesh
    from moeless_jax.provenance import compute_device_name, write_json

    corpus = load_corpus(args.data_dir)
    tokenizer = default_tokenizer()
    train_ids = tokenizer.encode_batch(list(corpus.train))
    held_ids = tokenizer.encode_batch(list(corpus.heldout))
    eos = tokenizer.eos_id
    unigram = unigram_perplexity([[*d, eos] for d in train_ids], [[*d, eos] for d in held_ids],
                                 tokenizer.vocab_size)
    heldout = pack_tokens(held_ids, args.seq_len, eos)
    mesh = make_ep_mesh(args.devices, devices)
    summary = {
        "ppl_unigram": unigram,
        "heldout_documents": len(corpus.heldout),
        "heldout_tokens_scored": int((len(heldout) // args.batch_size) * args.batch_size * args.seq_len),
        "data_sources": list(corpus.sources),
        "models": {},
    }
    # Routing counts are complete whatever the buffers: they come from the router, before dispatch.
    forward = nnx.jit(lambda m, t: m(t).expert_counts)
    for name in tqdm(SHIPPED, desc="models"):
        path = shipped_checkpoint(name)
        model = load_model(path, mesh=mesh)
        info = read_checkpoint(path)
        scores = evaluate(model, heldout, args.batch_size)
        skew = []  # [batches, L]
        for start in range(0, len(heldout) - args.batch_size + 1, args.batch_size):
            tokens = jnp.asarray(heldout[start : start + args.batch_size, :-1])
            counts = np.asarray(forward(model, tokens), np.float64)  # [L, E]
            skew.append(counts.max(axis=1) / counts.mean(axis=1))
        skew = np.array(skew)
        train_summary = json.loads((path.parent / f"{name}.train.json").read_text())
        summary["models"][name] = {
            "perplexity": scores["perplexity"],
            "cross_entropy": scores["cross_entropy"],
            "ppl_over_unigram": scores["perplexity"] / unigram,
            "max_over_mean_load_mean": float(skew.mean()),
            "max_over_mean_load_per_layer": skew.mean(axis=0).round(4).tolist(),
            "max_over_mean_load_p99": float(np.quantile(skew, 0.99)),
            "train_seconds": train_summary["train_seconds"],
            "train_steps": train_summary["steps"],
            "train_device": train_summary["device"],
            "checkpoint_step": info.step,
            "checkpoint_dtype": info.dtype,
            "checkpoint_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        }
    models = summary["models"]
    summary["ppl_mixtral_tiny"] = models["mixtral_tiny"]["perplexity"]
    summary["ppl_deepseek_tiny"] = models["deepseek_tiny"]["perplexity"]
    skews = [m["max_over_mean_load_mean"] for m in models.values()]
    summary["max_over_mean_load_mean"] = float(np.mean(skews))
    halved = all(m["ppl_over_unigram"] <= 0.5 for m in models.values())
    summary["targets"] = {"ppl_at_most_half_unigram": halved}
    write_json(args.out_dir / "summary.json", summary, method="computed", device=compute_device_name(),
               note="perplexities and loads computed on held-out text; train_seconds measured on "
                    "train_device")
    plot(summary, args.out_dir / "summary.png")
    for name, m in models.items():
        print(f"{name}: held-out perplexity {m['perplexity']:.1f} (unigram {unigram:.1f}, ratio "
              f"{m['ppl_over_unigram']:.3f}); hottest expert / mean load {m['max_over_mean_load_mean']:.2f}")
    return 0


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    fig, (ax_ppl, ax_skew) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(models)
    ax_ppl.bar(["unigram", *names], [summary["ppl_unigram"], *(models[n]["perplexity"] for n in names)],
               color=["tab:gray", "tab:blue", "tab:orange"])
    ax_ppl.set_ylabel("held-out perplexity")
    ax_ppl.set_title("held-out perplexity (lower is better)")
    for name, color in zip(names, ("tab:blue", "tab:orange"), strict=False):
        per_layer = models[name]["max_over_mean_load_per_layer"]
        ax_skew.plot(range(len(per_layer)), per_layer, "o-", color=color, label=name)
    ax_skew.axhline(1.0, color="gray", lw=0.8)
    ax_skew.set_xlabel("layer")
    ax_skew.set_ylabel("hottest expert load / mean load")
    ax_skew.set_title("routing skew on held-out batches")
    ax_skew.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
