"""Decode-size expert MLPs on the GPU: does a different matmul layout read the weights faster?

Mixtral-8x7B expert shape (4096 -> 14336, bf16), 2 slots per device, slot buffers of ``C`` rows (C = 8 ... 72
covers 4 ... 36 tokens per expert at top-2 with 10 % headroom, plus 512 for contrast). Each variant computes
the same SwiGLU from a ready slot buffer; reported is the weight read rate (3 matrices x 2 slots / time) and
its share of a plain copy's rate (read + write, measured in the same process). Times are device time per
call with the host's dispatch overlapped (``time_fn(pipelined=...)``); ``synchronised_ms`` also counts the
host round trip of one synchronised call, which is what earlier versions of this probe reported.

* ``einsum``: three batched einsums, as the capacity kernel does;
* ``merged_gate_up``: gate and up stored side by side, ``[S, M, 2F]``, one einsum for both;
* ``split_k<k>``: the down projection split over ``k`` chunks of F and summed (more blocks for the GPU);
* ``transposed``: the weights stored with the contracted axis last (``[S, F, M]`` for gate and up,
  ``[S, M, F]`` for down), the classic matrix-vector layout;
* ``block_diagonal``: the slots as one plain matmul per projection: a block-diagonal ``[S*C, S*M]`` input
  against the slot weights read as one ``[S*M, F]`` matrix (no batch axis; the zero blocks cost FLOPs,
  which decode has to spare).

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
PIPELINED = 10


def swiglu_variant(name: str):
    def up_proj(b, w):
        if name == "merged_gate_up":
            h = jnp.einsum("scm,smf->scf", b, w["gate_up"])
            return jax.nn.silu(h[..., :D_FF]) * h[..., D_FF:]
        if name == "transposed":
            proj = lambda m: jnp.einsum("scm,sfm->scf", b, m)  # noqa: E731
            return jax.nn.silu(proj(w["gate_t"])) * proj(w["up_t"])
        if name == "block_diagonal":
            s, c, m = b.shape
            blocks = (b[:, :, None, :] * jnp.eye(s, dtype=b.dtype)[:, None, :, None]).reshape(s * c, s * m)
            proj = lambda mat: (blocks @ mat.reshape(s * m, -1)).reshape(s, c, -1)  # noqa: E731
            return jax.nn.silu(proj(w["gate"])) * proj(w["up"])
        return jax.nn.silu(jnp.einsum("scm,smf->scf", b, w["gate"])) * jnp.einsum("scm,smf->scf", b, w["up"])

    def down_proj(h, w):
        down = w["down"]
        if name == "transposed":
            return jnp.einsum("scf,smf->scm", h, w["down_t"])
        if name == "block_diagonal":
            s, c, f = h.shape
            blocks = (h[:, :, None, :] * jnp.eye(s, dtype=h.dtype)[:, None, :, None]).reshape(s * c, s * f)
            return (blocks @ down.reshape(s * f, -1)).reshape(s, c, -1)
        if not name.startswith("split_k"):
            return jnp.einsum("scf,sfm->scm", h, down)
        k = int(name.removeprefix("split_k"))
        s, c, f = h.shape
        part = jnp.einsum("sckf,skfm->sckm", h.reshape(s, c, k, f // k), down.reshape(s, k, f // k, -1),
                          preferred_element_type=jnp.float32)
        return part.sum(2).astype(h.dtype)

    return jax.jit(lambda b, w: down_proj(up_proj(b, w), w))


def variant_weights(w) -> dict:
    """Only the arrays each variant reads, so the timed call holds no copies it does not need."""
    plain = {"gate": w.gate, "up": w.up, "down": w.down}
    return {
        "einsum": plain,
        "merged_gate_up": {"gate_up": jnp.concatenate([w.gate, w.up], -1), "down": w.down},
        "transposed": {"gate_t": jnp.swapaxes(w.gate, 1, 2), "up_t": jnp.swapaxes(w.up, 1, 2),
                       "down_t": jnp.swapaxes(w.down, 1, 2), "down": w.down},
        "block_diagonal": plain,
        **{f"split_k{k}": plain for k in (2, 4, 8)},
    }


def copy_rate_tbps() -> float:
    """Read + write rate of an element-wise pass over 2 GiB (far above the L2), the bandwidth ceiling."""
    block = jax.random.normal(jax.random.key(1), (16384, 65536), jnp.bfloat16)
    copy = jax.jit(lambda a: a + 1)
    return 2 * block.nbytes / time_fn(lambda: copy(block), repeats=20, pipelined=PIPELINED) / 1e12


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/gpu/decode_variants.json"))
    args = p.parse_args(argv)
    w = init_mlp_weights(jax.random.key(0), (SLOTS,), D_MODEL, D_FF, jnp.bfloat16)
    weights = variant_weights(w)
    weight_bytes = 3 * SLOTS * D_MODEL * D_FF * 2
    copy_tbps = copy_rate_tbps()
    print(f"copy {copy_tbps:.2f} TB/s (read + write)", flush=True)
    reference = swiglu_variant("einsum")
    points = []
    for capacity in CAPACITIES:
        buffer = jax.random.normal(jax.random.key(capacity), (SLOTS, capacity, D_MODEL), jnp.bfloat16)
        want = reference(buffer, weights["einsum"]).astype(jnp.float32)
        for name, variant_w in weights.items():
            fn = swiglu_variant(name)
            got = fn(buffer, variant_w).astype(jnp.float32)
            rel_err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            if not rel_err < 2e-2:  # bf16 operands only; a wrong layout shows as O(1)
                raise AssertionError(f"{name} at C={capacity} differs from einsum: relative error {rel_err}")
            call = lambda fn=fn, b=buffer, v=variant_w: fn(b, v)  # noqa: E731
            seconds = time_fn(call, repeats=20, min_seconds=0.3, pipelined=PIPELINED)
            synchronised = time_fn(call, repeats=20, min_seconds=0.3)
            tbps = weight_bytes / seconds / 1e12
            points.append({"capacity": capacity, "variant": name, "ms": seconds * 1e3, "weight_tbps": tbps,
                           "pct_of_copy": 100 * tbps / copy_tbps, "synchronised_ms": synchronised * 1e3,
                           "rel_err_vs_einsum": rel_err})
            print(f"C {capacity:4d} {name:15s} {seconds * 1e3:.3f} ms "
                  f"({synchronised * 1e3:.3f} synchronised) {tbps:.2f} TB/s "
                  f"{100 * tbps / copy_tbps:.0f}% of copy", flush=True)
    best = max((q for q in points if q["capacity"] <= 72), key=lambda q: q["weight_tbps"])
    summary = {"shape": {"d_model": D_MODEL, "d_ff": D_FF, "slots": SLOTS},
               "copy_tbps_read_plus_write": copy_tbps, "pipelined_calls": PIPELINED,
               "best_decode_weight_tbps": best["weight_tbps"],
               "best_decode_variant": best["variant"], "points": points}
    write_json(args.out, summary, method="measured", note="weight read rate of decode-size expert MLPs")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
