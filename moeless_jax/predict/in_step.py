"""Layer-aware forecasts inside a jitted step: layer ``l + 1``'s expert loads from what layer ``l`` knows.

The host predictors (:mod:`moeless_jax.predict.gate`, :mod:`moeless_jax.predict.routing_only`) score traces
between steps. Here the same forecasts run on the devices, on token-sharded arrays, so a step can plan and
move layer ``l + 1``'s replicas while layer ``l`` computes:

- :func:`gate_loads`: a gate kernel ``[M, E]`` applied to layer ``l``'s gate input. With layer ``l + 1``'s own
  router this is gate reuse; with a fine-tuned copy it is the MoEless predictor
  (:class:`~moeless_jax.predict.gate.MoElessPredictor`'s ``kernels``).
- :class:`RoutingOnlyStream`: RoutingOnly's :func:`~moeless_jax.predict.layer_stream.forecast_step` on each
  device's tokens, from layer ``l``'s routing ids.

Both return ``[E]`` float32 loads (assignments per expert, summing to ``T * K``) replicated over the mesh: the
per-device partial counts are summed with one ``psum`` of ``E`` numbers. Forecasts do not change any output;
they only decide which table the next layer runs on.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moeless_jax.errors import InputError
from moeless_jax.moe.config import MoEConfig
from moeless_jax.moe.layer import place, token_axes
from moeless_jax.moe.router import route
from moeless_jax.predict.layer_stream import StreamState, forecast_step, init_state
from moeless_jax.predict.routing_only import NUM_POSITION_BUCKETS

__all__ = ["RoutingOnlyStream", "StreamInputs", "gate_loads"]


def gate_loads(
    hidden: jax.Array,
    kernel: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    config: MoEConfig,
    bias: jax.Array | None = None,
) -> jax.Array:
    """``[E]`` float32 tokens per expert when ``kernel [M, E]`` routes ``hidden [T, M]`` as a layer with
    ``config`` would (its router kind, top-k and group limit; ``bias [E]`` for ``deepseek_v3``).

    ``hidden`` is split over the mesh's token axes like a layer's input.
    """
    want = (config.d_model, config.num_experts)
    if hidden.ndim != 2 or hidden.shape[1] != config.d_model or tuple(kernel.shape) != want:
        raise InputError(f"gate_loads: hidden {tuple(hidden.shape)} and kernel {tuple(kernel.shape)} must be "
                         f"[T, {config.d_model}] and {list(want)}")
    axes = token_axes(mesh)

    def local(h, w, *b):
        routing = route(h, w, top_k=config.top_k, kind=config.router, bias=b[0] if b else None,
                        group_limit=config.group_limit)
        counts = jax.nn.one_hot(routing.expert_ids, config.num_experts, dtype=jnp.float32).sum(axis=(0, 1))
        return jax.lax.psum(counts, axes)

    extra = () if bias is None else (place(bias, mesh, P()),)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(axes), P(), *(P() for _ in extra)),
        out_specs=P(),
    )(place(hidden, mesh, P(axes)), place(kernel, mesh, P()), *extra)


class StreamInputs(NamedTuple):
    """Per-token inputs RoutingOnly reads besides the routing (``[T]`` each, split like the tokens).

    segment: int32 the token's request, numbered from 0 within each device's share (a request's tokens must
        all sit on one device, as a batch row does when the batch is split over the mesh);
    bucket: int32 position bucket (:func:`~moeless_jax.predict.routing_only.position_buckets`);
    valid: bool, False for padding tokens (they add nothing to the forecast).
    """

    segment: jax.Array
    bucket: jax.Array
    valid: jax.Array


class RoutingOnlyStream:
    """A fitted :class:`~moeless_jax.predict.routing_only.RoutingOnly`, run layer by layer inside a step.

    ``forecast(state, layer, expert_ids)`` takes source layer ``layer``'s routing ``[T, K]`` and returns the
    forecast ``[E]`` of layer ``layer + distance``; the state carries the earlier layers' projections. The
    predictor's host-side online correction is not applied (it learns from past batches between steps).
    """

    def __init__(self, predictor):
        if getattr(predictor, "_params", None) is None:
            raise InputError("routing_only predictor is not fitted: call fit(trace) or load a checkpoint")
        self.graphdef, self.params = predictor._graphdef, predictor._params
        self.distance, self.top_k = predictor.distance, predictor.top_k
        self.num_layers, self.num_experts = predictor.num_layers, predictor.num_experts

    @staticmethod
    def inputs_for_rows(rows: int, time: int, positions: jax.Array, mesh: jax.sharding.Mesh,
                        valid: jax.Array | None = None) -> StreamInputs:
        """:class:`StreamInputs` of a ``[rows, time]`` batch flattened row-major (each row one request, rows
        split over the mesh): ``positions [rows, time]`` int32, ``valid`` ``[rows, time]`` (default all)."""
        devices = mesh.size
        if rows % devices:
            raise InputError(f"{rows} rows do not split over the mesh's {devices} devices")
        local_rows = rows // devices
        segment = jnp.tile(jnp.repeat(jnp.arange(local_rows, dtype=jnp.int32), time), devices)
        # position_buckets' rule, on device: floor(log2(pos + 1)), capped at the last bucket.
        log_position = jnp.floor(jnp.log2(positions.reshape(-1).astype(jnp.float32) + 1.0))
        bucket = jnp.minimum(log_position, NUM_POSITION_BUCKETS - 1).astype(jnp.int32)
        valid = jnp.ones(rows * time, bool) if valid is None else valid.reshape(-1).astype(bool)
        spec = P(token_axes(mesh))
        return StreamInputs(*(place(a, mesh, spec) for a in (segment, bucket, valid)))

    def init(self, num_tokens: int, mesh: jax.sharding.Mesh) -> StreamState:
        """An empty state for ``num_tokens`` tokens split over ``mesh``."""
        if num_tokens % mesh.size:
            raise InputError(f"{num_tokens} tokens do not split over the mesh's {mesh.size} devices")
        model = nnx.merge(self.graphdef, self.params)
        state = init_state(model, num_tokens)
        return StreamState(*(place(a, mesh, spec) for a, spec in zip(state, _state_specs(mesh), strict=True)))

    def forecast(self, state: StreamState, layer: int, expert_ids: jax.Array, inputs: StreamInputs, *,
                 mesh: jax.sharding.Mesh) -> tuple[StreamState, jax.Array]:
        """(new state, ``[E]`` float32 forecast of layer ``layer + distance``) from ``expert_ids [T, K]``."""
        if not 0 <= layer < self.num_layers - self.distance:
            raise InputError(f"layer {layer} + distance {self.distance} is past the last layer "
                             f"{self.num_layers - 1}")
        axes = token_axes(mesh)
        tokens = P(axes)
        body = partial(_local_forecast, graphdef=self.graphdef, top_k=self.top_k, axes=axes)
        params_spec = jax.tree.map(lambda _: P(), self.params)
        params = jax.tree.map(lambda a: place(a, mesh, P()), self.params)
        return jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(params_spec, _state_specs(mesh), tokens, P(), tokens, tokens, tokens),
            out_specs=(_state_specs(mesh), P()),
        )(params, state, place(expert_ids, mesh, tokens), jnp.int32(layer), *inputs)


def _state_specs(mesh: jax.sharding.Mesh) -> StreamState:
    axes = token_axes(mesh)
    return StreamState(P(None, None, axes), P(None, axes, None))


def _local_forecast(params, state, expert_ids, layer, segment, bucket, valid, *, graphdef, top_k, axes):
    model = nnx.merge(graphdef, params)
    state, loads = forecast_step(model, state, expert_ids, layer, segment, bucket, valid, top_k=top_k)
    return state, jax.lax.psum(loads, axes)
