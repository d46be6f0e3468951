"""Small timing utilities shared by the benchmark scripts (device-synchronised, median of repeats)."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def time_fn(
    fn: Callable[[], object], *, warmup: int = 2, repeats: int = 10, min_seconds: float = 0.0
) -> float:
    """Median wall-clock seconds of ``fn()``, each call synchronised with ``block_until_ready``.

    ``fn`` should be a jitted call (compile happens in the warm-up). Repeats continue past ``repeats``
    until ``min_seconds`` of timed work has accumulated, so short kernels get enough samples.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples: list[float] = []
    while len(samples) < repeats or sum(samples) < min_seconds:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
        if len(samples) >= 10 * repeats:
            break
    return float(np.median(samples))


def measure_matmul_peak(n: int = 8192, dtype=jnp.bfloat16) -> float:
    """TFLOP/s of one large square matmul on the default device: the practical ceiling."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    seconds = time_fn(lambda: matmul(a, b), warmup=3, repeats=20)
    return 2 * n**3 / seconds / 1e12
