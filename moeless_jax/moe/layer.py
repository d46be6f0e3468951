"""The replicated expert-parallel MoE layer: a pure function and its Flax NNX module.

Tokens ``[T, M]`` are sharded over mesh axis ``ep`` (T/D per device); physical slot weights ``[P, ...]``
are sharded over ``ep`` (S per device); router, shared experts and the replica table are replicated.
One step: route -> assign slots (table + split) -> dispatch -> grouped SwiGLU -> return -> combine.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moeless_jax.moe.capacity import Buffers, default_buffers
from moeless_jax.moe.config import MoEConfig
from moeless_jax.moe.dispatch import BACKENDS, assign_slots
from moeless_jax.moe.experts import MLPWeights, capacity_swiglu, grouped_swiglu, init_mlp_weights, swiglu
from moeless_jax.moe.replica_table import ReplicaTable, TableArrays
from moeless_jax.moe.router import Routing, route
from moeless_jax.moe.slot_weights import (
    MovePlan,
    apply_moves,
    expert_bytes,
    materialize_slot_weights,
    plan_moves,
)

EP_AXIS = "ep"


class ShapeError(ValueError):
    """An input does not have the shape the layer's config requires."""


class MoEParams(NamedTuple):
    """Parameters of a replicated MoE layer.

    router: [M, E]; experts: slot weights with leading axis P (sharded over ``ep``);
    shared: 2-D SwiGLU weights of the fused shared experts, or None.
    """

    router: jax.Array
    experts: MLPWeights
    shared: MLPWeights | None


class MoEOutput(NamedTuple):
    """Layer output and the load statistics the planner and predictors consume.

    y: [T, M]; slot_counts: [P] assignments per physical slot (sum = T * K);
    expert_counts: [E] assignments per logical expert; overflow: [] assignments that did not fit the
    dispatch buffer (always 0 with the worst-case buffer; non-zero means y is incomplete: retry larger).
    """

    y: jax.Array
    slot_counts: jax.Array
    expert_counts: jax.Array
    overflow: jax.Array


