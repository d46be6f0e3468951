"""Layer-ahead replication: forecast, plan and move layer ``l + 1``'s replicas in the step, during layer l.

The controller (:mod:`moeless_jax.replication.controller`) re-plans between steps from history. Layer-aware
forecasts are better (RoutingOnly from the same batch's earlier layers, or a gate applied to layer ``l``'s
hidden state), but they exist only while the step runs; planning on the host between layers would cost a
device-host round trip per layer. Here everything stays on the devices, in the one compiled step:

1. a forecaster turns what layer ``l`` knows into ``[E]`` loads of layer ``l + 1``
   (:mod:`moeless_jax.predict.in_step`);
2. :func:`~moeless_jax.plan.on_device.plan_on_device` plans layer ``l + 1``'s table from it, changing at most
   ``max_moves_per_device`` slots per device;
3. :func:`~moeless_jax.moe.weight_moves.move_slot_weights` copies the changed slots' weights (one collective).

Nothing in 1-3 depends on layer ``l``'s expert computation, so the scheduler is free to run the copy under it.
Layer ``l + 1`` then runs on its new table; the weights a slot receives are its expert's, bit for bit, so
outputs equal the static table's. When a plan would exceed the copy budget the layer keeps its table (and its
weights), so table and weights never disagree.

A step whose batch is too small for balance to matter (fewer than ``min_tokens_per_device`` tokens per device,
where the layer reads weights rather than computes rows) declines: it compiles without any of this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moeless_jax.config import require
from moeless_jax.errors import InputError
from moeless_jax.moe.config import MoEConfig
from moeless_jax.moe.experts import MLPWeights
from moeless_jax.moe.layer import MoELayer, MoEOutput, MoEParams, moe_forward, place
from moeless_jax.moe.replica_table import TableArrays
from moeless_jax.moe.weight_moves import move_slot_weights, slot_moves
from moeless_jax.plan.on_device import plan_on_device
from moeless_jax.predict.in_step import RoutingOnlyStream, StreamInputs, gate_loads

__all__ = [
    "FORECASTERS",
    "Installed",
    "LayerAhead",
    "LayerAheadConfig",
    "install_ahead",
    "layer_ahead_stack",
]

FORECASTERS = ("gate_reuse", "gate_copies", "routing_only")

# Tokens per device below which the mode declines: where it starts to beat static EP in the simulation of
# results/layer_ahead (DeepSeek-V2-Lite experts, H200 calibration, copy budget 4) under both layer-time
# variants (about 250 with the capacity kernel as it runs today, about 1,350 with a kernel whose time follows
# rows). See LayerAheadConfig.min_tokens_per_device.
DEFAULT_MIN_TOKENS_PER_DEVICE = 1400


@dataclass(frozen=True)
class LayerAheadConfig:
    """Settings of layer-ahead replication (YAML: a ``layer_ahead:`` section; see configs/layer_ahead.yaml).

    Attributes:
      forecaster: ``gate_reuse`` (layer ``l + 1``'s own router on layer ``l``'s gate input; needs nothing
        else), ``gate_copies`` (fine-tuned gate copies ``[L, M, E]``, the MoEless predictor's kernels) or
        ``routing_only`` (a fitted RoutingOnly predictor of distance 1, from layer ``l``'s routing).
      max_moves_per_device: at most this many slots of each device receive a weight copy per layer and step
        (the copy buffer holds ``D x this`` experts per device).
      min_tokens_per_device: steps with fewer tokens per device than this keep their tables: the layer is
        then bound by reading weights, and copies cost more than balance saves (``results/layer_ahead``
        gives the break-even on the H200 calibration).
    """

    forecaster: str = "gate_reuse"
    max_moves_per_device: int = 4
    min_tokens_per_device: int = DEFAULT_MIN_TOKENS_PER_DEVICE

    def __post_init__(self) -> None:
        require(self.forecaster in FORECASTERS, "forecaster",
                f"'{self.forecaster}' is not a layer-ahead forecaster; use one of {', '.join(FORECASTERS)}")
        for name, least in (("max_moves_per_device", 1), ("min_tokens_per_device", 0)):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= least, name,
                    f"must be an integer >= {least}, got {value!r}")


class Installed(NamedTuple):
    """A layer's table and slot weights after :func:`install_ahead`.

    table: the new table (or the old one when the plan did not fit the budget); experts: slot weights
    ``[P, ...]`` for it; moves: ``[D]`` int32 copies each device received; adopted: ``[]`` bool.
    """

    table: TableArrays
    experts: MLPWeights
    moves: jax.Array
    adopted: jax.Array


def install_ahead(
    forecast: jax.Array,
    table: TableArrays,
    experts: MLPWeights,
    *,
    config: MoEConfig,
    mesh: jax.sharding.Mesh,
    max_moves_per_device: int,
) -> Installed:
    """Plan a layer's table from ``forecast [E]`` and move its slot weights ``[P, ...]`` to it (jittable).

    Differentiable in ``experts``: a moved slot's gradient flows back to the replica it was copied from.
    """
    forecast = jax.lax.stop_gradient(jnp.asarray(forecast, jnp.float32))
    if forecast.shape != (config.num_experts,):
        raise InputError(f"forecast has shape {tuple(forecast.shape)}; expected [{config.num_experts}]")
    new = plan_on_device(forecast, table.slot_to_expert, num_devices=config.num_devices,
                         slots_per_device=config.slots_per_device, max_moves_per_device=max_moves_per_device)
    moves = slot_moves(table, new.slot_to_expert, slots_per_device=config.slots_per_device)
    moved, fits = move_slot_weights(experts, moves, mesh=mesh, max_moves_per_device=max_moves_per_device)
    kept = TableArrays(*(place(jnp.where(fits, n, o), mesh, P()) for n, o in zip(new, table, strict=True)))
    return Installed(kept, moved, jnp.where(fits, moves.per_device, 0), fits)


class LayerAhead:
    """Layer-ahead replication for a stack of :class:`~moeless_jax.moe.MoELayer` (a model's, or a user's).

    ``gate_kernels``: ``[L, M, E]`` gate copies (``forecaster='gate_copies'``; e.g. a fitted
    :class:`~moeless_jax.predict.MoElessPredictor`'s ``kernels``); ``routing_only``: a fitted
    :class:`~moeless_jax.predict.RoutingOnly` of distance 1 (``forecaster='routing_only'``).

    Inside a jitted step: :meth:`active` decides (statically) whether to run at all; :meth:`begin` makes the
    step's forecaster state; after layer ``l`` has routed, :meth:`forecast` gives layer ``l + 1``'s loads and
    :meth:`install` moves layer ``l + 1`` onto its new table in place (under ``nnx.jit`` the new tables and
    weights persist, so the next step plans from them).
    """

    def __init__(self, config: LayerAheadConfig | None = None, *, gate_kernels=None, routing_only=None):
        self.config = config or LayerAheadConfig()
        kind = self.config.forecaster
        if kind == "gate_copies" and gate_kernels is None:
            raise InputError("forecaster 'gate_copies' needs gate_kernels [L, M, E] (a fitted "
                             "MoElessPredictor's kernels)")
        if kind == "routing_only":
            if routing_only is None:
                raise InputError("forecaster 'routing_only' needs a fitted RoutingOnly predictor")
            if routing_only.distance != 1:
                raise InputError(f"layer-ahead forecasts one layer ahead; the routing_only predictor has "
                                 f"distance {routing_only.distance}")
        self.gate_kernels = None if gate_kernels is None else jnp.asarray(gate_kernels, jnp.float32)
        self.stream = RoutingOnlyStream(routing_only) if kind == "routing_only" else None

    def active(self, num_tokens: int, mesh: jax.sharding.Mesh) -> bool:
        """Whether a step of ``num_tokens`` tokens over ``mesh`` replicates (static: decided when tracing)."""
        return num_tokens // mesh.size >= self.config.min_tokens_per_device

    def check_stack(self, layers: Sequence[MoELayer]) -> None:
        """Raise unless the forecaster fits this stack of layers."""
        num_layers, first = len(layers), layers[0].config
        if self.gate_kernels is not None and self.config.forecaster == "gate_copies":
            want = (num_layers, first.d_model, first.num_experts)
            if tuple(self.gate_kernels.shape) != want:
                raise InputError(f"gate_kernels have shape {tuple(self.gate_kernels.shape)}; the model needs "
                                 f"[L, M, E] = {list(want)}")
        if self.stream is not None and (self.stream.num_layers, self.stream.num_experts) != (
            num_layers, first.num_experts
        ):
            raise InputError(f"the routing_only predictor was fitted for {self.stream.num_layers} layers of "
                             f"{self.stream.num_experts} experts; the model has {num_layers} of "
                             f"{first.num_experts}")

    def begin(self, num_tokens: int, mesh: jax.sharding.Mesh, inputs: StreamInputs | None = None):
        """The step's forecaster state (RoutingOnly's per-token projections; None for gates)."""
        if self.stream is None:
            return None
        if inputs is None:
            raise InputError("forecaster 'routing_only' needs StreamInputs (each token's request and "
                             "position)")
        return self.stream.init(num_tokens, mesh), inputs

    def forecast(self, state, layer: int, gate_input: jax.Array, out: MoEOutput, following: MoELayer):
        """(state, ``[E]`` forecast of layer ``layer + 1``) from layer ``layer``'s gate input ``[T, M]``
        and output (its routing ``out.expert_ids``); ``following`` is layer ``layer + 1``."""
        kind, mesh = self.config.forecaster, following.mesh
        if kind == "routing_only":
            stream_state, inputs = state
            stream_state, loads = self.stream.forecast(stream_state, layer, out.expert_ids, inputs, mesh=mesh)
            return (stream_state, inputs), loads
        if kind == "gate_copies":
            kernel, bias = self.gate_kernels[layer + 1], None
        else:
            kernel = following.router[...]
            bias = None if following.router_bias is None else following.router_bias[...]
        return state, gate_loads(gate_input, kernel, mesh=mesh, config=following.config, bias=bias)

    def install(self, layer: MoELayer, forecast: jax.Array) -> Installed:
        """Plan ``layer``'s table from ``forecast [E]`` and move it there in place; returns what happened."""
        done = install_ahead(forecast, layer.table.get_value(), layer.experts.weights(), config=layer.config,
                             mesh=layer.mesh, max_moves_per_device=self.config.max_moves_per_device)
        layer.table.set_value(done.table)
        layer.experts.set_weights(done.experts)
        return done


def layer_ahead_stack(
    params: Sequence[MoEParams],
    tables: Sequence[TableArrays],
    x: jax.Array,
    *,
    config: MoEConfig,
    mesh: jax.sharding.Mesh,
    between: Callable[[int, jax.Array, jax.Array], jax.Array] = lambda layer, x, y: x + y,
    max_moves_per_device: int = 2,
) -> tuple[jax.Array, list[TableArrays], list[MLPWeights], list[MoEOutput], jax.Array]:
    """A stack of replicated MoE layers (pure functions) run layer-ahead with gate-reuse forecasts.

    params, tables: one :class:`MoEParams` / :class:`TableArrays` per layer; ``x [T, M]`` the first layer's
    input; ``between(l, x_l, y_l)`` the next layer's input (default: a residual). Layer ``l + 1``'s table is
    planned from layer ``l + 1``'s router applied to ``x_l`` and its weights moved before layer ``l``'s output
    is used. Returns (last output, the tables used, the slot weights used, each layer's :class:`MoEOutput`,
    ``[L, D]`` copies per layer and device). Differentiable in ``params`` and ``x``.
    """
    if len(params) != len(tables) or not params:
        raise InputError(f"params has {len(params)} layers and tables {len(tables)}; give one of each per "
                         "layer")
    params, tables = list(params), list(tables)
    outs, moves = [], [jnp.zeros(config.num_devices, jnp.int32)]
    for layer in range(len(params)):
        if layer + 1 < len(params):
            following = params[layer + 1]
            forecast = gate_loads(x, following.router, mesh=mesh, config=config, bias=following.router_bias)
            done = install_ahead(forecast, tables[layer + 1], following.experts, config=config, mesh=mesh,
                                 max_moves_per_device=max_moves_per_device)
            tables[layer + 1], params[layer + 1] = done.table, following._replace(experts=done.experts)
            moves.append(done.moves)
        out = moe_forward(params[layer], tables[layer], x, config=config, mesh=mesh)
        outs.append(out)
        x = between(layer, x, out.y)
    return x, tables, [p.experts for p in params], outs, jnp.stack(moves)
