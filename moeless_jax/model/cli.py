"""``moeless train`` and ``moeless generate``: train the MoE language model, and generate text with it.

- ``moeless train --data-dir DATA --out DIR [--config configs/train_mixtral_tiny.yaml] [--steps N]
  [--no-resume] [--json]``: trains (resuming from ``DIR/train_state`` when present) and writes the exported
  checkpoint ``DIR/model``, ``summary.json``, ``train_log.json`` and ``loss.png``.
- ``moeless generate --prompt TEXT [--prompt TEXT ...] [--checkpoint DIR | --preset NAME]
  [--max-new-tokens N] [--temperature T] [--seed S] [--devices D] [--replication] [--json]``: batched
  generation with the KV cache from a checkpoint (default: the shipped Mixtral-shaped one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train the MoE language model on real text (CPU or GPU)")
    train.add_argument("--data-dir", required=True, type=Path,
                       help="folder with sharegpt/*.json and moe-beyond/prompt_datasets/ (docs/training.md)")
    train.add_argument("--out", required=True, type=Path, help="run directory (resumed when it exists)")
    train.add_argument("--config", type=Path, help="YAML with TrainConfig fields (default: the defaults)")
    train.add_argument("--steps", type=int,
                       help="override the config's steps (warm-up is capped at a tenth of them)")
    train.add_argument("--no-resume", action="store_true", help="start over even if DIR has a checkpoint")
    train.add_argument("--json", action="store_true", help="print the summary as JSON")
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from moeless_jax.config import load_config
    from moeless_jax.devices import local_devices
    from moeless_jax.model.train import TrainConfig, check_data_dir

    config = load_config(TrainConfig, args.config) if args.config else TrainConfig()
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps,
                                     warmup_steps=min(config.warmup_steps, args.steps // 10))
    data_dir = check_data_dir(args.data_dir)
    local_devices(config.num_devices)
    from moeless_jax.model.train import load_token_data, train

    data = load_token_data(data_dir, config.seq_len, config.batch_size)
    summary = train(config, data, args.out, resume=not args.no_resume)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        held = summary["heldout"]
        print(f"{config.model}: {summary['steps']} steps, held-out perplexity {held['perplexity']:.1f} "
              f"({held['tokens']:.0f} tokens); checkpoint {args.out / 'model'}")
    return 0
