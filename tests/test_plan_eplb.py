"""The numpy port of DeepSeek's EPLB: the README's golden example, its invariants, and its errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeless_jax.errors import InputError
from moeless_jax.plan import balanced_packing, rebalance_experts, replicate_experts

GOLDEN_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
GOLDEN_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def test_readme_golden_example():
    phy2log, log2phy, logcnt = rebalance_experts(np.array(GOLDEN_WEIGHT), 16, 4, 2, 8)
    assert phy2log.tolist() == GOLDEN_PHY2LOG
    assert logcnt.sum(-1).tolist() == [16, 16]
    for layer in range(2):  # log2phy inverts phy2log
        for expert in range(12):
            slots = log2phy[layer, expert][log2phy[layer, expert] >= 0]
            assert len(slots) == logcnt[layer, expert]
            assert all(phy2log[layer, p] == expert for p in slots)


def test_global_policy_when_groups_do_not_split_over_nodes():
    weight = np.array(GOLDEN_WEIGHT)
    phy2log, _, logcnt = rebalance_experts(weight, 16, 3, 2, 8)  # 3 groups, 2 nodes -> global
    expected, _, _ = rebalance_experts(weight, 16, 1, 1, 8)
    np.testing.assert_array_equal(phy2log, expected)
    # Global replication gives the 4 extra replicas to the highest loads per replica: 183, 165, 132, 104.
    assert logcnt[0].tolist() == [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]


@given(
    weight=st.lists(st.integers(0, 50), min_size=8, max_size=8),
    packs=st.sampled_from([1, 2, 4, 8]),
)
def test_balanced_packing_fills_every_pack_exactly(weight, packs):
    pack_index, rank = balanced_packing(np.array([weight], float), packs)
    counts = np.bincount(pack_index[0], minlength=packs)
    assert counts.tolist() == [8 // packs] * packs
    for pack in range(packs):  # ranks inside a pack are 0..n-1
        assert sorted(rank[0][pack_index[0] == pack].tolist()) == list(range(8 // packs))


def test_balanced_packing_ties_keep_item_order_and_lowest_pack():
    pack_index, rank = balanced_packing(np.zeros((1, 4)), 2)
    # Equal weights: items in order, each to the lowest-indexed lightest pack with room; zero weights keep
    # pack 0 lightest until it is full.
    assert pack_index.tolist() == [[0, 0, 1, 1]]
    assert rank.tolist() == [[0, 1, 0, 1]]


@given(st.lists(st.integers(0, 100), min_size=1, max_size=10), st.integers(0, 12))
def test_replicate_minimises_max_load_per_replica(weights, extra):
    weight = np.array([weights], float)
    phy2log, rank, logcnt = replicate_experts(weight, len(weights) + extra)
    assert logcnt.sum() == len(weights) + extra and logcnt.min() >= 1
    assert np.array_equal(np.bincount(phy2log[0], minlength=len(weights)), logcnt[0])
    # Greedy max-load-per-replica is optimal: no move of one replica lowers the maximum.
    per_replica = weight[0] / logcnt[0]
    for give in range(len(weights)):
        for take in range(len(weights)):
            if give != take and logcnt[0, take] > 1:
                moved = logcnt[0].copy()
                moved[give] += 1
                moved[take] -= 1
                assert (weight[0] / moved).max() >= per_replica.max() - 1e-9


def test_zero_and_equal_loads_follow_the_reference_tie_breaking():
    weight = np.array([[0, 0, 0, 0], [5, 5, 5, 5]], float)
    phy2log = rebalance_experts(weight, 8, 1, 1, 4)[0]
    # Zero loads: argmax takes the first maximum, so expert 0 gets every extra replica. Equal loads: one extra
    # each, and the stable packing puts both replicas of an expert on one GPU (EPLB issue #22).
    assert phy2log.tolist() == [[0, 1, 2, 3, 0, 0, 0, 0], [0, 0, 1, 1, 2, 2, 3, 3]]


@pytest.mark.parametrize(
    "args, problem",
    [
        ((16, 5, 1, 8), "do not split into 5 groups"),
        ((16, 4, 4, 6), "6 GPUs do not split over 4 nodes"),
        ((18, 4, 2, 8), "do not split over 8 GPUs"),
        ((8, 1, 1, 8), "cannot hold 12 experts"),
    ],
)
def test_rebalance_rejects_bad_layouts(args, problem):
    with pytest.raises(InputError, match=problem):
        rebalance_experts(np.array(GOLDEN_WEIGHT), *args)
