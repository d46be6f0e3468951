"""Predictor metrics on hand-computed cases."""

import numpy as np
import pytest

from moeless_jax.errors import InputError
from moeless_jax.predict import Scores, default_hot, hot_expert_recall, load_accuracy, pearson, scale_rows


def test_accuracy_is_one_minus_total_variation():
    # shares (0.5, 0.5, 0, 0) vs (0.25, 0.25, 0.25, 0.25): TV = 0.5 -> accuracy 0.5
    assert load_accuracy([2, 2, 0, 0], [1, 1, 1, 1]) == pytest.approx(0.5)
    # scale does not matter: (1, 3) vs (2, 2) -> shares (.25, .75) vs (.5, .5), TV 0.25
    assert load_accuracy([10, 30], [2, 2]) == pytest.approx(0.75)
    assert load_accuracy([3, 0], [0, 5]) == pytest.approx(0.0)
    assert load_accuracy([[1, 1], [4, 0]], [[5, 5], [1, 0]]) == pytest.approx([1.0, 1.0])


def test_accuracy_of_an_empty_row_is_nan():
    assert np.isnan(load_accuracy([0, 0], [1, 1]))


def test_hot_expert_recall_counts_shared_top_experts():
    true = [9, 8, 1, 0, 7]  # top-2: experts 0, 1
    assert hot_expert_recall([5, 1, 0, 0, 9], true, 2) == pytest.approx(0.5)  # forecast top-2: 4, 0
    assert hot_expert_recall([9, 8, 0, 0, 0], true, 2) == pytest.approx(1.0)
    assert hot_expert_recall([0, 0, 9, 9, 0], true, 2) == pytest.approx(0.0)
    # ties rank toward the lower id: forecast (1, 1, 1, 1, 1) has top-3 = experts 0, 1, 2
    assert hot_expert_recall([1, 1, 1, 1, 1], true, 3) == pytest.approx(2 / 3)


def test_pearson_matches_hand_computation_and_flags_constant_rows():
    # x = (1, 2, 3), y = (2, 4, 7): centred (-1, 0, 1), (-7/3, -1/3, 8/3); r = 5 / sqrt(2 * 38/3)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5.0 / np.sqrt(2 * 38.0 / 3.0))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(pearson([2, 2, 2], [1, 2, 3]))


def test_metrics_reject_mismatched_or_negative_loads():
    with pytest.raises(InputError, match="same shape"):
        load_accuracy([1, 2], [1, 2, 3])
    with pytest.raises(InputError, match="non-negative"):
        pearson([1, -1], [1, 1])
    with pytest.raises(InputError, match="hot must lie"):
        hot_expert_recall([1, 2], [1, 2], 3)


def test_scale_rows_keeps_shares_and_spreads_empty_rows():
    scaled = scale_rows(np.array([[1.0, 3.0], [0.0, 0.0]]), 8.0)
    np.testing.assert_allclose(scaled, [[2.0, 6.0], [4.0, 4.0]])


def test_default_hot_is_an_eighth_of_the_experts():
    assert (default_hot(64), default_hot(16), default_hot(4)) == (8, 2, 1)


def test_scores_summary_means_per_layer():
    scores = Scores(
        target_layers=np.array([2, 3]),
        accuracy=np.array([[1.0, 0.5], [0.5, np.nan]]),
        recall=np.array([[1.0, 0.0], [1.0, 1.0]]),
        pearson=np.array([[1.0, np.nan], [0.0, 0.5]]),
        seconds=np.array([0.002, 0.004]),
        tokens=np.array([10, 30]),
    )
    summary = scores.summary()
    assert summary["accuracy_per_layer"] == {"2": pytest.approx(0.75), "3": pytest.approx(0.5)}
    assert summary["accuracy_mean"] == pytest.approx(2.0 / 3.0)
    assert summary["recall_mean"] == pytest.approx(0.75)
    assert summary["pearson_mean"] == pytest.approx(0.5)
    assert summary["ms_per_layer"] == pytest.approx(1.5)  # median 3 ms over 2 target layers
    assert summary["tokens_per_batch_mean"] == pytest.approx(20.0)
