"""Device time of layer-ahead replication's in-step work -> results/layer_ahead/timing_<backend>.json (+ PNG).

What a step adds per layer when it replicates layer-ahead, measured on this machine's first device:

* ``plan``: :func:`moeless_jax.plan.on_device.plan_on_device` for one layer, (E, D, S) = (64, 8, 10) by
  default (DeepSeek-V2-Lite on 8 devices), move budget ``--max-moves``. Timed as a scan over ``--layers``
  layers inside one jitted call (each plans from its own forecast and table, as a step does), divided by the
  layer count, with calls pipelined so that the host's dispatch and synchronisation are not counted.
* ``forecast``: gate reuse (:func:`moeless_jax.predict.in_step.gate_loads`) on one device's tokens, at
  ``--tokens-per-device`` (default 512, 8192, 65536), hidden size ``--d-model``.
* ``layer``: the denominator, measured in the same run: one device's expert work for the same tokens (top-k
  rows spread evenly over its S slots, the capacity kernel), DeepSeek-V2-Lite's expert shape by default.
  Dispatch and combine all-to-alls are not included, so the share is an upper bound.

Reported: ``on_device_plan_us_per_layer``, ``forecast_us_<n>``, ``layer_us_<n>`` and
``forecast_plan_overhead_pct_<n>`` = 100 (forecast + plan) / layer. The copy itself is not timed here (it is a
collective that overlaps the previous layer; see docs/layer_ahead.md).

Usage:
  python scripts/bench_layer_ahead.py [--out-dir results/layer_ahead]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("results/layer_ahead"))
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--devices", type=int, default=8, help="devices the plan is for (the plan runs on one)")
    p.add_argument("--slots-per-device", type=int, default=10)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--d-ff", type=int, default=1408)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=26, help="layers planned per timed call")
    p.add_argument("--max-moves", type=int, default=4)
    p.add_argument("--tokens-per-device", type=int, nargs="+", default=[512, 8192, 65536])
    p.add_argument("--repeats", type=int, default=20)
    return p.parse_args(argv)


def time_plans(args) -> float:
    """Microseconds per layer of plan_on_device, planned layer after layer inside one jitted call."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moeless_jax.bench import time_fn
    from moeless_jax.moe import ReplicaTable
    from moeless_jax.plan.on_device import plan_on_device

    rng = np.random.default_rng(0)
    shape = dict(num_experts=args.experts, num_devices=args.devices, slots_per_device=args.slots_per_device)
    tables = np.stack([ReplicaTable.random(rng, **shape).slot_to_expert for _ in range(args.layers)])
    popularity = rng.dirichlet(np.full(args.experts, 0.5), size=args.layers)
    forecasts = jnp.asarray(popularity * 8192 * args.top_k, jnp.float32)

    @jax.jit
    def plan_all(forecasts, tables):
        def one(carry, layer):
            forecast, previous = layer
            # The carry chains the layers, as a step's data flow does, so they cannot run all at once.
            new = plan_on_device(forecast + carry, previous, num_devices=args.devices,
                                 slots_per_device=args.slots_per_device, max_moves_per_device=args.max_moves)
            return carry + 0.0 * new.replica_count[0], new.slot_to_expert
        return jax.lax.scan(one, jnp.float32(0), (forecasts, tables))[1]

    tables = jnp.asarray(tables, jnp.int32)
    seconds = time_fn(lambda: plan_all(forecasts, tables), warmup=2, repeats=args.repeats, pipelined=10)
    return 1e6 * seconds / args.layers


def time_forecast(args, tokens: int) -> float:
    """Microseconds of gate reuse on one device's ``tokens``."""
    import jax
    import jax.numpy as jnp

    from moeless_jax.bench import time_fn
    from moeless_jax.moe import MoEConfig, make_ep_mesh
    from moeless_jax.predict.in_step import gate_loads

    config = MoEConfig(num_experts=args.experts, top_k=args.top_k, d_model=args.d_model, d_ff=args.d_ff,
                       num_devices=1, slots_per_device=args.experts, router="deepseek", dtype=args.dtype)
    mesh = make_ep_mesh(1, jax.devices()[:1])
    key_h, key_w = jax.random.split(jax.random.key(1))
    hidden = jax.random.normal(key_h, (tokens, args.d_model), jnp.dtype(args.dtype))
    kernel = jax.random.normal(key_w, (args.d_model, args.experts), jnp.float32)
    run = jax.jit(lambda h, w: gate_loads(h, w, mesh=mesh, config=config))
    return 1e6 * time_fn(lambda: run(hidden, kernel), warmup=2, repeats=args.repeats, pipelined=10)


def time_layer(args, tokens: int) -> float:
    """Microseconds of one device's expert work for ``tokens`` x top-k rows, evenly over its slots."""
    import numpy as np

    from moeless_jax.sim.emulate import DeviceEmulator, ExpertShape

    rows = tokens * args.top_k
    slots = args.slots_per_device
    slot_rows = np.full(slots, rows // slots) + (np.arange(slots) < rows % slots)
    emulator = DeviceEmulator(ExpertShape(args.d_model, args.d_ff, args.dtype), slots, rows, args.repeats)
    capacity = -(-int(slot_rows.max()) // 64) * 64  # a balanced device's slot buffer, in 64-row tiles
    return 1e3 * emulator.device_ms(slot_rows, kernel="capacity", capacity=capacity)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    from tqdm import tqdm

    from moeless_jax.provenance import compute_device_name, write_json

    plan_us = time_plans(args)
    summary = {
        "experts": args.experts, "devices": args.devices, "slots_per_device": args.slots_per_device,
        "top_k": args.top_k, "d_model": args.d_model, "d_ff": args.d_ff, "dtype": args.dtype,
        "max_moves_per_device": args.max_moves, "layers_per_call": args.layers,
        "on_device_plan_us_per_layer": plan_us,
    }
    for tokens in tqdm(args.tokens_per_device, desc="batch sizes"):
        forecast_us, layer_us = time_forecast(args, tokens), time_layer(args, tokens)
        summary[f"forecast_us_{tokens}"] = forecast_us
        summary[f"layer_us_{tokens}"] = layer_us
        summary[f"forecast_plan_overhead_pct_{tokens}"] = 100 * (forecast_us + plan_us) / layer_us
    backend = jax.default_backend()
    device = compute_device_name()
    path = args.out_dir / f"timing_{backend}.json"
    write_json(path, summary, method="measured", device=device,
               note=f"one {device}: plan and forecast timed pipelined (device time per call); the layer "
                    "denominator is one device's expert work (capacity kernel, rows spread evenly), measured "
                    "in the same run; all-to-alls not included")
    plot(summary, args, path.with_suffix(".png"))
    print(f"plan {plan_us:.1f} us per layer; " + "; ".join(
        f"{n} tokens/device: overhead {summary[f'forecast_plan_overhead_pct_{n}']:.1f} % of "
        f"{summary[f'layer_us_{n}']:.0f} us" for n in args.tokens_per_device))
    return 0


def plot(summary: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = args.tokens_per_device
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [summary[f"forecast_plan_overhead_pct_{n}"] for n in sizes], "o-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per device")
    ax.set_ylabel("forecast + plan, % of the layer's expert work")
    ax.set_title(f"layer-ahead overhead (plan {summary['on_device_plan_us_per_layer']:.0f} us per layer)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
