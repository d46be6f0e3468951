"""The ``moeless`` command.

Each subcommand lives beside the code it drives and exposes ``register(subparsers)``; it imports jax (or
anything heavy) only when it runs, so ``moeless --help`` is instant and a command can set XLA flags first.
Errors in user input print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moeless_jax.errors import USER_ERRORS

# Modules that provide ``register(subparsers)``, in help order.
COMMAND_MODULES = (
    "moeless_jax.demo",
    "moeless_jax.layer_demo",
    "moeless_jax.traces.cli",
    "moeless_jax.plan.cli",
    "moeless_jax.predict.cli",
    "moeless_jax.model.cli",
    "moeless_jax.model.record_cli",
    "moeless_jax.serve.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeless", description="Serve MoE models with predictor-driven, elastic expert replication."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"moeless {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
