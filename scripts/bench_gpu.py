"""GPU performance of the expert computation and the costs around it -> results/gpu/.

Parts (run any subset with --parts; each writes ``part_<name>.json`` under --out-dir, and ``summarize``
merges them into ``summary.json`` and ``calibration-h200.json``):

``kernels``    expert computation (gate/up, SiLU, down) for the Mixtral-8x7B, Phi-3.5-MoE, Llama-4-Scout and
               DeepSeek-V2-Lite shapes, one device's share of an 8-device EP layer (its slots under a MoEless
               table: E/8 + 1 slots), 1..65536 tokens per device, kernels ``ragged`` (jax.lax.ragged_dot),
               ``capacity`` (batched matmuls over per-slot buffers, ragged overflow) and ``tokamax``
               (tokamax.ragged_dot, when importable), with balanced slot loads (a MoEless table with the
               balanced split) and skewed ones (a static-EP device: Dirichlet(0.5) slot shares).
``bandwidth``  the ceilings (device-to-device copy bandwidth; an 8192^3 bf16 matmul through jax) and one
               expert's weight copy into a slot, per shape.
``layer``      the whole layer at D = 1 (router, dispatch, experts, combine) and its time split by part.
``swap``       table swaps through a jitted NNX layer: retraces (must be 0) and the cost of a swap.
``predictor``  a gate-copy load predictor (x @ W[M, E] -> top-k -> counts) for 1..16384 tokens.
``summarize``  merge parts, fit the calibration (time = fixed + alpha * rows per shape and kernel), plot.
``calibrate``  only refit ``calibration-h200.json`` from the part files (runs anywhere, no GPU needed).

Usage (on the GPU machine, from the repo root):
  python scripts/bench_gpu.py --parts kernels bandwidth layer swap predictor summarize --out-dir results/gpu
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # name: (d_model, d_ff, experts, top_k)
    "mixtral": (4096, 14336, 8, 2),
    "phi35moe": (4096, 6400, 16, 2),
    "llama4scout": (5120, 8192, 16, 1),
    "dsv2lite": (2048, 1408, 64, 6),
}
TOKENS = (1, 16, 64, 512, 2048, 8192, 32768, 65536)
SKEWED_TOKENS = (2048, 8192, 32768)  # skewed slot loads are timed at these sizes only
DEVICES = 8
PEAK_TFLOPS = 790.0  # bf16 dense matmul ceiling of one H200 (8192^3, random data)
# Kernel and copy timings enqueue this many calls per sample and wait once (device time per call, the host's
# dispatch overlapped, as in a serving loop); see moeless_jax.bench.time_fn.
PIPELINED = 10
KERNELS = ("ragged", "capacity", "tokamax")
# Largest slot size timed for balanced loads, in balanced slots (the layer's default goes to 2x; the points
# of part_kernels.json were measured with 1.1x, which is also the single size of ``capacity_one_buffer``).
BALANCED_LARGEST = 1.1
PARTS = ("kernels", "bandwidth", "layer", "swap", "predictor", "summarize", "calibrate")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, required=True)
    p.add_argument("--out-dir", default="results/gpu")
    p.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    p.add_argument(
        "--kernels",
        nargs="*",
        default=list(KERNELS),
        help="kernels to time; points of other kernels already in part_kernels.json are kept",
    )
    return p.parse_args(argv)


def slots_per_device(shape: str) -> int:
    experts = SHAPES[shape][2]
    return experts // DEVICES + 1


def slot_rows(total_rows: int, num_slots: int, regime: str, seed: int = 0):
    """Rows each of a device's slots computes: ``balanced`` (equal) or ``skewed`` (Dirichlet(0.5) shares)."""
    import numpy as np

    if regime == "balanced":
        shares = np.full(num_slots, 1.0 / num_slots)
    else:
        shares = np.random.default_rng(seed).dirichlet(np.full(num_slots, 0.5))
    rows = np.floor(shares * total_rows).astype(int)
    rows[: total_rows - rows.sum()] += 1
    return rows


def _write(out_dir: Path, name: str, payload: dict, method: str = "measured") -> None:
    from moeless_jax.provenance import write_json

    path = write_json(out_dir / f"part_{name}.json", payload, method=method)
    print(f"wrote {path}", flush=True)


