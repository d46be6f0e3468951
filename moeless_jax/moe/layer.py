"""The replicated expert-parallel MoE layer: a pure function and its Flax NNX module.

Tokens ``[T, M]`` are sharded over every mesh axis (``ep``, and ``data`` on a data x expert mesh); physical
slot weights ``[P, ...]`` are sharded over ``ep`` (S per device) and replicated over ``data``; router, shared
experts and the replica table are replicated. Each data shard dispatches only its own tokens, within its own
``ep`` group. One step: route -> assign slots (table + split) -> dispatch -> grouped SwiGLU -> return ->
combine.
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
from moeless_jax.moe.experts import (
    MLPWeights,
    capacity_swiglu,
    grouped_swiglu,
    init_mlp_weights,
    slotwise_swiglu,
    swiglu,
)
from moeless_jax.moe.replica_table import ReplicaTable, TableArrays
from moeless_jax.moe.router import Routing, route, router_loss_sums, router_losses
from moeless_jax.moe.slot_weights import (
    MovePlan,
    apply_moves,
    expert_bytes,
    materialize_slot_weights,
    plan_moves,
)

EP_AXIS = "ep"
DATA_AXIS = "data"


class ShapeError(ValueError):
    """An input does not have the shape the layer's config requires."""


class MoEParams(NamedTuple):
    """Parameters of a replicated MoE layer.

    router: [M, E]; experts: slot weights with leading axis P (sharded over ``ep``);
    shared: 2-D SwiGLU weights of the fused shared experts, or None;
    router_bias: [E] ``deepseek_v3`` load-balancing bias (chooses experts, never weighs them), or None.
    """

    router: jax.Array
    experts: MLPWeights
    shared: MLPWeights | None
    router_bias: jax.Array | None = None


class MoEOutput(NamedTuple):
    """Layer output and the load statistics the planner and predictors consume.

    y: [T, M]; slot_counts: [P] assignments per physical slot (sum = T * K);
    expert_counts: [E] assignments per logical expert; overflow: [] assignments that did not fit the
    dispatch buffer (always 0 with the worst-case buffer; non-zero means y is incomplete: retry larger);
    load_balance_loss: [] Switch/Mixtral auxiliary loss, 1.0 when balanced (0 for a given routing);
    router_z_loss: [] mean squared logsumexp of the router logits (0 for a given routing);
    expert_ids: [T, K] int32 each token's logical experts (sharded like y): what an in-step forecaster
    reads of this layer's routing (RoutingOnly), before the experts have run.
    """

    y: jax.Array
    slot_counts: jax.Array
    expert_counts: jax.Array
    overflow: jax.Array
    load_balance_loss: jax.Array
    router_z_loss: jax.Array
    expert_ids: jax.Array


def make_ep_mesh(
    num_devices: int,
    devices: Sequence[jax.Device] | None = None,
    *,
    data: int = 1,
    axis_type: jax.sharding.AxisType = jax.sharding.AxisType.Explicit,
) -> jax.sharding.Mesh:
    """A mesh with axis ``ep`` over ``num_devices`` devices, or ``(data, ep)`` when ``data > 1``.

    Devices are taken by position, not id. ``axis_type``: ``Explicit`` (sharding in types, jax's default) or
    ``Auto``; the layer works on both.
    """
    available = list(devices) if devices is not None else jax.devices()
    needed = num_devices * data
    if num_devices < 1 or data < 1:
        raise ValueError(f"num_devices and data must be positive, got {num_devices} and {data}")
    if needed > len(available):
        raise ValueError(
            f"num_devices={num_devices} x data={data} needs {needed} devices but only {len(available)} are "
            f"visible; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={needed} before "
            "importing jax"
        )
    if data == 1:
        return jax.make_mesh((num_devices,), (EP_AXIS,), axis_types=(axis_type,), devices=available[:needed])
    return jax.make_mesh(
        (data, num_devices), (DATA_AXIS, EP_AXIS), axis_types=(axis_type,) * 2, devices=available[:needed]
    )


def token_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """Mesh axes a layer's tokens are split over: every axis of the mesh, ``data`` before ``ep``."""
    return tuple(mesh.axis_names)


