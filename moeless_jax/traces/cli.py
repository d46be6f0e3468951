"""``moeless trace``: convert routing traces to the native format, describe them, and batch them.

- ``moeless trace convert --format moe-beyond --input DIR --output FILE.npz [--prompts 1-50,60]``
- ``moeless trace info TRACE`` (TRACE: a native ``.npz`` or a MoE-Beyond folder)
- ``moeless trace batches TRACE (--arrivals FILE [--window-s 1] | --batch-tokens N)``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moeless_jax.errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser("trace", help="convert, describe and batch routing traces")
    commands = parser.add_subparsers(dest="trace_command", required=True, metavar="ACTION")

    convert = commands.add_parser("convert", help="convert a routing trace to the native .npz format")
    convert.add_argument("--format", required=True, choices=["moe-beyond", "native"], help="input format")
    convert.add_argument("--input", required=True, type=Path, help="input folder or file")
    convert.add_argument("--output", required=True, type=Path, help="output .npz file")
    convert.add_argument("--prompts", type=_prompt_list, help="MoE-Beyond prompt numbers, e.g. 1-50,60")
    convert.add_argument("--no-cache", action="store_true", help="do not read or write the parse cache")
    convert.set_defaults(func=_convert)

    info = commands.add_parser("info", help="print the size and shape of a routing trace")
    info.add_argument("trace", type=Path, help="native .npz file or MoE-Beyond folder")
    info.set_defaults(func=_info)

    batches = commands.add_parser("batches", help="batch a routing trace and summarize the batches' loads")
    batches.add_argument("trace", type=Path, help="native .npz file or MoE-Beyond folder")
    how = batches.add_mutually_exclusive_group(required=True)
    how.add_argument("--arrivals", type=Path, help="arrival trace: Azure .csv or Mooncake .jsonl")
    how.add_argument("--batch-tokens", type=int, help="token budget per batch (whole requests, in order)")
    batches.add_argument("--arrivals-format", choices=["auto", "azure", "mooncake"], default="auto")
    batches.add_argument("--window-s", type=float, default=1.0, help="batching window in seconds (default 1)")
    batches.add_argument("--max-requests", type=int, help="use only the first N arrivals")
    batches.set_defaults(func=_batches)


def _prompt_list(text: str) -> list[int]:
    """``"1-3,7"`` -> ``[1, 2, 3, 7]``."""
    numbers: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            numbers.extend(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected prompt numbers like 1-50,60, got {text!r}") from None
    return numbers


def _load(path: Path, *, prompts=None, cache: bool = True):
    from moeless_jax.traces import load_trace, read_moe_beyond

    if path.is_dir():
        return read_moe_beyond(path, prompts=prompts, cache=cache)
    if prompts is not None:
        raise InputError("--prompts applies to a MoE-Beyond folder only")
    return load_trace(path)


def _convert(args) -> int:
    from moeless_jax.traces import save_trace

    if args.format == "moe-beyond" and not args.input.is_dir():
        raise InputError(f"{args.input}: --format moe-beyond expects a folder")
    trace = _load(args.input, prompts=args.prompts, cache=not args.no_cache)
    save_trace(trace, args.output)
    print(f"wrote {args.output}: {trace.num_tokens} tokens, {trace.requests.size} requests, "
          f"{trace.num_layers} layers, top-{trace.top_k} of {trace.num_experts} experts")
    return 0


def _info(args) -> int:
    trace = _load(args.trace)
    lengths = trace.request_lengths
    optional = [name for name in ("gate_weights", "hidden", "token_text") if getattr(trace, name) is not None]
    print(f"tokens: {trace.num_tokens}")
    print(f"requests: {lengths.size} (tokens per request: mean {lengths.mean():.1f}, min {lengths.min()}, "
          f"max {lengths.max()})" if lengths.size else "requests: 0")
    print(f"layers: {trace.num_layers} (ids {trace.layer_ids[0]}..{trace.layer_ids[-1]})")
    print(f"experts: {trace.num_experts}, top-k: {trace.top_k}")
    print(f"optional fields: {', '.join(optional) or 'none'}")
    return 0


def _batches(args) -> int:
    from moeless_jax.traces import (
        expert_loads,
        read_azure_arrivals,
        read_mooncake_arrivals,
        token_budget_batches,
        window_batches,
    )

    trace = _load(args.trace)
    if args.arrivals is not None:
        kind = args.arrivals_format
        if kind == "auto":
            kind = "mooncake" if args.arrivals.suffix == ".jsonl" else "azure"
        arrivals = (read_mooncake_arrivals if kind == "mooncake" else read_azure_arrivals)(args.arrivals)
        batches = window_batches(trace, arrivals, window_s=args.window_s, max_requests=args.max_requests)
        used = min(arrivals.num_requests, args.max_requests or arrivals.num_requests)
        print(f"arrivals: {used} of {arrivals.num_requests} from {arrivals.source}, "
              f"{arrivals.arrival_s[used - 1]:.1f} s, windows of {args.window_s:g} s")
    else:
        batches = token_budget_batches(trace, args.batch_tokens)
    sizes = np.array([batch.size for batch in batches])
    print(f"batches: {len(batches)}")
    if not len(batches):
        return 0
    print(f"tokens per batch: mean {sizes.mean():.1f}, p50 {np.median(sizes):.0f}, min {sizes.min()}, "
          f"max {sizes.max()}, total {sizes.sum()}")
    loads = expert_loads(trace, batches)  # [B, L, E]
    hot = loads.max(axis=2) / loads.mean(axis=2)  # [B, L] hottest expert / mean expert load
    print(f"hottest expert / mean expert load per (batch, layer): mean {hot.mean():.2f}, "
          f"p99 {np.percentile(hot, 99):.2f}")
    return 0
