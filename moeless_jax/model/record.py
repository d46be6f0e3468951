"""Record routing traces from our own model: every real prompt token's experts, gate weights and gate inputs.

:func:`record_trace` runs the prefill of batches of prompts through a :class:`MoETransformer` and returns a
:class:`~moeless_jax.traces.RoutingTrace` with hidden states, the input the gate-based predictors need. The
routing of each layer is recomputed from the gate inputs the model returns (``return_gate_inputs=True``)
with the layer's own router, and checked against the per-expert counts the model itself produced: the
recorded experts are the ones the model used, padding and dummy rows included in the check, excluded from
the trace.

:func:`batches_from_arrivals` groups prompts the way the evaluation scripts batch requests: arrival ``i`` of
an Azure LLM inference trace serves prompt ``i mod R``, and arrivals in the same ``window_s`` window form
one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from moeless_jax.errors import InputError
from moeless_jax.model.transformer import MoETransformer
from moeless_jax.moe import call_dropless, route
from moeless_jax.moe.config import MoEConfig
from moeless_jax.traces import ArrivalTrace, RoutingTrace, read_azure_arrivals

HIDDEN_DTYPES = ("float16", "float32")
PAD_ID = 0  # the tokenizer's <pad>; padding never reaches a real token (causal attention, right padding)
_MIN_WIDTH = 8


class PrefillRouting(NamedTuple):
    """The routing of one padded prefill batch (B rows of which the first ``num_real`` are prompts).

    tokens:        [B, T] int32 the right-padded batch that ran.
    lengths:       [B] int32 tokens of each row (dummy rows: 0).
    expert_ids:    [L, B, T, K] int32 each layer's chosen experts, in the gate's order.
    gate_weights:  [L, B, T, K] float32 their combine weights.
    gate_inputs:   [L, B, T, M] float32 what each layer's router saw.
    expert_counts: [L, E] int32 the model's own per-expert counts (every row and position).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    expert_ids: np.ndarray
    gate_weights: np.ndarray
    gate_inputs: np.ndarray
    expert_counts: np.ndarray

    @property
    def num_real(self) -> int:
        return int(np.count_nonzero(self.lengths))


@nnx.jit(static_argnames="buffers")
def _forward(model: MoETransformer, tokens: jax.Array, buffers):
    return model(tokens, buffers=buffers, return_gate_inputs=True)


@jax.jit(static_argnames="config")
def _route(gate_input: jax.Array, router: jax.Array, bias: jax.Array | None, *, config: MoEConfig):
    """``gate_input [n, M]`` -> (``expert_ids [n, K]``, ``weights [n, K]``) exactly as the layer routes."""
    routing = route(gate_input, router, top_k=config.top_k, kind=config.router,
                    renormalize=config.renormalize, bias=bias, group_limit=config.group_limit,
                    scaling=config.routed_scaling_factor)
    return routing.expert_ids, routing.weights