# ---------------------------------------------------------------------------------------------- kernels
def load_tokamax():
    """tokamax.ragged_dot, or None. tokamax imports xprof only for its own benchmarking helpers; where xprof
    is missing a stub module stands in for it so the kernels can be imported."""
    try:
        import xprof  # noqa: F401
    except ImportError:
        shim = Path(tempfile.mkdtemp()) / "xprof" / "cli"
        shim.mkdir(parents=True)
        (shim.parent / "__init__.py").write_text("")
        (shim / "__init__.py").write_text("")
        (shim / "tools.py").write_text(
            "def get_kernel_stats_tool(*a, **k):\n    raise RuntimeError('no xprof')\n"
        )
        sys.path.append(str(shim.parent.parent))
    try:
        import tokamax
    except ImportError as err:
        print(f"tokamax unavailable: {err}", flush=True)
        return None
    return tokamax.ragged_dot


def kernel_fns(tokamax_ragged_dot):
    import jax

    from moeless_jax.moe import capacity_swiglu, grouped_swiglu

    fns = {"ragged": jax.jit(lambda rows, slot, w, cap: grouped_swiglu(rows, slot, w), static_argnums=3)}
    fns["capacity"] = jax.jit(
        lambda rows, slot, w, cap: capacity_swiglu(rows, slot, w, capacity=cap[0], overflow_rows=cap[1])[0],
        static_argnums=3,
    )
    if tokamax_ragged_dot is not None:

        def tokamax_swiglu(rows, slot, w, cap):
            import jax.numpy as jnp

            order = jnp.argsort(slot, stable=True)
            sizes = jnp.zeros(w.gate.shape[0], jnp.int32).at[slot].add(1, mode="drop")
            xs = rows[order]
            h = jax.nn.silu(tokamax_ragged_dot(xs, w.gate, sizes)) * tokamax_ragged_dot(xs, w.up, sizes)
            ys = tokamax_ragged_dot(h, w.down, sizes)
            return jnp.zeros_like(ys).at[order].set(ys)

        fns["tokamax"] = jax.jit(tokamax_swiglu, static_argnums=3)
    return fns


def kernels_part(args, out_dir: Path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from moeless_jax.bench import time_fn
    from moeless_jax.moe import grouped_swiglu, init_mlp_weights
    from moeless_jax.moe.capacity import pick_capacity, slot_capacities
    from moeless_jax.moe.config import SLOT_CAPACITY_RATIO

    fns = kernel_fns(load_tokamax() if "tokamax" in args.kernels else None)
    fns = {k: v for k, v in fns.items() if k in args.kernels}
    previous = out_dir / "part_kernels.json"
    points = json.loads(previous.read_text())["points"] if previous.exists() else []
    for shape in args.shapes:
        d_model, d_ff, _, top_k = SHAPES[shape]
        num_slots = slots_per_device(shape)
        w = init_mlp_weights(jax.random.key(0), (num_slots,), d_model, d_ff, jnp.bfloat16)
        weight_bytes = 3 * num_slots * d_model * d_ff * 2
        for tokens in tqdm(args.tokens, desc=shape):
            total = tokens * top_k
            for regime in ("balanced", "skewed") if tokens in SKEWED_TOKENS else ("balanced",):
                per_slot = slot_rows(total, num_slots, regime)
                slot = jnp.asarray(np.repeat(np.arange(num_slots), per_slot), jnp.int32)
                rows = jax.random.normal(jax.random.key(tokens), (total, d_model), jnp.bfloat16)
                # Compiled slot sizes 1.05 apart from a balanced slot's rows up to BALANCED_LARGEST x them or,
                # skewed, up to the fullest slot (where a dropless retry ends up). The kernel picks the
                # smallest that holds the fullest slot in the step, so a larger top only adds branches
                # that these loads never run (results/gpu/capacity_sizes.json).
                balanced_rows = total / num_slots
                fullest = max(1.0, per_slot.max() / balanced_rows)
                largest = BALANCED_LARGEST if regime == "balanced" else fullest
                multiple = 8 if total < 512 else 64
                ladder = slot_capacities(balanced_rows, largest, SLOT_CAPACITY_RATIO, multiple)
                cap = (ladder, max(8, total // 4))
                variants = dict(fns)
                if regime == "balanced" and "capacity" in fns:  # what one padded buffer (the top) gives
                    variants["capacity_one_buffer"] = fns["capacity"]
                reference = None
                for kernel, fn in variants.items():
                    call_cap = (ladder[-1:], cap[1]) if kernel == "capacity_one_buffer" else cap
                    try:
                        y = fn(rows, slot, w, call_cap)
                        if reference is None:
                            reference = grouped_swiglu(rows, slot, w)
                        err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - reference.astype(jnp.float32))))
                        scale = float(jnp.max(jnp.abs(reference.astype(jnp.float32))))
                        if not err <= 0.02 * scale:  # bf16 rounding only; an incomplete output is a bug
                            raise AssertionError(f"{kernel} differs from ragged by {err} (scale {scale})")
                        call = (fn, rows, slot, w, call_cap)
                        run = lambda c=call: c[0](*c[1:])  # noqa: E731
                        seconds = time_fn(run, repeats=5, min_seconds=0.05, pipelined=PIPELINED)
                        synchronised = time_fn(run, repeats=5, min_seconds=0.05)
                    except Exception as exc:  # a kernel that cannot run here is recorded, not fatal
                        print(f"{shape} {tokens} {kernel}: {type(exc).__name__}: {exc}"[:300], flush=True)
                        continue
                    flops = 6 * total * d_model * d_ff
                    point = {
                        "shape": shape,
                        "tokens": tokens,
                        "rows": total,
                        "slots": num_slots,
                        "regime": regime,
                        "kernel": kernel,
                        "ms": seconds * 1e3,
                        "tflops": flops / seconds / 1e12,
                        "pct_peak": 100 * flops / seconds / 1e12 / PEAK_TFLOPS,
                        "ms_synchronised": synchronised * 1e3,
                        "pct_peak_synchronised": 100 * flops / synchronised / 1e12 / PEAK_TFLOPS,
                        "weight_gbps": weight_bytes / seconds / 1e9,
                        "max_abs_err_vs_ragged": err,
                        "max_slot_rows": int(per_slot.max()),
                        "slot_buffer_rows": pick_capacity(call_cap[0], int(per_slot.max())),
                        "slot_capacities": list(call_cap[0]),
                        "pipelined_calls": PIPELINED,
                    }
                    same = ("shape", "tokens", "regime", "kernel")
                    points = [p for p in points if any(p[k] != point[k] for k in same)] + [point]
                    print(json.dumps(point), flush=True)
        # Written after every shape, so a run cut short keeps what it measured.
        _write(
            out_dir,
            "kernels",
            {"device": jax.devices()[0].device_kind, "peak_tflops": PEAK_TFLOPS, "points": points},
        )


