"""``moeless generate``: prompts to text with a trained model, batched, through the KV cache.

``moeless generate --prompt TEXT [--prompt TEXT ...] [--checkpoint DIR | --preset NAME] [--max-new-tokens N]
[--temperature T] [--seed S] [--devices D] [--replication {moeless,eplb,static}] [--layer-ahead [YAML]]
[--json]``

The default model is the shipped Mixtral-shaped checkpoint. ``--replication`` runs the replication controller
between steps; ``--layer-ahead`` replicates inside each step, layer ``l + 1`` planned and moved during layer
``l`` (settings from a YAML ``layer_ahead:`` section, default ``LayerAheadConfig()``). The text does not
change; the report says how evenly the devices were loaded and how many slot weights were copied.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from prompts with a trained MoE model")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, help="a checkpoint directory written by moeless train")
    which.add_argument("--preset", default="mixtral_tiny", help="a shipped checkpoint (mixtral_tiny, "
                       "deepseek_tiny; default mixtral_tiny)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=1, help="devices on the ep axis (host CPU devices on CPU)")
    p.add_argument("--replication", choices=("moeless", "eplb", "static"),
                   help="run the replication controller with this policy between steps")
    p.add_argument("--layer-ahead", nargs="?", const="", metavar="YAML",
                   help="replicate layer-ahead inside each step (optional YAML with a layer_ahead: section)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moeless_jax.errors import InputError

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    empty = [i for i, p in enumerate(args.prompt) if not p.strip()]
    if empty:
        raise InputError(f"--prompt number {empty[0] + 1} is empty; every prompt needs text")
    layer_ahead = _layer_ahead(args.layer_ahead)  # a bad config fails before the model loads
    from moeless_jax.devices import local_devices
    from moeless_jax.model.shipped import shipped_checkpoint

    path = args.checkpoint if args.checkpoint is not None else shipped_checkpoint(args.preset)
    if not Path(path).is_dir():
        raise InputError(f"--checkpoint: {path} is not a directory")
    devices = local_devices(args.devices)
    from moeless_jax.model import load_model
    from moeless_jax.model.tokenizer import default_tokenizer
    from moeless_jax.moe import make_ep_mesh
    from moeless_jax.replication import ControllerConfig
    from moeless_jax.serve.live import generate_live

    tokenizer = default_tokenizer()
    model = load_model(path, mesh=make_ep_mesh(args.devices, devices))
    controller = None
    if args.replication:
        controller = ControllerConfig(policy=args.replication, split=model.moe_layers()[0].config.split)
    prompt_ids = tokenizer.encode_prompts(args.prompt)
    run = generate_live(model, prompt_ids, args.max_new_tokens, controller=controller,
                        layer_ahead=layer_ahead, temperature=args.temperature,
                        seed=args.seed, eos_id=tokenizer.eos_id)
    texts = [tokenizer.decode(t) for t in run.tokens]
    if args.json:
        print(json.dumps({"texts": texts, "tokens": run.tokens, **run.summary()}, indent=2))
    else:
        for prompt, text in zip(args.prompt, texts, strict=True):
            print(f"> {prompt}\n{text}\n")
        if layer_ahead is not None:
            limit = layer_ahead.config.min_tokens_per_device
            print(f"layer-ahead: {int(run.weight_copies.sum())} slot weights copied inside the steps (steps "
                  f"under {limit} tokens per device keep their tables)")
    return 0


def _layer_ahead(path: str | None):
    """The ``--layer-ahead`` setting: None (off), "" (defaults) or a YAML file with a layer_ahead: section."""
    if path is None:
        return None
    from moeless_jax.config import load_config
    from moeless_jax.replication import LayerAhead, LayerAheadConfig

    config = load_config(LayerAheadConfig, path, section="layer_ahead") if path else LayerAheadConfig()
    if config.forecaster != "gate_reuse":
        from moeless_jax.errors import InputError

        raise InputError(f"--layer-ahead: forecaster '{config.forecaster}' needs a fitted predictor, which "
                         "moeless generate does not load; use gate_reuse here, or LayerAhead in Python")
    return LayerAhead(config)
