"""``moeless demo``: generate text with the shipped Mixtral-shaped model on 8 host CPU devices, once with
static expert parallelism and once with the replication controller re-planning the replica tables between
steps; print the text, per-layer balancedness under both, the moves made, and that the tokens are identical.

No download and no data: the checkpoint and tokenizer ship with the package.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from moeless_jax.config import load_config, require, require_positive_ints

# Beginnings of chat prompts: the shipped models learned from prompts (each followed by end-of-text), so a
# finished question is most often followed by end-of-text, and an unfinished one is continued.
PROMPTS = (
    "How do I center a text element",
    "Write a short poem about",
    "What is the difference between a list and",
    "Give me three ideas for",
    "Explain how a hash table",
    "Translate the following sentence into",
    "Summarize the plot of",
    "What should I pack for a",
)


@dataclass(frozen=True)
class ModelDemoConfig:
    """The demo's run (defaults are the embedded demo; ``configs/demo.yaml`` repeats them).

    checkpoint: a model checkpoint directory, or a shipped one's name. prompts: the batch (a multiple of
    ``num_devices`` runs without dummy rows). policy, history_window, max_moves_per_layer: the controller's
    (see :class:`moeless_jax.replication.ControllerConfig`).
    """

    checkpoint: str = "mixtral_tiny"
    num_devices: int = 8
    max_new_tokens: int = 24
    prompts: tuple[str, ...] = PROMPTS
    policy: str = "moeless"
    history_window: int = 4
    max_moves_per_layer: int | None = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        require_positive_ints(self, "num_devices", "max_new_tokens", "history_window")
        require(len(self.prompts) >= 1, "prompts", "needs at least one prompt")
        empty = [i for i, p in enumerate(self.prompts) if not str(p).strip()]
        require(not empty, "prompts", f"prompt {empty[:1]} is empty; every prompt needs text")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="generate with the shipped model, controller off and on (CPU)")
    p.add_argument("--config", help="YAML file with ModelDemoConfig fields (default: the embedded demo)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch; replaces the defaults)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(ModelDemoConfig, args.config) if args.config else ModelDemoConfig()
    if args.prompt:
        config = ModelDemoConfig(**{**asdict(config), "prompts": tuple(args.prompt)})
    report = run_demo(config)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def run_demo(config: ModelDemoConfig) -> dict:
    from moeless_jax.devices import local_devices

    devices = local_devices(config.num_devices)
    from pathlib import Path

    from moeless_jax.model import load_model
    from moeless_jax.model.shipped import SHIPPED, shipped_checkpoint
    from moeless_jax.model.tokenizer import default_tokenizer
    from moeless_jax.moe import make_ep_mesh
    from moeless_jax.replication import ControllerConfig
    from moeless_jax.serve import generate_live

    path = shipped_checkpoint(config.checkpoint) if config.checkpoint in SHIPPED else Path(config.checkpoint)
    tokenizer = default_tokenizer()
    prompt_ids = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in config.prompts]
    mesh = make_ep_mesh(config.num_devices, devices)
    runs = {}
    for name in ("static", "controller"):
        model = load_model(path, mesh=mesh)
        split = model.moe_layers()[0].config.split
        controller = None if name == "static" else ControllerConfig(
            policy=config.policy, history_window=config.history_window,
            max_moves_per_layer=config.max_moves_per_layer, split=split)
        runs[name] = generate_live(model, prompt_ids, config.max_new_tokens, controller=controller,
                                   eos_id=tokenizer.eos_id)
    static, live = runs["static"], runs["controller"]
    layout = model.moe_layers()[0].config
    return {
        "config": asdict(config),
        "layout": {"experts": layout.num_experts, "top_k": layout.top_k, "devices": layout.num_devices,
                   "slots_per_device": layout.slots_per_device, "split": layout.split},
        "texts": [tokenizer.decode(t) for t in live.tokens],
        "tokens_identical": static.tokens == live.tokens,
        "static": static.summary(),
        "controller": live.summary(),
    }


def format_report(report: dict) -> str:
    layout, static, live = report["layout"], report["static"], report["controller"]
    summary = live["controller"]
    lines = [
        f"model '{report['config']['checkpoint']}': {layout['experts']} experts, top-{layout['top_k']}, "
        f"{layout['devices']} devices x {layout['slots_per_device']} slots, {layout['split']} split",
        "",
    ]
    for prompt, text in zip(report["config"]["prompts"], report["texts"], strict=True):
        lines += [f"> {prompt}", f"  {text!r}"]
    lines += [
        "",
        f"balancedness per layer (mean over {static['steps']} steps; 1.0 = devices finish together)",
        f"{'layer':<8}{'static EP':>12}{'controller':>12}",
    ]
    for i, (a, b) in enumerate(zip(static["balancedness_per_layer"], live["balancedness_per_layer"],
                                   strict=True)):
        lines.append(f"{i:<8}{a:>12.3f}{b:>12.3f}")
    lines += [
        f"{'mean':<8}{static['balancedness_mean']:>12.3f}{live['balancedness_mean']:>12.3f}",
        "",
        f"controller ({report['config']['policy']}, window {report['config']['history_window']}, at most "
        f"{report['config']['max_moves_per_layer']} moves per layer): {summary['rebalances']} re-plans, "
        f"{summary['slots_moved']} slots moved ({summary['bytes_moved'] / 1e6:.2f} MB), "
        f"{1e3 * summary['planning_seconds'] / max(1, summary['steps']):.2f} ms planning per step",
        f"generated tokens identical with and without the controller: {report['tokens_identical']}",
    ]
    return "\n".join(lines)
