"""Small timing utilities shared by the benchmark scripts (device-synchronised, median of repeats)."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def time_fn(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    repeats: int = 10,
    min_seconds: float = 0.0,
    pipelined: int = 1,
) -> float:
    """Median wall-clock seconds of ``fn()``.

    ``pipelined = 1``: each call is synchronised with ``block_until_ready``, so a sample includes the host's
    dispatch and the synchronisation round trip. ``pipelined = n > 1``: a sample enqueues ``n`` calls and
    waits for the last one only, and counts the mean per call: the device's time per call when the host's
    dispatch overlaps the device's work, as in a serving loop. Use it for kernels of a few milliseconds or
    less, where the per-call round trip is a visible share of a synchronised sample.

    ``fn`` should be a jitted call (compile happens in the warm-up). Repeats continue past ``repeats``
    until ``min_seconds`` of timed work has accumulated, so short kernels get enough samples.
    """
    if pipelined < 1:
        raise ValueError(f"pipelined must be >= 1 calls per sample, got {pipelined}")
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples: list[float] = []
    while len(samples) < repeats or sum(samples) * pipelined < min_seconds:
        start = time.perf_counter()
        for _ in range(pipelined - 1):
            fn()  # each result is dropped at once: its buffer is freed when the device is done with it
        jax.block_until_ready(fn())
        samples.append((time.perf_counter() - start) / pipelined)
        if len(samples) >= 10 * repeats:
            break
    return float(np.median(samples))


def measure_matmul_peak(n: int = 8192, dtype=jnp.bfloat16, pipelined: int = 1) -> float:
    """TFLOP/s of one large square matmul on the default device: the practical ceiling."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    seconds = time_fn(lambda: matmul(a, b), warmup=3, repeats=20, pipelined=pipelined)
    return 2 * n**3 / seconds / 1e12
