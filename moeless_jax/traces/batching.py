"""Batches of a routing trace, and the per-(batch, layer) expert loads they produce.

A batch is an ``[n]`` int64 array of token indices into a :class:`RoutingTrace`. Both batchers keep requests
whole and in order: the prefill of a request is never split across batches.

- :func:`token_budget_batches` packs requests greedily up to a token budget.
- :func:`window_batches` is the MoEless paper's batching: requests that arrive within the same ``window_s``
  window of an arrival trace form one batch. Arrival ``i`` (in arrival order) is served by the trace's request
  ``i mod R`` (``R`` requests in trace order), so a trace with fewer requests than arrivals is reused
  cyclically. The arrival trace only supplies *when* requests come; their token counts come from the routing
  trace, because the routing of a token can only be taken from a prompt that was actually run.
"""

from __future__ import annotations

import numpy as np

from moeless_jax.errors import InputError
from moeless_jax.traces.arrivals import ArrivalTrace
from moeless_jax.traces.routing import RoutingTrace, _concat_ranges

# expert_loads bins this many (token, layer, k) entries per np.bincount call: big enough to amortize the
# call, small enough that the gathered ids of a long trace never need gigabytes.
_LOAD_CHUNK = 1 << 23
# expert_loads adds up per-run counts with a matrix product when it costs at most this many times the
# direct count's work (a product's multiply-add is far cheaper than a bincount entry) ...
_RUN_REUSE = 64
# ... and builds at most this many (batch, run kind) matrix elements at a time.
_MATRIX_ELEMENTS = 1 << 22


def token_budget_batches(trace: RoutingTrace, batch_tokens: int) -> list[np.ndarray]:
    """Pack whole requests, in order, into batches of at most ``batch_tokens`` tokens.

    A request joins the current batch if it fits, else starts the next one; a request longer than the budget
    forms a batch of its own. Every token appears in exactly one batch, and the concatenation of the batches
    is ``arange(trace.num_tokens)``.
    """
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int | np.integer) or batch_tokens < 1:
        raise InputError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
    start, stop = trace.request_bounds
    lengths = stop - start
    batches: list[np.ndarray] = []
    first, filled = 0, 0  # first request of the open batch, tokens in it
    for index, length in enumerate(lengths.tolist()):
        if filled and filled + length > batch_tokens:
            batches.append(np.arange(start[first], stop[index - 1], dtype=np.int64))
            first, filled = index, 0
        filled += length
    if lengths.size:
        batches.append(np.arange(start[first], stop[-1], dtype=np.int64))
    return batches


def window_requests(
    trace: RoutingTrace, arrivals: ArrivalTrace, *, window_s: float = 1.0, max_requests: int | None = None
) -> list[np.ndarray]:
    """The request ids of each non-empty ``window_s`` window in arrival order (see :func:`window_batches`)."""
    if not window_s > 0:
        raise InputError(f"window_s must be > 0, got {window_s}")
    if max_requests is not None and max_requests < 1:
        raise InputError(f"max_requests must be >= 1 or None, got {max_requests}")
    requests = trace.requests
    if requests.size == 0:
        raise InputError("the routing trace has no requests to map arrivals onto")
    arrival_s = arrivals.arrival_s[:max_requests]  # [A] seconds from the first arrival, sorted
    # Window w holds arrivals with w * window_s <= t < (w + 1) * window_s.
    window = np.floor(arrival_s / window_s).astype(np.int64)  # [A]
    served = requests[np.arange(arrival_s.size) % requests.size]  # [A] request id serving each arrival
    cuts = np.flatnonzero(np.diff(window)) + 1  # arrivals are sorted, so a window is a contiguous run
    return np.split(served, cuts) if served.size else []


def window_batches(
    trace: RoutingTrace, arrivals: ArrivalTrace, *, window_s: float = 1.0, max_requests: int | None = None
) -> list[np.ndarray]:
    """The paper's batching: the requests arriving in the same ``window_s`` window form one batch.

    Windows are ``[w * window_s, (w + 1) * window_s)`` counted from the first arrival; empty windows are
    skipped. Only the first ``max_requests`` arrivals are used when it is given. Arrival ``i`` is mapped to
    ``trace.requests[i % R]``: the trace's requests in order, cycling when there are more arrivals than
    requests. A batch holds those requests' tokens, request after request in arrival order; a request reused
    by a later arrival contributes its tokens again (so tokens can appear in several batches, and twice in
    one window only when a window holds more than ``R`` arrivals).
    """
    start, stop = trace.request_bounds
    order = {int(request): index for index, request in enumerate(trace.requests)}
    batches = []
    for requests in window_requests(trace, arrivals, window_s=window_s, max_requests=max_requests):
        index = np.fromiter((order[int(r)] for r in requests), np.int64, requests.size)
        batches.append(_concat_ranges(start[index], stop[index]))
    return batches


