"""Check the layer on whatever device jax has (e.g. one GPU): every backend x split x kernel against the
dense reference, D = 1 with spare slots (so the balanced split's fused kernel runs inside shard_map).

Usage: python scripts/check_layer_on_device.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moeless_jax.moe import (  # noqa: E402
    MoEConfig,
    MoEParams,
    ReplicaTable,
    dense_moe_reference,
    init_mlp_weights,
    make_ep_mesh,
    materialize_slot_weights,
    moe_forward,
)


def main() -> int:
    mesh = make_ep_mesh(1)
    k_router, k_experts, k_x = jax.random.split(jax.random.key(0), 3)
    router = jax.random.normal(k_router, (256, 8))
    experts = init_mlp_weights(k_experts, (8,), 256, 512, jnp.float32)
    table = ReplicaTable.random(np.random.default_rng(0), num_experts=8, num_devices=1, slots_per_device=10)
    params = MoEParams(router, materialize_slot_weights(experts, table), None)
    x = jax.random.normal(k_x, (2048, 256))
    failures = 0
    for backend in ("dense", "ragged"):
        for split in ("even", "balanced"):
            for kernel in ("ragged", "capacity"):
                config = MoEConfig(
                    d_model=256,
                    d_ff=512,
                    num_experts=8,
                    top_k=2,
                    num_devices=1,
                    slots_per_device=10,
                    backend=backend,
                    split=split,
                    expert_kernel=kernel,
                )
                out = jax.jit(lambda p, t, x, c=config: moe_forward(p, t, x, config=c, mesh=mesh))(
                    params, table.arrays(), x
                )
                ref = dense_moe_reference(router, experts, None, x, config=config)
                err = float(jnp.max(jnp.abs(out.y - ref)))
                ok = err < 1e-3 and int(out.overflow) == 0
                failures += not ok
                print(
                    f"{jax.devices()[0].platform} {backend:6} {split:8} {kernel:8} max|y-ref|={err:.2e} "
                    f"overflow={int(out.overflow)} {'ok' if ok else 'FAIL'}",
                    flush=True,
                )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
