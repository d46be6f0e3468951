"""Training the language model: dropless steps, the replication controller inside the loop, resume."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from moeless_jax.config import ConfigError
from moeless_jax.model import ModelConfig, MoESection, MoETransformer
from moeless_jax.model.train import (
    TokenData,
    TrainConfig,
    evaluate,
    make_optimizer,
    optimizer_follower,
    restore_train_state,
    save_train_state,
    train,
    train_step,
)
from moeless_jax.moe import make_ep_mesh
from moeless_jax.replication import ControllerConfig, ReplicationController

# A refused orbax restore leaves an asyncio callback behind that pytest reports after the test; it is orbax's
# clean-up, not a failure of the code under test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

MODEL = ModelConfig(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_seq_len=16,
    moe=MoESection(num_experts=8, top_k=2, d_ff=16, expert_kernel="ragged", split="even"),
)
CONFIG = TrainConfig(steps=6, batch_size=8, seq_len=8, learning_rate=1e-2, warmup_steps=1, num_devices=8,
                     eval_every=3, eval_batches=1, checkpoint_every=2)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    # A learnable stream: each token mostly follows from the one before.
    stream = np.cumsum(rng.integers(1, 3, 8 * 9 * 12)) % 64
    windows = stream[: 8 * 9 * 12].reshape(-1, 9).astype(np.int32)
    return TokenData(windows[:80], windows[80:], ({"file": "synthetic"},))


def _model(seed=0):
    return MoETransformer(MODEL, mesh=make_ep_mesh(8), rngs=nnx.Rngs(seed))


def _logical(model):
    return {k: np.asarray(v) for k, v in model.logical_state().items()}


def test_training_with_the_controller_equals_static_training():
    data = _data()
    static, live = _model(), _model()
    # SGD with momentum: its state (the trace) must follow the tables, and unlike Adam it does not blow up
    # gradient coordinates at rounding level (which differ between tables) to full-size steps.
    static_opt, live_opt = (nnx.Optimizer(m, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
                            for m in (static, live))
    controller = ReplicationController(live, ControllerConfig(policy="moeless", max_moves_per_layer=4),
                                       on_moves=optimizer_follower(live, live_opt))
    for step in range(CONFIG.steps):
        batch = data.batch(step, CONFIG.batch_size, CONFIG.seed)
        a = train_step(static, static_opt, batch)
        b = train_step(live, live_opt, batch, controller)
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    controller.flush()
    assert controller.log.summary()["slots_moved"] > 0, "the controller should have replicated experts"
    for layer in live.moe_layers():
        table = layer.replica_table()
        for w in layer.experts.weights():
            w = np.asarray(w)
            for e in range(table.num_experts):
                slots = table.expert_slots[e, : table.replica_count[e]]
                for s in slots[1:]:
                    np.testing.assert_array_equal(w[s], w[slots[0]])
    want, got = _logical(static), _logical(live)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-5, err_msg=name)


def test_resume_gives_the_uninterrupted_run(tmp_path):
    data = _data()
    whole = train(CONFIG, data, tmp_path / "whole", progress=False, model_config=MODEL)
    stopped = train(CONFIG, data, tmp_path / "split", progress=False, model_config=MODEL, stop_at=5)
    assert stopped == {"stopped_at": 5}
    # The same run directory: it resumes from step 4's checkpoint (checkpoint_every=2) or step 5's state.
    resumed = train(CONFIG, data, tmp_path / "split", progress=False, model_config=MODEL)
    assert resumed["resumed_from_step"] == 5
    assert resumed["heldout"]["cross_entropy"] == pytest.approx(whole["heldout"]["cross_entropy"], rel=1e-5)
    assert whole["heldout"]["cross_entropy"] < np.log(64), "six steps on a learnable stream must help"
    assert (tmp_path / "whole" / "loss.png").stat().st_size > 0
    assert (tmp_path / "whole" / "model").is_dir()


def test_resume_refuses_another_models_state(tmp_path):
    data = _data()
    model = _model()
    optimizer = make_optimizer(model, CONFIG)
    save_train_state(tmp_path, 2, model, optimizer, [])
    other = MoETransformer(dataclasses.replace(MODEL, d_model=16, head_dim=4), mesh=make_ep_mesh(8),
                           rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cannot resume"):
        restore_train_state(tmp_path, other, make_optimizer(other, CONFIG))
    assert evaluate(model, data.heldout, 8)["tokens"] > 0


def test_train_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="batch_size: 6 is not a multiple of num_devices=4"):
        TrainConfig(batch_size=6, num_devices=4)
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ConfigError, match="model preset 'nope' is unknown"):
        TrainConfig(model="nope").model_config()


def test_data_batches_are_a_pure_function_of_step_and_seed():
    data = _data()
    np.testing.assert_array_equal(data.batch(13, 8, 0), data.batch(13, 8, 0))
    epoch = [data.batch(i, 8, 0) for i in range(len(data.train) // 8)]
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch), axis=0), np.sort(data.train, axis=0))
    assert jax.device_count() == 8
