"""RoutingOnly: forecast layer ``l + d``'s load from the batch's routing at layers ``<= l`` alone.

For traces without hidden states. When layer ``l`` runs, every token's expert set at layers ``0..l`` is known.
A small network maps one token's recent expert sets to a probability distribution over the experts it will
use at layer ``l + d``; the forecast load is ``K`` times the sum of those distributions over the batch.

Per token and target layer ``t`` (source ``l = t - d``), with ``x_s`` the token's K-hot expert set at layer
``s`` (a ``[E]`` vector) and ``c_l`` the mean of ``x_l`` over the token's request (the prompt's context)::

    h = sum_{j < W} window_scale[t, j] * (x_{l-j} @ expert_embed[l-j])     # shared embedding per layer
        + sum_{j < O} x_{l-j} @ own[t, j]                                   # dense weights, recent layers
        + c_l @ context[t] + position[t, bucket(pos)] + bias[t]
    p_t = softmax(gelu(h) @ head[t] + head_bias[t])                         # [E], sums to 1

Training minimises the cross-entropy of ``p_t`` against the token's normalised K-hot set at ``t``, a proper
score whose optimum is the true per-expert inclusion probability / K; so the summed forecast is unbiased.
Sharing one expert embedding per source layer keeps a long window cheap in bytes; the few most recent layers,
which carry most of the signal, get weights of their own.

Optionally (``online_alpha > 0``) the predictor also tracks, like history does, an exponential moving average
of its own error on the batches already served (true minus forecast load shares) and adds it to later
forecasts, which removes a persistent bias between the fitting requests and the live ones.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moeless_jax.errors import InputError
from moeless_jax.predict.base import LoadPredictor
from moeless_jax.predict.config import RoutingOnlyConfig
from moeless_jax.traces import RoutingTrace

NUM_POSITION_BUCKETS = 10  # position buckets floor(log2(pos + 1)), capped: 0, 1, 2-3, 4-7, ..., >= 512


def position_buckets(position: np.ndarray) -> np.ndarray:
    """``[n]`` int32 bucket ``min(floor(log2(pos + 1)), 9)`` of each token position."""
    return np.minimum(np.log2(np.asarray(position, np.float64) + 1.0).astype(np.int32),
                      NUM_POSITION_BUCKETS - 1)


class TransitionNet(nnx.Module):
    """Per-token expert distributions at every target layer ``d .. L-1`` (see the module docstring)."""

    def __init__(self, *, num_layers: int, num_experts: int, top_k: int, distance: int,
                 config: RoutingOnlyConfig, rngs: nnx.Rngs):
        num_targets = num_layers - distance  # T; target t (layer t + d) reads source layer t
        hidden, window, own = config.hidden, config.window, config.own_layers
        self.distance, self.window, self.own_layers = distance, window, own
        # A K-hot input times N(0, 1/(4K)) rows gives hidden pre-activations of variance about 1/4 per layer.
        embed_std = (4.0 * top_k) ** -0.5
        normal = jax.random.normal
        self.expert_embed = nnx.Param(embed_std * normal(rngs.params(), (num_targets, num_experts, hidden)))
        self.window_scale = nnx.Param(jnp.ones((num_targets, window, hidden)))
        # No zero-size parameter when own == 0 (orbax cannot store empty arrays).
        self.own = nnx.Param(embed_std * normal(rngs.params(), (num_targets, own * num_experts, hidden))) \
            if own else None
        self.context = nnx.Param(0.02 * normal(rngs.params(), (num_targets, num_experts, hidden)))
        self.position = nnx.Param(jnp.zeros((num_targets, NUM_POSITION_BUCKETS, hidden)))
        self.bias = nnx.Param(jnp.zeros((num_targets, hidden)))
        # A small head starts every target near the uniform distribution.
        self.head = nnx.Param(0.1 * hidden**-0.5 * normal(rngs.params(), (num_targets, hidden, num_experts)))
        self.head_bias = nnx.Param(jnp.zeros((num_targets, num_experts)))
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, multi_hot: jax.Array, context: jax.Array, bucket: jax.Array, *,
                 targets: tuple[int, ...], dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits ``[T', B, E]`` of the target indices ``targets`` (static; index t is layer t + d).

        multi_hot: ``[B, S, E]`` float32 K-hot expert sets of the source layers ``0..S-1`` (S = T).
        context:   ``[B, S, E]`` float32 the same, averaged over each token's request.
        bucket:    ``[B]`` int32 position buckets.
        """
        chosen = np.asarray(targets, np.int64)  # [T']
        offsets = np.arange(self.window)  # [W]
        source = chosen[:, None] - offsets[None, :]  # [T', W] source layer of each window slot
        valid = source >= 0
        # Project only the source layers some chosen target reads, each once.
        needed = np.unique(source[valid])  # [S']
        slot = np.searchsorted(needed, np.maximum(source, needed[0]))  # [T', W] index into needed
        projected = jnp.einsum("bse,seh->bsh", multi_hot[:, needed], self.expert_embed[needed])  # [B, S', H]
        # band[t, s'] = the scale target t gives source s' (zero outside its window).
        scales = self.window_scale[chosen] * jnp.asarray(valid, jnp.float32)[..., None]  # [T', W, H]
        band = jnp.zeros((chosen.size, needed.size, scales.shape[-1]))
        band = band.at[np.arange(chosen.size)[:, None], slot].add(scales)  # [T', S', H]
        hidden = jnp.einsum("bsh,tsh->tbh", projected, band)  # [T', B, H]
        if self.own_layers:
            recent = np.maximum(source[:, : self.own_layers], 0)  # [T', O]
            mask = jnp.asarray(valid[:, : self.own_layers], jnp.float32)[None, :, :, None]
            own_input = (multi_hot[:, recent] * mask).reshape(multi_hot.shape[0], chosen.size, -1)
            hidden += jnp.einsum("bti,tih->tbh", own_input, self.own[chosen])
        hidden += jnp.einsum("bte,teh->tbh", context[:, chosen], self.context[chosen])
        hidden += self.position[chosen][:, bucket] + self.bias[chosen][:, None]
        hidden = jax.nn.gelu(hidden)
        if dropout_key is not None:
            hidden = self.dropout(hidden, rngs=nnx.Rngs(dropout=dropout_key))
        return jnp.einsum("tbh,the->tbe", hidden, self.head[chosen]) + self.head_bias[chosen][:, None]


