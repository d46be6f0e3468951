"""Measured expert-parallel MoE layer on every visible device, real-trace routing -> results/multigpu/.

Made for a host with several GPUs (run it with all of them visible); on CPU (8 host devices, ``--shape tiny``)
it runs the same pipeline as a smoke test, whose times mean nothing. Steps:

1. Batches and tables as in ``scripts/emulate_layer.py``: DeepSeek-V2-Lite routing (held-out prompts) in
   ``--window-s`` windows of Azure arrivals, tables of static EP, EPLB and MoEless (RoutingOnly forecast), a
   sample of (batch, layer) pairs. Each sampled batch is replayed through the layer with its true expert ids
   (``moe_forward(routing=...)``, equal combine weights: the trace has no gate weights), cut or cycled to a
   fixed ``--tokens`` so that one program serves every sample.
2. Per sample and policy: the table is installed with ``MoELayer.set_table`` (weight moves timed), then the
   jitted layer is timed (median of ``--repeats``; dropless buffer ladder, the rung used is recorded).
3. The latency model (``LatencyModel.layer_ms_static``, the one-GPU calibration) predicts the same calls;
   ``sim_vs_measured_abs_error`` is |mean modelled - mean measured| / mean measured.
4. ``all_to_all`` alone over the devices for growing rows: fitted latency and bandwidth per direction, the
   measured replacements for the calibration's modelled constants.

Keep NVLink multicast off when running on GPUs (NCCL_NVLS_ENABLE=0 and friends; see docs/gpu.md).

Usage:
  python scripts/bench_multigpu.py --data-dir DATA [--out-dir results/multigpu] [--samples 32]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_multigpu.py --data-dir DATA \\
      --shape tiny --samples 2 --tokens 256 --out-dir /tmp/mg     # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

POLICIES = ("static", "eplb", "moeless")


def parse_args(argv=None) -> argparse.Namespace:
    from emulate_layer import SHAPES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, type=Path, help="folder with moe-beyond/ and azure-llm-2023/")
    p.add_argument("--out-dir", type=Path, default=Path("results/multigpu"))
    p.add_argument("--calibration", type=Path, default=Path("results/gpu/calibration-h200.json"))
    p.add_argument("--window-s", type=float, default=16.0)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per layer call (all devices together)")
    p.add_argument("--slot-budget", type=float, default=1.25)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--shape", choices=sorted(SHAPES), default="dsv2lite")
    p.add_argument("--split", choices=("even", "balanced"), default="even")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, help="YAML with a routing_only section (default: built-in config)")
    args = p.parse_args(argv)
    args.samples = max(1, args.samples)
    return args


def fixed_size(batch: np.ndarray, tokens: int) -> np.ndarray:
    """``batch`` cut or cycled to exactly ``tokens`` token indices."""
    return np.resize(batch, tokens)


def time_ms(fn, repeats: int) -> float:
    """Median ms of ``fn()`` (synchronised), after one warm-up call."""
    from moeless_jax.bench import time_fn

    return 1e3 * time_fn(fn, warmup=1, repeats=repeats)


def all_to_all_part(mesh, num_devices: int, bytes_per_row: int, repeats: int) -> dict:
    """Time ``all_to_all`` over the mesh for growing rows per device pair; fit latency and bandwidth."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moeless_jax.moe.layer import EP_AXIS
    from moeless_jax.sim import fit_linear

    points = []
    width = bytes_per_row // 2  # bf16 rows of the layer's width
    for rows in (8, 64, 512, 2048, 8192):
        x = jax.device_put(
            jnp.ones((num_devices * num_devices, rows, width), jnp.bfloat16), NamedSharding(mesh, P(EP_AXIS))
        )
        fn = jax.jit(
            jax.shard_map(
                lambda a: jax.lax.all_to_all(a, EP_AXIS, 0, 0, tiled=True),
                mesh=mesh,
                in_specs=P(EP_AXIS),
                out_specs=P(EP_AXIS),
            )
        )
        ms = time_ms(lambda fn=fn, x=x: fn(x), repeats)
        sent = (num_devices - 1) * rows * bytes_per_row  # bytes one device sends to the others
        points.append({"rows_per_pair": rows, "bytes_sent_per_device": sent, "ms": ms})
    fixed, per_byte, err = fit_linear(
        np.array([p["bytes_sent_per_device"] for p in points], np.float64),
        np.array([p["ms"] for p in points]),
    )
    return {
        "points": points,
        "latency_us": 1e3 * fixed,
        "bandwidth_gbps_per_direction": (1e-6 / per_byte) if per_byte > 0 else None,
        "fit_max_rel_err": err,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    from emulate_layer import SHAPES, batches_and_forecasts, plan_tables
    from emulate_layer import modelled as modelled_ms  # (by rows, as the static shapes compute)
    from flax import nnx
    from tqdm import tqdm

    from moeless_jax.moe import (
        MoEConfig,
        MoELayer,
        ReplicaTable,
        buffer_ladder,
        call_dropless,
        make_ep_mesh,
        moe_forward,
    )
    from moeless_jax.moe.capacity import pick_capacity
    from moeless_jax.moe.split import host_slot_tokens
    from moeless_jax.provenance import compute_device_name, write_json
    from moeless_jax.sim import LatencyModel

    num_devices = jax.device_count()
    args.devices = num_devices  # the tables' layout
    if args.tokens % num_devices:
        raise SystemExit(f"--tokens {args.tokens} must divide over the {num_devices} devices")
    model = LatencyModel.from_file(args.calibration)
    test, batches, loads, forecast = batches_and_forecasts(args)
    tables, layout = plan_tables(loads, forecast, args)
    trace_ids = test.expert_ids  # [N, L, K] of the served (test) trace
    d_model, d_ff = SHAPES[args.shape]
    num_experts, top_k = loads.shape[-1], trace_ids.shape[-1]
    config = MoEConfig(
        d_model=d_model,
        d_ff=d_ff,
        num_experts=num_experts,
        top_k=top_k,
        num_devices=num_devices,
        slots_per_device=layout.slots_per_device,
        backend="dense" if jax.default_backend() == "cpu" else "ragged",
        capacity_factor=1.5,
        expert_kernel="auto",
        split=args.split,
        dtype="bfloat16",
    )
    mesh = make_ep_mesh(num_devices)
    layer = MoELayer(config, mesh=mesh, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (args.tokens, d_model), jnp.bfloat16)
    weights = jnp.full((args.tokens, top_k), 1.0 / top_k, jnp.float32)
    ladder = buffer_ladder(config, args.tokens // num_devices)

    @partial(jax.jit, static_argnames="buffers")
    def forward(params, table, x, ids, buffers):
        return moe_forward(
            params, table, x, config=config, mesh=mesh, buffers=buffers, routing=(ids, weights)
        )

    rng = np.random.default_rng(args.seed)
    first = min(len(batches) - 1, 8)
    pairs = np.stack(
        [rng.integers(first, len(batches), args.samples), rng.integers(0, loads.shape[1], args.samples)], 1
    )
    results = {
        p: {"layer_ms": [], "model_ms": [], "move_ms": [], "moved_slots": [], "rung": []} for p in POLICIES
    }
    for b, layer_index in tqdm(pairs, desc="samples"):
        batch = fixed_size(batches[b], args.tokens)
        ids = jnp.asarray(trace_ids[batch, layer_index], jnp.int32)
        counts = np.bincount(np.asarray(ids).ravel(), minlength=num_experts)
        for policy in POLICIES:
            table = ReplicaTable.from_slot_to_expert(
                tables[policy][b, layer_index],
                num_experts=num_experts,
                num_devices=num_devices,
                slots_per_device=layout.slots_per_device,
            )
            start = time.perf_counter()
            plan = layer.set_table(table)
            jax.block_until_ready(layer.experts.weights())
            move_ms = 1e3 * (time.perf_counter() - start)
            call = partial(forward, layer.params, layer.table.get_value(), x, ids)
            _, used = call_dropless(call, ladder)
            ms = time_ms(partial(call, used), args.repeats)
            slot_rows = host_slot_tokens(
                table.slot_to_expert, counts, num_devices=num_devices, split=args.split
            ).reshape(num_devices, -1)
            rows = slot_rows.sum(-1)
            kernel, capacity = "ragged", None
            if used.slot_rows is not None:  # the capacity the fullest slot's device picks in the step
                kernel, capacity = "capacity", pick_capacity(used.slot_rows, int(slot_rows.max()))
            _, modelled = modelled_ms(model, args.shape, kernel, int(rows.max()), capacity,
                                      config.slots_per_device, used.dispatch_rows)
            entry = results[policy]
            entry["layer_ms"].append(ms)
            entry["model_ms"].append(modelled)
            entry["move_ms"].append(move_ms)
            entry["moved_slots"].append(len(plan.moves))
            entry["rung"].append(ladder.index(used))
    summary = summarise(results, args, config)
    summary["all_to_all"] = all_to_all_part(mesh, num_devices, d_model * 2, args.repeats)
    device = compute_device_name()
    note = (
        "layer times measured on the devices named, one program over all of them; modelled times from "
        "the one-GPU calibration; real-trace routing replayed with equal combine weights"
    )
    path = write_json(args.out_dir / "summary.json", summary, method="measured", device=device, note=note)
    print(f"wrote {path}")
    for key in sorted(k for k in summary if isinstance(summary[k], float)):
        print(f"  {key}: {summary[key]:.4g}")
    return 0


def summarise(results: dict, args, config) -> dict:
    from emulate_layer import latency_stats

    summary: dict = {
        "setup": {
            "devices": config.num_devices,
            "slots_per_device": config.slots_per_device,
            "tokens_per_call": args.tokens,
            "samples": args.samples,
            "shape": args.shape,
            "backend": config.backend,
            "split": args.split,
            "batches": f"Azure conversation arrivals in {args.window_s:g}-s windows",
        }
    }
    measured_all, modelled_all = [], []
    for policy, entry in results.items():
        summary |= latency_stats(policy, entry["layer_ms"])
        summary[f"{policy}_model_ms_mean"] = float(np.mean(entry["model_ms"]))
        summary[f"{policy}_move_ms_mean"] = float(np.mean(entry["move_ms"]))
        measured_all += entry["layer_ms"]
        modelled_all += entry["model_ms"]
    summary["sim_vs_measured_abs_error"] = float(
        abs(np.mean(modelled_all) - np.mean(measured_all)) / np.mean(measured_all)
    )
    summary["per_sample"] = results
    return summary


if __name__ == "__main__":
    sys.exit(main())
