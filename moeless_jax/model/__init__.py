"""The decoder-only MoE language model built on :class:`moeless_jax.moe.MoELayer`."""

from moeless_jax.model.attention import KVCache, RMSNorm, apply_rope, init_cache
from moeless_jax.model.checkpoint import CheckpointInfo, load_model, read_checkpoint, save_model
from moeless_jax.model.config import (
    PRESETS,
    ModelConfig,
    MoESection,
    default_slots_per_device,
    param_count,
    preset,
)
from moeless_jax.model.transformer import Block, ModelOutput, MoETransformer, generate, loss_fn

__all__ = [
    "PRESETS",
    "Block",
    "CheckpointInfo",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "MoESection",
    "MoETransformer",
    "RMSNorm",
    "apply_rope",
    "default_slots_per_device",
    "generate",
    "init_cache",
    "load_model",
    "loss_fn",
    "param_count",
    "preset",
    "read_checkpoint",
    "save_model",
]
