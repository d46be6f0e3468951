"""The replication controller: schedule, budget, asynchronous reads, errors, log; then real MoE layers."""

import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moeless_jax.config import ConfigError, load_config
from moeless_jax.errors import InputError
from moeless_jax.moe import MoEConfig, MoELayer, ReplicaTable, make_ep_mesh, plan_moves
from moeless_jax.plan import EPLBConfig, MoElessConfig, SlotLayout, balancedness, limit_moves, make_policy
from moeless_jax.plan import tokens_per_device as plan_tokens_per_device
from moeless_jax.replication import (
    ControllerConfig,
    Forecaster,
    HistoryForecaster,
    ReplicatedLayer,
    ReplicatedModel,
    ReplicationController,
    ScriptedForecaster,
)

E, D, S, L = 8, 4, 3, 2
BYTES = 100  # per expert copy in the fake layers


# ---------------------------------------------------------------------------------------------- fakes
@dataclass(frozen=True)
class FakeConfig:
    num_experts: int = E
    num_devices: int = D
    slots_per_device: int = S
    split: str = "even"


class FakeLayer:
    """Holds a table; records every set_table call and answers with the real move plan."""

    def __init__(self, config=FakeConfig(), table=None):
        self.config = config
        self.table = table or ReplicaTable.static(
            num_experts=config.num_experts,
            num_devices=config.num_devices,
            slots_per_device=config.slots_per_device,
        )
        self.calls = []  # (table, plan)

    def replica_table(self):
        return self.table

    def set_table(self, table, *, current=None):
        assert current is None or current == self.table, "the controller must know the table the layer holds"
        plan = plan_moves(self.table, table, bytes_per_expert=BYTES)
        self.table = table
        self.calls.append((table, plan))
        return plan


class FakeModel:
    def __init__(self, layers):
        self.layers = layers

    def moe_layers(self):
        return self.layers


def fake_model(num_layers=L, config=FakeConfig()):
    return FakeModel([FakeLayer(config) for _ in range(num_layers)])


def skewed_loads(rng, step, num_layers=L, tokens=600):
    """[L, E] int counts whose hot expert moves with the step."""
    weights = np.ones((num_layers, E))
    for layer in range(num_layers):
        weights[layer, (step + 3 * layer) % E] = 12.0
        weights[layer, (step * 5 + layer + 1) % E] = 5.0
    return np.stack([rng.multinomial(tokens, w / w.sum()) for w in weights])


class SlowArray:
    """Duck-typed device array: a host copy that is not ready until told, and a flag when it is read."""

    def __init__(self, value, ready=False):
        self.value = np.asarray(value)
        self.shape, self.dtype = self.value.shape, self.value.dtype
        self.ready, self.copying, self.read = ready, False, False

    def copy_to_host_async(self):
        self.copying = True

    def is_ready(self):
        return self.ready

    def __array__(self, dtype=None, copy=None):
        self.read = True
        return self.value if dtype is None else self.value.astype(dtype)


def table_rows(model):
    return np.stack([layer.table.slot_to_expert for layer in model.layers])


# ---------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    ("policy", "interval", "budget"), [("moeless", 1, 2), ("moeless", 3, None), ("eplb", 2, 3)]
)
def test_scripted_forecasts_install_exactly_what_policy_and_budget_give(policy, interval, budget):
    rng = np.random.default_rng(0)
    steps = 12
    forecasts = [skewed_loads(rng, t).astype(np.float64) for t in range(steps)]
    config = ControllerConfig(policy=policy, rebalance_interval=interval, max_moves_per_layer=budget)
    model = fake_model()
    moves = []
    controller = ReplicationController(
        model, config, ScriptedForecaster(forecasts), on_moves=lambda i, plan: moves.append((i, plan))
    )
    # The same plans, recomputed step by step from the policy and the budget.
    layout = SlotLayout(E, D, S)
    reference = make_policy(policy, layout, L, moeless=config.moeless, eplb=config.eplb, split="even")
    want = table_rows(model)
    for t in range(steps):
        controller.observe(rng.integers(0, 50, (L, E)))  # observed counts: ignored by the script
        if (t + 1) % interval == 0:
            forecast = forecasts[t]
            if policy == "eplb":
                proposed = reference.rebalance(forecast)[0]
            else:
                proposed = reference.plan(forecast).slot_to_expert
            want = np.stack(
                [
                    limit_moves(
                        want[i],
                        proposed[i],
                        forecast[i],
                        num_experts=E,
                        num_devices=D,
                        slots_per_device=S,
                        max_moves=budget,
                    )
                    for i in range(L)
                ]
            )
            reference.adopt(want)
        np.testing.assert_array_equal(table_rows(model), want)
        np.testing.assert_array_equal(np.stack([t.slot_to_expert for t in controller.tables]), want)
    calls = [(i, plan) for i, layer in enumerate(model.layers) for _, plan in layer.calls]
    assert sorted(moves, key=lambda m: m[0]) == sorted(calls, key=lambda m: m[0])
    assert len(moves) > 0
    for layer in model.layers:  # set_table only when the table changed
        assert all(plan.moves or plan.cleared_slots for _, plan in layer.calls)


