"""Optimizer state that follows a layer's replica table.

:class:`~moeless_jax.moe.MoELayer` gives every replica of an expert the same gradient, so replicas that start
equal stay equal. When a table changes, :meth:`MoELayer.set_table` copies weights into the changed slots; an
optimizer's per-parameter state (Adam's moments) must be copied the same way, or a new replica would be
updated with another expert's moments. :func:`follow_moves` does that for an ``nnx.Optimizer`` (or any NNX
object whose state mirrors the model's parameter paths, as optax states inside ``nnx.Optimizer`` do).
"""

from __future__ import annotations

import jax
from flax import nnx

from moeless_jax.moe.layer import MoELayer
from moeless_jax.moe.slot_weights import MovePlan, apply_moves

_SLOT_PARAMS = ("gate", "up", "down")


def layer_path(model: nnx.Module, layer: MoELayer) -> tuple:
    """The attribute path of ``layer`` inside ``model`` (e.g. ``('blocks', 0, 'moe')``)."""
    for path, node in nnx.iter_graph(model):
        if node is layer:
            return tuple(path)
    raise ValueError("layer is not part of model; pass the model that holds the MoE layer")


def follow_moves(optimizer: nnx.Module, model: nnx.Module, layer: MoELayer, plan: MovePlan) -> int:
    """Apply ``plan``'s slot copies to every optimizer-state array that mirrors ``layer``'s slot weights.

    Call it right after ``plan = layer.set_table(table)``. Returns how many state arrays were moved (e.g. 6
    for Adam: two moments of three weight arrays); 0 when the plan moves nothing. Raises if the optimizer
    holds no state for the layer's slot weights, so a mismatched optimizer cannot pass silently.
    """
    if not plan.moves:
        return 0
    num_slots = layer.config.num_slots
    prefix = (*layer_path(model, layer), "experts")
    suffixes = {(*prefix, name) for name in _SLOT_PARAMS}
    state = nnx.state(optimizer)
    flat = nnx.to_flat_state(state)
    moved = {}
    for path, variable in flat:
        if tuple(path[-len(prefix) - 1 :]) not in suffixes:
            continue
        value = variable.get_value()
        if isinstance(value, jax.Array) and value.ndim >= 1 and value.shape[0] == num_slots:
            moved[tuple(path)] = value
    if not moved:
        raise ValueError(
            "the optimizer holds no state for this layer's slot weights; build it with "
            "nnx.Optimizer(model, tx, wrt=nnx.Param) over the model that holds the layer (a stateless "
            "optimizer such as plain SGD has nothing to move: skip follow_moves)"
        )
    after = apply_moves(moved, plan)
    for path, variable in flat:
        if tuple(path) in after:
            variable.set_value(after[tuple(path)])
    nnx.update(optimizer, state)
    return len(after)
