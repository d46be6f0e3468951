"""Simulated MoE-layer latency of layer-ahead replication against per-step replication, EPLB and static EP,
weight copies charged everywhere -> results/layer_ahead/summary.json (+ PNG).

Routing: DeepSeek-V2-Lite (MoE-Beyond), prompts split 70:30 (seed 0) as in ``scripts/emulate_layer.py``; the
held-out prompts are served in batches of two kinds:

* ``window_<w>s``: the Azure conversation arrivals cut into ``w``-second windows (arrival ``i`` served by
  held-out request ``i mod R``), the first ``--max-windows`` windows;
* ``budget_<n>``: held-out requests drawn at random (with replacement, seeded) and packed whole, in order,
  into batches of at most ``n x devices`` tokens, i.e. about ``n`` tokens per device (the sweep behind the
  threshold).

A batch's loads and RoutingOnly forecasts are sums over its requests: the forecast of a token depends only
on its own request, so each held-out request is forecast once (cached under ``--cache-dir``) and batches add
them up; RoutingOnly's online error correction is then applied batch by batch as the predictor does.

Policies, every one served with the balanced split (in-step quotas that level the devices):

* ``static``: one replica per expert, round-robin; never moves;
* ``eplb``: DeepSeek EPLB re-planned every batch from the loads of all earlier batches; copies between steps;
* ``eplb_fixed``: DeepSeek EPLB planned once, from the warm-up batches but the last, installed in the last
  one and then kept (as deployments that re-plan every few thousand steps run): no copies in the means;
* ``per_step``: the MoEless host planner from the previous batch's loads (the controller); copies between
  steps;
* ``layer_ahead``: layer ``l + 1``'s table planned on the devices (:func:`moeless_jax.plan.on_device.
  plan_on_device`, at most ``--max-moves-per-device`` copies per device) from RoutingOnly's in-step forecast
  (layer 0 from history), copies overlapped with layer ``l``; forecast and plan time charged per layer;
* ``layer_ahead_perfect``: the same from the batch's true loads (the bound a forecast can reach);
* ``layer_ahead_unbudgeted``: ``layer_ahead`` without the copy budget (what the budget costs in balance and
  saves in copies);
* ``oracle``: every slot the same rows (changes outputs; the balance bound), no copies.

Layer time (the calibrated latency model, H200) in two variants: ``rows``, the ``capacity`` fit's line
against the fullest device's rows (a kernel whose time follows rows), and ``padded``, the capacity kernel as
it runs today (the slowest device computes ``slots x capacity`` rows, the capacity the smallest compiled one
that holds its fullest slot). Copy time: :mod:`moeless_jax.sim.layer_ahead`. Expert sizes: DeepSeek-V2-Lite's
(2048 x 1408, bf16, 17.3 MB) and, with the same routing, a Mixtral-sized expert (4096 x 14336, 352 MB; the
calibration's ``mixtral`` fit).

Output, per batch kind, expert size (``dsv2lite``, ``mixtral``) and layer-time variant (``rows``, ``padded``):
``net_ms_per_layer`` (MoE layers + exposed copies + forecast/plan overhead, per layer), ``moe_layer_ms_mean``,
``exposed_move_ms_per_layer``, ``bytes_moved_per_layer_step``, ``layer_ahead_vs_<baseline>`` (layer-ahead's
net time over the baseline's, < 1 faster), and
``min_tokens_per_device_to_pay[expert][variant][vs_<baseline>]``: where on the token-budget sweep layer-ahead
starts (and stops) beating EPLB, EPLB kept fixed, and static EP. The means leave out the first ``--warmup``
batches of every stream.

Usage (any machine; no accelerator needed):
  python scripts/sim_layer_ahead.py --data-dir DATA [--out-dir results/layer_ahead] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name: (d_model, d_ff) of one routed expert (SwiGLU: three d_model x d_ff matrices); the routing fixes E, K.
SHAPES = {"dsv2lite": (2048, 1408), "mixtral": (4096, 14336)}
DTYPE_BYTES = 2  # bf16
POLICIES = ("static", "eplb", "eplb_fixed", "per_step", "layer_ahead", "layer_ahead_perfect",
            "layer_ahead_unbudgeted", "oracle")
MOVING = ("eplb", "eplb_fixed", "per_step", "layer_ahead", "layer_ahead_perfect", "layer_ahead_unbudgeted")
AHEAD = ("layer_ahead", "layer_ahead_perfect", "layer_ahead_unbudgeted")
BETWEEN = ("eplb", "eplb_fixed", "per_step")
# Baselines the threshold is found against: EPLB re-planned every batch (copies charged), EPLB planned once
# from the warm-up batches (no copies afterwards) and static EP (what a declining step keeps).
THRESHOLD_BASELINES = {"vs_eplb_balanced": "eplb", "vs_eplb_fixed": "eplb_fixed", "vs_static": "static"}
TIMINGS = ("rows", "padded")
KERNEL = "capacity"
PLAN_CHUNK = 8  # batches per compiled on-device planning call (one compile for every batch count)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="folder with moe-beyond/ and azure-llm-2023/")
    p.add_argument("--out-dir", type=Path, default=Path("results/layer_ahead"))
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/sim_layer_ahead"),
                   help="where the RoutingOnly per-request forecasts are kept between runs")
    p.add_argument("--calibration", type=Path, default=Path("results/gpu/calibration-h200.json"))
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--slots-per-device", type=int, default=10)
    p.add_argument("--max-moves-per-device", type=int, default=4, help="layer-ahead copy budget N")
    p.add_argument("--plan-ms", type=float, default=0.020,
                   help="on-device planning time per layer (assumed target, not measured)")
    p.add_argument("--windows", type=float, nargs="+", default=[16.0, 1.0], help="arrival windows (s)")
    p.add_argument("--max-windows", type=int, default=400, help="first windows served per window size")
    p.add_argument("--tokens-per-device", type=int, nargs="+", default=[128, 512, 2048, 8192, 32768, 65536],
                   help="token-budget sweep: batch budget = this x devices")
    p.add_argument("--budget-batches", type=int, default=48, help="batches per token budget")
    p.add_argument("--warmup", type=int, default=8,
                   help="first batches of every stream left out of the means (history and tables settle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="short run: 40 windows, 3 budgets x 16 batches, a RoutingOnly fitted for 300 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.max_windows, args.budget_batches, args.warmup = 40, 16, 4
        args.tokens_per_device = [512, 8192, 65536]
    return args


# ---------------------------------------------------------------------------------------- requests
def request_arrays(args, fit, test) -> dict[str, np.ndarray]:
    """Per held-out request: ``tokens [R]``, true ``loads [R, L, E]`` and RoutingOnly's raw forecast
    ``forecast [R, L-1, E]`` of layers 1.. (K x the summed per-token distributions), cached."""
    from moeless_jax.predict import RoutingOnly, RoutingOnlyConfig
    from moeless_jax.traces import expert_loads

    config = RoutingOnlyConfig(steps=300, warmup_steps=30) if args.quick else RoutingOnlyConfig()
    start, stop = test.request_bounds
    key = hashlib.sha256()
    key.update(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    for array in (fit.request_id, fit.expert_ids, test.request_id, test.expert_ids, start, stop):
        key.update(np.ascontiguousarray(array).tobytes())
    path = args.cache_dir / f"requests-{key.hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as cached:
            print(f"cached per-request forecasts: {path}")
            return {name: cached[name] for name in cached.files}
    print(f"fitting RoutingOnly on {fit.num_tokens} tokens ({config.steps} steps; cached afterwards)")
    predictor = RoutingOnly(distance=1, config=config).fit(fit)
    batches = [np.arange(a, b, dtype=np.int64) for a, b in zip(start, stop, strict=True)]
    from tqdm import tqdm

    # Before any observe() the predictor adds no correction, so each row is the raw sum rescaled to its own
    # total, K x tokens: the raw forecast itself.
    forecast = np.stack([predictor.predict(test, batch) for batch in tqdm(batches, desc="forecast requests")])
    arrays = {"requests": test.requests, "tokens": stop - start, "loads": expert_loads(test, batches),
              "forecast": forecast, "online_alpha": np.float64(config.online_alpha)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


def window_counts(test, arrivals, window_s: float, max_windows: int, requests: np.ndarray) -> np.ndarray:
    """``[B, R]`` how often each held-out request appears in each of the first ``max_windows`` windows."""
    from moeless_jax.traces import window_requests

    index = {int(r): i for i, r in enumerate(requests)}
    windows = window_requests(test, arrivals, window_s=window_s)[:max_windows]
    counts = np.zeros((len(windows), requests.size), np.int64)
    for b, window in enumerate(windows):
        np.add.at(counts[b], [index[int(r)] for r in window], 1)
    return counts


def budget_counts(tokens: np.ndarray, budget: int, num_batches: int, rng) -> np.ndarray:
    """``[B, R]`` batches of random requests (with replacement) packed whole, in draw order, up to
    ``budget`` tokens (a request that does not fit starts the next batch, as ``token_budget_batches``)."""
    counts = np.zeros((num_batches, tokens.size), np.int64)
    b, filled = 0, 0
    while b < num_batches:
        request = int(rng.integers(tokens.size))
        if filled and filled + tokens[request] > budget:
            b, filled = b + 1, 0
            if b == num_batches:
                break
        counts[b, request] += 1
        filled += int(tokens[request])
    return counts


def batch_forecasts(loads: np.ndarray, raw: np.ndarray, online_alpha: float) -> np.ndarray:
    """``[B, L, E]`` forecast per batch: layer 0 from the loads of all earlier batches (uniform at first),
    layers 1.. RoutingOnly's summed forecast with its online correction (an exponential moving average of
    true minus forecast load shares, weight ``online_alpha``), each row scaled to the batch's assignments."""
    num_batches, num_layers, num_experts = loads.shape
    out = np.zeros(loads.shape, np.float64)
    past = np.zeros(num_experts, np.float64)
    bias = None
    for b in range(num_batches):
        total = float(loads[b, 0].sum())
        first = past if past.sum() > 0 else np.ones(num_experts)
        out[b, 0] = first / first.sum() * total
        shares = raw[b] / raw[b].sum(-1, keepdims=True)
        corrected = shares if (bias is None or not online_alpha) else np.clip(shares + bias, 0.0, None)
        out[b, 1:] = corrected / corrected.sum(-1, keepdims=True) * total
        if online_alpha:
            true = loads[b, 1:] / np.maximum(loads[b, 1:].sum(-1, keepdims=True), 1.0)
            error = true - shares
            bias = error * online_alpha if bias is None else bias + online_alpha * (error - bias)
        past += loads[b, 0]
    return out


