"""Orbax checkpoints of predictors: round trips, and clear errors for missing, corrupt or mismatched ones."""

import json
from pathlib import Path

import numpy as np
import pytest

from moeless_jax.errors import InputError
from moeless_jax.predict import (
    GateTuneConfig,
    History,
    HistoryConfig,
    MoElessPredictor,
    Oracle,
    RoutingOnly,
    RoutingOnlyConfig,
    load_predictor,
    read_note,
    save_predictor,
    synthetic_gated_trace,
)
from moeless_jax.traces import token_budget_batches

TINY = RoutingOnlyConfig(hidden=16, window=2, own_layers=1, steps=20, tokens_per_step=32, warmup_steps=2)


@pytest.fixture(scope="module")
def gated():
    trace, kernels = synthetic_gated_trace(num_requests=12, num_layers=3, mixing=0.5, skew=0.5, seed=0)
    return trace, kernels, token_budget_batches(trace, 64)


@pytest.fixture(scope="module")
def fitted(gated):
    trace, kernels, _ = gated
    return {
        "history": History(1, HistoryConfig("ema", ema_alpha=0.5)).fit(trace),
        "oracle": Oracle(2).fit(trace),
        "routing_only": RoutingOnly(1, TINY).fit(trace),
        "moeless": MoElessPredictor(1, kernels, GateTuneConfig(steps=10)).fit(trace),
    }


@pytest.mark.parametrize("name", ["history", "oracle", "routing_only", "moeless"])
def test_round_trip_restores_the_same_forecasts(gated, fitted, name, tmp_path):
    trace, _, batches = gated
    predictor = fitted[name]
    path = save_predictor(predictor, tmp_path / "ckpt", note={"split": 0.7})
    restored = load_predictor(path)
    assert type(restored) is type(predictor)
    assert (restored.name, restored.distance, restored.shape) == (predictor.name, predictor.distance,
                                                                  predictor.shape)
    assert restored.settings() == predictor.settings()
    assert restored.num_bytes() == predictor.num_bytes()
    for batch in batches[:2]:
        np.testing.assert_array_equal(restored.predict(trace, batch), predictor.predict(trace, batch))
    assert read_note(path) == {"split": 0.7}


def test_moeless_checkpoint_keeps_which_layers_were_tuned(fitted, tmp_path):
    predictor = fitted["moeless"]
    restored = load_predictor(save_predictor(predictor, tmp_path / "ckpt"))
    np.testing.assert_array_equal(restored.tuned, predictor.tuned)
    np.testing.assert_array_equal(restored.kernels, predictor.kernels)


def test_missing_checkpoint_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: no predictor checkpoint here.*moeless predict fit"):
        load_predictor(tmp_path / "nowhere")


def test_an_empty_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(InputError, match=r"cannot read the checkpoint's metadata.*moeless predict fit"):
        load_predictor(tmp_path)


def test_corrupt_state_files_give_a_clear_error(fitted, tmp_path):
    path = save_predictor(fitted["routing_only"], tmp_path / "ckpt")
    for file in (path / "state").rglob("*"):
        if file.is_file():
            file.write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match=r"ckpt: cannot read the checkpoint's state"):
        load_predictor(path)


def test_corrupt_metadata_gives_a_clear_error(fitted, tmp_path):
    path = save_predictor(fitted["history"], tmp_path / "ckpt")
    (path / "metadata" / "metadata").write_text("{not json")
    with pytest.raises(InputError, match=r"ckpt: cannot read the checkpoint's metadata"):
        load_predictor(path)


def _edit_metadata(path: Path, edit) -> None:
    file = path / "metadata" / "metadata"
    metadata = json.loads(file.read_text())
    edit(metadata)
    file.write_text(json.dumps(metadata))


def test_mismatched_shapes_name_the_array(fitted, tmp_path):
    path = save_predictor(fitted["routing_only"], tmp_path / "ckpt")
    _edit_metadata(path, lambda metadata: metadata["settings"].update(hidden=8))
    with pytest.raises(InputError, match=r"checkpoint array '\w+' is float16 .*16.* need float16 .*8"):
        load_predictor(path)


def test_foreign_or_future_metadata_is_refused(fitted, tmp_path):
    path = save_predictor(fitted["history"], tmp_path / "ckpt")
    _edit_metadata(path, lambda metadata: metadata.update(format_version=99))
    with pytest.raises(InputError, match="format_version 99 is not supported"):
        load_predictor(path)
    _edit_metadata(path, lambda metadata: metadata.update(format_version=1, name="lstm"))
    with pytest.raises(InputError, match="unknown predictor 'lstm'"):
        load_predictor(path)


def test_save_refuses_to_overwrite_or_to_save_unfitted(fitted, tmp_path):
    path = save_predictor(fitted["history"], tmp_path / "ckpt")
    with pytest.raises(InputError, match="already exists"):
        save_predictor(fitted["history"], path)
    save_predictor(fitted["oracle"], path, overwrite=True)
    assert load_predictor(path).name == "oracle"
    with pytest.raises(InputError, match="not fitted"):
        save_predictor(RoutingOnly(1, TINY), tmp_path / "other")


def test_round_trip_without_own_layers(gated, tmp_path):
    trace, _, batches = gated
    config = RoutingOnlyConfig(hidden=8, window=2, own_layers=0, steps=2, warmup_steps=0)
    predictor = RoutingOnly(1, config).fit(trace)
    restored = load_predictor(save_predictor(predictor, tmp_path / "ckpt"))
    np.testing.assert_array_equal(restored.predict(trace, batches[0]), predictor.predict(trace, batches[0]))
