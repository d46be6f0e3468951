"""Configuration of one replicated MoE layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

from moeless_jax.config import require, require_positive_ints

RouterKind = Literal["mixtral", "deepseek", "deepseek_v3"]
ROUTERS: tuple[str, ...] = get_args(RouterKind)
Backend = Literal["dense", "ragged"]
Split = Literal["even", "balanced"]
SPLITS: tuple[str, ...] = get_args(Split)
# Rounds of the balanced split; see results/split/iterations.json for what fewer or more rounds give.
SPLIT_ITERATIONS = 8
# Ratio between consecutive compiled per-slot buffers of the capacity kernel: at most ~5 % padding rows.
SLOT_CAPACITY_RATIO = 1.05
ExpertKernel = Literal["ragged", "capacity", "slotwise", "auto"]
EXPERT_KERNELS: tuple[str, ...] = get_args(ExpertKernel)
DTYPES = ("float32", "bfloat16", "float16")


class GroupLimit(NamedTuple):
    """DeepSeek-V3 group-limited routing: experts form ``groups`` equal groups; a token picks its top
    ``topk_groups`` groups (by the sum of each group's two best biased scores) and its experts among them."""

    groups: int = 1
    topk_groups: int = 1


@dataclass(frozen=True)
class MoEConfig:
    """Shape and behaviour of an MoE layer served with expert parallelism over mesh axis ``ep``.

    Attributes:
      d_model: hidden size.
      d_ff: hidden size of each routed SwiGLU expert.
      num_experts: logical experts E.
      top_k: experts per token.
      num_devices: devices D on the ``ep`` axis.
      slots_per_device: physical expert slots S per device (P = D * S >= E).
      router: ``mixtral`` (top-k of logits, softmax over the chosen), ``deepseek`` (softmax over all,
        then top-k, renormalised when ``renormalize``) or ``deepseek_v3`` (sigmoid scores, group-limited
        top-k chosen with a load-balancing bias that never enters the weights; see
        :func:`moeless_jax.moe.router.route`).
      renormalize: DeepSeek routers only: rescale the chosen weights to sum to 1.
      num_expert_groups: ``deepseek_v3``: experts form this many equal groups (1 = no group limit).
      topk_groups: ``deepseek_v3``: groups a token may pick its experts from.
      routed_scaling_factor: ``deepseek_v3``: factor on the routed experts' weights.
      num_shared_experts: always-active experts applied to every token (DeepSeek); their hidden size is
        ``num_shared_experts * d_ff_shared``.
      d_ff_shared: hidden size of each shared expert (defaults to ``d_ff``).
      backend: ``dense`` (fixed-capacity all_to_all; runs everywhere) or ``ragged`` (ragged_all_to_all;
        GPU/TPU only).
      capacity_factor: dispatch buffer size relative to a perfectly balanced load. ``None`` sizes it for
        the worst case, which can never overflow. A smaller buffer is faster; an overflow is counted and
        reported, never dropped silently (see :mod:`moeless_jax.moe.dispatch`).
      split: how an expert's tokens are divided among its replicas: ``even`` (equal shares, as vLLM and
        the MoEless paper do) or ``balanced`` (quotas computed in the step from the true per-expert counts
        so that devices finish together; see :func:`moeless_jax.moe.split.balanced_quotas`). Both are exact.
      split_iterations: rounds of the balanced split (more rounds: closer to the optimal split).
      expert_kernel: ``ragged`` (``jax.lax.ragged_dot``; portable, no buffers), ``capacity`` (dense
        batched matmuls over per-slot buffers, with a ragged overflow path; fast when slots are balanced) or
        ``slotwise`` (like ``capacity``, but every slot picks its own buffer size, so a device's time follows
        the rows it holds, not ``S x`` its fullest slot; see :func:`moeless_jax.moe.experts.slotwise_swiglu`)
        or ``auto``: ``capacity`` on an accelerator backend, ``ragged`` on CPU (see
        :func:`moeless_jax.moe.capacity.resolve_expert_kernel`).
      slot_capacity_factor: ``capacity`` kernel: the largest per-slot buffer, in rows relative to a
        balanced slot's rows (rows past it take the slower ragged overflow path). On real DeepSeek-V2-Lite
        routings with replicated tables the fullest slot held 1.3-2x a balanced slot's rows
        (``results/emulate``), hence the default 2.
      slot_capacity_ratio: ``capacity`` kernel: ratio between consecutive compiled per-slot buffers, from a
        balanced slot's rows up to ``slot_capacity_factor``; each device computes with the smallest that holds
        its fullest slot (see :func:`moeless_jax.moe.capacity.slot_capacities`). ``None``: one buffer.
      overflow_fraction: ``capacity`` kernel: rows of the ragged overflow path (rows past the largest slot
        buffer) as a fraction of a device's balanced rows. ``None`` (default): as many as the device can
        receive, so a call with the default buffers computes every row in one go (the overflow path runs only
        when a slot spills, so its size costs memory, not time). A fraction bounds it: rows past it are not
        computed and are counted in ``overflow`` (retry with :func:`moeless_jax.moe.call_dropless`).
      dtype: parameter and activation dtype.
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    num_devices: int = 1
    slots_per_device: int = 1
    router: RouterKind = "mixtral"
    renormalize: bool = True
    num_expert_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    d_ff_shared: int | None = None
    backend: Backend = "dense"
    capacity_factor: float | None = None
    split: Split = "even"
    split_iterations: int = SPLIT_ITERATIONS
    expert_kernel: ExpertKernel = "ragged"
    slot_capacity_factor: float = 2.0
    slot_capacity_ratio: float | None = SLOT_CAPACITY_RATIO
    overflow_fraction: float | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        require_positive_ints(
            self,
            "d_model", "d_ff", "num_experts", "top_k", "num_devices", "slots_per_device"
        )
        require(
            self.top_k <= self.num_experts,
            "top_k",
            f"{self.top_k} exceeds num_experts {self.num_experts}; choose top_k <= num_experts",
        )
        require(
            self.num_devices * self.slots_per_device >= self.num_experts,
            "slots_per_device",
            f"{self.num_devices} devices x {self.slots_per_device} slots cannot hold {self.num_experts} "
            f"experts once each; use slots_per_device >= {-(-self.num_experts // self.num_devices)}",
        )
        require(self.router in ROUTERS, "router", f"'{self.router}' is not one of {'|'.join(ROUTERS)}")
        require_positive_ints(self, "num_expert_groups", "topk_groups")
        require(
            self.num_experts % self.num_expert_groups == 0,
            "num_expert_groups",
            f"{self.num_expert_groups} groups do not divide {self.num_experts} experts evenly",
        )
        require(
            self.topk_groups <= self.num_expert_groups,
            "topk_groups",
            f"{self.topk_groups} exceeds num_expert_groups {self.num_expert_groups}",
        )
        require(
            self.num_expert_groups == 1 or self.router == "deepseek_v3",
            "num_expert_groups",
            f"group-limited routing needs router 'deepseek_v3', got '{self.router}'",
        )
        require(
            self.topk_groups * (self.num_experts // self.num_expert_groups) >= self.top_k,
            "topk_groups",
            f"{self.topk_groups} groups of {self.num_experts // self.num_expert_groups} experts cannot hold "
            f"top_k={self.top_k} experts; raise topk_groups",
        )
        require(
            self.routed_scaling_factor > 0,
            "routed_scaling_factor",
            f"must be positive, got {self.routed_scaling_factor}",
        )
        require(self.backend in ("dense", "ragged"), "backend", f"'{self.backend}' is not dense|ragged")
        require(
            isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0,
            "num_shared_experts",
            f"must be a non-negative integer, got {self.num_shared_experts!r}",
        )
        require(
            self.d_ff_shared is None or (isinstance(self.d_ff_shared, int) and self.d_ff_shared >= 1),
            "d_ff_shared",
            f"must be a positive integer or null, got {self.d_ff_shared!r}",
        )
        require(
            self.capacity_factor is None or self.capacity_factor > 0,
            "capacity_factor",
            f"must be positive or null (worst-case buffer), got {self.capacity_factor!r}",
        )
        require(self.split in SPLITS, "split", f"'{self.split}' is not one of {'|'.join(SPLITS)}")
        require(
            isinstance(self.split_iterations, int) and self.split_iterations >= 1,
            "split_iterations",
            f"must be a positive integer, got {self.split_iterations!r}",
        )
        require(
            self.expert_kernel in EXPERT_KERNELS,
            "expert_kernel",
            f"'{self.expert_kernel}' is not one of {'|'.join(EXPERT_KERNELS)}",
        )
        require(
            self.slot_capacity_factor > 0,
            "slot_capacity_factor",
            f"must be positive, got {self.slot_capacity_factor}",
        )
        require(
            self.slot_capacity_ratio is None or self.slot_capacity_ratio > 1,
            "slot_capacity_ratio",
            f"must be > 1 (or null for one buffer size), got {self.slot_capacity_ratio}",
        )
        require(
            self.overflow_fraction is None or self.overflow_fraction > 0,
            "overflow_fraction",
            f"must be positive or null (every row the device can receive), got {self.overflow_fraction}",
        )
        require(self.dtype in DTYPES, "dtype", f"'{self.dtype}' is not one of {DTYPES}")

    @property
    def group_limit(self) -> GroupLimit:
        return GroupLimit(self.num_expert_groups, self.topk_groups)

    @property
    def num_slots(self) -> int:
        return self.num_devices * self.slots_per_device

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the fused shared-expert MLP (0 without shared experts)."""
        return self.num_shared_experts * (self.d_ff_shared or self.d_ff)
