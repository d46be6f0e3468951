"""The on-device planner: servable tables, jit + vmap, warm reuse, the move budget, and the same quality bar
as the host planner."""

from functools import cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeless_jax.errors import InputError
from moeless_jax.moe import ReplicaTable
from moeless_jax.plan import MoElessConfig, SlotLayout, make_policy, scale_min_max, tokens_per_device
from moeless_jax.plan.on_device import (
    moves_per_device,
    place_rounds,
    plan_on_device,
    scale_counts,
    table_arrays_from_slots,
    table_device_loads,
)

# Few layouts, so that few programs compile: (E, D, S).
LAYOUTS = ((5, 3, 4), (12, 4, 5))  # (8, 8, 2) and larger ones: the quality test
BUDGET_LAYOUT = (12, 4, 5)
LAYERS = 3
# A multiple of 1..8: replica shares of these loads are exact integers in float32 and float64 alike, so the
# numpy references break ties exactly as the device does.
EXACT = 840


@cache
def planner(num_devices, slots, max_moves=None, batched=True):
    plan = partial(
        plan_on_device, num_devices=num_devices, slots_per_device=slots, max_moves_per_device=max_moves
    )
    return jax.jit(jax.vmap(plan) if batched else plan)


@cache
def scaler_and_rounds(num_devices, slots):
    def run(load):
        count = scale_counts(load, num_devices=num_devices, slots_per_device=slots)
        return count, place_rounds(load / count, count, num_devices=num_devices, slots_per_device=slots)

    return jax.jit(run)


def layout_of(experts, devices, slots):
    return {"num_experts": experts, "num_devices": devices, "slots_per_device": slots}


def random_previous(rng, experts, devices, slots):
    extra = int(rng.integers(0, devices * slots - experts + 1))
    return ReplicaTable.random(rng, extra_replicas=extra, **layout_of(experts, devices, slots)).slot_to_expert


def peak(table, loads, devices):
    return tokens_per_device(np.asarray(table), np.asarray(loads, np.float64), devices).max(-1)


def check_servable(arrays, experts, devices, slots):
    """The returned arrays form a valid table and agree with the host's derivation."""
    s2e = np.asarray(arrays.slot_to_expert)
    assert s2e.dtype == np.int32 and arrays.expert_slots.dtype == jnp.int32
    table = ReplicaTable.from_slot_to_expert(s2e, **layout_of(experts, devices, slots))  # raises unless valid
    np.testing.assert_array_equal(np.asarray(arrays.expert_slots), table.expert_slots)
    np.testing.assert_array_equal(np.asarray(arrays.replica_count), table.replica_count)


@st.composite
def layer_problems(draw, layouts=LAYOUTS):
    """(E, D, S, forecast [L, E], previous [L, P]) with zeros, ties and random valid previous tables."""
    experts, devices, slots = draw(st.sampled_from(layouts))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = st.sampled_from([0, 0, 1, 3, 3, 10, 50, 400])
    layer = st.lists(values, min_size=experts, max_size=experts)
    loads = np.array(draw(st.lists(layer, min_size=LAYERS, max_size=LAYERS)), np.float32)
    if draw(st.booleans()):
        loads[0] = 0.0  # an idle layer
    previous = np.stack([random_previous(rng, experts, devices, slots) for _ in range(LAYERS)])
    return experts, devices, slots, loads, previous.astype(np.int32)


# ------------------------------------------------------------------------------------------ validity
@given(layer_problems())
def test_plans_are_servable_idempotent_and_keep_an_equal_previous(problem):
    experts, devices, slots, loads, previous = problem
    plan = planner(devices, slots)
    out = plan(loads, previous)
    for layer in range(LAYERS):
        check_servable(jax.tree.map(lambda a, i=layer: a[i], out), experts, devices, slots)
    assert out.expert_slots.shape == (LAYERS, experts, devices)
    again = plan(loads, out.slot_to_expert)
    np.testing.assert_array_equal(np.asarray(again.slot_to_expert), np.asarray(out.slot_to_expert))
    # An idle layer has nothing to balance: its table stays.
    idle = ~loads.any(-1)
    np.testing.assert_array_equal(np.asarray(out.slot_to_expert)[idle], previous[idle])