def prefill_routing(model: MoETransformer, rows: Sequence[Sequence[int]]) -> PrefillRouting:
    """Run the prefill of ``rows`` (token id lists) as one right-padded batch and recompute its routing.

    The batch is padded with ``<pad>`` to ``[B, T]``: ``T`` the longest row rounded up to a power of two (at
    most ``max_seq_len``) and ``B`` (at least 2) a power-of-two multiple of the mesh's devices, so that few
    shapes compile; the extra rows are dummy rows. MoE buffers grow until nothing overflowed. Raises
    ``RuntimeError`` if the recomputed routing's counts differ from the model's (it would not be the
    routing the model used).
    """
    rows = _checked_prompts(model, rows)
    config = model.config
    width = min(_power_of_two(max(len(row) for row in rows), _MIN_WIDTH), config.max_seq_len)
    # At least two rows: the attention of a one-row batch on a one-device mesh fails jax's sharding check.
    batch = model.num_devices * _power_of_two(-(-max(len(rows), 2) // model.num_devices), 1)
    tokens = np.full((batch, width), PAD_ID, np.int32)
    lengths = np.zeros(batch, np.int32)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = row
        lengths[index] = len(row)
    ladder = model.buffer_ladder(batch, width)
    out, _ = call_dropless(lambda buffers: _forward(model, tokens, buffers), ladder)
    gate_inputs = np.asarray(jax.device_get(out.gate_inputs), np.float32)  # [L, B, T, M]
    layers, m = len(model.moe_layers()), config.d_model
    ids, weights = [], []
    for index, layer in enumerate(model.moe_layers()):
        bias = None if layer.router_bias is None else jnp.asarray(jax.device_get(layer.router_bias[...]))
        layer_ids, layer_weights = _route(jnp.asarray(gate_inputs[index].reshape(-1, m)),
                                          jnp.asarray(jax.device_get(layer.router[...])), bias,
                                          config=layer.config)
        ids.append(np.asarray(layer_ids).reshape(batch, width, -1))
        weights.append(np.asarray(layer_weights, np.float32).reshape(batch, width, -1))
    expert_ids = np.stack(ids)  # [L, B, T, K]
    expert_counts = np.asarray(jax.device_get(out.expert_counts))  # [L, E]
    recomputed = np.stack([np.bincount(expert_ids[i].reshape(-1), minlength=expert_counts.shape[1])
                           for i in range(layers)])
    if not np.array_equal(recomputed, expert_counts):
        layer = int(np.flatnonzero((recomputed != expert_counts).any(axis=1))[0])
        raise RuntimeError(f"layer {layer}: the routing recomputed from the gate inputs does not match the "
                           f"model's expert counts ({recomputed[layer].tolist()} vs "
                           f"{expert_counts[layer].tolist()})")
    return PrefillRouting(tokens, lengths, expert_ids, np.stack(weights), gate_inputs, expert_counts)


def record_trace(
    model: MoETransformer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    batches: Sequence[Sequence[int]],
    hidden_dtype: str = "float16",
    progress: bool = False,
    desc: str = "record",
) -> RoutingTrace:
    """The routing of every prompt token, recorded from the prefill of ``batches``.

    ``prompt_ids``: token id lists, each at most ``max_seq_len`` long. ``batches``: lists of indices into
    ``prompt_ids``; each runs as one prefill (:func:`prefill_routing`). A prompt is recorded from the first
    batch that holds it; later batches run only their prompts not recorded yet (a batch of recorded prompts
    is skipped): a real token's routing does not depend on the other rows of its batch (causal attention,
    right padding, per-token routing, nothing dropped).

    Returns a trace of the prompts that appear in some batch, in prompt order, with ``request_id`` the
    prompt index, ``position`` 0.. within the prompt, ``layer_ids`` 0..L-1, ``expert_ids`` / ``gate_weights``
    ``[N, L, K]`` in the gate's order and ``hidden`` ``[N, L, M]`` the gate inputs in ``hidden_dtype``.
    """
    prompts = _checked_prompts(model, prompt_ids)
    batches = _checked_batches(batches, len(prompts))
    if hidden_dtype not in HIDDEN_DTYPES:
        raise InputError(f"hidden_dtype must be one of {HIDDEN_DTYPES}, got {hidden_dtype!r}")
    recorded: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # prompt -> ids, weights, hidden
    for new in tqdm(prefill_runs(batches), desc=desc, disable=not progress, leave=False):
        run = prefill_routing(model, [prompts[p] for p in new])
        for row, prompt in enumerate(new):
            n = len(prompts[prompt])
            # [L, n, K] -> [n, L, K]: the trace is token-major.
            recorded[prompt] = (run.expert_ids[:, row, :n].transpose(1, 0, 2),
                                run.gate_weights[:, row, :n].transpose(1, 0, 2),
                                run.gate_inputs[:, row, :n].transpose(1, 0, 2))
    order = sorted(recorded)
    hidden = np.concatenate([recorded[p][2] for p in order])
    if hidden_dtype == "float16" and not np.isfinite(hidden.astype(np.float16)).all():
        raise InputError("hidden states overflow float16; record with hidden_dtype='float32'")
    return RoutingTrace(
        expert_ids=np.concatenate([recorded[p][0] for p in order]),
        request_id=np.repeat(np.array(order, np.int64), [len(prompts[p]) for p in order]),
        position=np.concatenate([np.arange(len(prompts[p])) for p in order]),
        num_experts=model.config.moe.num_experts,
        layer_ids=tuple(range(model.config.num_layers)),
        gate_weights=np.concatenate([recorded[p][1] for p in order]),
        hidden=hidden.astype(hidden_dtype),
    )


def batches_from_arrivals(
    arrivals_csv: str | Path | ArrivalTrace,
    num_prompts: int,
    *,
    window_s: float = 1.0,
    max_batches: int | None = None,
) -> list[list[int]]:
    """Prompt-index batches from an Azure LLM inference trace (a CSV path or an :class:`ArrivalTrace`).

    Arrival ``i`` (in arrival order) serves prompt ``i mod num_prompts``; the arrivals of each non-empty
    window ``[w * window_s, (w + 1) * window_s)`` form one batch, as
    :func:`moeless_jax.traces.window_batches` batches a trace's requests. ``max_batches`` keeps the first
    windows only.
    """
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int | np.integer) or num_prompts < 1:
        raise InputError(f"num_prompts must be a positive integer, got {num_prompts!r}")
    if not window_s > 0:
        raise InputError(f"window_s must be > 0, got {window_s!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise InputError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    arrivals = arrivals_csv if isinstance(arrivals_csv, ArrivalTrace) else read_azure_arrivals(arrivals_csv)
    window = np.floor(arrivals.arrival_s / window_s).astype(np.int64)  # [A]; sorted, so windows are runs
    served = np.arange(window.size, dtype=np.int64) % int(num_prompts)  # [A] prompt of each arrival
    groups = np.split(served, np.flatnonzero(np.diff(window)) + 1) if served.size else []
    return [group.tolist() for group in groups[:max_batches]]


def token_batches(trace: RoutingTrace, batches: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Prompt-index ``batches`` as token-index batches of ``trace`` (each prompt's tokens, in batch order),
    for :func:`moeless_jax.predict.score_batches`; every prompt must be in the trace."""
    return [trace.tokens_of(list(batch)) for batch in batches]


def prefill_runs(batches: list[list[int]]) -> list[list[int]]:
    """The prefills :func:`record_trace` runs for ``batches``: each batch's prompts that no earlier batch
    holds (duplicates dropped), batches left empty omitted."""
    seen: set[int] = set()
    runs = []
    for batch in batches:
        new = [p for p in dict.fromkeys(batch) if p not in seen]
        seen.update(new)
        if new:
            runs.append(new)
    return runs


def _checked_prompts(model: MoETransformer, prompt_ids) -> list[list[int]]:
    vocab, longest = model.config.vocab_size, model.config.max_seq_len
    prompts = [list(p) for p in prompt_ids]
    if not prompts:
        raise InputError("prompt_ids is empty; give at least one prompt")
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise InputError(f"prompt {index} is empty; every prompt needs at least one token (e.g. BOS)")
        if len(prompt) > longest:
            raise InputError(f"prompt {index} has {len(prompt)} tokens, more than max_seq_len={longest}; "
                             "truncate it")
        bad = [t for t in prompt if not isinstance(t, int | np.integer) or not 0 <= t < vocab]
        if bad:
            raise InputError(f"prompt {index} holds token {bad[0]!r}, outside the vocabulary 0..{vocab - 1}")
    return prompts


def _checked_batches(batches, num_prompts: int) -> list[list[int]]:
    batches = [list(batch) for batch in batches]
    if not batches:
        raise InputError("batches is empty; give at least one batch of prompt indices")
    for index, batch in enumerate(batches):
        if not batch:
            raise InputError(f"batch {index} is empty")
        bad = [p for p in batch if isinstance(p, bool) or not isinstance(p, int | np.integer)
               or not 0 <= p < num_prompts]
        if bad:
            raise InputError(f"batch {index} holds {bad[0]!r}, not a prompt index in 0..{num_prompts - 1}")
    return [[int(p) for p in batch] for batch in batches]


def _power_of_two(value: int, multiple: int) -> int:
    """The smallest ``multiple * 2**k`` (k >= 0) that is at least ``value``."""
    size = multiple
    while size < value:
        size *= 2
    return size