def make_ep_mesh(num_devices: int, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis ``ep`` over the first ``num_devices`` devices (by position, not id)."""
    available = list(devices) if devices is not None else jax.devices()
    if num_devices > len(available):
        raise ValueError(
            f"num_devices={num_devices} but only {len(available)} devices are visible; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} before importing jax"
        )
    return jax.make_mesh(
        (num_devices,),
        (EP_AXIS,),
        axis_types=(jax.sharding.AxisType.Explicit,),
        devices=available[:num_devices],
    )


def param_specs(has_shared: bool) -> MoEParams:
    """PartitionSpecs of :class:`MoEParams` over the ``ep`` axis."""
    slot = MLPWeights(P(EP_AXIS), P(EP_AXIS), P(EP_AXIS))
    shared = MLPWeights(P(), P(), P()) if has_shared else None
    return MoEParams(P(), slot, shared)


def _check_inputs(config: MoEConfig, params: MoEParams, x: jax.Array, mesh: jax.sharding.Mesh) -> None:
    if mesh.shape.get(EP_AXIS) != config.num_devices:
        raise ShapeError(
            f"mesh axis '{EP_AXIS}' has {dict(mesh.shape)}; config.num_devices is {config.num_devices}"
        )
    if x.ndim != 2 or x.shape[1] != config.d_model:
        raise ShapeError(f"x has shape {x.shape}; expected [tokens, d_model={config.d_model}]")
    if x.shape[0] % config.num_devices:
        raise ShapeError(
            f"x has {x.shape[0]} tokens, not divisible by num_devices={config.num_devices}; pad the batch"
        )
    want = (config.num_slots, config.d_model, config.d_ff)
    if params.experts.gate.shape != want:
        raise ShapeError(
            f"slot weights gate has shape {params.experts.gate.shape}; expected {want} = (P, M, F)"
        )
    if params.router.shape != (config.d_model, config.num_experts):
        raise ShapeError(
            f"router has shape {params.router.shape}; expected ({config.d_model}, {config.num_experts})"
        )


def moe_forward(
    params: MoEParams,
    table: TableArrays,
    x: jax.Array,
    *,
    config: MoEConfig,
    mesh: jax.sharding.Mesh,
    buffers: Buffers | None = None,
    routing: tuple[jax.Array, jax.Array] | None = None,
) -> MoEOutput:
    """Apply the replicated MoE layer to ``x [T, M]`` (T divisible by D).

    ``table`` is data: any valid table of the config's (E, D, S) runs without recompiling, as long as
    ``params.experts`` holds the weights materialised for it. ``buffers`` (static) overrides the buffer
    sizes that the config implies (see :mod:`moeless_jax.moe.capacity`). ``routing``, if given, replaces the
    router: ``(expert_ids [T, K] int32, weights [T, K])``, each row ``K`` distinct experts, e.g. to replay a
    routing trace (checked when the arrays are concrete; under a trace only shapes are checked).
    """
    _check_inputs(config, params, x, mesh)
    extra = () if routing is None else _checked_routing(routing, config, x.shape[0])
    if buffers is None:
        buffers = default_buffers(config, x.shape[0] // config.num_devices)
    shard = partial(_moe_shard, config=config, buffers=buffers)
    specs = param_specs(params.shared is not None)
    # Explicit-sharding meshes want inputs laid out as in_specs say; these are no-ops when they already are.
    x = jax.reshard(x, NamedSharding(mesh, P(EP_AXIS)))
    extra = tuple(jax.reshard(a, NamedSharding(mesh, P(EP_AXIS))) for a in extra)
    params = jax.tree.map(lambda a, spec: jax.reshard(a, NamedSharding(mesh, spec)), params, specs)
    table = TableArrays(*(jax.reshard(a, NamedSharding(mesh, P())) for a in table))
    return jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(specs, TableArrays(P(), P(), P()), P(EP_AXIS), *(P(EP_AXIS) for _ in extra)),
        out_specs=MoEOutput(P(EP_AXIS), P(), P(), P()),
    )(params, table, x, *extra)


def _checked_routing(routing, config: MoEConfig, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    expert_ids, weights = routing
    want = (num_tokens, config.top_k)
    if tuple(expert_ids.shape) != want or tuple(weights.shape) != want:
        raise ShapeError(f"routing arrays have shapes {tuple(expert_ids.shape)} and {tuple(weights.shape)}; "
                         f"expected [tokens, top_k] = {want}")
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise ShapeError(f"routing expert_ids must be integers, got {expert_ids.dtype}")
    if not isinstance(expert_ids, jax.core.Tracer):
        ids = np.asarray(expert_ids)
        if ids.min() < 0 or ids.max() >= config.num_experts:
            raise ShapeError(f"routing expert_ids must lie in 0..{config.num_experts - 1}, "
                             f"got {ids.min()}..{ids.max()}")
        ordered = np.sort(ids, axis=1)
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise ShapeError("routing expert_ids repeat an expert within a token's row; each row needs "
                             f"{config.top_k} distinct experts")
    return jnp.asarray(expert_ids, jnp.int32), jnp.asarray(weights, jnp.float32)


def _given_routing(expert_ids: jax.Array, weights: jax.Array, num_experts: int) -> Routing:
    counts = jnp.zeros(num_experts, jnp.int32).at[expert_ids.reshape(-1)].add(1)
    return Routing(weights, expert_ids, counts)


def _moe_shard(params: MoEParams, table: TableArrays, x: jax.Array, *given, config: MoEConfig,
               buffers: Buffers):
    """One device's share: x [T/D, M], slot weights [S, ...]; ``given`` = (expert_ids, weights) or ()."""
    if given:
        routing = _given_routing(*given, config.num_experts)
    else:
        routing = route(x, params.router, top_k=config.top_k, kind=config.router,
                        renormalize=config.renormalize)
    a = assign_slots(
        routing.expert_ids,
        table,
        slots_per_device=config.slots_per_device,
        axis_name=EP_AXIS,
        split=config.split,
        split_iterations=config.split_iterations,
    )
    send, receive = BACKENDS[config.backend]
    rows, local_slot, state = send(
        x,
        a,
        num_devices=config.num_devices,
        slots_per_device=config.slots_per_device,
        capacity=buffers.dispatch_rows,
        axis_name=EP_AXIS,
    )
    if buffers.slot_rows is None:
        y_rows, uncomputed = grouped_swiglu(rows, local_slot, params.experts), jnp.int32(0)
    else:
        y_rows, uncomputed = capacity_swiglu(
            rows, local_slot, params.experts, capacity=buffers.slot_rows, overflow_rows=buffers.overflow_rows
        )
    y_assign = receive(y_rows, state, num_devices=config.num_devices, axis_name=EP_AXIS)
    weights = routing.weights.reshape(-1, 1).astype(jnp.float32)
    y = (
        jnp.zeros((x.shape[0], x.shape[1]), jnp.float32)
        .at[a.token]
        .add(weights * y_assign.astype(jnp.float32))
    )
    if params.shared is not None:
        y = y + swiglu(x, params.shared).astype(jnp.float32)
    slot_counts = jnp.zeros(table.slot_to_expert.shape[0], jnp.int32).at[a.slot].add(1)
    return MoEOutput(
        y.astype(x.dtype),
        jax.lax.psum(slot_counts, EP_AXIS),
        jax.lax.psum(routing.expert_counts, EP_AXIS),
        jax.lax.psum(state.overflow + uncomputed, EP_AXIS),
    )


# ---------------------------------------------------------------------------------------------- NNX module
class TableVar(nnx.Variable):
    """Replica-table arrays held by a layer: data, so a new table never changes the graph."""


class MoELayer(nnx.Module):
    """Flax NNX MoE layer with experts replicated over physical slots on an ``ep`` mesh.

    The layer owns its slot weights *and* the table they were materialised for, so the two can never
    disagree: :meth:`set_table` moves weights and swaps the table together, and returns the move plan.
    """

    def __init__(
        self,
        config: MoEConfig,
        *,
        mesh: jax.sharding.Mesh,
        rngs: nnx.Rngs,
        table: ReplicaTable | None = None,
        logical_experts: MLPWeights | None = None,
    ):
        self.config = config
        self.mesh = mesh
        dtype = jnp.dtype(config.dtype)
        table = table or ReplicaTable.static(
            num_experts=config.num_experts,
            num_devices=config.num_devices,
            slots_per_device=config.slots_per_device,
        )
        table.check_layout(
            num_experts=config.num_experts,
            num_devices=config.num_devices,
            slots_per_device=config.slots_per_device,
        )
        if logical_experts is None:
            logical_experts = init_mlp_weights(
                rngs.params(), (config.num_experts,), config.d_model, config.d_ff, dtype
            )
        replicated = NamedSharding(mesh, P())
        router = jax.random.normal(rngs.params(), (config.d_model, config.num_experts)) / np.sqrt(
            config.d_model
        )
        self.router = nnx.Param(jax.device_put(router.astype(dtype), replicated))
        slots = materialize_slot_weights(logical_experts, table)
        by_slot = NamedSharding(mesh, P(EP_AXIS))
        self.experts = nnx.Param(MLPWeights(*(jax.device_put(w, by_slot) for w in slots)))
        self.shared = None
        if config.num_shared_experts:
            shared = init_mlp_weights(rngs.params(), (), config.d_model, config.shared_hidden, dtype)
            self.shared = nnx.Param(MLPWeights(*(jax.device_put(w, replicated) for w in shared)))
        self.table = TableVar(table.arrays(replicated))

    @property
    def params(self) -> MoEParams:
        return MoEParams(
            self.router[...], self.experts.get_value(), self.shared.get_value() if self.shared else None
        )

    def replica_table(self) -> ReplicaTable:
        """The host-side table the layer's slot weights hold."""
        c = self.config
        return ReplicaTable.from_slot_to_expert(
            np.asarray(self.table.get_value().slot_to_expert),
            num_experts=c.num_experts,
            num_devices=c.num_devices,
            slots_per_device=c.slots_per_device,
        )

    def set_table(self, table: ReplicaTable) -> MovePlan:
        """Move slot weights to ``table`` (only changed slots are copied) and adopt it."""
        c = self.config
        table.check_layout(
            num_experts=c.num_experts, num_devices=c.num_devices, slots_per_device=c.slots_per_device
        )
        weights = self.experts.get_value()
        plan = plan_moves(self.replica_table(), table, bytes_per_expert=expert_bytes(weights))
        self.experts.set_value(apply_moves(weights, plan))
        self.table.set_value(table.arrays(NamedSharding(self.mesh, P())))
        return plan

    def __call__(self, x: jax.Array, *, buffers: Buffers | None = None) -> MoEOutput:
        return moe_forward(
            self.params, self.table.get_value(), x, config=self.config, mesh=self.mesh, buffers=buffers
        )
