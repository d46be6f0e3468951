"""The layer's split option in every policy's outcome: ``even`` and ``balanced`` device loads, and the
fixed-replication baseline."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeless_jax import cli as top_cli
from moeless_jax.errors import InputError
from moeless_jax.moe.config import SPLITS as LAYER_SPLITS
from moeless_jax.plan import (
    SPLITS,
    MoElessConfig,
    ReplicateConfig,
    SlotLayout,
    make_policy,
    slot_loads,
    tokens_per_device,
)

LAYOUT = SlotLayout(num_experts=16, num_devices=4, slots_per_device=6)  # 24 slots: up to 8 extra replicas
LAYERS = 3


def skewed_loads(seed: int, layers: int = LAYERS, experts: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(3000, rng.dirichlet(np.full(experts, 0.3)), size=layers)


def test_planner_and_layer_agree_on_the_splits():
    assert SPLITS == LAYER_SPLITS


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), policy=st.sampled_from(["moeless", "eplb", "replicate"]))
def test_balanced_split_conserves_tokens_and_never_loses_to_even(seed, policy):
    loads = skewed_loads(seed)
    outcomes = {}
    for split in SPLITS:
        p = make_policy(policy, LAYOUT, LAYERS, moeless=MoElessConfig(cv_target=0.0), split=split)
        if policy == "eplb":
            p.observe(skewed_loads(seed + 1))  # history to plan from
        p.plan(loads)
        outcomes[split] = p.observe(loads).tokens_per_device
    for split, tokens in outcomes.items():
        assert tokens.dtype.kind == "i", split
        np.testing.assert_array_equal(tokens.sum(-1), loads.sum(-1))
    assert (outcomes["balanced"].max(-1) <= outcomes["even"].max(-1)).all()


def test_balanced_split_helps_a_replicated_hot_expert():
    # Expert 0 is hot and has a replica on every device; the even split leaves the other experts' devices
    # over-full, the balanced split lets expert 0's tokens fill in around them.
    layout = SlotLayout(num_experts=4, num_devices=2, slots_per_device=3)
    table = np.array([[0, 1, 2, 0, 3, -1]])  # device 0: experts 0, 1, 2; device 1: experts 0, 3
    loads = np.array([[100, 40, 40, 0]])
    even = tokens_per_device(table, loads, layout.num_devices, "even")
    balanced = tokens_per_device(table, loads, layout.num_devices, "balanced")
    np.testing.assert_array_equal(even, [[130, 50]])
    np.testing.assert_array_equal(balanced, [[90, 90]])


def test_single_replica_policies_are_unchanged_by_the_split():
    loads = skewed_loads(3)
    for policy in ("static", "tokendrop"):
        tokens = {split: make_policy(policy, LAYOUT, LAYERS, split=split).observe(loads) for split in SPLITS}
        np.testing.assert_array_equal(tokens["even"].tokens_per_device, tokens["balanced"].tokens_per_device)


def test_replicate_places_every_expert_k_times_once():
    policy = make_policy("replicate", LAYOUT, LAYERS)
    assert policy.replicas == 1  # 24 slots // 16 experts
    layout = SlotLayout(num_experts=8, num_devices=4, slots_per_device=5)
    policy = make_policy("replicate", layout, 2)
    assert policy.replicas == 2
    table = policy.slot_to_expert
    for row in table:
        np.testing.assert_array_equal(np.bincount(row[row >= 0], minlength=8), np.full(8, 2))
        devices = [set(np.flatnonzero(row == e) // 5) for e in range(8)]
        assert all(len(d) == 2 for d in devices)  # one replica of an expert per device
        assert np.ptp((row >= 0).reshape(4, 5).sum(-1)) <= 1  # devices hold as many replicas as each other
    decision = policy.plan(skewed_loads(0, 2, 8))
    assert not decision.changed.any()
    policy = make_policy("replicate", layout, 1, replicate=ReplicateConfig(replicas=1))
    assert (np.bincount(policy.slot_to_expert[0][policy.slot_to_expert[0] >= 0]) == 1).all()


def test_bad_split_and_replica_settings_are_named():
    with pytest.raises(InputError, match="split: 'uneven'"):
        make_policy("moeless", LAYOUT, LAYERS, split="uneven")
    with pytest.raises(InputError, match="replicas 3"):
        make_policy("replicate", LAYOUT, LAYERS, replicate=ReplicateConfig(replicas=3))
    with pytest.raises(ValueError, match="replicas"):
        ReplicateConfig(replicas=0)
    with pytest.raises(InputError, match="integers"):
        tokens_per_device(np.array([[0, 1]]), np.array([[1.5, 2.0]]), 2, "balanced")


def test_cli_split_flag(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(top_cli, "COMMAND_MODULES", ("moeless_jax.plan.cli",))
    path = tmp_path / "loads.npy"
    np.save(path, skewed_loads(1))
    results = {}
    for split in SPLITS:
        args = ["plan", "--loads", str(path), "--devices", "4", "--slots-per-device", "6",
                "--policy", "moeless", "--cv", "0", "--split", split, "--json"]
        assert top_cli.main(args) == 0
        results[split] = json.loads(capsys.readouterr().out)
        assert results[split]["split"] == split
    pairs = zip(results["balanced"]["balancedness"], results["even"]["balancedness"], strict=True)
    assert all(b >= e for b, e in pairs)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_layer_even_quotas_match_the_planner_even_split(seed):
    from moeless_jax.moe.split import host_slot_tokens

    loads = skewed_loads(seed)
    policy = make_policy("moeless", LAYOUT, LAYERS, moeless=MoElessConfig(cv_target=0.0))
    tables = policy.plan(loads).slot_to_expert
    per_slot = host_slot_tokens(tables, loads, num_devices=LAYOUT.num_devices, split="even")
    np.testing.assert_array_equal(per_slot, slot_loads(tables, loads))
    balanced = host_slot_tokens(tables, loads, num_devices=LAYOUT.num_devices, split="balanced")
    np.testing.assert_array_equal(balanced.sum(-1), loads.sum(-1))
    assert (balanced[tables < 0] == 0).all()


@settings(max_examples=40, deadline=None)
@given(base=st.lists(st.floats(0, 100), min_size=1, max_size=8), amount=st.floats(0, 500))
def test_water_fill_levels_pour_exactly_and_level_the_lowest(base, amount):
    from moeless_jax.plan.split_placement import water_fill_levels

    base = np.array(base)
    add = water_fill_levels(base, amount)
    assert (add >= -1e-9).all() and add.sum() == pytest.approx(amount, abs=1e-6)
    filled = base + add
    raised = add > 1e-9
    if raised.any():  # every raised entry ends at one level, and nothing left below it was skipped
        level = filled[raised].max()
        np.testing.assert_allclose(filled[raised], level, rtol=1e-9, atol=1e-6)
        assert (base[~raised] >= level - 1e-6).all()


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_divisible_placement_is_a_valid_table_or_none(data):
    from moeless_jax.plan.split_placement import place_divisible

    devices, slots = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    experts = data.draw(st.integers(1, devices * slots))
    count = np.ones(experts, np.int64)
    for _ in range(data.draw(st.integers(0, devices * slots - experts))):
        e = data.draw(st.integers(0, experts - 1))
        count[e] = min(devices, count[e] + 1)
    loads = np.array(data.draw(st.lists(st.sampled_from([0.0, 1.0, 5.0, 40.0]), min_size=experts,
                                        max_size=experts)))
    table = place_divisible(count, loads, devices, slots)
    if table is None:
        return
    np.testing.assert_array_equal(np.bincount(table[table >= 0], minlength=experts), count)
    per_device = table.reshape(devices, slots)
    for row in per_device:  # anti-affinity
        filled = row[row >= 0]
        assert np.unique(filled).size == filled.size