def test_budget_is_never_exceeded_over_many_steps():
    rng = np.random.default_rng(1)
    model = fake_model(3)
    config = ControllerConfig(max_moves_per_layer=2, history_window=2)
    controller = ReplicationController(model, config)
    for t in range(40):
        records = controller.observe(skewed_loads(rng, t // 3, num_layers=3))
        (record,) = records  # numpy counts are read at once
        assert record.step == t and record.rebalanced
        assert all(0 <= moved <= 2 for moved in record.slots_moved)
        assert record.bytes_moved == tuple(BYTES * m for m in record.slots_moved)
    plans = [plan for layer in model.layers for _, plan in layer.calls]
    assert plans and all(len(plan.moves) <= 2 for plan in plans)
    summary = controller.log.summary()
    assert summary["slots_moved"] == sum(len(p.moves) for p in plans) > 40
    assert summary["bytes_moved"] == BYTES * summary["slots_moved"]
    # The moving hot expert is followed: later steps are far better balanced than static EP's first.
    assert summary["balancedness_per_layer"][0] > controller.log[0].balancedness[0]


def test_rebalance_interval_is_respected():
    rng = np.random.default_rng(2)
    forecasts = [skewed_loads(rng, t).astype(np.float64) for t in range(10)]
    model = fake_model()
    config = ControllerConfig(rebalance_interval=3)
    controller = ReplicationController(model, config, ScriptedForecaster(forecasts))
    calls_after = []
    for t in range(10):
        controller.observe(skewed_loads(rng, t))
        calls_after.append(sum(len(layer.calls) for layer in model.layers))
    rebalanced = [r.step for r in controller.log if r.rebalanced]
    assert rebalanced == [2, 5, 8]
    grew = [t for t in range(10) if calls_after[t] > (calls_after[t - 1] if t else 0)]
    assert set(grew) <= {2, 5, 8} and grew
    assert all(r.planning_seconds == 0 for r in controller.log if not r.rebalanced)


def test_static_policy_never_moves():
    rng = np.random.default_rng(3)
    model = fake_model()
    controller = ReplicationController(model, ControllerConfig(policy="static"))
    for t in range(5):
        controller.observe(skewed_loads(rng, t))
    assert all(not layer.calls for layer in model.layers)
    assert controller.log.summary()["rebalances"] == 5 and controller.log.summary()["slots_moved"] == 0


# ---------------------------------------------------------------------------------------------- asynchrony
def test_observe_reads_the_newest_step_only_when_ready_and_older_ones_on_the_next_call():
    rng = np.random.default_rng(4)
    model = fake_model()
    controller = ReplicationController(model, ControllerConfig(rebalance_interval=2))
    first = SlowArray(skewed_loads(rng, 0))
    assert controller.observe(first) == ()
    assert first.copying and not first.read and controller.queued == 1 and controller.steps_observed == 0
    second = SlowArray(skewed_loads(rng, 1))
    records = controller.observe(second)
    assert [r.step for r in records] == [0] and first.read  # one step of lag
    assert second.copying and not second.read and controller.queued == 1
    assert all(not layer.calls for layer in model.layers)  # interval 2: step 1 not read yet
    second.ready = True
    third = SlowArray(skewed_loads(rng, 2), ready=True)
    records = controller.observe(third)
    assert [r.step for r in records] == [1, 2] and third.read and controller.queued == 0
    assert records[0].rebalanced and not records[1].rebalanced
    fourth = SlowArray(skewed_loads(rng, 3))
    assert controller.observe(fourth) == () and not fourth.read
    assert [r.step for r in controller.flush()] == [3] and fourth.read
    assert [r.step for r in controller.log] == [0, 1, 2, 3]


def test_observe_takes_jax_arrays_from_a_jitted_step():
    model = fake_model()
    controller = ReplicationController(model, ControllerConfig())

    @jax.jit
    def step_counts(seed):
        return jax.random.randint(jax.random.key(seed), (L, E), 0, 100)

    read = []
    for seed in range(4):
        counts = step_counts(seed)
        read += controller.observe(counts)
        assert controller.queued <= 1  # never more than the newest step waits
    read += controller.flush()
    assert [r.step for r in read] == [0, 1, 2, 3]
    want = plan_tokens_per_device(
        np.stack([ReplicaTable.static(num_experts=E, num_devices=D, slots_per_device=S).slot_to_expert] * L),
        np.asarray(step_counts(0)),
        D,
    )
    np.testing.assert_allclose(read[0].balancedness, balancedness(want))


# ---------------------------------------------------------------------------------------------- errors
def test_layouts_split_and_inputs_are_checked():
    with pytest.raises(InputError, match=r"layer 1 has \(experts, devices, slots_per_device\) = \(8, 4, 4\)"):
        ReplicationController(
            FakeModel([FakeLayer(), FakeLayer(FakeConfig(slots_per_device=4))]), ControllerConfig()
        )
    with pytest.raises(InputError, match="plans for 'even' but layer 0 splits 'balanced'"):
        ReplicationController(fake_model(config=FakeConfig(split="balanced")), ControllerConfig())
    with pytest.raises(InputError, match="no moe_layers"):
        ReplicationController(object(), ControllerConfig())
    with pytest.raises(InputError, match="returned no layers"):
        ReplicationController(FakeModel([]), ControllerConfig())
    with pytest.raises(InputError, match="layer 0: object lacks"):
        ReplicationController(FakeModel([object()]), ControllerConfig())
    with pytest.raises(InputError, match="4 devices do not split over 3 nodes"):
        ReplicationController(
            fake_model(), ControllerConfig(policy="eplb", eplb=EPLBConfig(window=1, num_nodes=3))
        )
    controller = ReplicationController(fake_model(), ControllerConfig())
    with pytest.raises(InputError, match=r"expert_counts: has shape \(2, 7\), expected \(2, 8\)"):
        controller.observe(np.zeros((L, E - 1), np.int32))
    with pytest.raises(InputError, match=r"slot_counts: has shape \(2, 8\), expected \(2, 12\)"):
        controller.observe(np.zeros((L, E), np.int32), np.zeros((L, 8), np.int32))
    balanced = ReplicationController(
        fake_model(config=FakeConfig(split="balanced")), ControllerConfig(split="balanced")
    )
    with pytest.raises(InputError, match="split 'balanced' divides token counts"):
        balanced.observe(np.ones((L, E)))
    assert controller.queued == 0 and balanced.queued == 0  # rejected steps are not queued


def test_controller_config_validates_itself_and_loads_from_yaml(tmp_path):
    with pytest.raises(ConfigError, match="policy: 'oracle' is not a controller policy"):
        ControllerConfig(policy="oracle")
    with pytest.raises(ConfigError, match="ema_alpha: give history_window or ema_alpha, not both"):
        ControllerConfig(history_window=4, ema_alpha=0.5)
    with pytest.raises(ConfigError, match="max_moves_per_layer"):
        ControllerConfig(max_moves_per_layer=-1)
    with pytest.raises(ConfigError, match="rebalance_interval"):
        ControllerConfig(rebalance_interval=0)
    with pytest.raises(ConfigError, match="split: 'uneven'"):
        ControllerConfig(split="uneven")
    with pytest.raises(ConfigError, match="eplb.period: is 1 but rebalance_interval is 5"):
        ControllerConfig(policy="eplb", rebalance_interval=5, eplb=EPLBConfig(window=1))
    with pytest.raises(ConfigError, match="eplb.window: is 1000 but history_window is 1"):
        ControllerConfig(policy="eplb", eplb=EPLBConfig())
    # EPLB's schedule is the controller's: filled in when left out.
    config = ControllerConfig(policy="eplb", rebalance_interval=7, history_window=30)
    assert (config.eplb.window, config.eplb.period) == (30, 7)
    assert ControllerConfig().window == 1 and ControllerConfig(ema_alpha=0.5).window is None
    path = tmp_path / "run.yaml"
    path.write_text(
        "replication:\n  policy: eplb\n  rebalance_interval: 4\n  history_window: 8\n"
        "  max_moves_per_layer: 2\n  moeless: {cv_target: 0.1}\n  eplb: {num_groups: 2}\n"
    )
    config = load_config(ControllerConfig, path, section="replication")
    assert config.moeless == MoElessConfig(cv_target=0.1)
    assert config.eplb == EPLBConfig(window=8, period=4, num_groups=2)
    assert config.max_moves_per_layer == 2
    path.write_text("replication:\n  moeless: {cv_targt: 0.1}\n")
    with pytest.raises(ConfigError, match=r"moeless: unknown field\(s\) \['cv_targt'\]"):
        load_config(ControllerConfig, path, section="replication")


# ---------------------------------------------------------------------------------------------- forecasters
def test_history_forecaster_sums_a_window_or_averages_exponentially():
    steps = [np.array([[1, 2]]), np.array([[3, 0]]), np.array([[5, 4]])]
    window = HistoryForecaster(window=2)
    ema = HistoryForecaster(ema_alpha=0.5)
    assert window.forecast() is None and ema.forecast() is None
    for loads in steps:
        window.observe(loads)
        ema.observe(loads)
    np.testing.assert_array_equal(window.forecast(), [[8.0, 4.0]])
    np.testing.assert_array_equal(ema.forecast(), [[0.5 * 5 + 0.25 * 3 + 0.25 * 1, 0.5 * 4 + 0.25 * 2]])
    assert window.forecast().dtype == np.float64
    window.reset()
    assert window.forecast() is None
    with pytest.raises(InputError, match="exactly one of window and ema_alpha"):
        HistoryForecaster()
    with pytest.raises(InputError, match="ema_alpha"):
        HistoryForecaster(ema_alpha=1.5)
    with pytest.raises(InputError, match="earlier steps had"):
        ema.observe(np.ones((1, 3)))
    with pytest.raises(InputError, match="finite and >= 0"):
        HistoryForecaster(window=1).observe(np.array([[-1.0]]))
    assert isinstance(window, Forecaster) and isinstance(ScriptedForecaster([np.ones((1, 1))]), Forecaster)


def test_scripted_forecaster_replays_in_order():
    forecasts = [np.full((1, 2), float(i)) for i in range(3)]
    scripted = ScriptedForecaster(forecasts)
    assert scripted.forecast() is None
    for i in range(3):
        scripted.observe(np.zeros((1, 2)))
        np.testing.assert_array_equal(scripted.forecast(), forecasts[i])
    with pytest.raises(InputError, match="step 4 observed but only 3 forecasts"):
        scripted.observe(np.zeros((1, 2)))
    scripted.reset()
    assert scripted.forecast() is None


# ---------------------------------------------------------------------------------------------- log
def test_log_records_the_tables_that_served_each_step_and_serialises():
    rng = np.random.default_rng(5)
    model = fake_model()
    controller = ReplicationController(model, ControllerConfig(rebalance_interval=2, max_moves_per_layer=4))
    served, counts_seen = [], []
    for t in range(6):
        counts = skewed_loads(rng, t)
        served.append(table_rows(model))  # the tables the step is "dispatched" with
        counts_seen.append(counts)
        if t == 4:  # true per-slot counts: the log uses them as measured
            slot_counts = rng.integers(0, 30, (L, D * S))
            controller.observe(counts, slot_counts)
        else:
            controller.observe(counts)
    log = controller.log
    assert len(log) == 6 and [r.step for r in log] == list(range(6))
    for t, record in enumerate(log):
        if t == 4:
            tokens = slot_counts.reshape(L, D, S).sum(-1)
            assert record.measured
        else:
            tokens = plan_tokens_per_device(served[t], counts_seen[t], D)
            assert not record.measured
        np.testing.assert_allclose(record.balancedness, balancedness(tokens))
        np.testing.assert_allclose(record.peak_tokens, tokens.max(-1))
        assert record.rebalanced == (t % 2 == 1)
    assert not np.array_equal(served[0], served[-1])  # tables did change in between
    with pytest.raises(AttributeError):
        log[0].step = 9  # frozen
    data = json.loads(log.to_json())
    assert data["summary"] == log.summary() and len(data["steps"]) == 6
    assert data["steps"][1]["slots_moved"] == list(log[1].slots_moved)
    summary = controller.summary()
    assert summary["redundant_slots"] == D * S - E == controller.redundant_slots
    assert summary["steps"] == 6 and summary["rebalances"] == 3
    controller.reset()
    assert len(controller.log) == 0 and controller.steps_observed == 0
    np.testing.assert_array_equal(np.stack([t.slot_to_expert for t in controller.tables]), table_rows(model))


# ---------------------------------------------------------------------------------------------- real layers
CONFIG = MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, num_devices=8, slots_per_device=2)
TRACES = {"count": 0}


class MoEStack(nnx.Module):
    """Two MoE layers with residual connections; reports each layer's counts."""

    def __init__(self, mesh, seed):
        self.blocks = nnx.List([MoELayer(CONFIG, mesh=mesh, rngs=nnx.Rngs(seed + i)) for i in range(2)])

    def moe_layers(self):
        return list(self.blocks)

    def __call__(self, x):
        expert_counts, slot_counts = [], []
        for layer in self.blocks:
            out = layer(x)
            x = x + out.y
            expert_counts.append(out.expert_counts)
            slot_counts.append(out.slot_counts)
        return x, jnp.stack(expert_counts), jnp.stack(slot_counts)


@nnx.jit
def forward(model, x):
    TRACES["count"] += 1
    return model(x)


def test_real_layers_keep_their_outputs_and_never_recompile():
    mesh = make_ep_mesh(8)
    model, static = MoEStack(mesh, 0), MoEStack(mesh, 0)
    assert isinstance(model, ReplicatedModel) and isinstance(model.blocks[0], ReplicatedLayer)
    moved = []
    controller = ReplicationController(
        model, ControllerConfig(max_moves_per_layer=3), on_moves=lambda i, plan: moved.append(i)
    )
    router = np.asarray(model.blocks[0].router[...])
    served, counts_seen = [], []
    for step in range(6):
        hot = router[:, step % 2] / np.linalg.norm(router[:, step % 2])  # skew towards expert 0 or 1
        x = jax.random.normal(jax.random.key(step), (64, 16)) + 3.0 * jnp.asarray(hot)
        served.append(np.stack([t.slot_to_expert for t in controller.tables]))
        y, expert_counts, slot_counts = forward(model, x)
        controller.observe(expert_counts, slot_counts)
        y_static, _, _ = forward(static, x)
        assert float(jnp.max(jnp.abs(y - y_static))) <= 1e-6
        counts_seen.append(expert_counts)
    controller.flush()
    assert TRACES["count"] == 1, "installing tables must not retrace or recompile the step"
    assert moved and controller.log.summary()["slots_moved"] > 0
    for t, layer in enumerate(model.blocks):
        assert layer.replica_table() == controller.tables[t]
    for t, record in enumerate(controller.log):  # measured per-device tokens = the serving tables' split
        tokens = plan_tokens_per_device(served[t], np.asarray(counts_seen[t]), 8)
        np.testing.assert_allclose(record.balancedness, balancedness(tokens))
        assert record.measured and all(m <= 3 for m in record.slots_moved)