def place(a: jax.Array, mesh: jax.sharding.Mesh, spec: P) -> jax.Array:
    """Lay ``a`` out as ``spec`` on ``mesh``: ``reshard`` on an Explicit mesh, a sharding constraint on an
    Auto one (which ``reshard`` rejects). Inside jit and out."""
    sharding = NamedSharding(mesh, spec)
    if mesh.explicit_axes:
        return jax.reshard(a, sharding)
    return jax.lax.with_sharding_constraint(a, sharding)


def param_specs(has_shared: bool, has_bias: bool = False) -> MoEParams:
    """PartitionSpecs of :class:`MoEParams` over the ``ep`` axis."""
    slot = MLPWeights(P(EP_AXIS), P(EP_AXIS), P(EP_AXIS))
    shared = MLPWeights(P(), P(), P()) if has_shared else None
    return MoEParams(P(), slot, shared, P() if has_bias else None)


def _check_inputs(config: MoEConfig, params: MoEParams, x: jax.Array, mesh: jax.sharding.Mesh) -> None:
    if mesh.shape.get(EP_AXIS) != config.num_devices:
        raise ShapeError(
            f"mesh axis '{EP_AXIS}' has {dict(mesh.shape)}; config.num_devices is {config.num_devices}"
        )
    if x.ndim != 2 or x.shape[1] != config.d_model:
        raise ShapeError(f"x has shape {x.shape}; expected [tokens, d_model={config.d_model}]")
    if x.shape[0] % mesh.size:
        raise ShapeError(
            f"x has {x.shape[0]} tokens, not divisible by the mesh's {mesh.size} devices; pad the batch"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ShapeError(
            f"x must hold floating-point activations, got dtype {x.dtype}; embed token ids first"
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
    if (params.router_bias is not None) != (config.router == "deepseek_v3"):
        raise ShapeError(
            f"router_bias is {'set' if params.router_bias is not None else 'None'} but router is "
            f"'{config.router}'; only deepseek_v3 routing takes a bias"
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
    """Apply the replicated MoE layer to ``x [T, M]`` (T divisible by the mesh's device count).

    ``table`` is data: any valid table of the config's (E, D, S) runs without recompiling, as long as
    ``params.experts`` holds the weights materialised for it. ``buffers`` (static) overrides the buffer
    sizes that the config implies (see :mod:`moeless_jax.moe.capacity`). ``routing``, if given, replaces the
    router: ``(expert_ids [T, K] int32, weights [T, K])``, each row ``K`` distinct experts, e.g. to replay a
    routing trace (checked when the arrays are concrete; under a trace only shapes are checked).
    """
    _check_inputs(config, params, x, mesh)
    extra = () if routing is None else _checked_routing(routing, config, x.shape[0])
    if buffers is None:
        buffers = default_buffers(config, x.shape[0] // mesh.size)
    shard = partial(_moe_shard, config=config, buffers=buffers, token_axes=token_axes(mesh))
    specs = param_specs(params.shared is not None, params.router_bias is not None)
    tokens = P(token_axes(mesh))
    given_spec = _explicit_spec(x, mesh)
    x = place(x, mesh, tokens)
    extra = tuple(place(a, mesh, tokens) for a in extra)
    params = jax.tree.map(lambda a, spec: place(a, mesh, spec), params, specs)
    table = TableArrays(*(place(a, mesh, P()) for a in table))
    out = jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(specs, TableArrays(P(), P(), P()), tokens, *(tokens for _ in extra)),
        out_specs=MoEOutput(tokens, P(), P(), P(), P(), P(), tokens),
    )(params, table, x, *extra)
    # The output takes the layout the input came with, so the layer drops into any model's sharding.
    return out if given_spec is None else out._replace(y=jax.reshard(out.y, NamedSharding(mesh, given_spec)))


def _explicit_spec(x: jax.Array, mesh: jax.sharding.Mesh) -> P | None:
    """The PartitionSpec ``x`` carries in its type on an Explicit ``mesh``, or None (Auto mesh, no mesh)."""
    if not mesh.explicit_axes:
        return None
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec, on = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or on is None or on.empty or tuple(on.axis_names) != tuple(mesh.axis_names):
        return None
    return spec


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
               buffers: Buffers, token_axes: tuple[str, ...]):
    """One device's share: x [T/N, M], slot weights [S, ...]; ``given`` = (expert_ids, weights) or ()."""
    if given:
        routing = _given_routing(*given, config.num_experts)
    else:
        routing = route(x, params.router, top_k=config.top_k, kind=config.router,
                        renormalize=config.renormalize, bias=params.router_bias,
                        group_limit=config.group_limit, scaling=config.routed_scaling_factor)
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
        kernel = slotwise_swiglu if config.expert_kernel == "slotwise" else capacity_swiglu
        y_rows, uncomputed = kernel(
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
    expert_counts = jax.lax.psum(routing.expert_counts, token_axes)
    if routing.logits is None:
        balance, z = jnp.float32(0), jnp.float32(0)
    else:
        sums = jax.lax.psum(router_loss_sums(routing.logits, config.router), token_axes)
        balance, z = router_losses(sums, expert_counts, config.top_k)
    return MoEOutput(
        y.astype(x.dtype),
        jax.lax.psum(slot_counts, token_axes),
        expert_counts,
        jax.lax.psum(state.overflow + uncomputed, token_axes),
        balance,
        z,
        routing.expert_ids.astype(jnp.int32),
    )


# ---------------------------------------------------------------------------------------------- NNX module
class TableVar(nnx.Variable):
    """Replica-table arrays held by a layer: data, so a new table never changes the graph."""


class RouterBias(nnx.Variable):
    """``deepseek_v3`` load-balancing bias [E]: state, not a parameter (no gradient, no optimizer)."""


class SwiGLUWeights(nnx.Module):
    """SwiGLU weights as three :class:`nnx.Param` (so optimizers and ``nnx.state`` see plain arrays).

    gate, up: [N?, M, F]; down: [N?, F, M] (N: slot axis for routed experts, absent for shared ones).
    """

    def __init__(self, weights: MLPWeights):
        self.gate = nnx.Param(weights.gate)
        self.up = nnx.Param(weights.up)
        self.down = nnx.Param(weights.down)

    def weights(self) -> MLPWeights:
        return MLPWeights(self.gate[...], self.up[...], self.down[...])

    def set_weights(self, weights: MLPWeights) -> None:
        self.gate.set_value(weights.gate)
        self.up.set_value(weights.up)
        self.down.set_value(weights.down)


class MoELayer(nnx.Module):
    """Flax NNX MoE layer with experts replicated over physical slots on an ``ep`` mesh.

    The layer owns its slot weights *and* the table they were materialised for, so the two can never
    disagree: :meth:`set_table` moves weights and swaps the table together, and returns the move plan.

    Training: in :meth:`__call__` the gradient of each slot is the sum over every replica of its expert (the
    gradient of the one logical expert), so replicas that start equal get equal updates from any optimizer and
    never drift apart; :func:`moeless_jax.moe.follow_moves` moves optimizer state with a table change.
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
        if mesh.shape.get(EP_AXIS) != config.num_devices:
            raise ShapeError(
                f"mesh axis '{EP_AXIS}' has {dict(mesh.shape)}; config.num_devices is {config.num_devices}"
            )
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
        self.experts = SwiGLUWeights(MLPWeights(*(jax.device_put(w, by_slot) for w in slots)))
        shared = None
        if config.num_shared_experts:
            shared = init_mlp_weights(rngs.params(), (), config.d_model, config.shared_hidden, dtype)
            shared = SwiGLUWeights(MLPWeights(*(jax.device_put(w, replicated) for w in shared)))
        self.shared = shared
        bias = None
        if config.router == "deepseek_v3":
            bias = RouterBias(jax.device_put(jnp.zeros(config.num_experts, jnp.float32), replicated))
        self.router_bias = bias
        self.table = TableVar(table.arrays(replicated))

    @property
    def params(self) -> MoEParams:
        return MoEParams(
            self.router[...],
            self.experts.weights(),
            self.shared.weights() if self.shared is not None else None,
            self.router_bias[...] if self.router_bias is not None else None,
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

    def logical_experts(self) -> MLPWeights:
        """The ``[E, ...]`` expert weights, read from each expert's first replica (table-independent:
        what a checkpoint stores), replicated over the mesh."""
        first = self.table.get_value().expert_slots[:, 0]
        out = NamedSharding(self.mesh, P())
        return MLPWeights(*(w.at[first].get(out_sharding=out) for w in self.experts.weights()))

    def set_table(self, table: ReplicaTable, *, current: ReplicaTable | None = None) -> MovePlan:
        """Move slot weights to ``table`` (only changed slots are copied) and adopt it.

        The old slot arrays are donated to the copy: arrays read from the layer before this call (e.g. a
        ``layer.params`` held by the caller) are invalid after it. Accepts only a :class:`ReplicaTable`.
        ``current``: the table the layer holds, when the caller tracks it (a controller does); without it the
        layer reads its table back from the device, which waits for any step in flight that outputs it.
        Nothing here blocks otherwise: the copy is dispatched asynchronously.
        """
        if not isinstance(table, ReplicaTable):
            raise TypeError(
                f"set_table takes a ReplicaTable, got {type(table).__name__}; build one with "
                "ReplicaTable.from_slot_to_expert(slot_to_expert, num_experts=..., num_devices=..., "
                "slots_per_device=...)"
            )
        c = self.config
        table.check_layout(
            num_experts=c.num_experts, num_devices=c.num_devices, slots_per_device=c.slots_per_device
        )
        weights = self.experts.weights()
        current = self.replica_table() if current is None else current
        plan = plan_moves(current, table, bytes_per_expert=expert_bytes(weights))
        self.experts.set_weights(apply_moves(weights, plan))
        self.table.set_value(table.arrays(NamedSharding(self.mesh, P())))
        return plan

    def update_router_bias(self, expert_counts: jax.Array, rate: float) -> None:
        """``deepseek_v3`` auxiliary-loss-free balancing: raise the bias of experts below the mean load by
        ``rate`` and lower those above it (``expert_counts [E]`` from a step's output)."""
        if self.router_bias is None:
            raise ValueError(f"router '{self.config.router}' has no bias; only deepseek_v3 routing does")
        counts = jnp.asarray(expert_counts, jnp.float32)
        step = rate * jnp.sign(jnp.mean(counts) - counts)
        self.router_bias.set_value(self.router_bias[...] + step)

    def __call__(
        self,
        x: jax.Array,
        *,
        buffers: Buffers | None = None,
        routing: tuple[jax.Array, jax.Array] | None = None,
    ) -> MoEOutput:
        table = self.table.get_value()
        params = self.params
        tied = tie_replica_grads(params.experts, table.slot_to_expert, self.mesh, self.config.num_experts)
        params = params._replace(experts=tied)
        return moe_forward(
            params, table, x, config=self.config, mesh=self.mesh, buffers=buffers, routing=routing
        )


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def tie_replica_grads(
    experts: MLPWeights, slot_to_expert: jax.Array, mesh: jax.sharding.Mesh, num_experts: int
) -> MLPWeights:
    """Identity on slot weights ``[P, ...]`` whose gradient gives every slot the sum of the gradients of all
    replicas of its expert (the logical expert's gradient); empty slots get zero.

    ``moe_forward`` alone differentiates each slot by its own tokens; a training step through it would let
    replicas drift apart. Through this, replicas that are equal stay equal under any optimizer.
    """
    return experts


def _tie_fwd(experts, slot_to_expert, mesh, num_experts):
    return experts, slot_to_expert


def _tie_bwd(mesh, num_experts, slot_to_expert, cotangent):
    summed = jax.shard_map(
        partial(_sum_over_replicas, num_experts=num_experts),
        mesh=mesh,
        in_specs=(MLPWeights(P(EP_AXIS), P(EP_AXIS), P(EP_AXIS)), P()),
        out_specs=MLPWeights(P(EP_AXIS), P(EP_AXIS), P(EP_AXIS)),
    )(cotangent, place(slot_to_expert, mesh, P()))
    return summed, None


def _sum_over_replicas(grads: MLPWeights, slot_to_expert: jax.Array, *, num_experts: int) -> MLPWeights:
    """One device: its slots' gradients [S, ...] -> the sums over each slot's expert's replicas [S, ...]."""
    slots = grads.gate.shape[0]
    mine = jax.lax.dynamic_slice_in_dim(slot_to_expert, jax.lax.axis_index(EP_AXIS) * slots, slots)
    one_hot = (mine[:, None] == jnp.arange(num_experts)[None, :]).astype(jnp.float32)  # [S, E]

    def tie(g: jax.Array) -> jax.Array:
        per_expert = jax.lax.psum(jnp.einsum("se,s...->e...", one_hot, g.astype(jnp.float32)), EP_AXIS)
        return jnp.einsum("se,e...->s...", one_hot, per_expert).astype(g.dtype)

    return MLPWeights(*(tie(g) for g in grads))


tie_replica_grads.defvjp(_tie_fwd, _tie_bwd)
