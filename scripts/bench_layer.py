"""Benchmark the replicated MoE layer -> results/layer/summary.json (+ PNGs).

Two parts, merged into one summary:

``--part cpu``  8 host CPU devices: tokens per device and balancedness of a skewed routing under a static
                and a replicated table, and the max abs difference of their outputs. A correctness-level
                figure (8 emulated devices share the host's cores), not a speed claim.
``--part gpu``  one accelerator: the layer's expert computation (``grouped_swiglu``: sort + three
                ``jax.lax.ragged_dot`` + unsort) in bf16 at a Mixtral-like and a DeepSeek-V2-Lite-like
                shape for 512..65536 tokens, in useful TFLOP/s and % of the bf16 matmul ceiling (790 TFLOP/s);
                plus the ``ragged`` dispatch backend checked against ``dense`` and the dense reference.

Usage:
  python scripts/bench_layer.py --part cpu
  python scripts/bench_layer.py --part gpu --out-dir results/layer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SHAPES = {  # name: (d_model, d_ff, experts, top_k)
    "mixtral": (4096, 14336, 8, 2),
    "dsv2lite": (2048, 1408, 64, 6),
}
TOKENS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
# bf16 dense-matmul ceiling of one H200 (8192^3 product, random data, measured on such a machine): the
# denominator of every "% of peak". The script also records the single matmul it measures through JAX.
PEAK_REFERENCE_TFLOPS = 790.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("cpu", "gpu"), required=True)
    p.add_argument("--out-dir", default="results/layer")
    p.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- GPU part
def expert_compute_rows(shape: str, tokens: int, seed: int = 0):
    """Rows, local slot ids and bf16 weights of one device holding every expert (D = 1, balanced routing)."""
    import jax
    import jax.numpy as jnp

    from moeless_jax.moe import init_mlp_weights

    d_model, d_ff, experts, top_k = SHAPES[shape]
    k_x, k_slot, k_w = jax.random.split(jax.random.key(seed), 3)
    rows = jax.random.normal(k_x, (tokens * top_k, d_model), jnp.bfloat16)
    slot = jax.random.randint(k_slot, (tokens * top_k,), 0, experts, jnp.int32)
    weights = init_mlp_weights(k_w, (experts,), d_model, d_ff, jnp.bfloat16)
    return rows, slot, weights


def time_expert_compute(shape: str, tokens: int, peak: float) -> dict:
    import jax

    from moeless_jax.bench import time_fn
    from moeless_jax.moe import grouped_swiglu

    d_model, d_ff, _, top_k = SHAPES[shape]
    rows, slot, weights = expert_compute_rows(shape, tokens)
    fn = jax.jit(grouped_swiglu)
    seconds = time_fn(lambda: fn(rows, slot, weights), repeats=5, min_seconds=0.2)
    flops = 2 * 3 * tokens * top_k * d_model * d_ff
    tflops = flops / seconds / 1e12
    return {
        "shape": shape,
        "tokens": tokens,
        "ms": seconds * 1e3,
        "tflops": tflops,
        "pct_peak": 100 * tflops / peak,
    }


def check_ragged_backend() -> dict:
    """Same params, same tokens: ragged vs dense backend vs dense reference, on the default device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moeless_jax.moe import (
        MoEConfig,
        MoEParams,
        ReplicaTable,
        dense_moe_reference,
        init_mlp_weights,
        make_ep_mesh,
        materialize_slot_weights,
        moe_forward,
    )

    base = dict(d_model=512, d_ff=1024, num_experts=8, top_k=2, num_devices=1, slots_per_device=8)
    dense_cfg, ragged_cfg = MoEConfig(**base, backend="dense"), MoEConfig(**base, backend="ragged")
    mesh = make_ep_mesh(1)
    k_r, k_e, k_x = jax.random.split(jax.random.key(0), 3)
    router = jax.random.normal(k_r, (512, 8))
    experts = init_mlp_weights(k_e, (8,), 512, 1024, jnp.float32)
    table = ReplicaTable.static(num_experts=8, num_devices=1, slots_per_device=8)
    params = MoEParams(router, materialize_slot_weights(experts, table), None)
    x = jax.random.normal(k_x, (4096, 512))
    run = {
        name: jax.jit(lambda p, t, x, c=cfg: moe_forward(p, t, x, config=c, mesh=mesh))
        for name, cfg in (("dense", dense_cfg), ("ragged", ragged_cfg))
    }
    out = {name: fn(params, table.arrays(), x) for name, fn in run.items()}
    ref = jax.jit(lambda r, e, x: dense_moe_reference(r, e, None, x, config=dense_cfg))(router, experts, x)
    scale = float(jnp.max(jnp.abs(ref)))
    return {
        "config": base,
        "tokens": 4096,
        "dtype": "float32",
        "max_abs_diff_ragged_vs_dense": float(jnp.max(jnp.abs(out["ragged"].y - out["dense"].y))),
        "max_abs_diff_ragged_vs_reference": float(jnp.max(jnp.abs(out["ragged"].y - ref))),
        "max_abs_reference": scale,
        "slot_counts_equal": bool(np.array_equal(out["ragged"].slot_counts, out["dense"].slot_counts)),
        "overflow": int(out["ragged"].overflow),
    }