# ---------------------------------------------------------------------------------------------- bandwidth
def bandwidth_part(args, out_dir: Path) -> None:
    import jax
    import jax.numpy as jnp

    from moeless_jax.bench import measure_matmul_peak, time_fn
    from moeless_jax.moe import Move, MovePlan, init_mlp_weights
    from moeless_jax.moe.slot_weights import apply_moves, expert_bytes

    big = jnp.ones((2 * 1024**3,), jnp.bfloat16)  # 4 GiB
    copy = jax.jit(lambda a: a * 1)  # one read and one write of every byte
    seconds = time_fn(lambda: copy(big), repeats=10, pipelined=PIPELINED)
    copy_tbps = 2 * big.nbytes / seconds / 1e12
    out = {"device": jax.devices()[0].device_kind, "copy_tbps_read_plus_write": copy_tbps, "expert_copy": [],
           "pipelined_calls": PIPELINED, "matmul_tflops_jax": measure_matmul_peak(pipelined=PIPELINED)}
    for shape in args.shapes:
        d_model, d_ff, _, _ = SHAPES[shape]
        state = {"w": init_mlp_weights(jax.random.key(0), (2,), d_model, d_ff, jnp.bfloat16)}
        nbytes = expert_bytes(state["w"])
        # The copy a replica move does: one expert's gate, up and down weights into another slot.
        plan = MovePlan((Move(slot=1, expert=0, src_slot=0, src_device=0, dst_device=0, bytes=nbytes),), ())

        def move(plan=plan, state=state):
            state["w"] = apply_moves(state["w"], plan)  # donated: an in-place slot copy
            return state["w"]

        seconds = time_fn(move, repeats=20, pipelined=PIPELINED)
        point = {
            "shape": shape,
            "bytes": nbytes,
            "ms": seconds * 1e3,
            "tbps_read_plus_write": 2 * nbytes / seconds / 1e12,
        }
        out["expert_copy"].append(point)
        print(json.dumps(point), flush=True)
    _write(out_dir, "bandwidth", out)