def test_vmap_over_layers_matches_planning_each_layer():
    experts, devices, slots = BUDGET_LAYOUT
    rng = np.random.default_rng(1)
    loads = rng.gamma(0.4, 100.0, size=(LAYERS, experts)).astype(np.float32)
    previous = np.stack([random_previous(rng, experts, devices, slots) for _ in range(LAYERS)])
    batched = planner(devices, slots)(loads, previous)
    single = planner(devices, slots, batched=False)
    for layer in range(LAYERS):
        one = single(loads[layer], previous[layer])
        for got, want in zip(batched, one, strict=True):
            np.testing.assert_array_equal(np.asarray(got[layer]), np.asarray(want))


def test_previous_as_good_as_the_plan_is_kept_and_a_relabelled_plan_moves_nothing():
    experts, devices, slots = BUDGET_LAYOUT
    rng = np.random.default_rng(2)
    loads = rng.gamma(0.4, 100.0, size=(LAYERS, experts)).astype(np.float32)
    static = ReplicaTable.static(**layout_of(experts, devices, slots)).slot_to_expert
    plan = planner(devices, slots)
    first = np.asarray(plan(loads, np.tile(static, (LAYERS, 1))).slot_to_expert)
    # Devices are interchangeable: the same plan with devices (and slots inside them) permuted is as good.
    permuted = first.reshape(LAYERS, devices, slots)[:, rng.permutation(devices)][:, :, ::-1]
    permuted = permuted.reshape(LAYERS, -1)
    kept = np.asarray(plan(loads, permuted).slot_to_expert)
    np.testing.assert_array_equal(kept, permuted)
    assert not np.asarray(moves_per_device(permuted, kept, devices)).any()


def test_all_zero_forecast_keeps_previous():
    experts, devices, slots = BUDGET_LAYOUT
    previous = random_previous(np.random.default_rng(3), experts, devices, slots)
    out = planner(devices, slots, batched=False)(np.zeros(experts, np.float32), previous)
    np.testing.assert_array_equal(np.asarray(out.slot_to_expert), previous)


# ------------------------------------------------------------------------------------------ budget
@given(layer_problems(layouts=(BUDGET_LAYOUT,)), st.sampled_from([0, 1]))
def test_budget_is_respected_and_never_worse_than_previous(problem, max_moves):
    experts, devices, slots, loads, previous = problem
    out = planner(devices, slots, max_moves)(loads, previous)
    table = np.asarray(out.slot_to_expert)
    for layer in range(LAYERS):
        check_servable(jax.tree.map(lambda a, i=layer: a[i], out), experts, devices, slots)
    assert np.asarray(moves_per_device(previous, table, devices)).max() <= max_moves
    assert np.all(peak(table, loads, devices) <= peak(previous, loads, devices) * (1 + 1e-6))
    if max_moves == 0:
        np.testing.assert_array_equal(table, previous)
    unlimited = np.asarray(planner(devices, slots)(loads, previous).slot_to_expert)
    fits = np.asarray(moves_per_device(previous, unlimited, devices)).max(-1) <= max_moves
    np.testing.assert_array_equal(table[fits], unlimited[fits])  # a plan within budget is taken whole


def test_budget_improves_a_bad_previous_table():
    experts, devices, slots = BUDGET_LAYOUT
    loads = np.zeros((LAYERS, experts), np.float32)
    loads[:, :devices] = 100.0  # every hot expert on device 0 in the previous table below
    loads[:, devices:] = 1.0
    previous = np.full(devices * slots, -1, np.int32)
    previous[:experts] = np.arange(experts)  # expert e in slot e: the hot ones all on device 0
    previous = np.tile(previous, (LAYERS, 1))
    out = np.asarray(planner(devices, slots, 1)(loads, previous).slot_to_expert)
    assert np.all(peak(out, loads, devices) < 0.8 * peak(previous, loads, devices))


