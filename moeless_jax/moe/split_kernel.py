"""The balanced split as one fused Pallas kernel (GPU).

Under XLA :func:`moeless_jax.moe.split.levelled_quotas` becomes dozens of tiny kernels (the even split, the
row selection, every round's reductions, the rounding and the safeguard), so launch gaps dominate its time.
Its tensors are small (``[E, R]`` quotas, ``[M, R, D]`` one-hots, ``[M, E, R]`` selections), so one program
can hold them all and run the whole computation in a single launch. The kernel body *is*
``levelled_quotas``, so the two paths share their arithmetic; interpret mode checks the kernel on CPU.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moeless_jax.moe.split import levelled_quotas, round_rows

# Largest intermediate (elements) kept in one program; beyond it registers spill and XLA is faster.
MAX_PROGRAM_ELEMENTS = 1 << 15


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fits_one_program(num_experts: int, r_max: int, num_devices: int, num_movable: int) -> bool:
    """Whether the kernel's largest tensor (after padding to powers of two) stays within one program."""
    e, r, d, m = (_pow2(n) for n in (num_experts, r_max, num_devices, num_movable))
    rows = round_rows(e, m)
    selection = max(rows * e * r, e * e) if rows < e else 0
    return max(selection, e * r * d, rows * r * max(r, d)) <= MAX_PROGRAM_ELEMENTS


def default_num_warps(num_experts: int, r_max: int, num_devices: int, num_movable: int) -> int:
    """Warps for the kernel: few for small rounds (less cross-warp reduction), more once the rounds' ``[rows,
    R, max(R, D)]`` tensors grow (fewer registers per thread). Chosen from an H200 sweep of 1-16 warps over
    64-expert, 8-device tables at 1.125x-2x slots; ``scripts/bench_split.py --part warps`` repeats it."""
    e, r, d, m = (_pow2(n) for n in (num_experts, r_max, num_devices, num_movable))
    return 2 if round_rows(e, m) * r * max(r, d) <= 512 else 8


def fused_levelled_quotas(
    totals: jax.Array,
    expert_slots: jax.Array,
    replica_count: jax.Array,
    *,
    slots_per_device: int,
    num_devices: int,
    num_movable: int,
    iterations: int,
    num_warps: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """:func:`~moeless_jax.moe.split.levelled_quotas` in one kernel; same arguments and result.

    Triton tensors have power-of-two sizes, so experts, replicas, devices and movable rows are padded: padded
    experts have no replicas and no tokens, padded replicas are invalid, padded devices hold nothing.
    """
    num_experts, r_max = expert_slots.shape
    e, r = _pow2(num_experts), _pow2(r_max)
    args = (
        jnp.pad(totals, ((0, e - num_experts), (0, 0))),
        jnp.pad(expert_slots, ((0, e - num_experts), (0, r - r_max)), constant_values=-1),
        jnp.pad(replica_count, ((0, e - num_experts), (0, 0))),
    )
    body = partial(levelled_quotas, slots_per_device=slots_per_device, num_devices=_pow2(num_devices),
                   num_movable=_pow2(num_movable), iterations=iterations)

    def kernel(totals_ref, slots_ref, count_ref, out_ref):
        out_ref[...] = body(totals_ref[...], slots_ref[...], count_ref[...])

    # Inside shard_map the output varies over the mesh axes that the XLA path's output would.
    manual_axis_type = jax.eval_shape(body, *args).manual_axis_type
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((e, r), jnp.int32, manual_axis_type=manual_axis_type),
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or default_num_warps(num_experts, r_max, num_devices, num_movable)
        ),
        interpret=interpret,
    )(*args)
    return out[:num_experts, :r_max]