# ---------------------------------------------------------------------------------------------- layer
def layer_part(args, out_dir: Path) -> None:
    """Whole layer at D = 1 (Mixtral shape, bf16, 8192 tokens) and its parts, timed as nested pipelines."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moeless_jax.bench import time_fn
    from moeless_jax.moe import (
        MoEConfig,
        MoEParams,
        ReplicaTable,
        assign_slots,
        grouped_swiglu,
        init_mlp_weights,
        make_ep_mesh,
        materialize_slot_weights,
        moe_forward,
        route,
    )

    d_model, d_ff, experts, top_k = SHAPES["mixtral"]
    mesh = make_ep_mesh(1)
    table = ReplicaTable.static(num_experts=experts, num_devices=1, slots_per_device=experts)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    router = (jax.random.normal(k1, (d_model, experts)) / 64).astype(jnp.bfloat16)
    slot_w = materialize_slot_weights(init_mlp_weights(k2, (experts,), d_model, d_ff, jnp.bfloat16), table)
    params = MoEParams(router, slot_w, None)
    arrays = table.arrays()
    times = {}
    for tokens in (256, 8192):  # a decode-like batch, where the split's own cost shows, and a prefill batch
        x = jax.random.normal(k3, (tokens, d_model), jnp.bfloat16)
        for kernel in ("ragged", "capacity"):
            for split in ("even", "balanced"):
                cfg = MoEConfig(
                    d_model=d_model,
                    d_ff=d_ff,
                    num_experts=experts,
                    top_k=top_k,
                    num_devices=1,
                    slots_per_device=experts,
                    dtype="bfloat16",
                    expert_kernel=kernel,
                    split=split,
                )
                fn = jax.jit(partial(moe_forward, config=cfg, mesh=mesh))
                times[f"layer_{kernel}_{split}_{tokens}_ms"] = 1e3 * time_fn(
                    lambda fn=fn, x=x: fn(params, arrays, x), repeats=10, min_seconds=0.2
                )
    tokens = 8192
    x = jax.random.normal(k3, (tokens, d_model), jnp.bfloat16)
    routed = jax.jit(lambda x: route(x, router, top_k=top_k))
    times["router_ms"] = 1e3 * time_fn(lambda: routed(x), repeats=20)

    def assign_only(x, table):
        r = route(x, router, top_k=top_k)
        return assign_slots(r.expert_ids, table, slots_per_device=experts, axis_name="ep").slot

    assign = jax.jit(jax.shard_map(assign_only, mesh=mesh, in_specs=(P("ep"), P()), out_specs=P("ep")))
    x_ep = jax.device_put(x, NamedSharding(mesh, P("ep")))
    arrays_ep = table.arrays(NamedSharding(mesh, P()))
    times["router_plus_assign_ms"] = 1e3 * time_fn(lambda: assign(x_ep, arrays_ep), repeats=20)
    slot = jnp.asarray(np.asarray(assign(x_ep, arrays_ep)))  # plain single-device array
    rows = jnp.repeat(x, top_k, axis=0)
    experts_only = jax.jit(grouped_swiglu)
    times["experts_ragged_ms"] = 1e3 * time_fn(lambda: experts_only(rows, slot, slot_w), repeats=10)
    times["dispatch_combine_ragged_ms"] = (
        times["layer_ragged_even_8192_ms"] - times["router_plus_assign_ms"] - times["experts_ragged_ms"]
    )
    out = {"device": jax.devices()[0].device_kind, "shape": "mixtral", "tokens": tokens, **times}
    print(json.dumps(out), flush=True)
    _write(out_dir, "layer", out)


# ---------------------------------------------------------------------------------------------- swap
def swap_part(args, out_dir: Path) -> None:
    """Swap tables through a jitted NNX layer: count retraces and time set_table (with and without moves)."""
    import time

    import jax
    import numpy as np
    from flax import nnx

    from moeless_jax.moe import MoEConfig, MoELayer, ReplicaTable, make_ep_mesh

    experts, slots = 8, 12
    cfg = MoEConfig(
        d_model=1024,
        d_ff=2048,
        num_experts=experts,
        top_k=2,
        num_devices=1,
        slots_per_device=slots,
        dtype="bfloat16",
    )
    layer = MoELayer(cfg, mesh=make_ep_mesh(1), rngs=nnx.Rngs(0))
    traces = []

    @nnx.jit
    def step(layer, x):
        traces.append(1)
        return layer(x).y

    x = jax.random.normal(jax.random.key(0), (4096, 1024)).astype("bfloat16")
    jax.block_until_ready(step(layer, x))
    rng = np.random.default_rng(0)
    swap_ms, moves = [], []
    for _ in range(10):
        table = ReplicaTable.random(rng, num_experts=experts, num_devices=1, slots_per_device=slots)
        start = time.perf_counter()
        plan = layer.set_table(table)
        jax.block_until_ready(layer.experts.weights())
        swap_ms.append(1e3 * (time.perf_counter() - start))
        moves.append(len(plan.moves))
        jax.block_until_ready(step(layer, x))
    same = layer.replica_table()
    start = time.perf_counter()
    layer.set_table(same)
    jax.block_until_ready(layer.table.get_value())
    out = {
        "device": jax.devices()[0].device_kind,
        "table_swap_recompiles": len(traces) - 1,
        "table_swap_ms_median": float(np.median(swap_ms)),
        "moves_per_swap_median": float(np.median(moves)),
        "table_swap_no_moves_ms": 1e3 * (time.perf_counter() - start),
        "note": "set_table = host move plan + bucketed slot copies (bf16 1024x2048 experts) + table upload",
    }
    print(json.dumps(out), flush=True)
    _write(out_dir, "swap", out)


# ---------------------------------------------------------------------------------------------- predictor
def predictor_part(args, out_dir: Path) -> None:
    """Gate-copy predictor (GateReuse / MoEless): counts of top-k of x @ W, per layer (scan-amortised)."""
    import jax
    import jax.numpy as jnp

    from moeless_jax.bench import time_fn
    from moeless_jax.moe.router import expert_histogram, route

    d_model, _, experts, top_k = SHAPES["dsv2lite"]
    layers = 26
    gates = jax.random.normal(jax.random.key(0), (layers, d_model, experts))
    points = []
    for tokens in (1, 16, 256, 1024, 4096, 16384):
        x = jax.random.normal(jax.random.key(tokens), (layers, tokens, d_model), jnp.bfloat16)

        def all_layers(x, gates):
            def body(_, xw):
                r = route(xw[0], xw[1], top_k=top_k, kind="deepseek")
                return None, expert_histogram(r.expert_ids, experts)

            return jax.lax.scan(body, None, (x, gates))[1]

        fn = jax.jit(all_layers)
        seconds = time_fn(lambda fn=fn, x=x: fn(x, gates), repeats=20, min_seconds=0.1)
        points.append({"tokens": tokens, "ms_per_layer": 1e3 * seconds / layers})
        print(json.dumps(points[-1]), flush=True)
    _write(
        out_dir,
        "predictor",
        {
            "device": jax.devices()[0].device_kind,
            "shape": "dsv2lite",
            "predictor": "gate copy (x @ W[2048, 64], top-6, counts)",
            "points": points,
        },
    )


# ---------------------------------------------------------------------------------------------- summary
def summarize_part(args, out_dir: Path) -> None:
    from moeless_jax.provenance import write_json

    parts = read_parts(out_dir)
    kernels = parts.get("kernels", {}).get("points", [])

    def point(shape, tokens, kernel, regime="balanced"):
        for p in kernels:
            if (p["shape"], p["tokens"], p["kernel"], p["regime"]) == (shape, tokens, kernel, regime):
                return p
        return None

    copy_tbps = parts.get("bandwidth", {}).get("copy_tbps_read_plus_write")
    summary = {
        "device": next((p["device"] for p in parts.values() if "device" in p), None),
        "peak_tflops_reference": PEAK_TFLOPS,
        "copy_tbps_read_plus_write": copy_tbps,
    }
    for tokens in (8192, 65536):
        for kernel in ("capacity", "capacity_one_buffer", "ragged", "tokamax"):
            p = point("mixtral", tokens, kernel)
            key = {"capacity": "gmm", "capacity_one_buffer": "gmm_one_buffer"}.get(kernel, kernel)
            summary[f"{key}_pct_peak_mixtral_{tokens}"] = p and p["pct_peak"]
            summary[f"{key}_pct_peak_mixtral_{tokens}_synchronised"] = p and p.get("pct_peak_synchronised")
    for kernel in ("capacity", "ragged", "tokamax"):
        p = point("mixtral", 16, kernel)
        summary[f"decode_{kernel}_pct_hbm_mixtral_16"] = (
            p and copy_tbps and 100 * p["weight_gbps"] / 1e3 / copy_tbps
        )
    decode = [v for k, v in summary.items() if k.startswith("decode_") and v is not None]
    summary["decode_pct_hbm_mixtral_16"] = max(decode) if decode else None
    cap, tok = point("mixtral", 8192, "capacity"), point("mixtral", 8192, "tokamax")
    summary["capacity_over_tokamax_mixtral_8192"] = cap and tok and cap["tflops"] / tok["tflops"]
    copies = {c["shape"]: c for c in parts.get("bandwidth", {}).get("expert_copy", [])}
    summary["expert_copy_ms_mixtral"] = copies.get("mixtral", {}).get("ms")
    summary["expert_copy_ms"] = {k: v["ms"] for k, v in copies.items()}
    preds = {p["tokens"]: p["ms_per_layer"] for p in parts.get("predictor", {}).get("points", [])}
    summary["predictor_ms_per_layer_4096"] = preds.get(4096)
    summary["table_swap_recompiles"] = parts.get("swap", {}).get("table_swap_recompiles")
    layer = parts.get("layer") or {}
    summary["layer"] = layer
    for kernel in ("ragged", "capacity"):
        even = layer.get(f"layer_{kernel}_even_256_ms")
        balanced = layer.get(f"layer_{kernel}_balanced_256_ms")
        summary[f"balanced_split_added_ms_{kernel}_256"] = even and balanced and balanced - even
    summary["swap"] = parts.get("swap")
    import jax

    summary["jax_version"] = jax.__version__
    summary["parts_provenance"] = {k: v.get("provenance") for k, v in parts.items()}
    write_json(out_dir / "summary.json", summary, method="measured")
    calibrate_part(args, out_dir, parts)
    plot_kernels(kernels, out_dir / "kernels_tflops.png")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=1))


def read_parts(out_dir: Path) -> dict[str, dict]:
    """The ``part_<name>.json`` files present under ``out_dir``."""
    parts = {}
    for name in PARTS[: PARTS.index("summarize")]:
        path = out_dir / f"part_{name}.json"
        if path.exists():
            parts[name] = json.loads(path.read_text())
    return parts


def calibrate_part(args, out_dir: Path, parts: dict[str, dict] | None = None) -> None:
    """Fit ``calibration-h200.json`` from the measured parts (needs no GPU: the points are in the files)."""
    from moeless_jax.provenance import write_json
    from moeless_jax.sim.calibration import fit_calibration

    parts = read_parts(out_dir) if parts is None else parts
    # The layer's kernels only: ``capacity_one_buffer`` points show what the in-step capacities buy.
    kernels = [p for p in parts.get("kernels", {}).get("points", []) if p["kernel"] in KERNELS]
    preds = {p["tokens"]: p["ms_per_layer"] for p in parts.get("predictor", {}).get("points", [])}
    copy_tbps = parts.get("bandwidth", {}).get("copy_tbps_read_plus_write")
    calibration = fit_calibration(kernels, shapes=SHAPES, copy_tbps=copy_tbps, predictor_points=preds)
    device = next((p["device"] for p in parts.values() if "device" in p), None)
    write_json(
        out_dir / "calibration-h200.json",
        calibration,
        method="measured",
        device=device,
        note="kernel points measured on the device named (part_kernels.json), fitted by the command above; "
        "all-to-all constants are modelled until measured",
    )


def plot_kernels(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({p["shape"] for p in points})
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for kernel in ("capacity", "capacity_one_buffer", "tokamax", "ragged"):
            for regime, style in (("balanced", "-"), ("skewed", ":")):
                pts = sorted(
                    (p for p in points if (p["shape"], p["kernel"], p["regime"]) == (shape, kernel, regime)),
                    key=lambda p: p["tokens"],
                )
                if pts:
                    ax.plot(
                        [p["tokens"] for p in pts],
                        [p["tflops"] for p in pts],
                        style,
                        marker="o",
                        ms=3,
                        label=f"{kernel} {regime}",
                    )
        ax.axhline(PEAK_TFLOPS, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(shape)
        ax.set_xlabel("tokens per device")
    axes[0][0].set_ylabel("useful TFLOP/s (bf16)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runners = {
        "kernels": kernels_part,
        "bandwidth": bandwidth_part,
        "layer": layer_part,
        "swap": swap_part,
        "predictor": predictor_part,
        "summarize": summarize_part,
        "calibrate": calibrate_part,
    }
    for part in args.parts:
        runners[part](args, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
