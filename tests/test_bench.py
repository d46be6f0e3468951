"""The benchmark timer: synchronised and pipelined samples."""

import jax.numpy as jnp
import pytest

from moeless_jax.bench import time_fn


def test_pipelined_samples_enqueue_that_many_calls_per_sample():
    calls = []

    def fn():
        calls.append(1)
        return jnp.zeros(())

    seconds = time_fn(fn, warmup=1, repeats=3, pipelined=4)
    assert seconds >= 0.0
    assert len(calls) == 1 + 3 * 4  # warm-up, then three samples of four calls


def test_pipelined_must_be_a_positive_call_count():
    with pytest.raises(ValueError, match="pipelined"):
        time_fn(lambda: jnp.zeros(()), pipelined=0)