def gpu_part(args) -> dict:
    import jax
    from tqdm import tqdm

    from moeless_jax.bench import measure_matmul_peak

    jax_matmul = measure_matmul_peak()
    peak = PEAK_REFERENCE_TFLOPS
    print(f"{jax.devices()[0].device_kind}: 8192^3 bf16 matmul via JAX {jax_matmul:.0f} TFLOP/s", flush=True)
    points = []
    for shape in SHAPES:
        for tokens in tqdm(args.tokens, desc=f"grouped_swiglu {shape}"):
            points.append(time_expert_compute(shape, tokens, peak))
            print(json.dumps(points[-1]), flush=True)
    summary = {
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "peak_reference_tflops": peak,
        "matmul_8192_tflops_jax_measured": jax_matmul,
        "gmm_kernel": "jax.lax.ragged_dot (grouped_swiglu: gate, up, down), balanced random routing, D=1",
        "gmm_points": points,
        "ragged_backend_check": check_ragged_backend(),
    }
    for p in points:
        summary[f"gmm_pct_peak_{p['shape']}_{p['tokens']}"] = p["pct_peak"]
        summary[f"gmm_tflops_{p['shape']}_{p['tokens']}"] = p["tflops"]
    plot_gmm(points, peak, Path(args.out_dir) / "gmm_tflops.png")
    return summary


def plot_gmm(points: list[dict], peak: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for shape in SHAPES:
        pts = [p for p in points if p["shape"] == shape]
        ax.plot(
            [p["tokens"] for p in pts], [p["tflops"] for p in pts], marker="o", label=f"{shape} ragged_dot"
        )
    ax.axhline(peak, color="gray", linestyle="--", label=f"bf16 matmul ceiling ({peak:.0f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("useful TFLOP/s")
    ax.set_title("Expert computation (grouped SwiGLU, bf16)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CPU part
def cpu_part(args) -> dict:
    """The demo's skewed batch on 8 host devices: static table vs MoEless table (even and balanced split)."""
    from moeless_jax.layer_demo import DemoConfig, run_demo

    report = run_demo(DemoConfig())
    plot_tokens_per_device(report, Path(args.out_dir) / "tokens_per_device.png")
    summary = {"cpu_layer": report}
    for name in ("static", "moeless_even", "moeless_balanced"):
        summary[f"balancedness_{name}"] = report[name]["balancedness"]
        summary[f"max_abs_diff_{name}_vs_static"] = report[name]["max_abs_diff_vs_static"]
    return summary


def plot_tokens_per_device(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = ("static", "moeless_even", "moeless_balanced")
    devices = np.arange(len(report["static"]["tokens_per_device"]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, name in enumerate(names):
        r = report[name]
        label = f"{name} (balancedness {r['balancedness']:.2f})"
        ax.bar(devices + (i - 1) * 0.27, r["tokens_per_device"], width=0.27, label=label)
    ax.set_xlabel("device")
    ax.set_ylabel("tokens computed")
    ax.set_title("One skewed batch on 8 host devices (token counts, not time)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part == "cpu":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from moeless_jax.provenance import provenance, write_json

    path = Path(args.out_dir) / "summary.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.pop("provenance", None)  # each part keeps its own, under "provenance_by_part"
    if args.part == "gpu":
        part, method = gpu_part(args), "measured"
        note = "GPU part: expert computation timed on the device named; ragged vs dense backend check"
    else:
        part, method = cpu_part(args), "computed"
        note = "CPU part: 8 host devices; balancedness counts tokens, it is not a timing"
    merged.update(part)
    merged.setdefault("provenance_by_part", {})[args.part] = provenance(method, note=note)
    write_json(path, merged, method=method, note=note)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
