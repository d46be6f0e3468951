"""Expert loads recorded from the shipped models' prefills -> tests/data/recorded_loads.npz (a test fixture).

For each shipped model, ``--batches`` prefill batches of ``--rows`` held-out prompts (cut or padded to
``--width`` tokens) run on ``--devices`` host devices; the file keeps each batch's per-layer expert counts,
``<model> [batches, L, E]`` int32 (counts only: no text, no token ids). The planner tests hold the on-device
and host planners to one quality bar on these.

Usage:
  python scripts/make_test_loads.py --data-dir DATA [--out tests/data/recorded_loads.npz]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moeless_jax.devices import local_devices  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--out", type=Path, default=Path("tests/data/recorded_loads.npz"))
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batches", type=int, default=12)
    args = p.parse_args(argv)
    devices = local_devices(args.devices)

    import jax
    import numpy as np
    from flax import nnx

    from moeless_jax.model import load_model
    from moeless_jax.model.shipped import SHIPPED, shipped_checkpoint
    from moeless_jax.model.text import load_corpus
    from moeless_jax.model.tokenizer import default_tokenizer
    from moeless_jax.moe import make_ep_mesh

    tokenizer = default_tokenizer()
    documents = load_corpus(args.data_dir).heldout[: args.rows * args.batches]
    rows = np.zeros((len(documents), args.width), np.int32)
    for i, ids in enumerate(tokenizer.encode_prompts(documents, args.width)):
        rows[i, : len(ids)] = ids
    mesh = make_ep_mesh(args.devices, devices)
    step = nnx.jit(lambda model, tokens: model(tokens).expert_counts)
    loads = {}
    for name in SHIPPED:
        model = load_model(shipped_checkpoint(name), mesh=mesh)
        loads[name] = np.stack([np.asarray(step(model, jax.device_put(rows[i : i + args.rows])))
                                for i in range(0, len(rows), args.rows)]).astype(np.int32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **loads)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in loads.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
