"""Dispatch-time split of tokens across replicas -> results/split/ (summary.json + PNG).

``--part quota``  time of the quota computation per layer on the default device (CPU or GPU): a jitted scan
                  over many layers' expert counts, so the per-layer figure is device time without the Python
                  dispatch of one call. Writes ``quota_<platform>.json``.
``--part warps``  (GPU) the fused kernel's time per layer for 1..16 warps at every budget, layers unrolled:
                  how the kernel's default warps were chosen. Writes ``quota_warps_<platform>.json``.
``--part merge``  refresh the quota timings inside an existing ``summary.json``.
``--part eval``   the real-trace evaluation: DeepSeek-V2-Lite routing (MoE-Beyond), test prompts, batches from
                  Azure conversation arrivals in 1-s windows; max device load against Oracle (perfect
                  balance) for {even, balanced} x {history, MoEless-forecast, perfect-forecast placement} x
                  slot budgets, and the exact LP bound. Writes ``summary.json`` (merging the quota files).
``--part iterations``  the balanced split against the LP optimum for 2..32 rounds (history placement,
                  1.125x and 1.25x slots, the LP's sampled batch-layers). Writes ``iterations.json``.

Usage:
  python scripts/bench_split.py --part quota --out-dir results/split
  python scripts/bench_split.py --part eval --data-dir DATA --out-dir results/split
  python scripts/bench_split.py --part iterations --data-dir DATA --out-dir results/split
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moeless_jax.moe.config import SPLIT_ITERATIONS  # noqa: E402

BUDGETS = (1.125, 1.25, 1.5, 2.0)
NUM_EXPERTS, NUM_DEVICES = 64, 8  # DeepSeek-V2-Lite's routed experts on 8 devices


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("quota", "warps", "eval", "merge", "iterations"), required=True)
    p.add_argument("--out-dir", default="results/split")
    p.add_argument("--data-dir", help="folder holding moe-beyond/ and azure-llm-2023/ (eval part)")
    p.add_argument("--layers", type=int, default=256, help="layers per timed scan (quota part)")
    p.add_argument("--unrolled-layers", type=int, default=32, help="layers timed unrolled (quota part)")
    return p.parse_args(argv)


def budget_key(budget: float) -> str:
    return f"{budget:g}".replace(".", "_") + "x"


# ---------------------------------------------------------------------------------------------- quota timing
def scan_quotas(
    counts, expert_slots, replica_count, *, slots_per_device: int, split: str, unroll: bool = False
):
    """Quotas of every layer's counts [L, E] in one device program (a scan), so timing excludes dispatch.

    ``unroll``: the layers as straight-line code (no loop), as in a model whose layers are unrolled; a rolled
    scan adds a per-iteration loop overhead on GPUs.
    """
    import jax
    import jax.numpy as jnp

    from moeless_jax.moe.split import balanced_quotas, split_quotas

    def body(total, layer_counts):
        kw = dict(slots_per_device=slots_per_device, num_devices=NUM_DEVICES)
        if split.startswith("balanced"):  # "balanced": the XLA rounds; "balanced_fused": the Pallas kernel
            fused = split == "balanced_fused"
            q = balanced_quotas(layer_counts, expert_slots, replica_count, fused=fused, **kw)
        else:
            q = split_quotas(layer_counts, expert_slots, replica_count, split=split, **kw)
        return total + q.sum(), None

    return jax.lax.scan(body, jnp.int32(0), counts, unroll=unroll)[0]


def compare_fused(counts, expert_slots, replica_count, *, slots_per_device: int) -> dict:
    """Max device load of the fused-kernel quotas against the XLA quotas on the same counts [L, E]."""
    import jax
    import jax.numpy as jnp

    from moeless_jax.moe.split import balanced_quotas, device_loads, replica_devices

    device, valid = replica_devices(expert_slots, slots_per_device)

    @partial(jax.jit, static_argnames="fused")
    def worst(c, fused):
        q = balanced_quotas(
            c,
            expert_slots,
            replica_count,
            slots_per_device=slots_per_device,
            num_devices=NUM_DEVICES,
            fused=fused,
        )
        return jnp.max(device_loads(q, device, valid, NUM_DEVICES)), jnp.sum(q, axis=1) == c

    xla = [worst(c, False) for c in counts]
    fused = [worst(c, True) for c in counts]
    return {
        "max_load_diff": max(abs(int(a[0]) - int(b[0])) for a, b in zip(xla, fused, strict=True)),
        "sums_exact": all(bool(jnp.all(b[1])) for b in fused),
    }


def sample_counts(rng, layers: int):
    """[L, E] int32 expert counts of 4096-token batches at top-6 under skewed (Dirichlet(0.5)) popularity."""
    import jax.numpy as jnp
    import numpy as np

    popularity = rng.dirichlet(np.full(NUM_EXPERTS, 0.5), size=layers)
    return jnp.asarray(np.stack([rng.multinomial(4096 * 6, p) for p in popularity]), jnp.int32)


def random_table(rng, budget: float):
    """(slots per device, expert_slots [E, R], replica_count [E]) of a random table at ``budget`` x slots."""
    import jax.numpy as jnp

    from moeless_jax.moe import ReplicaTable

    slots = int(round(budget * NUM_EXPERTS / NUM_DEVICES))
    table = ReplicaTable.random(rng, num_experts=NUM_EXPERTS, num_devices=NUM_DEVICES, slots_per_device=slots)
    return slots, jnp.asarray(table.expert_slots), jnp.asarray(table.replica_count)


def time_warps(unrolled_layers: int) -> dict:
    """The fused kernel's time per layer for 1..16 warps (GPU), layers unrolled: how ``default_num_warps``
    was chosen."""
    import jax
    import numpy as np

    from moeless_jax.bench import time_fn
    from moeless_jax.moe.split_kernel import default_num_warps, fused_levelled_quotas

    rng = np.random.default_rng(0)
    counts = sample_counts(rng, unrolled_layers)
    out = {"layers_unrolled": unrolled_layers, "experts": NUM_EXPERTS, "devices": NUM_DEVICES, "points": []}
    for budget in BUDGETS:
        slots, expert_slots, replica_count = random_table(rng, budget)
        num_movable = min(NUM_EXPERTS, NUM_DEVICES * slots - NUM_EXPERTS)
        default = default_num_warps(NUM_EXPERTS, NUM_DEVICES, NUM_DEVICES, num_movable)
        for warps in (1, 2, 4, 8, 16):
            quotas = partial(fused_levelled_quotas, slots_per_device=slots, num_devices=NUM_DEVICES,
                             num_movable=num_movable, iterations=SPLIT_ITERATIONS, num_warps=warps)
            fn = jax.jit(lambda c, s, n, q=quotas: sum(q(layer[:, None], s, n[:, None]).sum() for layer in c))
            args = (counts, expert_slots, replica_count)
            seconds = time_fn(lambda fn=fn, a=args: fn(*a), repeats=20, min_seconds=0.3, pipelined=10)
            point = {"budget": budget, "num_warps": warps, "default": warps == default,
                     "us_per_layer": seconds / unrolled_layers * 1e6}
            out["points"].append(point)
            print(json.dumps(point), flush=True)
    return out


def time_quotas(layers: int, unrolled_layers: int) -> dict:
    import jax
    import numpy as np

    from moeless_jax.bench import time_fn

    rng = np.random.default_rng(0)
    counts = sample_counts(rng, layers)
    out = {"layers_per_scan": layers, "layers_unrolled": unrolled_layers, "experts": NUM_EXPERTS,
           "devices": NUM_DEVICES, "points": [], "unrolled_points": []}
    for budget in BUDGETS:
        slots, expert_slots, replica_count = random_table(rng, budget)
        out.setdefault("fused_vs_xla", []).append(
            compare_fused(counts[:16], expert_slots, replica_count, slots_per_device=slots)
            | {"budget": budget}
        )
        for split in ("even", "balanced", "balanced_fused"):
            for loop, n in (("scan", layers), ("unrolled", unrolled_layers)):
                unroll = loop == "unrolled"
                fn = jax.jit(partial(scan_quotas, slots_per_device=slots, split=split, unroll=unroll))
                args = (counts[:n], expert_slots, replica_count)
                call = lambda fn=fn, args=args: fn(*args)  # noqa: E731
                seconds = time_fn(call, repeats=20, min_seconds=0.5, pipelined=10)
                synchronised = time_fn(call, repeats=20, min_seconds=0.5)
                point = {"budget": budget, "split": split, "us_per_layer": seconds / n * 1e6, "layers": n,
                         "us_per_layer_synchronised": synchronised / n * 1e6}
                out["points" if loop == "scan" else "unrolled_points"].append(point)
                print(json.dumps(point | {"loop": loop}), flush=True)
    for split in ("balanced", "balanced_fused"):
        out[f"{split}_us_per_layer_mean"] = float(
            np.mean([p["us_per_layer"] for p in out["points"] if p["split"] == split])
        )
    return out


def quota_part(args) -> None:
    import jax

    from moeless_jax.provenance import write_json

    platform = jax.default_backend()
    if args.part == "warps":
        result, name = time_warps(args.unrolled_layers), f"quota_warps_{platform}.json"
    else:
        result, name = time_quotas(args.layers, args.unrolled_layers), f"quota_{platform}.json"
    result["device"] = jax.devices()[0].device_kind
    path = write_json(Path(args.out_dir) / name, result, method="measured")
    print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part in ("quota", "warps"):
        quota_part(args)
    else:
        from split_eval import eval_part, iterations_part, merge_part  # the trace evaluation, beside this

        {"eval": eval_part, "merge": merge_part, "iterations": iterations_part}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
