"""Placement for splittability, measured: does placing for the balanced split beat the default placer?

Same data and batches as the split evaluation (``scripts/split_eval.py``: DeepSeek-V2-Lite routing, 30 % of
prompts held out, Azure conversation arrivals in 1-s windows, 8 devices), on ``--batches`` sampled batches and
every layer. For each forecast (``perfect``: the batch's true loads; ``history``: cumulative loads of the
batches before) and slot budget, replica counts come from the MoEless scaler and the replicas are placed by:

* ``default``: the MoEless placer (warm reuse from the previous sampled batch's table, ``warm_slack`` 0.03);
* ``fresh``: the same placer without warm reuse (the fair baseline for the next one);
* ``divisible``: :func:`moeless_jax.plan.split_placement.place_divisible` (replicated experts water-filled
  over their devices while placing; ``fresh`` where it corners itself);

with the scaler's CV target 0 (every budgeted slot used, as in the split evaluation) and 0.2 (MoEless's
default, fewer replicas). The true counts are then split over each table with the layer's quota code,
``even`` and ``balanced``; reported: mean over (batch, layer) of max device tokens / Oracle (all tokens / 8).

Usage:
  python scripts/split_placement.py --data-dir DATA [--out-dir results/split] [--batches 600]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from split_eval import NUM_DEVICES, budget_key, history_forecast, load_batches, max_device_loads  # noqa: E402

BUDGETS = (1.125, 1.5, 2.0)
PLACERS = ("default", "fresh", "divisible")
CV_TARGETS = (0.0, 0.2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, type=Path, help="folder with moe-beyond/ and azure-llm-2023/")
    p.add_argument("--out-dir", type=Path, default=Path("results/split"))
    p.add_argument("--batches", type=int, default=600, help="test windows sampled (kept in order)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def plan(forecast: np.ndarray, placer: str, cv_target: float, slots: int) -> np.ndarray:
    """``[N, L, P]`` tables for ``forecast [N, L, E]`` (batches in order)."""
    from moeless_jax.plan import MoEless, MoElessConfig, SlotLayout, place_replicas
    from moeless_jax.plan.scaler import cv_counts
    from moeless_jax.plan.split_placement import place_divisible

    num_batches, num_layers, num_experts = forecast.shape
    layout = SlotLayout(num_experts, NUM_DEVICES, slots)
    tables = np.empty((num_batches, num_layers, layout.num_slots), np.int64)
    if placer == "default":
        policy = MoEless(layout, num_layers, MoElessConfig(cv_target=cv_target))
        for b in range(num_batches):
            tables[b] = policy.plan(forecast[b]).slot_to_expert
        return tables
    for b in range(num_batches):
        for layer in range(num_layers):
            load = forecast[b, layer]
            count = cv_counts(load, cv_target, layout.num_slots, NUM_DEVICES)
            table = place_divisible(count, load, NUM_DEVICES, slots) if placer == "divisible" else None
            if table is None:
                table = place_replicas(count, load, num_devices=NUM_DEVICES, slots_per_device=slots)
            tables[b, layer] = table
    return tables


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from moeless_jax.provenance import write_json

    _, _, batches, loads = load_batches(args.data_dir)
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(batches), size=min(args.batches, len(batches)), replace=False))
    casts = {"perfect": loads.astype(np.float64)[chosen], "history": history_forecast(loads)[chosen]}
    sample = loads[chosen]
    oracle = sample.sum(-1) / NUM_DEVICES
    summary: dict = {"batches": int(chosen.size), "layers": int(loads.shape[1]), "devices": NUM_DEVICES}
    runs = [(f, b, p, cv) for f in casts for b in BUDGETS for p in PLACERS for cv in CV_TARGETS]
    for forecast, budget, placer, cv in tqdm(runs, desc="placements"):
        slots = round(budget * loads.shape[-1] / NUM_DEVICES)
        tables = plan(casts[forecast], placer, cv, slots)
        for split in ("even", "balanced"):
            ratio = max_device_loads(sample, tables, split) / oracle
            key = f"{split}_{forecast}_{placer}_cv{cv:g}_{budget_key(budget)}_vs_oracle".replace(".", "_")
            summary[key] = float(ratio.mean())
        summary[f"slots_used_{forecast}_{placer}_cv{cv:g}_{budget_key(budget)}".replace(".", "_")] = float(
            (tables >= 0).sum(-1).mean()
        )
    note = "token counts on real routing; tables from the planner, splits from the layer's quota code"
    path = write_json(args.out_dir / "placement.json", summary, method="computed", note=note)
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