def k_hot(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """``[..., K]`` int ids (-1 = none) -> ``[..., E]`` float32 K-hot sets."""
    return jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32).sum(axis=-2)


def request_context(multi_hot: jax.Array, segment: jax.Array, num_segments: int) -> jax.Array:
    """``[B, S, E]`` each token's K-hot sets averaged over the tokens of its segment (request)."""
    sums = jax.ops.segment_sum(multi_hot, segment, num_segments=num_segments)  # [G, S, E]
    counts = jax.ops.segment_sum(jnp.ones(segment.shape, jnp.float32), segment, num_segments=num_segments)
    return (sums / jnp.maximum(counts, 1.0)[:, None, None])[segment]


@partial(jax.jit, static_argnames=("graphdef", "targets", "num_experts", "top_k"))
def _forecast(graphdef, params, expert_ids, segment, bucket, valid, *, targets, num_experts, top_k):
    """``[T', E]`` forecast loads: K x the per-token distributions summed over the valid tokens."""
    model = nnx.merge(graphdef, params)
    num_sources = model.expert_embed.shape[0]
    multi_hot = k_hot(expert_ids[:, :num_sources], num_experts)  # [B, S, E]; padding ids -1 give zeros
    context = request_context(multi_hot, segment, expert_ids.shape[0])
    logits = model(multi_hot, context, bucket, targets=targets)  # [T', B, E]
    probs = jax.nn.softmax(logits, axis=-1) * valid.astype(jnp.float32)[None, :, None]
    return top_k * probs.sum(axis=1)


