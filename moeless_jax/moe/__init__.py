"""The replicated expert-parallel MoE layer and its parts."""

from moeless_jax.moe.capacity import (
    Buffers,
    buffer_ladder,
    call_dropless,
    default_buffers,
    dispatch_capacity,
    worst_case_buffers,
)
from moeless_jax.moe.config import MoEConfig
from moeless_jax.moe.dispatch import Assignments, assign_slots
from moeless_jax.moe.experts import (
    MLPWeights,
    capacity_swiglu,
    grouped_swiglu,
    init_mlp_weights,
    slotwise_swiglu,
    swiglu,
)
from moeless_jax.moe.layer import (
    DATA_AXIS,
    EP_AXIS,
    MoELayer,
    MoEOutput,
    MoEParams,
    RouterBias,
    ShapeError,
    SwiGLUWeights,
    make_ep_mesh,
    moe_forward,
    place,
    tie_replica_grads,
    token_axes,
)
from moeless_jax.moe.optimizer_state import follow_moves
from moeless_jax.moe.reference import dense_moe_reference
from moeless_jax.moe.replica_table import EMPTY, ReplicaTable, ReplicaTableError, TableArrays
from moeless_jax.moe.router import Routing, route, router_losses
from moeless_jax.moe.slot_weights import Move, MovePlan, apply_moves, materialize_slot_weights, plan_moves
from moeless_jax.moe.weight_moves import SlotMoves, move_slot_weights, moved_bytes, slot_moves

__all__ = [
    "DATA_AXIS",
    "EMPTY",
    "EP_AXIS",
    "Assignments",
    "Buffers",
    "MLPWeights",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "MoEParams",
    "Move",
    "MovePlan",
    "ReplicaTable",
    "ReplicaTableError",
    "RouterBias",
    "Routing",
    "ShapeError",
    "SlotMoves",
    "SwiGLUWeights",
    "TableArrays",
    "apply_moves",
    "assign_slots",
    "buffer_ladder",
    "call_dropless",
    "capacity_swiglu",
    "default_buffers",
    "dense_moe_reference",
    "dispatch_capacity",
    "follow_moves",
    "grouped_swiglu",
    "init_mlp_weights",
    "make_ep_mesh",
    "materialize_slot_weights",
    "moe_forward",
    "move_slot_weights",
    "moved_bytes",
    "place",
    "plan_moves",
    "route",
    "slot_moves",
    "slotwise_swiglu",
    "router_losses",
    "swiglu",
    "tie_replica_grads",
    "token_axes",
    "worst_case_buffers",
]