# ------------------------------------------------------------------------------------------ tables
def plan_tables(loads: np.ndarray, forecast: np.ndarray, layout, max_moves: int,
                warmup: int) -> dict[str, np.ndarray]:
    """``[B, L, P]`` slot_to_expert per policy (``oracle``: the static table)."""
    from moeless_jax.plan import EPLBConfig, MoElessConfig, make_policy
    from moeless_jax.plan.tables import static_slot_to_expert

    num_batches, num_layers, _ = loads.shape
    static = static_slot_to_expert(layout.num_experts, layout.num_devices, layout.slots_per_device)
    tables = {"static": np.broadcast_to(static, (num_batches, num_layers, static.size)).copy()}
    # The policies' own split only shapes their observe() outcome, which is not used here.
    eplb = make_policy("eplb", layout, num_layers, eplb=EPLBConfig(window=max(num_batches, 1)))
    moeless = make_policy("moeless", layout, num_layers, moeless=MoElessConfig(cv_target=0.0))
    tables["eplb"] = np.empty_like(tables["static"])
    tables["per_step"] = np.empty_like(tables["static"])
    from tqdm import tqdm

    for b in tqdm(range(num_batches), desc="host plans", leave=False):
        tables["eplb"][b] = eplb.plan().slot_to_expert
        eplb.observe(loads[b])
        tables["per_step"][b] = moeless.plan(loads[b - 1]).slot_to_expert if b else static
    # Installed in the last warm-up batch (its copies fall outside the means), planned from the ones before.
    install = max(warmup - 1, 0)
    tables["eplb_fixed"] = tables["static"].copy()
    tables["eplb_fixed"][install:] = tables["eplb"][install]
    tables["layer_ahead"] = on_device_tables(forecast, static, layout, max_moves)
    tables["layer_ahead_perfect"] = on_device_tables(loads.astype(np.float64), static, layout, max_moves)
    tables["layer_ahead_unbudgeted"] = on_device_tables(forecast, static, layout, None)
    tables["oracle"] = tables["static"]
    check_tables(tables, layout, max_moves)
    return tables


