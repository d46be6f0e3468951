"""Serverless replicas and the two cost views, on tiny cases worked out by hand."""

import pytest

from moeless_jax.config import ConfigError, load_config
from moeless_jax.errors import InputError
from moeless_jax.serverless import (
    LifecycleConfig,
    Prices,
    ReplicaPool,
    Served,
    gb_seconds,
    serverful_dollars,
    serverless_dollars,
)

CONFIG = LifecycleConfig(warm_up_s=1.0, keep_alive_s=5.0)


def test_prewarm_hit_and_keep_alive_expiry():
    pool = ReplicaPool(CONFIG)
    assert pool.prewarm(0, 3, 1, now=0.0) == 1
    assert pool.prewarm(0, 3, 1, now=0.5) == 0  # already warming
    assert pool.serve(0, 3, 1, now=2.0, busy_s=0.5) == Served(1, 0, 0.0)
    assert (pool.prewarm_hits, pool.late_starts, pool.wanted) == (1, 0, 1)
    pool.prewarm(1, 0, 1, now=7.4)  # idle since 2.5: alive until 7.5
    assert pool.live(layer=0) == 1
    pool.prewarm(1, 0, 1, now=7.6)
    assert pool.live(layer=0) == 0 and pool.live() == 1
    pool.close()
    # (0, 3): created 0, released 2.5 + 5 = 7.5; (1, 0): created 7.4, ready 8.4, never busy, released 13.4.
    assert sorted(pool.held_seconds()) == pytest.approx([6.0, 7.5])
    assert pool.busy_seconds() == pytest.approx(0.5)


def test_late_start_runs_on_the_warm_replicas():
    pool = ReplicaPool(CONFIG)
    pool.prewarm(0, 1, 1, now=0.0)
    assert pool.serve(0, 1, 2, now=2.0, busy_s=1.0) == Served(1, 1, 0.0)
    assert pool.late_starts == 1 and pool.live() == 2
    pool.close()
    # warm one: busy until 3, released 8 (held 8); late one: created 2, ready 3, released 8 (held 6).
    assert sorted(pool.held_seconds()) == pytest.approx([6.0, 8.0])


def test_late_start_waits_when_told_to():
    pool = ReplicaPool(LifecycleConfig(warm_up_s=1.0, keep_alive_s=5.0, late_start="wait"))
    pool.prewarm(0, 1, 1, now=0.0)
    assert pool.serve(0, 1, 2, now=2.0, busy_s=1.0) == Served(2, 1, 1.0)
    pool.close()
    # both busy from 3 to 4, released 9: held 9 and 7.
    assert sorted(pool.held_seconds()) == pytest.approx([7.0, 9.0])


def test_a_cold_expert_waits_for_its_first_replica_never_drops():
    pool = ReplicaPool(CONFIG)
    assert pool.serve(0, 0, 1, now=0.0, busy_s=1.0) == Served(1, 1, 1.0)
    pool.close()
    assert pool.held_seconds() == pytest.approx([7.0])  # ready 1, busy to 2, released 7


def test_time_must_not_go_back_and_bad_input_is_named():
    pool = ReplicaPool(CONFIG)
    pool.prewarm(0, 0, 1, now=3.0)
    with pytest.raises(InputError, match="time order"):
        pool.serve(0, 0, 1, now=2.0, busy_s=0.1)
    with pytest.raises(InputError, match="count >= 1"):
        pool.serve(0, 0, 0, now=4.0, busy_s=0.1)
    with pytest.raises(ConfigError, match="late_start"):
        LifecycleConfig(warm_up_s=1.0, late_start="drop")
    with pytest.raises(ConfigError, match="keep_alive_s"):
        LifecycleConfig(warm_up_s=1.0, keep_alive_s=-1)


def test_cost_views_on_hand_computed_cases():
    prices = Prices(gpu_second_usd=0.001, gpu_memory_bytes=80e9)
    assert gb_seconds([0.5, 1.0], [2e9, 4e9]) == pytest.approx(5.0)
    assert serverful_dollars(8, 100.0, prices) == pytest.approx(0.8)
    # 10 s holding half a GPU + 20 s holding a quarter = 10 GPU-seconds.
    assert serverless_dollars([10.0, 20.0], [40e9, 20e9], prices) == pytest.approx(0.01)
    with pytest.raises(InputError, match="one entry per call"):
        gb_seconds([1.0], [1.0, 2.0])
    with pytest.raises(InputError, match="replica_seconds"):
        serverless_dollars([-1.0], [1.0], prices)
    with pytest.raises(ConfigError, match="gpu_second_usd"):
        Prices(gpu_second_usd=0, gpu_memory_bytes=1)


def test_prices_load_from_the_shipped_config():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "prices.yaml"
    prices = load_config(Prices, path, section="prices")
    assert prices.gpu_second_usd > 0 and prices.gpu_memory_bytes == 141e9
