"""The routing trace: which experts every token of every request was routed to, layer by layer.

A :class:`RoutingTrace` is the in-memory form of every routing source (the native ``.npz`` format, the
MoE-Beyond CSVs, traces captured from our own model). It is a frozen dataclass that validates itself, so code
that receives one can trust its shapes, id ranges and request layout without re-checking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeless_jax.errors import InputError


def _fail(field: str, message: str) -> None:
    raise InputError(f"RoutingTrace.{field}: {message}")


def _as_int_array(value, field: str, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.size == 0 and array.dtype.kind not in "iu":
        array = array.astype(np.int64)  # an empty list arrives as float64
    if array.dtype.kind not in "iu":
        _fail(field, f"expected an integer array, got dtype {array.dtype}")
    if array.ndim != ndim:
        _fail(field, f"expected {ndim} dimensions, got shape {array.shape}")
    return array


def _expert_dtype(num_experts: int) -> type[np.integer]:
    # int16 halves the memory of a 1.3M-row trace; only absurd expert counts need more.
    return np.int16 if num_experts <= np.iinfo(np.int16).max + 1 else np.int32


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """Per-token, per-layer top-k routing of a set of requests.

    Fields (N tokens, L layers, K experts per token, M hidden size):

    - ``expert_ids`` ``[N, L, K]`` int16 (int32 if ``num_experts`` > 32768): expert ids in ``0..E-1``,
      distinct within each (token, layer). Set-like sources (MoE-Beyond) store each row sorted ascending;
      sources with gate weights keep the gate's order so ``gate_weights`` lines up.
    - ``request_id`` ``[N]`` int32: the request each token belongs to. A request's tokens are contiguous.
    - ``position`` ``[N]`` int32: position of the token within its request, >= 0 and strictly increasing
      inside a request (a subset of a request need not start at 0 or be gap-free).
    - ``num_experts``: E, the number of routed experts.
    - ``layer_ids``: the source's layer numbers for the L axis (MoE-Beyond: 1..26).
    - ``gate_weights`` ``[N, L, K]`` float32, optional: the gate's weight for each chosen expert.
    - ``hidden`` ``[N, L, M]`` float16/float32, optional: the gate input of each token at each layer.
    - ``token_text`` ``[N]`` str, optional: token strings when the source has them.

    Integer fields are cast to the dtypes above; invalid input raises :class:`InputError` naming the field.
    Traces compare by identity (``eq=False``): comparing array fields needs ``np.array_equal``.
    """

    expert_ids: np.ndarray
    request_id: np.ndarray
    position: np.ndarray
    num_experts: int
    layer_ids: tuple[int, ...]
    gate_weights: np.ndarray | None = None
    hidden: np.ndarray | None = None
    token_text: np.ndarray | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int | np.integer):
            _fail("num_experts", f"expected an int, got {self.num_experts!r}")
        if self.num_experts < 1:
            _fail("num_experts", f"must be >= 1, got {self.num_experts}")
        object.__setattr__(self, "num_experts", int(self.num_experts))
        self._check_expert_ids()
        self._check_requests()
        self._check_layer_ids()
        self._check_optional()

    # -- validation -------------------------------------------------------------------------------------

    def _check_expert_ids(self) -> None:
        ids = _as_int_array(self.expert_ids, "expert_ids", 3)
        num_layers, top_k = ids.shape[1], ids.shape[2]
        if num_layers < 1 or top_k < 1:
            _fail("expert_ids", f"expected shape [N, L>=1, K>=1], got {ids.shape}")
        if top_k > self.num_experts:
            _fail("expert_ids", f"top-k {top_k} exceeds num_experts {self.num_experts}")
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.num_experts:
                bad = low if low < 0 else high
                _fail("expert_ids", f"expert id {bad} outside 0..{self.num_experts - 1}")
            if top_k > 1:
                repeats = np.any(np.diff(np.sort(ids, axis=2), axis=2) == 0, axis=2)  # [N, L]
                if repeats.any():
                    token, layer = np.argwhere(repeats)[0]
                    _fail("expert_ids", f"token {token}, layer axis {layer}: ids repeat {ids[token, layer]}")
        object.__setattr__(self, "expert_ids", ids.astype(_expert_dtype(self.num_experts), copy=False))

    def _check_requests(self) -> None:
        num_tokens = self.expert_ids.shape[0]
        request = _as_int_array(self.request_id, "request_id", 1)
        position = _as_int_array(self.position, "position", 1)
        for name, array in (("request_id", request), ("position", position)):
            if array.shape != (num_tokens,):
                _fail(name, f"expected shape ({num_tokens},) to match expert_ids, got {array.shape}")
            if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
                _fail(name, "values must lie in 0..2**31-1")
        request = request.astype(np.int32, copy=False)
        position = position.astype(np.int32, copy=False)
        if num_tokens:
            starts = np.flatnonzero(np.diff(request) != 0) + 1  # first token of each later request run
            run_ids = request[np.concatenate(([0], starts))]
            if np.unique(run_ids).size != run_ids.size:
                _fail("request_id", "the tokens of each request must be contiguous (a request id reappears)")
            same = request[1:] == request[:-1]
            stalls = same & (position[1:] <= position[:-1])
            if stalls.any():
                token = int(np.flatnonzero(stalls)[0]) + 1
                _fail("position", f"token {token}: positions must increase within request {request[token]}")
        object.__setattr__(self, "request_id", request)
        object.__setattr__(self, "position", position)

    def _check_layer_ids(self) -> None:
        try:
            layer_ids = tuple(int(layer) for layer in self.layer_ids)
        except (TypeError, ValueError):
            _fail("layer_ids", f"expected a sequence of ints, got {self.layer_ids!r}")
        if len(layer_ids) != self.expert_ids.shape[1]:
            _fail("layer_ids", f"{len(layer_ids)} ids for {self.expert_ids.shape[1]} layers in expert_ids")
        if len(set(layer_ids)) != len(layer_ids):
            _fail("layer_ids", f"layer ids repeat: {layer_ids}")
        object.__setattr__(self, "layer_ids", layer_ids)

    def _check_optional(self) -> None:
        if self.gate_weights is not None:
            weights = np.asarray(self.gate_weights)
            if weights.shape != self.expert_ids.shape or weights.dtype.kind != "f":
                _fail("gate_weights", f"expected float [N, L, K] {self.expert_ids.shape}, got "
                      f"{weights.dtype} {weights.shape}")
            if not np.isfinite(weights).all():
                _fail("gate_weights", "contains NaN or inf")
            object.__setattr__(self, "gate_weights", weights.astype(np.float32, copy=False))
        if self.hidden is not None:
            hidden = np.asarray(self.hidden)
            if hidden.ndim != 3 or hidden.shape[:2] != self.expert_ids.shape[:2]:
                _fail("hidden", f"expected [N, L, M], N, L = {self.expert_ids.shape[:2]}, got {hidden.shape}")
            if hidden.dtype not in (np.float16, np.float32):
                if hidden.dtype.kind != "f":
                    _fail("hidden", f"expected float16 or float32, got {hidden.dtype}")
                hidden = hidden.astype(np.float32)
            object.__setattr__(self, "hidden", hidden)
        if self.token_text is not None:
            text = np.asarray(self.token_text)
            if text.size == 0 and text.dtype.kind != "U":
                text = text.astype(np.str_)
            if text.dtype.kind != "U" or text.shape != (self.num_tokens,):
                _fail("token_text", f"expected a str array of shape ({self.num_tokens},), got "
                      f"{text.dtype} {text.shape}")
            object.__setattr__(self, "token_text", text)

    # -- sizes ------------------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def requests(self) -> np.ndarray:
        """``[R]`` int32: the request ids in the order their tokens appear."""
        if self.num_tokens == 0:
            return np.zeros(0, np.int32)
        starts = np.concatenate(([0], np.flatnonzero(np.diff(self.request_id) != 0) + 1))
        return self.request_id[starts]

    @property
    def request_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(start [R], stop [R])`` int64 token ranges of the requests, in :attr:`requests` order."""
        if self.num_tokens == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        cuts = np.flatnonzero(np.diff(self.request_id) != 0) + 1
        return np.concatenate(([0], cuts)), np.concatenate((cuts, [self.num_tokens]))

    @property
    def request_lengths(self) -> np.ndarray:
        """``[R]`` int64 token counts of the requests, in :attr:`requests` order."""
        start, stop = self.request_bounds
        return stop - start

    def layer_index(self, layer_id: int) -> int:
        """The index on the L axis of the source layer number ``layer_id``."""
        try:
            return self.layer_ids.index(int(layer_id))
        except ValueError:
            raise InputError(f"layer {layer_id} is not in this trace (layers {self.layer_ids})") from None

    # -- selection --------------------------------------------------------------------------------------

    def tokens_of(self, request_ids) -> np.ndarray:
        """``[n]`` int64 token indices of ``request_ids``, request by request in the order given.

        A request listed twice contributes its tokens twice; an unknown id raises :class:`InputError`.
        """
        wanted = np.asarray(request_ids, dtype=np.int64).reshape(-1)
        if wanted.size == 0:
            return np.zeros(0, np.int64)
        ids = self.requests.astype(np.int64)
        start, stop = self.request_bounds
        order = np.argsort(ids, kind="stable")
        where = np.searchsorted(ids, wanted, sorter=order)
        where = np.minimum(where, ids.size - 1)
        found = order[where]
        missing = ids[found] != wanted
        if missing.any():
            raise InputError(f"request id {int(wanted[np.argmax(missing)])} is not in this trace")
        return _concat_ranges(start[found], stop[found])

    def subset(self, token_index) -> RoutingTrace:
        """A trace of the tokens ``token_index`` ``[n]`` (in that order; the result must still be valid)."""
        index = np.asarray(token_index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < -self.num_tokens or index.max() >= self.num_tokens):
            raise InputError(f"token index out of range for a trace of {self.num_tokens} tokens")

        def take(array):
            return None if array is None else array[index]

        return RoutingTrace(
            expert_ids=self.expert_ids[index],
            request_id=self.request_id[index],
            position=self.position[index],
            num_experts=self.num_experts,
            layer_ids=self.layer_ids,
            gate_weights=take(self.gate_weights),
            hidden=take(self.hidden),
            token_text=take(self.token_text),
        )

    def split_by_request(self, fraction: float, seed: int = 0) -> tuple[RoutingTrace, RoutingTrace]:
        """Split whole requests at random into ``(fit, test)``; ``fit`` gets ``round(fraction * R)`` of them.

        Both parts keep the original request order. With two or more requests each part gets at least one,
        so a 7:3 split (``fraction=0.7``) never leaves an empty test set.
        """
        if not 0.0 < fraction < 1.0:
            raise InputError(f"split fraction must lie strictly between 0 and 1, got {fraction}")
        requests = self.requests
        num_fit = round(fraction * requests.size)
        if requests.size >= 2:
            num_fit = min(max(num_fit, 1), requests.size - 1)
        chosen = np.random.default_rng(seed).permutation(requests.size)[:num_fit]
        in_fit = np.zeros(requests.size, bool)
        in_fit[chosen] = True
        return self.subset(self.tokens_of(requests[in_fit])), self.subset(self.tokens_of(requests[~in_fit]))


def _concat_ranges(start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """``[sum(stop - start)]`` int64: ranges ``start[i]:stop[i]`` laid end to end, without a Python loop."""
    lengths = (stop - start).astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    # Each output element is its range's start plus its offset inside the range.
    range_of = np.repeat(np.arange(lengths.size), lengths)
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return start.astype(np.int64)[range_of] + offsets
