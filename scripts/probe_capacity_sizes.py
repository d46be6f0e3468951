"""How many compiled slot sizes the capacity kernel should carry -> results/gpu/capacity_sizes.json.

One device's share of an 8-device Mixtral-8x7B layer (2 slots, 8192 tokens, 16384 rows), slot loads balanced
or with the fullest slot at 1.6x a balanced slot's rows (as real routings with replicated tables give; see
docs/gpu.md), under three size ladders: one 10 %-padded size (``slot_capacity_factor`` 1.1, no ratio), sizes
1.05 apart up to 1.1x, and sizes 1.05 apart up to 2x (the default). For each: device time per call, the
compiled program's temporary memory, compile time, the size picked and the rows that took the ragged
overflow path.

Usage (on the GPU, from the repo root):
  python scripts/probe_capacity_sizes.py [--out results/gpu/capacity_sizes.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LADDERS = {"one size, 1.1x": (1.1, None), "1.05 steps to 1.1x": (1.1, 1.05), "1.05 steps to 2x": (2.0, 1.05)}
SLOTS = {"balanced": (8192, 8192), "fullest 1.6x": (13107, 3277)}
D_MODEL, D_FF, ROWS = 4096, 14336, 16384


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/gpu/capacity_sizes.json"))
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from moeless_jax.bench import time_fn
    from moeless_jax.moe import capacity_swiglu, init_mlp_weights
    from moeless_jax.moe.capacity import pick_capacity, slot_capacities
    from moeless_jax.provenance import write_json

    w = init_mlp_weights(jax.random.key(0), (2,), D_MODEL, D_FF, jnp.bfloat16)
    rows = jax.random.normal(jax.random.key(1), (ROWS, D_MODEL), jnp.bfloat16)
    points = []
    for ladder_name, (factor, ratio) in LADDERS.items():
        sizes = slot_capacities(ROWS / 2, factor, ratio)
        fn = jax.jit(partial(capacity_swiglu, capacity=sizes, overflow_rows=ROWS // 4))
        start = time.perf_counter()  # one program serves every slot load of this ladder
        compiled = fn.lower(rows, jnp.zeros(ROWS, jnp.int32), w).compile()
        compile_s = time.perf_counter() - start
        for slots_name, per_slot in SLOTS.items():
            slot = jnp.asarray(np.repeat(np.arange(2), per_slot), jnp.int32)
            _, uncomputed = compiled(rows, slot, w)
            call = partial(compiled, rows, slot, w)
            seconds = time_fn(call, repeats=5, min_seconds=0.05, pipelined=10)
            memory = compiled.memory_analysis()
            picked = pick_capacity(sizes, max(per_slot))
            point = {
                "ladder": ladder_name,
                "slots": slots_name,
                "slot_rows": list(per_slot),
                "sizes": len(sizes),
                "largest_size": sizes[-1],
                "picked_size": picked,
                "overflow_rows": int(max(0, max(per_slot) - sizes[-1])),
                "uncomputed": int(uncomputed),
                "ms": 1e3 * seconds,
                "useful_tflops": 6 * ROWS * D_MODEL * D_FF / seconds / 1e12,
                "temp_gib": None if memory is None else memory.temp_size_in_bytes / 2**30,
                "compile_s": compile_s,
            }
            points.append(point)
            print(point, flush=True)
    path = write_json(args.out, {"shape": "mixtral one device: 2 slots, 8192 tokens", "pipelined_calls": 10,
                                 "points": points}, method="measured")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