# ------------------------------------------------------------------------------------------ references
def greedy_counts(loads, num_devices, num_slots):
    """Reference scaler: one replica each, then one at a time to the highest positive load per replica
    (ties: lower expert), at most D per expert, P - E in all."""
    count = np.ones(loads.size, np.int64)
    for _ in range(num_slots - loads.size):
        key = np.where((count < num_devices) & (loads > 0), loads / count, -1.0)
        if key.max() <= 0:
            break
        count[int(np.argmax(key))] += 1
    return count


def rounds_reference(share, count, num_devices, slots):
    """Reference placement: replicas heaviest first in rounds of D; each round's replicas in order go to
    the devices in ascending load (ties: lower device), those of an expert already on a device skipping it."""
    order = np.lexsort((np.arange(share.size), -share))
    replicas = np.repeat(order, count[order])
    replicas = np.concatenate([replicas, np.full(num_devices * slots - replicas.size, -1)])
    load = np.zeros(num_devices)
    content = np.full((num_devices, slots), -1)
    for r in range(slots):
        free = list(np.lexsort((np.arange(num_devices), load)))
        for e in replicas[r * num_devices : (r + 1) * num_devices]:
            device = next(d for d in free if e < 0 or e not in content[d, :r])
            free.remove(device)
            content[device, r] = e
            load[device] += share[e] if e >= 0 else 0.0
    return content


@given(layer_problems())
def test_scaler_and_rounds_match_numpy_references(problem):
    experts, devices, slots, loads, _ = problem
    for load in loads * EXACT:
        count, content = scaler_and_rounds(devices, slots)(jnp.asarray(load))
        count = np.asarray(count)
        np.testing.assert_array_equal(count, greedy_counts(load.astype(np.float64), devices, devices * slots))
        if load.min() > 0 and devices > 1:  # with every load positive it is the host's min-max scaler
            host = scale_min_max(load, extra_replicas=devices * slots - experts, max_per_expert=devices)
            np.testing.assert_array_equal(count, host)
        want = rounds_reference(load / count, count, devices, slots)
        np.testing.assert_array_equal(np.asarray(content), want)


@given(layer_problems())
def test_helpers_match_host_code(problem):
    experts, devices, slots, loads, previous = problem
    for row, other, load in zip(previous, previous[::-1], loads, strict=True):
        arrays = table_arrays_from_slots(jnp.asarray(row), experts, devices)
        check_servable(arrays, experts, devices, slots)
        want = ((other != row) & (other >= 0)).reshape(devices, slots).sum(-1)
        np.testing.assert_array_equal(np.asarray(moves_per_device(row, other, devices)), want)
        np.testing.assert_allclose(
            np.asarray(table_device_loads(row, load, devices)),
            tokens_per_device(row, load.astype(np.float64), devices),
            rtol=1e-5,
            atol=1e-3,
        )


# ------------------------------------------------------------------------------------------ quality
def skewed_loads(rng, experts, top_k, tokens, batches):
    """``[batches, E]`` token counts around a fixed skewed popularity (drawn as the planner benchmark
    draws them)."""
    popularity = rng.dirichlet(np.full(experts, 0.5))
    batch_popularity = rng.dirichlet(popularity * experts * 2.0, size=batches)
    return np.stack([rng.multinomial(tokens * top_k, p) for p in batch_popularity])


# Both planners start from the static table and carry their own. Measured with these 12 forecasts (mean over
# forecasts of max device load / the better planner's; per-forecast worst in brackets):
#   (E, D, S)      host MoEless        on-device
#   (8, 8, 2)      1.0007 (1.0080)     1.0004 (1.0031)
#   (64, 8, 10)    1.0062 (1.0126)     1.0003 (1.0033)
#   (64, 8, 9)     1.0032 (1.0076)     1.0003 (1.0022)
#   (256, 64, 5)   1.0052 (1.0140)     1.0004 (1.0037)
# so the shared 1 % bar on the mean needs no extra tolerance for either; per forecast the host trails by up
# to 1.4 %.
@pytest.mark.parametrize(("experts", "devices", "slots", "top_k"), [
    (8, 8, 2, 2), (64, 8, 10, 6), (64, 8, 9, 6), (256, 64, 5, 8)
])
def test_on_device_and_host_planners_meet_the_same_quality_bar(experts, devices, slots, top_k):
    loads = skewed_loads(np.random.default_rng(0), experts, top_k, 4096, 12)
    host_ratio, device_ratio = quality_ratios(loads, experts, devices, slots)
    assert host_ratio <= 1.01 and device_ratio <= 1.01