def expert_loads(trace: RoutingTrace, batches: list[np.ndarray]) -> np.ndarray:
    """``[B, L, E]`` int64: how many of batch ``b``'s tokens layer ``l`` routed to expert ``e``.

    Each token adds K (top-k) to its layer's row, so ``loads[b, l].sum() == len(batches[b]) * K``. A token
    listed twice counts twice.
    """
    num_batches = len(batches)
    tokens, batch_of_token = _flatten(batches, trace.num_tokens)  # [n], [n]
    if tokens.size == 0:
        return np.zeros((num_batches, trace.num_layers, trace.num_experts), np.int64)
    starts, lengths, run_batch = _request_runs(trace, tokens, batch_of_token)  # [U_all] each
    # Window batching serves the same requests again and again, so count each distinct run of tokens once
    # and add the run counts per batch as a (batch x run) matrix product, exact in float64 for integers.
    run_key, run_kind = np.unique(starts * (trace.num_tokens + 1) + lengths, return_inverse=True)
    num_kinds = run_key.size
    if num_kinds * num_batches * trace.num_experts > _RUN_REUSE * tokens.size * trace.top_k:
        return _count_tokens(trace, tokens, batch_of_token, num_batches)  # little reuse: count directly
    kind_start, kind_length = run_key // (trace.num_tokens + 1), run_key % (trace.num_tokens + 1)
    kind_tokens = _concat_ranges(kind_start, kind_start + kind_length)
    kind_of_token = np.repeat(np.arange(num_kinds), kind_length)
    kind_loads = _count_tokens(trace, kind_tokens, kind_of_token, num_kinds)  # [U, L, E]
    kind_loads = kind_loads.reshape(num_kinds, -1).astype(np.float64)  # [U, L*E]
    loads = np.zeros((num_batches, trace.num_layers * trace.num_experts), np.int64)
    rows = max(1, _MATRIX_ELEMENTS // max(num_kinds, 1))  # batches per product, to bound memory
    for first in range(0, num_batches, rows):
        last = min(first + rows, num_batches)
        in_chunk = (run_batch >= first) & (run_batch < last)
        uses = np.zeros((last - first, num_kinds))  # [b, U] how often batch b holds run kind u
        np.add.at(uses, (run_batch[in_chunk] - first, run_kind[in_chunk]), 1.0)
        loads[first:last] = np.rint(uses @ kind_loads).astype(np.int64)
    return loads.reshape(num_batches, trace.num_layers, trace.num_experts)


def _flatten(batches: list[np.ndarray], num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [n], batch_of_token [n])`` int64 from the batches, checking the indices."""
    arrays = [np.asarray(batch).reshape(-1) for batch in batches]
    for batch in arrays:
        if batch.size and batch.dtype.kind not in "iu":
            raise InputError(f"batches must hold integer token indices, got dtype {batch.dtype}")
    sizes = np.array([batch.size for batch in arrays], np.int64)
    tokens = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= num_tokens):
        raise InputError(f"a batch holds a token index outside 0..{num_tokens - 1}")
    return tokens, np.repeat(np.arange(len(arrays), dtype=np.int64), sizes)


def _request_runs(trace: RoutingTrace, tokens: np.ndarray, batch_of_token: np.ndarray):
    """Split the token list into runs of consecutive tokens of one request within one batch.

    Returns ``(start token [U], length [U], batch [U])`` int64, in order.
    """
    if tokens.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    breaks = (
        (np.diff(tokens) != 1)
        | (np.diff(batch_of_token) != 0)
        | (np.diff(trace.request_id[tokens]) != 0)
    )
    first = np.concatenate(([0], np.flatnonzero(breaks) + 1))  # [U] index of each run's first token
    lengths = np.diff(np.concatenate((first, [tokens.size])))
    return tokens[first], lengths, batch_of_token[first]


def _count_tokens(trace: RoutingTrace, tokens: np.ndarray, group: np.ndarray, num_groups: int) -> np.ndarray:
    """``[G, L, E]`` int64 expert counts of ``tokens [n]`` grouped by ``group [n]`` (non-decreasing)."""
    num_layers, num_experts = trace.num_layers, trace.num_experts
    loads = np.zeros((num_groups, num_layers * num_experts), np.int64)
    layer_offset = (np.arange(num_layers, dtype=np.int64) * num_experts)[None, :, None]  # [1, L, 1]
    step = max(1, _LOAD_CHUNK // (num_layers * trace.top_k))  # tokens per bincount call
    for first in range(0, tokens.size, step):
        chunk, owner = tokens[first : first + step], group[first : first + step]
        low = int(owner[0])  # groups are non-decreasing, so a chunk covers groups low..owner[-1]
        span = int(owner[-1]) - low + 1
        # (group in chunk, layer, expert) as one flat bin index, so one bincount counts the whole chunk.
        flat = trace.expert_ids[chunk].astype(np.int64) + layer_offset
        flat += ((owner - low) * num_layers * num_experts)[:, None, None]
        counts = np.bincount(flat.reshape(-1), minlength=span * num_layers * num_experts)
        loads[low : low + span] += counts.reshape(span, -1)
    return loads.reshape(num_groups, num_layers, num_experts)