_PLANNERS: dict = {}


def on_device_tables(forecast: np.ndarray, static: np.ndarray, layout, max_moves: int | None) -> np.ndarray:
    """``[B, L, P]`` tables of :func:`plan_on_device`, batch after batch, each layer from its own previous
    table (the first batch from the static one), in compiled chunks of ``PLAN_CHUNK`` batches."""
    import jax
    import jax.numpy as jnp

    key = (layout.num_devices, layout.slots_per_device, max_moves)
    if key not in _PLANNERS:
        from functools import partial

        from moeless_jax.plan.on_device import plan_on_device

        plan = jax.vmap(partial(plan_on_device, num_devices=layout.num_devices,
                                slots_per_device=layout.slots_per_device, max_moves_per_device=max_moves))

        def chunk(previous, casts):
            def step(table, cast):
                new = plan(cast, table).slot_to_expert
                return new, new

            return jax.lax.scan(step, previous, casts)

        _PLANNERS[key] = jax.jit(chunk)
    run = _PLANNERS[key]
    num_batches, num_layers, _ = forecast.shape
    padded = -(-num_batches // PLAN_CHUNK) * PLAN_CHUNK
    casts = np.concatenate([forecast, np.repeat(forecast[-1:], padded - num_batches, axis=0)])
    previous = jnp.asarray(np.tile(static, (num_layers, 1)), jnp.int32)
    out = []
    for first in range(0, padded, PLAN_CHUNK):
        previous, tables = run(previous, jnp.asarray(casts[first:first + PLAN_CHUNK], jnp.float32))
        out.append(np.asarray(tables))
    return np.concatenate(out)[:num_batches].astype(np.int64)


def check_tables(tables: dict[str, np.ndarray], layout, max_moves: int) -> None:
    """Every table servable; the layer-ahead ones within their copy budget per device."""
    from moeless_jax.plan.budget import check_table, copies

    kw = dict(num_experts=layout.num_experts, num_devices=layout.num_devices,
              slots_per_device=layout.slots_per_device)
    for name, array in tables.items():
        for index in np.ndindex(array.shape[:2]):
            check_table(array[index], name=f"{name} table {index}", **kw)
    for name in ("layer_ahead", "layer_ahead_perfect"):
        array = tables[name]
        copied = copies(_previous(tables, name), array).reshape(*array.shape[:2], layout.num_devices, -1)
        worst = int(copied.sum(-1).max())
        if worst > max_moves:
            raise RuntimeError(f"{name}: a device received {worst} copies, over the budget {max_moves}")


# -------------------------------------------------------------------------------------- layer times
def slot_rows(tables: dict[str, np.ndarray], loads: np.ndarray, layout) -> dict[str, np.ndarray]:
    """``[B, L, P]`` rows each slot computes per policy, balanced split (oracle: the same rows everywhere)."""
    from moeless_jax.moe.split import host_slot_tokens
    from moeless_jax.plan.metrics import spread_evenly

    out = {}
    for name in POLICIES:
        if name == "oracle":
            out[name] = spread_evenly(loads.sum(-1), layout.num_slots)
        else:
            out[name] = host_slot_tokens(tables[name], loads, num_devices=layout.num_devices,
                                         split="balanced")
    return out


def layer_times(model, shape: str, rows: np.ndarray, layout) -> dict[str, np.ndarray]:
    """``[B, L]`` MoE-layer ms for slot rows ``[B, L, P]``: ``rows`` (the capacity fit's line against the
    fullest device's rows, :meth:`LatencyModel.layer_ms`) and ``padded`` (what the capacity kernel computes,
    :meth:`LatencyModel.layer_ms_static`). Both grow with the fullest device's rows or slot, so they are
    evaluated on those maxima directly (checked against the model's methods on a sample)."""
    from moeless_jax.moe.capacity import pick_capacity, slot_capacities
    from moeless_jax.moe.config import SLOT_CAPACITY_RATIO

    bytes_per_row = SHAPES[shape][0] * DTYPE_BYTES
    device_rows = rows.reshape(*rows.shape[:2], layout.num_devices, -1).sum(-1)  # [B, L, D]
    fullest_device = device_rows.max(-1)
    exchange = 2 * model.all_to_all_ms(fullest_device * bytes_per_row)
    by_rows = model.expert_ms(shape, KERNEL, fullest_device) + exchange
    balanced = rows.sum(-1) / layout.num_slots  # [B, L]
    fullest_slot = rows.max(-1)
    capacity = np.empty(fullest_slot.shape, np.int64)
    for index in np.ndindex(capacity.shape):
        ladder = slot_capacities(balanced[index], max(1.0, fullest_slot[index] / balanced[index]),
                                 SLOT_CAPACITY_RATIO)
        capacity[index] = pick_capacity(ladder, int(fullest_slot[index]))
    padded = model.padded_ms(shape, KERNEL, layout.slots_per_device * capacity) + exchange
    for index in list(np.ndindex(capacity.shape))[:3]:  # the shortcut equals the model's own methods
        want = model.layer_ms(shape, KERNEL, device_rows[index], bytes_per_row=bytes_per_row)
        static = model.layer_ms_static(shape, KERNEL, device_rows[index], bytes_per_row=bytes_per_row,
                                       slots=layout.slots_per_device, capacity=int(capacity[index]))
        assert np.isclose(by_rows[index], want) and np.isclose(padded[index], static), index
    return {"rows": by_rows, "padded": padded}


def copy_count_arrays(tables: dict[str, np.ndarray], layout) -> dict[str, dict[str, np.ndarray]]:
    """Per moving policy ``local``, ``received``, ``sent`` ``[B, L, D]`` copies from the table before."""
    from moeless_jax.sim.layer_ahead import copy_counts

    out = {}
    for name in MOVING:
        array, previous = tables[name], _previous(tables, name)
        fields = {f: np.zeros((*array.shape[:2], layout.num_devices), np.int64)
                  for f in ("local", "received", "sent")}
        for index in np.ndindex(array.shape[:2]):
            if np.array_equal(array[index], previous[index]):
                continue
            counts = copy_counts(previous[index], array[index], num_devices=layout.num_devices,
                                 slots_per_device=layout.slots_per_device)
            for f in fields:
                fields[f][index] = getattr(counts, f)
        out[name] = fields
    return out


def move_times(counts: dict[str, np.ndarray], expert_bytes: int, links: dict) -> np.ndarray:
    """``[B, L]`` ms to install each table (:func:`moeless_jax.sim.layer_ahead.copy_ms`)."""
    from moeless_jax.sim.layer_ahead import CopyCounts, copy_ms

    shape = counts["local"].shape[:2]
    out = np.zeros(shape)
    for index in np.ndindex(shape):
        c = CopyCounts(counts["local"][index], counts["received"][index], counts["sent"][index])
        out[index] = copy_ms(c, expert_bytes=expert_bytes, **links) if c.copies else 0.0
    return out


def predictor_ms(model, tokens_per_device: np.ndarray) -> tuple[np.ndarray, bool]:
    """RoutingOnly's measured forecast time per layer (H200) at each batch's tokens per device: linear
    interpolation between the measured batch sizes, linear extrapolation past the largest; (ms, whether
    any batch needed the extrapolation)."""
    points = sorted((int(k), float(v)) for k, v in model.calibration["predictor_ms_per_layer"].items())
    tokens, ms = np.array(points, np.float64).T
    out = np.interp(tokens_per_device, tokens, ms)
    beyond = tokens_per_device > tokens[-1]
    slope = (ms[-1] - ms[-2]) / (tokens[-1] - tokens[-2])
    out = np.where(beyond, ms[-1] + slope * (tokens_per_device - tokens[-1]), out)
    return out, bool(beyond.any())


# ------------------------------------------------------------------------------------------ metrics
def evaluate(stream: dict, model, args, layout) -> dict:
    """Per expert size and layer-time variant: the policies' step times and what the moves cost."""
    from moeless_jax.sim.layer_ahead import between_steps_ms, exposed_ahead_ms, layer_ahead_ms

    loads, tables = stream["loads"], stream["tables"]
    rows, counts = stream["rows"], stream["counts"]
    num_batches, num_layers, _ = loads.shape
    kept = slice(stream["warmup"], None)
    tokens_per_device = loads[:, 0].sum(-1) / stream["top_k"] / layout.num_devices
    predict_ms, extrapolated = predictor_ms(model, tokens_per_device)
    overhead = np.full((num_batches, num_layers), args.plan_ms)
    overhead[:, 1:] += predict_ms[:, None]  # layer 0's forecast is history: no predictor call
    links = {"local_tbps": model.calibration["copy_tbps_read_plus_write"],
             "link_gbps": model.calibration["all_to_all"]["bandwidth_gbps_per_direction"],
             "link_latency_us": model.calibration["all_to_all"]["latency_us"]}
    out: dict = {
        "batches": num_batches, "batches_in_means": int(num_batches - kept.start),
        "tokens_per_device_mean": float(tokens_per_device[kept].mean()),
        "rows_per_device_mean": float(stream["top_k"] * tokens_per_device[kept].mean()),
        "predictor_ms_per_layer_mean": float(predict_ms[kept].mean()),
        "predictor_ms_extrapolated": extrapolated,
        "copies_per_layer_step": {n: float(sum(c[f][kept].sum(-1) for f in ("local", "received")).mean())
                                  for n, c in counts.items()},
        "changed_tables_fraction": {n: float(_changed(tables, n)[kept].mean()) for n in MOVING},
    }
    for shape in SHAPES:
        expert_bytes = 3 * SHAPES[shape][0] * SHAPES[shape][1] * DTYPE_BYTES
        moves = {n: move_times(counts[n], expert_bytes, links) for n in MOVING}
        copied = {n: sum(counts[n][f].sum(-1) for f in ("local", "received")) for n in MOVING}
        times = {n: layer_times(model, shape, rows[n], layout) for n in POLICIES}
        by_timing = {}
        for timing in TIMINGS:
            layer = {n: times[n][timing] for n in POLICIES}
            step, exposed = {}, {}
            for n in POLICIES:
                if n in AHEAD:
                    step[n] = layer_ahead_ms(layer[n], moves[n], overhead)
                    exposed[n] = exposed_ahead_ms(layer[n], moves[n]).sum(-1)
                elif n in BETWEEN:
                    step[n] = between_steps_ms(layer[n], moves[n])
                    exposed[n] = moves[n].sum(-1)
                else:
                    step[n], exposed[n] = layer[n].sum(-1), np.zeros(num_batches)
            net = {n: float(step[n][kept].mean() / num_layers) for n in POLICIES}
            entry = {
                "moe_layer_ms_mean": {n: float(layer[n][kept].mean()) for n in POLICIES},
                "net_ms_per_layer": net,
                "exposed_move_ms_per_layer": {n: float(exposed[n][kept].mean() / num_layers)
                                              for n in POLICIES},
                "overhead_ms_per_layer": {n: float(overhead[kept].mean()) if n in AHEAD else 0.0
                                          for n in POLICIES},
                "move_ms_per_layer_if_exposed": {n: float(moves[n][kept].mean()) for n in MOVING},
                "bytes_moved_per_layer_step": {n: float(copied[n][kept].mean() * expert_bytes) if n in MOVING
                                               else 0.0 for n in POLICIES},
            }
            la = net["layer_ahead"]
            entry |= {"layer_ahead_vs_eplb_balanced": la / net["eplb"],
                      "layer_ahead_vs_eplb_fixed": la / net["eplb_fixed"],
                      "layer_ahead_vs_per_step": la / net["per_step"],
                      "layer_ahead_vs_static": la / net["static"],
                      "layer_ahead_vs_oracle": la / net["oracle"],
                      "layer_ahead_perfect_vs_eplb_balanced": net["layer_ahead_perfect"] / net["eplb"]}
            by_timing[timing] = entry
        out[shape] = {"expert_bytes": expert_bytes, **by_timing}
    return out


def _previous(tables: dict[str, np.ndarray], name: str) -> np.ndarray:
    """``[B, L, P]`` the table each batch of policy ``name`` replaced (the first batch: the static table)."""
    array = tables[name]
    return np.concatenate([tables["static"][:1], array[:-1]])


def _changed(tables: dict[str, np.ndarray], name: str) -> np.ndarray:
    return (tables[name] != _previous(tables, name)).any(-1)  # [B, L]


def threshold(points: list[tuple[float, float]]) -> dict:
    """Where layer-ahead pays against a baseline, from ``(tokens per device, baseline / layer-ahead)``
    points: ``tokens_per_device``, the smallest size where it pays (the first crossing of 1 from below,
    interpolated linearly in log tokens; the smallest point when it already pays there; None when it never
    pays), and ``stops_paying_at``, the first crossing back below 1 after that (None when it keeps paying)."""
    points = sorted(points)
    tokens = np.array([t for t, _ in points])
    gain = np.array([g for _, g in points]) - 1.0
    pays = gain > 0

    def crossing(i: int) -> float:  # between points i - 1 and i, where the gain changes sign
        x0, x1 = np.log(tokens[i - 1]), np.log(tokens[i])
        return float(np.exp(x0 + gain[i - 1] / (gain[i - 1] - gain[i]) * (x1 - x0)))

    if not pays.any():
        return {"tokens_per_device": None, "how": "never pays in the sweep", "stops_paying_at": None}
    first = int(np.argmax(pays))
    value = float(tokens[0]) if first == 0 else crossing(first)
    how = "pays already at the smallest size swept" if first == 0 else "interpolated in log tokens"
    later = np.flatnonzero(~pays[first:])
    stops = crossing(first + int(later[0])) if later.size else None
    return {"tokens_per_device": value, "how": how, "stops_paying_at": stops}


# -------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from moeless_jax.plan import SlotLayout
    from moeless_jax.provenance import write_json
    from moeless_jax.sim import LatencyModel
    from moeless_jax.traces import read_azure_arrivals, read_moe_beyond

    started = time.perf_counter()
    model = LatencyModel.from_file(args.calibration)
    trace = read_moe_beyond(args.data_dir / "moe-beyond")
    fit, test = trace.split_by_request(0.7, seed=0)
    arrivals = read_azure_arrivals(args.data_dir / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv")
    arrays = request_arrays(args, fit, test)
    layout = SlotLayout(trace.num_experts, args.devices, args.slots_per_device)
    rng = np.random.default_rng(args.seed)
    streams = {f"window_{w:g}s": window_counts(test, arrivals, w, args.max_windows, arrays["requests"])
               for w in args.windows}
    for n in args.tokens_per_device:
        streams[f"budget_{n}"] = budget_counts(arrays["tokens"], n * args.devices, args.budget_batches, rng)
    loads_by_request = arrays["loads"].reshape(arrays["loads"].shape[0], -1)
    results = {}
    for name, counts in tqdm(streams.items(), desc="batch sizes"):
        loads = (counts @ loads_by_request).reshape(len(counts), *arrays["loads"].shape[1:])
        raw = np.einsum("br,rle->ble", counts.astype(np.float64), arrays["forecast"])
        forecast = batch_forecasts(loads, raw, float(arrays["online_alpha"]))
        warmup = min(args.warmup, len(counts) - 1)
        tables = plan_tables(loads, forecast, layout, args.max_moves_per_device, warmup)
        stream = {"loads": loads, "tables": tables, "rows": slot_rows(tables, loads, layout),
                  "counts": copy_count_arrays(tables, layout), "top_k": trace.top_k,
                  "warmup": warmup}
        results[name] = evaluate(stream, model, args, layout)
    summary = summarise(results, args, layout, model, time.perf_counter() - started)
    summary = {**headline(summary, args.out_dir), **summary}
    note = ("simulated with the latency model calibrated on an H200: expert compute measured (fits), "
            "RoutingOnly forecast time measured, local copy rate measured; all-to-all and link copies "
            "modelled (NVLink constants); on-device plan time assumed; tables, splits and forecasts "
            "computed on the host from the real traces")
    path = write_json(args.out_dir / "summary.json", summary, method="simulated",
                      device="NVIDIA H200 (latency model)", note=note)
    plot(args.out_dir / "summary.png", summary)
    print(f"wrote {path} and {args.out_dir / 'summary.png'} in {time.perf_counter() - started:.0f} s")
    print_table(summary)
    return 0


HEADLINE_STREAM, HEADLINE_SHAPE, HEADLINE_TIMING = "window_16s", "dsv2lite", "padded"


def headline(summary: dict, out_dir: Path) -> dict:
    """The figures the layer-ahead results lead with: simulated ratios at the default settings (16-s windows,
    DeepSeek-V2-Lite experts, the capacity kernel's time as it runs today; ``rows``: a kernel whose time
    follows rows) and, from the measured parts beside this file when they exist, the planner's quality
    (``plan_quality.json``) and in-step device time on the H200 (``timing_gpu.json``); None until measured."""
    entry = summary[HEADLINE_STREAM][HEADLINE_SHAPE]
    out = {"headline_setting": f"{HEADLINE_STREAM}, {HEADLINE_SHAPE} experts, {HEADLINE_TIMING} layer time, "
                               f"copy budget {summary['setup']['max_moves_per_device']} per device",
           "bytes_moved_per_layer_step": entry[HEADLINE_TIMING]["bytes_moved_per_layer_step"]["layer_ahead"]}
    for timing in ("padded", "rows"):
        suffix = "" if timing == HEADLINE_TIMING else f"_{timing}"
        for base in ("eplb_balanced", "eplb_fixed", "per_step", "static", "oracle"):
            out[f"layer_ahead_vs_{base}{suffix}"] = entry[timing][f"layer_ahead_vs_{base}"]
    out["method_ratios"] = "simulated"
    quality, timing = _read_json(out_dir / "plan_quality.json"), _read_json(out_dir / "timing_gpu.json")
    layout = f"{summary['setup']['devices']}x{summary['setup']['slots_per_device']}"
    out["plan_quality_vs_host"] = None if quality is None else quality["plan_quality_vs_host"].get(layout)
    out["plan_quality_source"] = None if quality is None else quality.get("provenance")
    gpu = timing is not None and "H200" in str(timing.get("provenance", {}).get("device", ""))
    out["on_device_plan_us_per_layer_h200"] = timing["on_device_plan_us_per_layer"] if gpu else None
    out["forecast_plan_overhead_pct_8192"] = timing.get("forecast_plan_overhead_pct_8192") if gpu else None
    return out


def _read_json(path: Path) -> dict | None:
    import json

    return json.loads(path.read_text()) if path.is_file() else None


def summarise(results: dict, args, layout, model, seconds: float) -> dict:
    calib = model.calibration
    import moeless_jax.plan.on_device as on_device

    planner_sha = hashlib.sha256(Path(on_device.__file__).read_bytes()).hexdigest()[:12]
    summary: dict = {
        "method": "simulated",
        "setup": {
            "trace": "MoE-Beyond DeepSeek-V2-Lite-Chat routing (64 experts, top-6, 26 MoE layers), 30% "
                     "held-out prompts (split seed 0); RoutingOnly (distance 1) fitted on the other 70%",
            "batches": {
                **{f"window_{w:g}s": f"Azure conversation arrivals in {w:g}-s windows, the first "
                                     f"{results[f'window_{w:g}s']['batches']}" for w in args.windows},
                **{f"budget_{n}": f"random held-out requests packed whole into {n * args.devices}-token "
                                  f"batches ({n} tokens per device), {args.budget_batches} batches"
                   for n in args.tokens_per_device},
            },
            "tokens_per_device": "batch tokens / devices (each device forecasts and routes its share)",
            "warmup_batches_left_out": args.warmup,
            "devices": args.devices, "slots_per_device": args.slots_per_device,
            "split": "balanced (every policy)",
            "max_moves_per_device": args.max_moves_per_device,
            "on_device_planner_sha256": planner_sha,
            "expert_shapes": {s: {"d_model": d, "d_ff": f, "dtype": "bfloat16",
                                  "expert_bytes": 3 * d * f * DTYPE_BYTES} for s, (d, f) in SHAPES.items()},
            "calibration": str(args.calibration),
            "quick": args.quick,
            "runtime_s": round(seconds, 1),
        },
        "terms": {
            "expert_compute_rows": f"measured: H200 '{KERNEL}' kernel fit, fixed_ms + ms_per_row x the "
                                   "fullest device's rows (what a kernel whose time follows rows would take)",
            "expert_compute_padded": f"measured: H200 '{KERNEL}' kernel padded fit, for slots x the "
                                     "capacity its fullest slot picks (the kernel as it runs today)",
            "mixtral_fit_caveat": "the 'mixtral' fit was measured with 2 slots per device; here a device "
                                  f"holds {args.slots_per_device}, so its fixed (weight-reading) part is "
                                  "underestimated and small-batch layer times are low",
            "dispatch_combine": "modelled: 2 all-to-alls of the fullest device's rows, "
                                f"{calib['all_to_all']['latency_us']} us + bytes / "
                                f"{calib['all_to_all']['bandwidth_gbps_per_direction']} GB/s (not measured)",
            "remote_copy": "modelled: the same link constants, per device max(received, sent) experts, "
                           "latency once per device",
            "local_copy": f"measured: {calib['copy_tbps_read_plus_write']:.2f} TB/s read+write device copy "
                          "(whole buffer; a single Mixtral expert copy measured 1.23 TB/s)",
            "predictor": "measured: RoutingOnly forecast ms per layer on an H200 by tokens per device, "
                         "interpolated; extrapolated linearly past 16384 tokens",
            "on_device_plan": f"assumed (target), not measured: {args.plan_ms} ms per layer",
            "forecast_all_reduce": "not charged (the [E] forecast sum across devices)",
            "overlap": "a layer-ahead copy hides under the previous MoE layer's modelled time only (not "
                       "attention) and is assumed not to slow it",
            "tables_splits_forecasts": "computed on the host from the real traces",
        },
        "policies": list(POLICIES),
        "ratios": "layer_ahead_vs_Y = layer_ahead's net ms / Y's net ms (< 1: layer-ahead is faster); net = "
                  "MoE layers + exposed copies + forecast/plan overhead, per layer",
    }
    summary |= results
    budgets = [f"budget_{n}" for n in args.tokens_per_device]
    summary["min_tokens_per_device_to_pay"] = {
        shape: {timing: {label: threshold([(results[b]["tokens_per_device_mean"],
                                             _ratio(results[b], shape, timing, base)) for b in budgets])
                         for label, base in THRESHOLD_BASELINES.items()}
                for timing in TIMINGS}
        for shape in SHAPES}
    return summary


def _ratio(result: dict, shape: str, timing: str, base: str) -> float:
    """Layer-ahead's speed-up over ``base`` (> 1: it pays), what :func:`threshold` reads."""
    net = result[shape][timing]["net_ms_per_layer"]
    return net[base] / net["layer_ahead"]


def print_table(summary: dict) -> None:
    streams = [k for k in summary if k.startswith(("window_", "budget_"))]
    for shape in SHAPES:
        for timing in TIMINGS:
            print(f"\n{shape} / {timing}: net ms per layer; layer-ahead's ms over eplb's, eplb_fixed's, "
                  "per_step's")
            for s in streams:
                e = summary[s][shape][timing]
                cells = " ".join(f"{p}={e['net_ms_per_layer'][p]:.3f}" for p in POLICIES)
                print(f"  {s:>13} ({summary[s]['tokens_per_device_mean']:8.0f} tok/dev): {cells} | "
                      f"{e['layer_ahead_vs_eplb_balanced']:.3f} {e['layer_ahead_vs_eplb_fixed']:.3f} "
                      f"{e['layer_ahead_vs_per_step']:.3f}")
            for label, found in summary["min_tokens_per_device_to_pay"][shape][timing].items():
                print(f"  min tokens/device to pay {label}: {found}")


def plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted((k for k in summary if k.startswith("budget_")),
                     key=lambda k: summary[k]["tokens_per_device_mean"])
    windows = [k for k in summary if k.startswith("window_")]
    fig, axes = plt.subplots(len(SHAPES), len(TIMINGS), figsize=(13, 9), squeeze=False)
    palette = ("tab:gray", "tab:blue", "tab:cyan", "tab:orange", "tab:red", "tab:pink", "tab:purple", "k")
    colors = dict(zip(POLICIES, palette, strict=True))
    for row, shape in enumerate(SHAPES):
        for col, timing in enumerate(TIMINGS):
            ax = axes[row, col]
            x = [summary[b]["tokens_per_device_mean"] for b in budgets]
            wx = [summary[w]["tokens_per_device_mean"] for w in windows]
            for policy in POLICIES:
                nets = {k: summary[k][shape][timing]["net_ms_per_layer"] for k in budgets + windows}
                speed = {k: net["static"] / net[policy] for k, net in nets.items()}
                ax.plot(x, [speed[k] for k in budgets], "o-", color=colors[policy], label=policy, ms=4)
                ax.plot(wx, [speed[k] for k in windows], "s", color=colors[policy], mfc="none", ms=7)
            ax.axhline(1.0, color="k", lw=0.5)
            for label, style in (("vs_eplb_balanced", ":"), ("vs_static", "--")):
                found = summary["min_tokens_per_device_to_pay"][shape][timing][label]["tokens_per_device"]
                if found is not None:
                    ax.axvline(found, color="tab:red", ls=style, lw=1)
            ax.set_xscale("log")
            ax.set_xlabel("tokens per device (lines: token budgets; squares: Azure windows)")
            ax.set_ylabel("speed-up over static EP, net of moves")
            ax.set_title(f"{shape} expert, {timing} layer time (red: layer-ahead pays vs EPLB ':' / "
                         "static '--')", fontsize=9)
            if row == col == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Layer-ahead replication, simulated (H200 latency model), 8 devices x 10 slots, "
                 "DeepSeek-V2-Lite routing", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
