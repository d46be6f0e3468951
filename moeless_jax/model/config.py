"""Configuration of the decoder-only MoE language model, its presets and YAML loading."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeless_jax.config import (
    ConfigError,
    config_from_dict,
    is_positive_int,
    load_config,
    require,
    require_positive_ints,
)
from moeless_jax.moe.config import DTYPES, MoEConfig


def default_slots_per_device(num_experts: int, num_devices: int) -> int:
    """Slots per device when the config leaves it open: the fewest that hold every expert once,
    ``ceil(E / D)``, plus ``max(1, ceil(E / D) // 4)`` spare slots for replicas of hot experts.

    On one device there are no spares: an expert has at most one replica per device, so a spare slot could
    never be filled.
    """
    base = -(-num_experts // num_devices)
    return base if num_devices == 1 else base + max(1, base // 4)


@dataclass(frozen=True)
class MoESection:
    """The MoE feed-forward of every block.

    Attributes:
      num_experts, top_k, d_ff: routed experts E, experts per token K, hidden size of each routed expert.
      num_shared_experts, d_ff_shared: always-active experts and the hidden size of each (``None``: d_ff).
      router: ``mixtral`` (softmax over the top-k logits), ``deepseek`` (softmax over all, top-k,
        ``renormalize`` optional; DeepSeek-V2) or ``deepseek_v3`` (sigmoid scores, group-limited top-k over
        ``num_expert_groups`` groups keeping ``topk_groups``, weights scaled by ``routed_scaling_factor``).
      expert_kernel, split: how the layer computes experts and splits tokens over replicas (see
        :class:`moeless_jax.moe.MoEConfig`).
      slots_per_device: physical slots per device; ``None`` picks :func:`default_slots_per_device`.
      load_balance_weight, router_z_weight: weights of the layer's auxiliary losses in :func:`loss_fn`.
    """

    num_experts: int
    top_k: int
    d_ff: int
    num_shared_experts: int = 0
    d_ff_shared: int | None = None
    router: str = "mixtral"
    renormalize: bool = True
    num_expert_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    expert_kernel: str = "capacity"
    split: str = "balanced"
    slots_per_device: int | None = None
    load_balance_weight: float = 0.01
    router_z_weight: float = 0.001

    def __post_init__(self) -> None:
        slots = self.slots_per_device
        require(slots is None or is_positive_int(slots), "moe.slots_per_device",
                f"must be a positive integer or null, got {slots!r}")
        for name in ("load_balance_weight", "router_z_weight"):
            value = getattr(self, name)
            require(isinstance(value, int | float) and not isinstance(value, bool) and value >= 0,
                    f"moe.{name}", f"must be a non-negative number, got {value!r}")
        # The layer's own checks, on a one-device layout, so a bad section fails when the config is built.
        try:
            self.layer_config(num_devices=1, slots_per_device=self.num_experts, d_model=1, dtype="float32")
        except ConfigError as err:
            raise ConfigError(f"moe.{err}") from None

    def layer_config(self, *, num_devices: int, slots_per_device: int, d_model: int, dtype: str) -> MoEConfig:
        """The :class:`MoEConfig` of this section for a layer of width ``d_model`` on ``num_devices``."""
        return MoEConfig(
            d_model=d_model,
            d_ff=self.d_ff,
            num_experts=self.num_experts,
            top_k=self.top_k,
            num_devices=num_devices,
            slots_per_device=slots_per_device,
            router=self.router,
            renormalize=self.renormalize,
            num_expert_groups=self.num_expert_groups,
            topk_groups=self.topk_groups,
            routed_scaling_factor=self.routed_scaling_factor,
            num_shared_experts=self.num_shared_experts,
            d_ff_shared=self.d_ff_shared,
            split=self.split,
            expert_kernel=self.expert_kernel,
            dtype=dtype,
        )


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer whose every feed-forward is a replicated MoE layer.

    Attributes:
      vocab_size, d_model, num_layers: vocabulary V, hidden size M, blocks L.
      num_heads, num_kv_heads, head_dim: query heads H, key/value heads (grouped-query attention:
        ``num_heads % num_kv_heads == 0``) and the size of each head.
      rope_theta: RoPE base; max_seq_len: longest sequence (prompt plus generated tokens).
      norm_eps: RMSNorm epsilon; tie_embeddings: the output projection is the embedding's transpose.
      dtype: parameter and activation dtype (attention softmax, router and logits run in float32).
      moe: the :class:`MoESection` (a mapping in YAML).
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe: MoESection
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", config_from_dict(MoESection, self.moe, source="moe"))
        require(isinstance(self.moe, MoESection), "moe", f"must be a mapping of MoE fields, got {self.moe!r}")
        require_positive_ints(
            self,
            "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_seq_len"
        )
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                f"{self.num_kv_heads} does not divide num_heads {self.num_heads}; grouped-query attention "
                "shares each key/value head among num_heads / num_kv_heads query heads")
        require(self.head_dim % 2 == 0, "head_dim", f"RoPE rotates pairs of dimensions; {self.head_dim} is "
                "odd")
        require(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta!r}")
        require(0 < self.norm_eps < 1, "norm_eps", f"must lie in (0, 1), got {self.norm_eps!r}")
        require(isinstance(self.tie_embeddings, bool), "tie_embeddings",
                f"must be true|false, got {self.tie_embeddings!r}")
        require(self.dtype in DTYPES, "dtype", f"'{self.dtype}' is not one of {DTYPES}")

    # ------------------------------------------------------------------ derived
    def moe_config(self, num_devices: int) -> MoEConfig:
        """The :class:`MoEConfig` of each block's MoE layer on ``num_devices`` devices of the ``ep`` axis."""
        require(is_positive_int(num_devices), "num_devices",
                f"must be a positive integer, got {num_devices!r}")
        slots = self.moe.slots_per_device or default_slots_per_device(self.moe.num_experts, num_devices)
        return self.moe.layer_config(
            num_devices=num_devices, slots_per_device=slots, d_model=self.d_model, dtype=self.dtype
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (YAML/JSON-ready) that :func:`config_from_mapping` turns back into this config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path, *, section: str | None = None) -> ModelConfig:
        """Load from a YAML file (optionally one top-level ``section``); unknown keys are errors."""
        return load_config(cls, path, section=section)


def config_from_mapping(data: dict[str, Any], *, source: str = "model config") -> ModelConfig:
    """Build a :class:`ModelConfig` from :meth:`ModelConfig.to_dict` output, rejecting unknown keys."""
    return config_from_dict(ModelConfig, data, source=source)


PRESETS: dict[str, ModelConfig] = {
    "mixtral_tiny": ModelConfig(
        vocab_size=4096,
        d_model=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_seq_len=256,
        rope_theta=10000.0,
        norm_eps=1e-5,
        moe=MoESection(num_experts=8, top_k=2, d_ff=192, router="mixtral"),
    ),
    "deepseek_tiny": ModelConfig(
        vocab_size=4096,
        d_model=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_seq_len=256,
        rope_theta=10000.0,
        norm_eps=1e-6,
        moe=MoESection(
            num_experts=64,
            top_k=6,
            d_ff=48,
            num_shared_experts=2,
            d_ff_shared=48,
            router="deepseek",
            renormalize=False,
        ),
    ),
}


def preset(name: str) -> ModelConfig:
    """The named preset; an unknown name raises :class:`ConfigError` listing the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"model preset '{name}' is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def param_count(config: ModelConfig) -> int:
    """Parameters of the model (logical experts, i.e. independent of replication)."""
    m, moe = config.d_model, config.moe
    attention = m * (config.q_dim + 2 * config.kv_dim) + config.q_dim * m + 2 * m
    shared_hidden = moe.num_shared_experts * (moe.d_ff_shared or moe.d_ff)
    experts = 3 * m * (moe.num_experts * moe.d_ff + shared_hidden) + m * moe.num_experts
    head = 0 if config.tie_embeddings else config.vocab_size * m
    return config.vocab_size * m + head + m + config.num_layers * (attention + experts)