RECORDED = Path(__file__).resolve().parent / "data" / "recorded_loads.npz"  # scripts/make_test_loads.py


# Loads our shipped models routed on held-out prompts (12 prefill batches, layers 1-3, tables carried per
# layer), host planner filling every slot as the on-device one does (cv_target 0). Measured, layers 1/2/3:
# mixtral_tiny host 1.0000 / 1.0003 / 1.0008, on-device 1.0009 / 1.0006 / 1.0000; deepseek_tiny host
# 1.0035 / 1.0045 / 1.0024, on-device 1.0009 / 1.0013 / 1.0014.
@pytest.mark.parametrize(("model", "devices", "slots"), [("mixtral_tiny", 8, 2), ("deepseek_tiny", 8, 10)])
def test_both_planners_meet_the_bar_on_recorded_loads(model, devices, slots):
    loads = np.load(RECORDED)[model]  # [batches, L, E]
    for layer in range(1, loads.shape[1]):
        host_ratio, device_ratio = quality_ratios(loads[:, layer], loads.shape[2], devices, slots,
                                                  MoElessConfig(cv_target=0.0))
        assert host_ratio <= 1.01 and device_ratio <= 1.01, (layer, host_ratio, device_ratio)


def test_the_papers_cv_stop_leaves_mixtral_slots_empty_on_recorded_loads():
    """The host planner's default stop (CV of replica loads <= 0.2, the paper's) adds no replica once the CV
    is low enough, so on 8 experts x 2 slots per device it leaves slots empty and the peak 17-19 % higher
    (layers 2 and 3) than planners that fill the slots; a cost knob, not a bug (fewer replicas held)."""
    loads = np.load(RECORDED)["mixtral_tiny"]
    host_ratio, _ = quality_ratios(loads[:, 3], 8, 8, 2)
    assert host_ratio > 1.1


def quality_ratios(loads, experts, devices, slots, config=None) -> tuple[float, float]:
    """Mean over ``loads [B, E]`` of each planner's max device load / the better planner's, both starting from
    the static table and carrying their own (host: MoEless with ``config``, default the paper's)."""
    layout = SlotLayout(experts, devices, slots)
    host = make_policy("moeless", layout, 1, moeless=config or MoElessConfig())
    plan = planner(devices, slots)  # one layer at a time, batched as in the tests above
    previous = host.static.astype(np.int32)[None]
    host_peak, device_peak = [], []
    for load in loads:
        host_table = host.plan(load[None]).slot_to_expert[0]
        table = np.asarray(plan(load[None].astype(np.float32), previous).slot_to_expert)[0]
        ReplicaTable.from_slot_to_expert(table, **layout_of(experts, devices, slots))
        host_peak.append(peak(host_table, load, devices))
        device_peak.append(peak(table, load, devices))
        previous = table[None]
    best = np.minimum(host_peak, device_peak)
    return float(np.mean(np.array(host_peak) / best)), float(np.mean(np.array(device_peak) / best))


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("forecast", "previous", "kwargs", "problem"),
    [
        (np.ones((2, 4)), np.zeros(8, np.int32), {}, "forecast must be one layer"),
        (np.ones(4), np.zeros(6, np.int32), {}, "previous must be a \\[8\\]"),
        (np.ones(9), np.zeros(8, np.int32), {}, "raise slots_per_device"),
        (np.ones(4), np.zeros(8, np.int32), {"max_moves_per_device": -1}, "max_moves_per_device"),
        (np.ones(4), np.zeros(8, np.int32), {"warm_slack": -0.1}, "warm_slack"),
    ],
)
def test_bad_input_names_the_field(forecast, previous, kwargs, problem):
    with pytest.raises(InputError, match=problem):
        plan_on_device(forecast, previous, num_devices=2, slots_per_device=4, **kwargs)
