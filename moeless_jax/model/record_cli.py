"""``moeless record``: run corpus prompts through a model's prefill and write their routing trace.

``moeless record --data-dir DATA --out TRACE.npz [--checkpoint DIR | --preset NAME] [--split heldout|train]
[--max-prompts N] [--arrivals FILE] [--window-s 1] [--hidden-dtype float16|float32] [--devices D] [--json]``

Prompts are the documents of one split of the chat corpus (``load_corpus``: held-out by default), each BOS
plus its tokens truncated to the model's ``max_seq_len``. They are batched by the Azure LLM conversation
trace (arrival i serves prompt i mod R; 1-s windows) and the native trace keeps every prompt token's experts,
gate weights and gate inputs (``hidden``), with ``request_id`` the prompt's index in the split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ARRIVALS = Path("azure-llm-2023") / "AzureLLMInferenceTrace_conv.csv"


def register(subparsers) -> None:
    p = subparsers.add_parser("record", help="record the routing and gate inputs of corpus prompts (prefill)")
    p.add_argument("--data-dir", required=True, type=Path,
                   help="folder with sharegpt/*.json, moe-beyond/prompt_datasets/ and azure-llm-2023/")
    p.add_argument("--out", required=True, type=Path, help="output native trace (.npz)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, help="a checkpoint directory written by moeless train")
    which.add_argument("--preset", default="mixtral_tiny",
                       help="a shipped checkpoint (mixtral_tiny, deepseek_tiny; default mixtral_tiny)")
    p.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="corpus split the prompts come from (default heldout)")
    p.add_argument("--max-prompts", type=int, default=1000,
                   help="the split's first N documents (default 1000)")
    p.add_argument("--arrivals", type=Path, help=f"Azure arrival CSV (default DATA/{ARRIVALS})")
    p.add_argument("--window-s", type=float, default=1.0, help="batching window in seconds (default 1)")
    p.add_argument("--hidden-dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the stored gate inputs (default float16)")
    p.add_argument("--devices", type=int, default=1, help="devices on the ep axis (host CPU devices on CPU)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moeless_jax.errors import InputError

    if args.max_prompts < 1:
        raise InputError(f"--max-prompts must be >= 1, got {args.max_prompts}")
    if args.devices < 1:
        raise InputError(f"--devices must be >= 1, got {args.devices}")
    if not args.window_s > 0:
        raise InputError(f"--window-s must be > 0, got {args.window_s}")
    arrivals = args.arrivals if args.arrivals is not None else args.data_dir / ARRIVALS
    if not arrivals.is_file():
        raise FileNotFoundError(f"{arrivals}: no such arrival trace (give --arrivals FILE)")
    from moeless_jax.model.shipped import shipped_checkpoint

    path = args.checkpoint if args.checkpoint is not None else shipped_checkpoint(args.preset)
    if not Path(path).is_dir():
        raise InputError(f"--checkpoint: {path} is not a directory")
    from moeless_jax.devices import local_devices

    devices = local_devices(args.devices)
    from moeless_jax.model import load_model
    from moeless_jax.model.record import batches_from_arrivals, prefill_runs, record_trace
    from moeless_jax.model.text import load_corpus
    from moeless_jax.model.tokenizer import default_tokenizer
    from moeless_jax.moe import make_ep_mesh
    from moeless_jax.traces import save_trace

    docs = getattr(load_corpus(args.data_dir), args.split)[: args.max_prompts]
    if not docs:
        raise InputError(f"{args.data_dir}: the {args.split} split has no documents")
    model = load_model(path, mesh=make_ep_mesh(args.devices, devices))
    tokenizer = default_tokenizer()
    longest = model.config.max_seq_len
    encoded = tokenizer.encode_prompts(docs)
    prompts = [ids[:longest] for ids in encoded]
    batches = batches_from_arrivals(arrivals, len(prompts), window_s=args.window_s)
    start = time.perf_counter()
    trace = record_trace(model, prompts, batches=batches, hidden_dtype=args.hidden_dtype, progress=True,
                         desc="prefill")
    seconds = time.perf_counter() - start
    save_trace(trace, args.out)
    summary = {
        "out": str(args.out),
        "checkpoint": str(path),
        "split": args.split,
        "prompts": int(trace.requests.size),
        "truncated_prompts": sum(len(ids) > longest for ids in encoded),
        "tokens": trace.num_tokens,
        "layers": trace.num_layers,
        "experts": trace.num_experts,
        "top_k": trace.top_k,
        "hidden_size": int(trace.hidden.shape[2]),
        "hidden_dtype": args.hidden_dtype,
        "prefills": len(prefill_runs(batches)),
        "arrivals": str(arrivals),
        "seconds": seconds,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {args.out}: {summary['prompts']} {args.split} prompts ({summary['truncated_prompts']} "
              f"truncated to {longest} tokens), {summary['tokens']} tokens, {summary['layers']} layers, top-"
              f"{summary['top_k']} of {summary['experts']} experts, gate inputs [{summary['tokens']}, "
              f"{summary['layers']}, {summary['hidden_size']}] {args.hidden_dtype}; {summary['prefills']} "
              f"prefills in {seconds:.1f} s")
    return 0
