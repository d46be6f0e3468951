"""``moeless demo``: generate text with the shipped Mixtral-shaped model on 8 host CPU devices three times:
with static expert parallelism, with the replication controller re-planning the replica tables between steps,
and with layer-ahead replication (inside every step, layer l+1's table forecast from layer l, planned and its
weights moved on the devices); print the text, per-layer balancedness under each, the moves made, and that the
tokens are identical.

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
    (see :class:`moeless_jax.replication.ControllerConfig`). layer_ahead: run the layer-ahead pass too (gate
    reuse, default budget). The demo's steps hold a few tokens per device, far below the size where
    layer-ahead pays (its default declines under 1,400), so the demo switches that threshold off to show the
    mechanism.
    """

    checkpoint: str = "mixtral_tiny"
    num_devices: int = 8
    max_new_tokens: int = 24
    prompts: tuple[str, ...] = PROMPTS
    policy: str = "moeless"
    history_window: int = 4
    max_moves_per_layer: int | None = 4
    layer_ahead: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        require_positive_ints(self, "num_devices", "max_new_tokens", "history_window")
        require(len(self.prompts) >= 1, "prompts", "needs at least one prompt")
        empty = [i for i, p in enumerate(self.prompts) if not str(p).strip()]
        require(not empty, "prompts", f"prompt {empty[:1]} is empty; every prompt needs text")
        require(isinstance(self.layer_ahead, bool), "layer_ahead",
                f"must be true or false, got {self.layer_ahead!r}")


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
    from moeless_jax.replication import ControllerConfig, LayerAhead, LayerAheadConfig
    from moeless_jax.serve import generate_live

    path = shipped_checkpoint(config.checkpoint) if config.checkpoint in SHIPPED else Path(config.checkpoint)
    tokenizer = default_tokenizer()
    prompt_ids = tokenizer.encode_prompts(config.prompts)
    mesh = make_ep_mesh(config.num_devices, devices)
    runs = {}
    for name in ("static", "controller", "layer_ahead") if config.layer_ahead else ("static", "controller"):
        model = load_model(path, mesh=mesh)
        split = model.moe_layers()[0].config.split
        controller = None if name != "controller" else ControllerConfig(
            policy=config.policy, history_window=config.history_window,
            max_moves_per_layer=config.max_moves_per_layer, split=split)
        ahead = LayerAhead(LayerAheadConfig(min_tokens_per_device=0)) if name == "layer_ahead" else None
        runs[name] = generate_live(model, prompt_ids, config.max_new_tokens, controller=controller,
                                   layer_ahead=ahead, eos_id=tokenizer.eos_id)
    static, live = runs["static"], runs["controller"]
    layout = model.moe_layers()[0].config
    return {
        "config": asdict(config),
        "layout": {"experts": layout.num_experts, "top_k": layout.top_k, "devices": layout.num_devices,
                   "slots_per_device": layout.slots_per_device, "split": layout.split},
        "texts": [tokenizer.decode(t) for t in live.tokens],
        "tokens_identical": all(run.tokens == static.tokens for run in runs.values()),
        **{name: run.summary() for name, run in runs.items()},
    }


def format_report(report: dict) -> str:
    layout, static, live = report["layout"], report["static"], report["controller"]
    ahead = report.get("layer_ahead")
    summary = live["controller"]
    lines = [
        f"model '{report['config']['checkpoint']}': {layout['experts']} experts, top-{layout['top_k']}, "
        f"{layout['devices']} devices x {layout['slots_per_device']} slots, {layout['split']} split",
        "",
    ]
    for prompt, text in zip(report["config"]["prompts"], report["texts"], strict=True):
        lines += [f"> {prompt}", f"  {text!r}"]
    columns = [("static EP", static), ("controller", live)] + ([("layer-ahead", ahead)] if ahead else [])
    lines += [
        "",
        f"balancedness per layer (mean over {static['steps']} steps; 1.0 = devices finish together)",
        f"{'layer':<8}" + "".join(f"{name:>13}" for name, _ in columns),
    ]
    for i in range(len(static["balancedness_per_layer"])):
        lines.append(f"{i:<8}" + "".join(f"{run['balancedness_per_layer'][i]:>13.3f}" for _, run in columns))
    lines += [
        f"{'mean':<8}" + "".join(f"{run['balancedness_mean']:>13.3f}" for _, run in columns),
        "",
        f"controller ({report['config']['policy']}, window {report['config']['history_window']}, at most "
        f"{report['config']['max_moves_per_layer']} moves per layer): {summary['rebalances']} re-plans, "
        f"{summary['slots_moved']} slots moved ({summary['bytes_moved'] / 1e6:.2f} MB), "
        f"{1e3 * summary['planning_seconds'] / max(1, summary['steps']):.2f} ms planning per step",
    ]
    if ahead:
        lines.append(f"layer-ahead (gate reuse, in the step; layer 0 keeps its table): "
                     f"{ahead['layer_ahead_weight_copies']} slot weights copied inside the steps")
    lines.append(f"generated tokens identical in every run: {report['tokens_identical']}")
    return "\n".join(lines)
