"""Decode-size expert MLPs on the GPU: does a different matmul layout read the weights faster?

Mixtral-8x7B expert shape (4096 -> 14336, bf16), 2 slots per device, slot buffers of ``C`` rows (C = 8 ... 72
covers 4 ... 36 tokens per expert at top-2 with 10 % headroom, plus 512 for contrast). Each variant computes
the same SwiGLU from a ready slot buffer; reported is the weight read rate (3 matrices x 2 slots / time) and
its share of a plain copy's rate (read + write, measured in the same process):

* ``einsum``: three batched einsums, as the capacity kernel does;
* ``merged_gate_up``: gate and up stored side by side, ``[S, M, 2F]``, one einsum for both;
* ``split_k<k>``: the down projection split over ``k`` chunks of F and summed (more blocks for the GPU).

Usage (on the GPU): python scripts/probe_decode.py [--out results/gpu/decode_variants.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moeless_jax.bench import time_fn  # noqa: E402
from moeless_jax.moe import init_mlp_weights  # noqa: E402
from moeless_jax.provenance import write_json  # noqa: E402

D_MODEL, D_FF, SLOTS = 4096, 14336, 2
CAPACITIES = (8, 16, 24, 40, 72, 512)


def swiglu_variant(name: str):
    def up_proj(b, w):
        if name == "merged_gate_up":
            h = jnp.einsum("scm,smf->scf", b, w["gate_up"])
            return jax.nn.silu(h[..., :D_FF]) * h[..., D_FF:]
        return jax.nn.silu(jnp.einsum("scm,smf->scf", b, w["gate"])) * jnp.einsum("scm,smf->scf", b, w["up"])

    def down_proj(h, down):
        if not name.startswith("split_k"):
            return jnp.einsum("scf,sfm->scm", h, down)
        k = int(name.removeprefix("split_k"))
        s, c, f = h.shape
        part = jnp.einsum("sckf,skfm->sckm", h.reshape(s, c, k, f // k), down.reshape(s, k, f // k, -1),
                          preferred_element_type=jnp.float32)
        return part.sum(2).astype(h.dtype)

    return jax.jit(lambda b, w: down_proj(up_proj(b, w), w["down"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/gpu/decode_variants.json"))
    args = p.parse_args(argv)
    w = init_mlp_weights(jax.random.key(0), (SLOTS,), D_MODEL, D_FF, jnp.bfloat16)
    weights = {"gate": w.gate, "up": w.up, "down": w.down, "gate_up": jnp.concatenate([w.gate, w.up], -1)}
    weight_bytes = 3 * SLOTS * D_MODEL * D_FF * 2
    block = jnp.ones((4096, 4096 * 8), jnp.bfloat16)
    copy = jax.jit(lambda a: a + 1)
    copy_tbps = 2 * block.nbytes / time_fn(lambda: copy(block), repeats=20) / 1e12
    print(f"copy {copy_tbps:.2f} TB/s (read + write)", flush=True)
    points = []
    for capacity in CAPACITIES:
        buffer = jax.random.normal(jax.random.key(capacity), (SLOTS, capacity, D_MODEL), jnp.bfloat16)
        for name in ("einsum", "merged_gate_up", "split_k2", "split_k4", "split_k8"):
            fn = swiglu_variant(name)
            seconds = time_fn(lambda fn=fn, b=buffer: fn(b, weights), repeats=20, min_seconds=0.3)
            tbps = weight_bytes / seconds / 1e12
            points.append({"capacity": capacity, "variant": name, "ms": seconds * 1e3, "weight_tbps": tbps,
                           "pct_of_copy": 100 * tbps / copy_tbps})
            print(f"C {capacity:4d} {name:15s} {seconds * 1e3:.3f} ms {tbps:.2f} TB/s", flush=True)
    best = max((q for q in points if q["capacity"] <= 72), key=lambda q: q["weight_tbps"])
    summary = {"shape": {"d_model": D_MODEL, "d_ff": D_FF, "slots": SLOTS},
               "copy_tbps_read_plus_write": copy_tbps, "best_decode_weight_tbps": best["weight_tbps"],
               "best_decode_variant": best["variant"], "points": points}
    write_json(args.out, summary, method="measured", note="weight read rate of decode-size expert MLPs")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
