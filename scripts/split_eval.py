"""Real-trace evaluation of the dispatch-time split (the ``eval`` part of ``bench_split.py``).

DeepSeek-V2-Lite routing (MoE-Beyond), split by prompt 70:30 (seed 0; the test prompts are served), batches
from the Azure conversation arrivals in 1-s windows. For every batch and layer a MoEless plan (scaler with
the slot budget as its cap and CV target 0, so every budgeted slot is used; placer with warm reuse) is made
from one of three forecasts:

* ``history``: cumulative loads of the batches served before (the History predictor);
* ``moeless``: the RoutingOnly predictor at distance 1 (layer l's routing of this batch forecasts l+1);
  the first MoE layer has no source layer, so it uses history;
* ``perfect``: the batch's true loads.

The batch's true per-expert counts are then split over each plan's replicas, ``even`` or ``balanced``,
with the same quota code the layer runs, and the max tokens on a device is compared with Oracle (perfect
balance: all tokens / D). An exact LP over the same placements bounds what any split can do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moeless_jax.moe.config import SPLIT_ITERATIONS

BUDGETS = (1.125, 1.25, 1.5, 2.0)
NUM_DEVICES = 8
PLACEMENTS = ("history", "moeless", "perfect")
LP_SAMPLES = 300


def budget_key(budget: float) -> str:
    return f"{budget:g}".replace(".", "_") + "x"


def load_batches(data_dir: Path):
    from moeless_jax.traces import expert_loads, read_azure_arrivals, read_moe_beyond, window_batches

    trace = read_moe_beyond(data_dir / "moe-beyond")
    fit, test = trace.split_by_request(0.7, seed=0)
    arrivals = read_azure_arrivals(data_dir / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv")
    batches = window_batches(test, arrivals, window_s=1.0)
    return fit, test, batches, expert_loads(test, batches)


def forecasts(fit, test, batches, loads: np.ndarray) -> dict[str, np.ndarray]:
    """[B, L, E] forecast loads per placement."""
    from tqdm import tqdm

    from moeless_jax.predict import History, RoutingOnly

    history, routing = History(distance=1).fit(fit), RoutingOnly(distance=1).fit(fit)
    out = {name: np.zeros(loads.shape, np.float64) for name in PLACEMENTS}
    out["perfect"] = loads.astype(np.float64)
    past = np.zeros(loads.shape[1:], np.float64)
    for b, batch in enumerate(tqdm(batches, desc="forecasts")):
        assignments = loads[b, 0].sum()
        first = past[0] if past[0].sum() > 0 else np.full(loads.shape[2], 1.0)
        first = first / first.sum() * assignments  # no source layer: cumulative history
        out["history"][b, 0] = out["moeless"][b, 0] = first
        out["history"][b, 1:] = history.predict(test, batch)
        out["moeless"][b, 1:] = routing.predict(test, batch)
        history.observe(loads[b])
        routing.observe(loads[b])  # its online error correction (configs/predict.yaml: online_alpha)
        past += loads[b]
    return out


def plan_tables(forecast: np.ndarray, slots_per_device: int) -> np.ndarray:
    """[B, L, P] slot_to_expert of MoEless plans made batch by batch from ``forecast [B, L, E]``."""
    from moeless_jax.plan import MoEless, MoElessConfig, SlotLayout

    num_batches, num_layers, num_experts = forecast.shape
    policy = MoEless(
        SlotLayout(num_experts, NUM_DEVICES, slots_per_device), num_layers, MoElessConfig(cv_target=0.0)
    )
    return np.stack([policy.plan(forecast[b]).slot_to_expert for b in range(num_batches)])


def max_device_loads(
    loads: np.ndarray, tables: np.ndarray, split: str, iterations: int = SPLIT_ITERATIONS
) -> np.ndarray:
    """[B, L] max tokens on a device when the true ``loads`` are split over ``tables`` by ``split``
    (``iterations``: rounds of the balanced split)."""
    from moeless_jax.moe.split import host_tokens_per_device

    num_experts, num_slots = loads.shape[-1], tables.shape[-1]
    flat_loads, flat_tables = loads.reshape(-1, num_experts), tables.reshape(-1, num_slots)
    chunk = 4096  # bounds the quota code's intermediates
    out = [
        host_tokens_per_device(
            flat_tables[i : i + chunk],
            flat_loads[i : i + chunk],
            num_devices=NUM_DEVICES,
            split=split,
            iterations=iterations,
        ).max(-1)
        for i in range(0, flat_loads.shape[0], chunk)
    ]
    return np.concatenate(out).reshape(loads.shape[:2])


def history_forecast(loads: np.ndarray) -> np.ndarray:
    """``[B, L, E]`` cumulative loads of the batches before each (uniform before the first)."""
    past = np.cumsum(loads, axis=0, dtype=np.float64) - loads
    past[0] = 1.0
    return past


ITERATIONS = (2, 3, 4, 6, 8, 12, 16, 24)


def iterations_part(args) -> None:
    """How close the balanced split gets to the LP optimum with each number of rounds -> iterations.json.

    History placement (cumulative loads of the batches before), 1.125x and 1.25x slots, the LP's sampled
    (batch, layer) pairs; the rounds' cost grows with their number (see the quota timings).
    """
    from tqdm import tqdm

    from moeless_jax.provenance import write_json

    if not args.data_dir:
        raise SystemExit("--data-dir is required (the folder with moe-beyond/ and azure-llm-2023/)")
    _, _, batches, loads = load_batches(Path(args.data_dir))
    rng = np.random.default_rng(0)
    sample = np.stack(
        [rng.integers(len(batches), size=LP_SAMPLES), rng.integers(loads.shape[1], size=LP_SAMPLES)], 1
    )
    picked = loads[sample[:, 0], sample[:, 1]][:, None, :]  # [N, 1, E]
    oracle = picked[:, 0].sum(-1) / NUM_DEVICES
    summary: dict = {"lp_samples": LP_SAMPLES, "iterations": list(ITERATIONS), "placement": "history"}
    for budget in (1.125, 1.25):
        slots = round(budget * loads.shape[-1] / NUM_DEVICES)
        tables = plan_tables(history_forecast(loads), slots)
        bound = lp_bound(loads, tables, slots, sample)
        picked_tables = tables[sample[:, 0], sample[:, 1]][:, None, :]
        key = budget_key(budget)
        summary[f"lp_{key}_vs_oracle"] = float((bound / oracle).mean())
        for iterations in tqdm(ITERATIONS, desc=f"rounds at {key}"):
            worst = max_device_loads(picked, picked_tables, "balanced", iterations)[:, 0]
            summary[f"balanced_over_lp_{key}_{iterations}_rounds_mean"] = float((worst / bound).mean())
            summary[f"balanced_over_lp_{key}_{iterations}_rounds_max"] = float((worst / bound).max())
        even = max_device_loads(picked, picked_tables, "even")[:, 0]
        summary[f"even_over_lp_{key}_mean"] = float((even / bound).mean())
    path = write_json(Path(args.out_dir) / "iterations.json", summary, method="computed",
                      note="token counts on real routing; LP via scipy HiGHS")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


def lp_bound(loads: np.ndarray, tables: np.ndarray, slots_per_device: int, sample: np.ndarray) -> np.ndarray:
    """Exact LP optimum of the max device load for the sampled (batch, layer) pairs."""
    from moeless_jax.moe import ReplicaTable
    from moeless_jax.plan.split_bound import optimal_max_device_load

    out = []
    for b, layer in sample:
        table = ReplicaTable.from_slot_to_expert(
            tables[b, layer],
            num_experts=loads.shape[-1],
            num_devices=NUM_DEVICES,
            slots_per_device=slots_per_device,
        )
        out.append(optimal_max_device_load(loads[b, layer], table))
    return np.array(out)


def eval_part(args) -> None:
    from tqdm import tqdm

    from moeless_jax.provenance import write_json

    if not args.data_dir:
        raise SystemExit(
            "--data-dir is required for the eval part (the folder with moe-beyond/ and azure-llm-2023/)"
        )
    data_dir, out_dir = Path(args.data_dir), Path(args.out_dir)
    fit, test, batches, loads = load_batches(data_dir)
    num_experts = loads.shape[-1]
    oracle = loads.sum(-1) / NUM_DEVICES  # [B, L]
    summary: dict = {
        "batches": len(batches),
        "layers": int(loads.shape[1]),
        "mean_tokens_per_batch": float(loads[:, 0].sum(-1).mean() / test.top_k),
        "devices": NUM_DEVICES,
        "budgets": list(BUDGETS),
        "planner": "MoEless scaler (cap = budget, cv_target 0) + placer (warm reuse, warm_slack 0.03)",
    }
    casts = forecasts(fit, test, batches, loads)
    ratios = {}
    rng = np.random.default_rng(0)
    sample = np.stack(
        [rng.integers(len(batches), size=LP_SAMPLES), rng.integers(loads.shape[1], size=LP_SAMPLES)], 1
    )
    for budget in tqdm(BUDGETS, desc="budgets"):
        slots = round(budget * num_experts / NUM_DEVICES)
        for placement in PLACEMENTS:
            tables = plan_tables(casts[placement], slots)
            for split in ("even", "balanced"):
                worst = max_device_loads(loads, tables, split)
                ratio = worst / oracle
                ratios[(split, placement, budget)] = ratio
                summary[f"{split}_{placement}_{budget_key(budget)}_vs_oracle"] = float(ratio.mean())
                summary[f"{split}_{placement}_{budget_key(budget)}_vs_oracle_p99"] = float(
                    np.quantile(ratio, 0.99)
                )
            if placement == "history" and budget == 1.25:
                bound = lp_bound(loads, tables, slots, sample) / oracle[sample[:, 0], sample[:, 1]]
                quotas = ratios[("balanced", placement, budget)][sample[:, 0], sample[:, 1]]
                summary["lp_history_1_25x_vs_oracle"] = float(bound.mean())
                summary["lp_samples"] = LP_SAMPLES
                summary["balanced_history_1_25x_vs_oracle_on_lp_samples"] = float(quotas.mean())
                summary["balanced_over_lp_history_1_25x_mean"] = float((quotas / bound).mean())
                summary["balanced_over_lp_history_1_25x_max"] = float((quotas / bound).max())
    merge_quota_timings(summary, out_dir)
    write_json(out_dir / "summary.json", summary, method="computed", note=NOTE)
    plot(summary, out_dir / "summary.png")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=1))


NOTE = (
    "token counts on real routing; quota timings are measured (quota_* entries, from quota_<platform>.json)"
)


def merge_quota_timings(summary: dict, out_dir: Path) -> None:
    """Copy the quota timings (``bench_split.py --part quota``) into the summary, with headline keys.

    The timed scan has a per-layer step overhead that the even split, a few element-wise ops, shows on its
    own; ``*_net`` subtracts it; ``*_unrolled`` times the layers as straight-line code, without a loop (and
    ``*_unrolled_by_budget`` at every slot budget). Times are device time per call with the host's dispatch
    overlapped (``us_per_layer_synchronised`` in the quota files also counts one synchronised round trip).
    """
    for platform, name in (("cpu", "cpu"), ("gpu", "h200")):
        path = out_dir / f"quota_{platform}.json"
        if not path.exists():
            continue
        quota = json.loads(path.read_text())
        summary[f"quota_{platform}"] = quota
        at = {(p["split"], p["budget"]): p["us_per_layer"] for p in quota["points"]}
        best = "balanced_fused" if ("balanced_fused", 1.125) in at else "balanced"
        summary[f"quota_us_per_layer_{name}"] = at[(best, 1.125)]
        summary[f"quota_us_per_layer_{name}_net"] = at[(best, 1.125)] - at[("even", 1.125)]
        unrolled = {(p["split"], p["budget"]): p["us_per_layer"] for p in quota.get("unrolled_points", [])}
        if (best, 1.125) in unrolled:
            summary[f"quota_us_per_layer_{name}_unrolled"] = unrolled[(best, 1.125)]
            summary[f"quota_us_per_layer_{name}_unrolled_by_budget"] = {
                budget_key(b): us for (split, b), us in sorted(unrolled.items()) if split == best
            }


def merge_part(args) -> None:
    """Refresh the quota timings in an existing summary.json without re-running the evaluation."""
    from moeless_jax.provenance import write_json

    out_dir = Path(args.out_dir)
    summary = json.loads((out_dir / "summary.json").read_text())
    previous = summary.pop("provenance", None)
    if previous and "--part eval" in previous.get("command", ""):
        summary["provenance_eval"] = previous  # what produced the evaluation itself
    merge_quota_timings(summary, out_dir)
    write_json(out_dir / "summary.json", summary, method="computed", note=NOTE)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for placement, color in zip(PLACEMENTS, ("tab:gray", "tab:blue", "tab:green"), strict=True):
        for split, style in (("even", "--"), ("balanced", "-")):
            ys = [summary[f"{split}_{placement}_{budget_key(b)}_vs_oracle"] for b in BUDGETS]
            ax.plot(
                BUDGETS, ys, style, marker="o", color=color, label=f"{placement} placement, {split} split"
            )
    if "lp_history_1_25x_vs_oracle" in summary:
        ax.plot(
            [1.25], [summary["lp_history_1_25x_vs_oracle"]], "k*", ms=10, label="LP bound (history, 1.25x)"
        )
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xlabel("slot budget (slots / experts)")
    ax.set_ylabel("max device load / Oracle (mean over batch, layer)")
    ax.set_title("DeepSeek-V2-Lite routing, Azure 1-s batches, 8 devices")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
