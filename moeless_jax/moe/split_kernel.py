"""The balanced split's water-filling rounds as one fused Pallas kernel (GPU).

Under XLA each round of :func:`moeless_jax.moe.split.balanced_quotas` is a chain of reductions, so 24 rounds
become about a hundred tiny kernels and launch latency dominates (~120 µs per layer on an H200). The rounds
touch only ``[M, R]`` quotas of the replicated experts (M <= P - E, R = D), so one program can keep them in
registers and run every round in a single launch. Same arithmetic as the XLA rounds; interpret mode checks
it on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rounds_kernel(
    q_ref, device_ref, valid_ref, totals_ref, step_ref, fixed_ref, out_ref, *, iterations: int
):
    q = q_ref[...]  # [M, R]
    valid = valid_ref[...] > 0  # [M, R]
    totals, step = totals_ref[...], step_ref[...]  # [M, 1]
    fixed = fixed_ref[...]  # [1, D]
    num_devices = fixed.shape[1]
    on_device = (device_ref[...][:, :, None] == jnp.arange(num_devices)[None, None, :]) & valid[:, :, None]
    on_device = on_device.astype(jnp.float32)  # [M, R, D]
    big = jnp.float32(3.0e38)

    def round_(_, q):
        loads = fixed[0] + jnp.sum(jnp.sum(q[:, :, None] * on_device, axis=1), axis=0)  # [D]
        base = jnp.sum(loads[None, None, :] * on_device, axis=2) - q  # [M, R]
        b = jnp.where(valid, base, big)
        below = b[:, None, :] <= b[:, :, None]  # [M, k, j]: b_j <= b_k
        need = jnp.sum(jnp.where(below, b[:, :, None] - b[:, None, :], 0.0), axis=2)  # [M, k]
        feasible = valid & (need <= totals)
        top = jnp.max(jnp.where(feasible, b, -big), axis=1, keepdims=True)  # [M, 1]
        active = valid & (b <= top)
        count = jnp.maximum(jnp.sum(active.astype(jnp.float32), axis=1, keepdims=True), 1.0)
        level = (totals + jnp.sum(jnp.where(active, b, 0.0), axis=1, keepdims=True)) / count
        target = jnp.where(valid, jnp.maximum(level - b, 0.0), 0.0)
        return q + step * (target - q)

    out_ref[...] = jax.lax.fori_loop(0, iterations, round_, q)


def fused_rounds(
    q: jax.Array,
    device: jax.Array,
    valid: jax.Array,
    totals: jax.Array,
    step: jax.Array,
    fixed: jax.Array,
    *,
    iterations: int,
    interpret: bool = False,
) -> jax.Array:
    """Run the water-filling rounds in one kernel; shapes as in ``balanced_quotas`` (padded to powers of 2).

    q, device, valid: [M, R]; totals, step: [M]; fixed: [D]. Returns the fractional quotas [M, R].
    """
    m, r = q.shape
    d = fixed.shape[0]
    mp, rp, dp = _pow2(m), _pow2(r), _pow2(d)
    pad2 = lambda a, fill: jnp.pad(a, ((0, mp - m), (0, rp - r)), constant_values=fill)  # noqa: E731
    args = (
        pad2(q.astype(jnp.float32), 0.0),
        pad2(device.astype(jnp.int32), 0),
        pad2(valid.astype(jnp.int32), 0),
        jnp.pad(totals.astype(jnp.float32), (0, mp - m))[:, None],
        jnp.pad(step.astype(jnp.float32), (0, mp - m))[:, None],
        jnp.pad(fixed.astype(jnp.float32), (0, dp - d))[None, :],
    )
    out = pl.pallas_call(
        lambda *refs: _rounds_kernel(*refs, iterations=iterations),
        # Inside shard_map the output varies over the same mesh axes as the inputs do.
        out_shape=jax.ShapeDtypeStruct(
            (mp, rp), jnp.float32, manual_axis_type=jax.typeof(args[0]).manual_axis_type
        ),
        interpret=interpret,
    )(*args)
    return out[:m, :r]
