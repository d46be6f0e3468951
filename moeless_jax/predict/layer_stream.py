"""RoutingOnly one layer at a time: forecast layer ``l + d`` as soon as layer ``l``'s routing is known.

:meth:`RoutingOnly.predict` reads a batch's whole routing and forecasts every target layer in one call. A
serving step learns the routing layer by layer, and calling ``predict`` per layer would redo the batch's input
preparation and every source layer's projection each time. :func:`forecast_step` is the incremental form: it
takes one source layer's expert ids, adds that layer's projection to a small state, and returns the forecast
of its target layer, with static shapes and the layer index as data, so it compiles once and can sit inside a
jitted serving step. :class:`LayerStream` wraps it for host-side use (one batch, layers pushed in order) with
the predictor's online correction.

The arithmetic is :class:`~moeless_jax.predict.routing_only.TransitionNet`'s, reordered: the same forecasts
as ``predict`` up to float rounding (``tests/test_predict_layer_stream.py``).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moeless_jax.errors import InputError
from moeless_jax.predict.base import scale_rows


class StreamState(NamedTuple):
    """What :func:`forecast_step` keeps between layers of one batch.

    projected: ``[H, S, B]`` each source layer's ``x_s @ expert_embed[s]`` so far (zeros for layers ahead),
        hidden-major so that weighting the window is one batched matrix-vector product per hidden unit.
    recent:    ``[max(O, 1), B, E]`` K-hot sets of the most recent source layers, newest first.
    """

    projected: jax.Array
    recent: jax.Array


def init_state(model, num_tokens: int) -> StreamState:
    """An empty :class:`StreamState` for ``num_tokens`` (padded) tokens."""
    num_sources, num_experts, hidden = model.expert_embed.shape
    return StreamState(jnp.zeros((hidden, num_sources, num_tokens), jnp.float32),
                       jnp.zeros((max(model.own_layers, 1), num_tokens, num_experts), jnp.float32))


def forecast_step(model, state: StreamState, expert_ids: jax.Array, layer: jax.Array, segment: jax.Array,
                  bucket: jax.Array, valid: jax.Array, *, top_k: int) -> tuple[StreamState, jax.Array]:
    """Take source layer ``layer``'s routing and forecast its target layer (``layer + d``).

    model: the :class:`TransitionNet`; expert_ids: ``[B, K]`` int32 (-1 pads); layer: int32 scalar, the
    source index ``0..S-1`` (equal to the target index); segment, bucket, valid: ``[B]`` as in
    :func:`~moeless_jax.predict.routing_only.batch_inputs`. Layers must arrive in order ``0, 1, ...``.
    Returns the new state and ``[E]`` forecast loads (``K`` x the summed per-token distributions).
    """
    from moeless_jax.predict.routing_only import k_hot, request_context

    num_experts = model.expert_embed.shape[1]
    multi_hot = k_hot(expert_ids, num_experts)  # [B, E]
    projected = state.projected.at[:, layer].set((multi_hot @ model.expert_embed[layer]).T)  # [H, S, B]
    source = layer - jnp.arange(model.window)  # [W]
    in_window = (source >= 0).astype(jnp.float32)[:, None]  # [W, 1]
    # band[h, s] = the scale this target gives source s (zero outside its window).
    scales = model.window_scale[layer] * in_window  # [W, H]
    band = jnp.zeros(projected.shape[:2]).at[:, jnp.maximum(source, 0)].add(scales.T)  # [H, S]
    hidden = jax.lax.dot_general(band[:, None, :], projected, (((2,), (1,)), ((0,), (0,))))[:, 0].T  # [B, H]
    recent = jnp.concatenate([multi_hot[None], state.recent[:-1]], axis=0)  # newest first
    if model.own_layers:
        own = layer - jnp.arange(model.own_layers) >= 0  # [O]
        own_input = recent[: model.own_layers] * own.astype(jnp.float32)[:, None, None]  # [O, B, E]
        own_input = jnp.transpose(own_input, (1, 0, 2)).reshape(multi_hot.shape[0], -1)  # [B, O * E]
        hidden += own_input @ model.own[layer]
    context = request_context(multi_hot[:, None, :], segment, multi_hot.shape[0])[:, 0]  # [B, E]
    hidden += context @ model.context[layer] + model.position[layer][bucket] + model.bias[layer]
    logits = jax.nn.gelu(hidden) @ model.head[layer] + model.head_bias[layer]
    probs = jax.nn.softmax(logits, axis=-1) * valid.astype(jnp.float32)[:, None]
    return StreamState(projected, recent), top_k * probs.sum(axis=0)


@partial(jax.jit, static_argnames=("graphdef", "top_k"), donate_argnames=("state",))
def _step(graphdef, params, state, expert_ids, layer, segment, bucket, valid, *, top_k):
    return forecast_step(nnx.merge(graphdef, params), state, expert_ids, layer, segment, bucket, valid,
                         top_k=top_k)


class LayerStream:
    """One batch's forecasts, one target layer per pushed source layer (host-side use).

    predictor: a fitted :class:`~moeless_jax.predict.routing_only.RoutingOnly`; request_id, position: ``[B]``
    the batch's tokens (as in a :class:`~moeless_jax.traces.RoutingTrace`). :meth:`push` source layers
    ``0, 1, ...`` in order; each returns the forecast of layer ``l + d``, online correction included, scaled
    to ``B * K`` assignments like ``predict``. After the last target the forecasts count as the predictor's
    last forecast, so ``predictor.observe(true_loads)`` updates its correction as after ``predict``.
    """

    def __init__(self, predictor, request_id: np.ndarray, position: np.ndarray):
        from moeless_jax.predict.routing_only import token_inputs

        if predictor._params is None:
            raise InputError("routing_only predictor is not fitted: call fit(trace) or load a checkpoint")
        request_id, position = np.asarray(request_id).reshape(-1), np.asarray(position).reshape(-1)
        if request_id.size == 0 or request_id.shape != position.shape:
            raise InputError(f"request_id {request_id.shape} and position {position.shape} must be the same "
                             "non-empty [B]")
        self.predictor, self.num_tokens = predictor, request_id.size
        self._segment, self._bucket, self._valid = token_inputs(request_id, position)
        model = nnx.merge(predictor._graphdef, predictor._params)
        self._state = init_state(model, self._valid.size)
        self._shares = np.zeros((len(predictor.targets), predictor.num_experts))
        self.next_layer = 0

    def push(self, layer: int, expert_ids: np.ndarray) -> np.ndarray:
        """``[E]`` forecast of layer ``layer + d`` from source layer ``layer``'s ``[B, K]`` expert ids."""
        predictor = self.predictor
        if layer != self.next_layer:
            raise InputError(f"push source layers in order: expected layer {self.next_layer}, got {layer}")
        if layer >= len(predictor.targets):
            raise InputError(f"layer {layer} + distance {predictor.distance} is past the last layer "
                             f"{predictor.num_layers - 1}")
        ids = np.asarray(expert_ids)
        if ids.shape != (self.num_tokens, predictor.top_k) or ids.dtype.kind not in "iu":
            raise InputError(f"expert_ids must be [{self.num_tokens}, {predictor.top_k}] integers, got "
                             f"{ids.shape} {ids.dtype}")
        padded = np.full((self._valid.size, predictor.top_k), -1, np.int32)
        padded[: self.num_tokens] = ids
        self._state, loads = _step(predictor._graphdef, predictor._params, self._state, padded,
                                   np.int32(layer), self._segment, self._bucket, self._valid,
                                   top_k=predictor.top_k)
        loads = np.asarray(loads, np.float64)[None]  # [1, E]
        corrected = predictor._corrected(loads, [layer])
        if predictor.config.online_alpha:
            self._shares[layer] = loads[0] / loads[0].sum()
            if layer == len(predictor.targets) - 1:
                predictor._last = self._shares.copy()
        self.next_layer += 1
        return scale_rows(corrected[0], float(self.num_tokens * predictor.top_k))