def _padded_size(num_tokens: int) -> int:
    """Batches are padded to a multiple of 256 tokens (1024 beyond 4096): few shapes to compile, and at most
    255 wasted rows on the batch sizes serving sees."""
    step = 256 if num_tokens <= 4096 else 1024
    return max(step, -(-num_tokens // step) * step)


class RoutingOnly(LoadPredictor):
    """Sum over the batch of per-token expert distributions from the token's routing history."""

    name = "routing_only"

    def __init__(self, distance: int = 1, config: RoutingOnlyConfig | None = None):
        super().__init__(distance)
        self.config = config or RoutingOnlyConfig()
        self._graphdef = None
        self._params = None  # nnx.State of the float32 parameters, already rounded to param_dtype
        self.train_seconds: float | None = None
        self.train_loss: list[float] = []
        self.reset()

    def reset(self) -> None:
        self._bias: np.ndarray | None = None  # [T, E] moving average of true - forecast load shares
        self._last: np.ndarray | None = None  # [T, E] shares of the last all-target forecast, uncorrected

    # -- building -----------------------------------------------------------------------------------------

    def _build(self) -> TransitionNet:
        num_layers, num_experts, top_k = self._shape()
        return TransitionNet(num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                             distance=self.distance, config=self.config, rngs=nnx.Rngs(self.config.seed))

    def _round_to_storage(self, params):
        dtype = jnp.dtype(self.config.param_dtype)
        return jax.tree.map(lambda value: value.astype(dtype).astype(jnp.float32), params)

    # -- fitting ------------------------------------------------------------------------------------------

    def initialise(self, num_layers: int, num_experts: int, top_k: int) -> RoutingOnly:
        """Give the predictor freshly initialised (untrained) parameters for traces of this shape; for
        timing, whose cost depends on shapes only. Returns ``self``."""
        if num_layers <= self.distance:
            raise InputError(f"distance {self.distance} needs more than {self.distance} layers, "
                             f"got {num_layers}")
        self.shape = (num_layers, num_experts, top_k)
        self._graphdef, params = nnx.split(self._build(), nnx.Param)
        self._params = self._round_to_storage(params)
        self.reset()
        return self

    def _fit(self, trace: RoutingTrace) -> None:
        import optax  # training-only dependency: forecasting needs just jax and flax

        config = self.config
        model = self._build()
        graphdef, params = nnx.split(model, nnx.Param)
        schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps,
                                                      config.steps)
        optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)
        opt_state = optimizer.init(params)
        step = _train_step(graphdef, optimizer, self.num_experts, self.distance, len(self.targets))
        sampler = _TokenSampler(trace, self.distance)
        rng = np.random.default_rng(config.seed)
        key = jax.random.key(config.seed)
        start = time.perf_counter()
        losses = []
        for index in range(config.steps):
            inputs = sampler.sample(rng, config.tokens_per_step)
            params, opt_state, loss = step(params, opt_state, *inputs, jax.random.fold_in(key, index))
            if index % 100 == 99 or index == config.steps - 1:
                losses.append(float(loss))  # syncing every step would stall the dispatch pipeline
        self.train_seconds = time.perf_counter() - start
        self.train_loss = losses
        self._graphdef, self._params = graphdef, self._round_to_storage(params)

    # -- forecasting --------------------------------------------------------------------------------------

    def _predict(self, trace: RoutingTrace, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
        if self._params is None:
            raise InputError("routing_only predictor is not fitted: call fit(trace) or load a checkpoint")
        inputs = batch_inputs(trace, batch)
        index = tuple(int(t) - self.distance for t in targets)  # rows of the target layers
        loads = _forecast(self._graphdef, self._params, *inputs, targets=index,
                          num_experts=self.num_experts, top_k=self.top_k)
        loads = np.asarray(loads, np.float64)  # [T', E]
        if self.config.online_alpha and len(index) == len(self.targets):
            self._last = loads / loads.sum(axis=1, keepdims=True)  # observe() compares it with true loads
        return self._corrected(loads, index)

    def _corrected(self, loads: np.ndarray, index) -> np.ndarray:
        """``[T', E]`` forecast loads of the target indices ``index`` with the online correction applied
        (load shares plus the error average; unchanged without ``online_alpha``)."""
        if not self.config.online_alpha:
            return loads
        shares = loads / loads.sum(axis=1, keepdims=True)
        if self._bias is None:
            return shares
        return np.clip(shares + self._bias[list(index)], 0.0, None)

    def observe(self, loads: np.ndarray) -> None:
        """Update the moving average of the forecast error with the true ``[L, E]`` loads of the batch
        forecast last (only with ``online_alpha > 0``)."""
        if not self.config.online_alpha or self._last is None:
            return
        true = np.asarray(loads, np.float64)[self.targets]  # [T, E]
        error = true / np.maximum(true.sum(axis=1, keepdims=True), 1.0) - self._last
        alpha = self.config.online_alpha
        self._bias = error * alpha if self._bias is None else self._bias + alpha * (error - self._bias)
        self._last = None

    # -- state --------------------------------------------------------------------------------------------

    def settings(self) -> dict:
        return asdict(self.config)

    def state(self) -> dict[str, np.ndarray]:
        if self._params is None:
            return {}
        dtype = np.dtype(jnp.dtype(self.config.param_dtype))
        params = nnx.to_pure_dict(self._params)
        return {name: np.asarray(value).astype(dtype) for name, value in params.items()}

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        graphdef, abstract = nnx.split(nnx.eval_shape(self._build), nnx.Param)
        dtype = str(np.dtype(jnp.dtype(self.config.param_dtype)))
        return {name: (tuple(value.shape), dtype) for name, value in nnx.to_pure_dict(abstract).items()}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        graphdef, params = nnx.split(nnx.eval_shape(self._build), nnx.Param)
        restored = {name: jnp.asarray(np.asarray(value), jnp.float32) for name, value in state.items()}
        nnx.replace_by_pure_dict(params, restored)
        self._graphdef, self._params = graphdef, params


def batch_inputs(trace: RoutingTrace, batch: np.ndarray):
    """Padded jit inputs of one batch: ``(expert_ids [B, L, K] int32 (-1 pads), segment [B] int32,
    bucket [B] int32, valid [B] bool)`` with B = the padded size of ``len(batch)``."""
    size = _padded_size(batch.size)
    expert_ids = np.pad(trace.expert_ids[batch].astype(np.int32), ((0, size - batch.size), (0, 0), (0, 0)),
                        constant_values=-1)
    return (expert_ids, *token_inputs(trace.request_id[batch], trace.position[batch]))


def token_inputs(request_id: np.ndarray, position: np.ndarray):
    """``(segment, bucket, valid)``, each ``[B']`` for the padded size B' of a batch's ``[B]`` tokens."""
    num_tokens = request_id.size
    size = _padded_size(num_tokens)
    pad = size - num_tokens
    _, segment = np.unique(request_id, return_inverse=True)
    # Padding tokens form their own segment, so they never dilute a request's context.
    segment = np.concatenate([segment.astype(np.int32).reshape(-1), np.full(pad, size - 1, np.int32)])
    bucket = np.pad(position_buckets(position), (0, pad))
    valid = np.arange(size) < num_tokens
    return segment, bucket, valid


class _TokenSampler:
    """Random training tokens of a fitting trace with their network inputs and targets."""

    def __init__(self, trace: RoutingTrace, distance: int):
        self.expert_ids = trace.expert_ids.astype(np.int32)  # [N, L, K]
        self.num_experts, self.distance = trace.num_experts, distance
        num_sources = trace.num_layers - distance
        _, self.request = np.unique(trace.request_id, return_inverse=True)  # [N] request index
        num_requests = int(self.request.max()) + 1
        # Request means of the source layers' K-hot sets, [R, S, E], built with one bincount per layer.
        means = np.zeros((num_requests, num_sources, trace.num_experts), np.float32)
        lengths = np.bincount(self.request, minlength=num_requests).astype(np.float32)
        for layer in range(num_sources):
            flat = self.request[:, None] * trace.num_experts + trace.expert_ids[:, layer].astype(np.int64)
            counts = np.bincount(flat.reshape(-1), minlength=num_requests * trace.num_experts)
            means[:, layer] = counts.reshape(num_requests, trace.num_experts) / lengths[:, None]
        self.means = means
        self.bucket = position_buckets(trace.position)

    def sample(self, rng: np.random.Generator, count: int):
        """``(expert_ids [B, L, K], context [B, S, E], bucket [B])`` of ``count`` random tokens."""
        tokens = rng.integers(0, self.expert_ids.shape[0], count)
        return self.expert_ids[tokens], self.means[self.request[tokens]], self.bucket[tokens]


def _train_step(graphdef, optimizer, num_experts: int, distance: int, num_targets: int):
    """A jitted step of ``optimizer`` (optax) on the mean cross-entropy over (token, target layer)."""
    import optax

    targets = tuple(range(num_targets))

    def loss_fn(params, expert_ids, context, bucket, key):
        model = nnx.merge(graphdef, params)
        num_sources = model.expert_embed.shape[0]
        multi_hot = k_hot(expert_ids[:, :num_sources], num_experts)  # [B, S, E]
        wanted = k_hot(expert_ids[:, distance:], num_experts)  # [B, T, E]
        wanted = wanted / wanted.sum(-1, keepdims=True)
        logits = model(multi_hot, context, bucket, targets=targets, dropout_key=key)  # [T, B, E]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.sum(wanted.transpose(1, 0, 2) * log_probs, axis=-1))

    @jax.jit
    def step(params, opt_state, expert_ids, context, bucket, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, expert_ids, context, bucket, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step
