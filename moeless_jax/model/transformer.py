"""The decoder-only MoE language model: pre-norm blocks of grouped-query attention and a replicated MoE layer.

Activations ``[B, T, M]`` are sharded with the batch over every mesh axis (``ep``, and ``data`` on a
data x expert mesh); each block's MoE layer takes the flattened ``[B*T, M]`` tokens, so the layer's
expert parallelism spans the whole batch. Non-MoE parameters are replicated on every device of the mesh.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moeless_jax.errors import InputError
from moeless_jax.model.attention import (
    Attention,
    KVCache,
    RMSNorm,
    batch_sharding,
    init_cache,
    normal_init,
    replicated,
)
from moeless_jax.model.config import ModelConfig
from moeless_jax.moe.capacity import Buffers, buffer_ladder
from moeless_jax.moe.experts import MLPWeights
from moeless_jax.moe.layer import EP_AXIS, MoELayer, MoEOutput, place
from moeless_jax.moe.replica_table import ReplicaTable
from moeless_jax.predict.in_step import RoutingOnlyStream
from moeless_jax.replication.layer_ahead import LayerAhead

Cache = tuple[KVCache, ...]
# The MoE layer's table-dependent state: rebuilt from its logical experts and a table, never stored.
SLOT_STATE = ("experts", "table")
LOGICAL_EXPERTS = "logical_experts"


class ModelOutput(NamedTuple):
    """What one forward pass returns.

    logits:            [B, T, V] float32.
    expert_counts:     [L, E] int32 assignments per logical expert in each layer (padding rows included:
                       they load the experts like any token).
    slot_counts:       [L, P] int32 assignments per physical slot in each layer.
    overflow:          [] int32 assignments not computed, summed over layers (0 unless buffers were too
                       small; non-zero means the logits are incomplete: rerun with larger buffers).
    load_balance_loss: [] float32 the layers' auxiliary balance loss, mean over layers.
    router_z_loss:     [] float32 the layers' router z-loss, mean over layers.
    cache:             the per-layer :class:`KVCache` with this call's tokens appended, or None.
    gate_inputs:       [L, B, T, M] the normed hidden states each MoE layer routed, when asked for.
    weight_copies:     [L, D] int32 slot weights each device of the ``ep`` axis received, per layer, from
                       layer-ahead replication in this call (zeros without it).
    """

    logits: jax.Array
    expert_counts: jax.Array
    slot_counts: jax.Array
    overflow: jax.Array
    load_balance_loss: jax.Array
    router_z_loss: jax.Array
    cache: Cache | None = None
    gate_inputs: jax.Array | None = None
    weight_copies: jax.Array | None = None


class Block(nnx.Module):
    """``x + attn(norm(x))`` then ``x + moe(norm(x))``."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        mesh: jax.sharding.Mesh,
        rngs: nnx.Rngs,
        table: ReplicaTable | None = None,
        logical_experts: MLPWeights | None = None,
    ):
        dtype = jnp.dtype(config.dtype)
        self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps, mesh=mesh, dtype=dtype)
        self.attn = Attention(
            config.d_model,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            rope_theta=config.rope_theta,
            mesh=mesh,
            rngs=rngs,
            dtype=dtype,
        )
        self.moe_norm = RMSNorm(config.d_model, eps=config.norm_eps, mesh=mesh, dtype=dtype)
        self.moe = MoELayer(
            config.moe_config(mesh.shape[EP_AXIS]),
            mesh=mesh,
            rngs=rngs,
            table=table,
            logical_experts=logical_experts,
        )

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: KVCache | None, buffers: Buffers | None
    ) -> tuple[jax.Array, KVCache | None, MoEOutput, jax.Array]:
        """``x [B, T, M]`` -> (``[B, T, M]``, updated cache, MoE layer output, MoE input ``[B, T, M]``)."""
        h, cache = self.attn(self.attn_norm(x), positions, cache)
        x = x + h
        gate_input = self.moe_norm(x)
        b, t, m = x.shape
        moe = self.moe(gate_input.reshape(b * t, m), buffers=buffers)
        return x + moe.y.reshape(b, t, m), cache, moe, gate_input


class MoETransformer(nnx.Module):
    """Decoder-only language model whose every feed-forward is a replicated expert-parallel MoE layer.

    ``tables``: one :class:`ReplicaTable` for every layer, a list with one per layer (None entries: static),
    or None (static expert parallelism everywhere). ``logical_experts``: per-layer ``[E, ...]`` expert
    weights to start from (a checkpoint's), or None to initialise them.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        mesh: jax.sharding.Mesh,
        rngs: nnx.Rngs,
        tables: ReplicaTable | Sequence[ReplicaTable | None] | None = None,
        logical_experts: Sequence[MLPWeights] | None = None,
    ):
        if EP_AXIS not in mesh.shape:
            raise InputError(f"mesh has axes {tuple(mesh.axis_names)}; the model needs an '{EP_AXIS}' axis "
                             "(build it with moeless_jax.moe.make_ep_mesh)")
        self.config = config
        self.mesh = mesh
        layers = config.num_layers
        tables = _per_layer(tables, layers, "tables")
        experts = _per_layer(logical_experts, layers, "logical_experts")
        dtype = jnp.dtype(config.dtype)
        m, v = config.d_model, config.vocab_size
        # Tied: unit-variance logits at init needs embedding rows of norm ~1, i.e. entries ~ 1/sqrt(M).
        self.embed = nnx.Param(replicated(mesh, normal_init(rngs.params(), (v, m), m, dtype)))
        self.layers = nnx.List(
            [Block(config, mesh=mesh, rngs=rngs, table=tables[i], logical_experts=experts[i])
             for i in range(layers)]
        )
        self.final_norm = RMSNorm(m, eps=config.norm_eps, mesh=mesh, dtype=dtype)
        self.lm_head = None
        if not config.tie_embeddings:
            self.lm_head = nnx.Param(replicated(mesh, normal_init(rngs.params(), (m, v), m, dtype)))

    # ------------------------------------------------------------------ the protocol controllers use
    def moe_layers(self) -> list[MoELayer]:
        """The MoE layer of each block, in order (set tables on these to replicate experts)."""
        return [block.moe for block in self.layers]

    @property
    def num_devices(self) -> int:
        """Devices of the whole mesh; batches must be a multiple of it."""
        return self.mesh.size

    def buffer_ladder(self, batch: int, time: int) -> list[Buffers]:
        """Growing MoE buffer sizes for a ``[batch, time]`` call, ending with the worst case, for
        :func:`moeless_jax.moe.call_dropless`: ``call_dropless(lambda b: step(model, tokens, b), ladder)``
        reruns a call whose ``overflow`` is non-zero until every assignment was computed."""
        self._check_batch(batch)
        return buffer_ladder(self.moe_layers()[0].config, batch * time // self.mesh.size)

    def init_cache(self, batch: int, max_len: int | None = None) -> Cache:
        """An empty per-layer cache for ``batch`` sequences of up to ``max_len`` (default: max_seq_len)."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        self._check_batch(batch)
        if not 1 <= max_len <= self.config.max_seq_len:
            raise InputError(f"max_len {max_len} must lie in 1..max_seq_len={self.config.max_seq_len}")
        c = self.config
        return tuple(
            init_cache(batch, max_len, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                       dtype=jnp.dtype(c.dtype), mesh=self.mesh)
            for _ in range(c.num_layers)
        )

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        cache: Cache | None = None,
        buffers: Buffers | None = None,
        return_gate_inputs: bool = False,
        layer_ahead: LayerAhead | None = None,
    ) -> ModelOutput:
        """``tokens [B, T]`` int32 -> :class:`ModelOutput` (B a multiple of the mesh's device count).

        ``positions [B, T]`` feed RoPE (default: each sequence's cache length onward, or 0..T-1). With a
        ``cache``, each sequence's tokens are appended at its own length and attend to everything before.
        ``buffers`` (static) sizes every MoE layer's buffers (default: the layer's own first rung).
        ``layer_ahead``: replicate layer-ahead in this call (:mod:`moeless_jax.replication.layer_ahead`):
        layer ``l + 1``'s table is planned and its weights moved during layer ``l``, in place (under
        ``nnx.jit`` the new tables persist). Outputs are those of the tables the call started with.
        """
        self._check_tokens(tokens, cache)
        b, t = tokens.shape
        tokens = place(jnp.asarray(tokens, jnp.int32), self.mesh, batch_sharding(self.mesh, 2).spec)
        if positions is None:
            start = cache[0].lengths[:, None] if cache is not None else jnp.zeros((b, 1), jnp.int32)
            positions = start + jnp.arange(t, dtype=jnp.int32)[None, :]
        positions = place(jnp.asarray(positions, jnp.int32), self.mesh, batch_sharding(self.mesh, 2).spec)
        x = self._embed(tokens)
        ahead = _LayerAheadRun.start(self, layer_ahead, positions)
        new_cache, outs, gate_inputs = [], [], []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache, moe, gate_input = block(x, positions, layer_cache, buffers)
            ahead.after_layer(i, gate_input.reshape(b * t, -1), moe)
            new_cache.append(layer_cache)
            outs.append(moe)
            if return_gate_inputs:
                gate_inputs.append(gate_input)
        x = self.final_norm(x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.einsum("btm,mv->btv", x, head, preferred_element_type=jnp.float32)
        return ModelOutput(
            logits=logits,
            expert_counts=jnp.stack([o.expert_counts for o in outs]),
            slot_counts=jnp.stack([o.slot_counts for o in outs]),
            overflow=sum(o.overflow for o in outs),
            load_balance_loss=jnp.mean(jnp.stack([o.load_balance_loss for o in outs])),
            router_z_loss=jnp.mean(jnp.stack([o.router_z_loss for o in outs])),
            cache=None if cache is None else tuple(new_cache),
            gate_inputs=jnp.stack(gate_inputs) if return_gate_inputs else None,
            weight_copies=ahead.copies(),
        )

    def _embed(self, tokens: jax.Array) -> jax.Array:
        """``tokens [B, T]`` -> ``[B, T, M]`` rows of the (replicated) embedding, batch-sharded."""
        out = batch_sharding(self.mesh, 3)
        table = self.embed[...]
        if self.mesh.explicit_axes:
            return table.at[tokens].get(out_sharding=out)
        return place(table[tokens], self.mesh, out.spec)

    def _check_batch(self, batch: int) -> None:
        n = self.mesh.size
        if batch % n:
            raise InputError(
                f"batch of {batch} sequences is not a multiple of the mesh's {n} devices; pad it to "
                f"{-(-batch // n) * n} rows (generate() pads and discards the extra rows itself)"
            )

    def _check_tokens(self, tokens, cache: Cache | None) -> None:
        if tokens.ndim != 2:
            raise InputError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        self._check_batch(tokens.shape[0])
        if cache is not None:
            if len(cache) != self.config.num_layers:
                raise InputError(f"cache has {len(cache)} layers, the model {self.config.num_layers}")
            if cache[0].k.shape[0] != tokens.shape[0]:
                raise InputError(f"cache holds {cache[0].k.shape[0]} sequences, tokens {tokens.shape[0]}")

    # ------------------------------------------------------------------ logical state (checkpoints)
    def logical_state(self) -> dict[str, jax.Array]:
        """Every array of the model by dotted name, with each MoE layer's slot weights replaced by its
        logical experts ``<layer>.logical_experts.{gate,up,down} [E, ...]``: independent of the tables."""
        state: dict[str, jax.Array] = {}
        for prefix, layer in _moe_paths(self):
            for field, weight in zip(MLPWeights._fields, layer.logical_experts(), strict=True):
                state[_name((*prefix, LOGICAL_EXPERTS, field))] = weight
        for name, (leaf, _) in _table_free_variables(self):
            state[name] = leaf
        return state

    @classmethod
    def from_logical_state(
        cls,
        config: ModelConfig,
        state: dict[str, Any],
        *,
        mesh: jax.sharding.Mesh,
        tables: ReplicaTable | Sequence[ReplicaTable | None] | None = None,
    ) -> MoETransformer:
        """A model built from :meth:`logical_state` arrays (any array type, any dtype: each is cast to the
        dtype the model gives it and laid out as the model shards it). A missing, unexpected or misshapen
        array raises :class:`InputError` naming it."""
        state = dict(state)
        experts = []
        for i in range(config.num_layers):
            names = [f"layers.{i}.moe.{LOGICAL_EXPERTS}.{field}" for field in MLPWeights._fields]
            missing = [n for n in names if n not in state]
            if missing:
                raise InputError(f"array {missing[0]!r} is missing")
            e, m, f = config.moe.num_experts, config.d_model, config.moe.d_ff
            weights = MLPWeights(*(np.asarray(state.pop(n)) for n in names))
            for name, w, want in zip(names, weights, ((e, m, f), (e, m, f), (e, f, m)), strict=True):
                if w.shape != want:
                    raise InputError(f"array {name!r} has shape {w.shape}; the config needs {want}")
            experts.append(MLPWeights(*(jnp.asarray(w, config.dtype) for w in weights)))
        model = cls(config, mesh=mesh, rngs=nnx.Rngs(0), tables=tables, logical_experts=experts)
        expected = dict(_table_free_variables(model))
        for name in sorted(set(state) - set(expected)):
            raise InputError(f"array {name!r} is not part of this model")
        for name, (current, setter) in expected.items():
            if name not in state:
                raise InputError(f"array {name!r} is missing")
            value = np.asarray(state[name])
            if value.shape != current.shape:
                raise InputError(f"array {name!r} has shape {value.shape}; the config needs {current.shape}")
            setter(jax.device_put(jnp.asarray(value, current.dtype), current.sharding))
        return model


class _LayerAheadRun:
    """One call's layer-ahead replication: after layer ``l`` routes, plan and move layer ``l + 1``."""

    def __init__(self, model: MoETransformer, layer_ahead: LayerAhead | None, state):
        self.model, self.layer_ahead, self.state = model, layer_ahead, state
        self.moves = [jnp.zeros(model.mesh.shape[EP_AXIS], jnp.int32)]

    @classmethod
    def start(cls, model: MoETransformer, layer_ahead: LayerAhead | None, positions: jax.Array):
        b, t = positions.shape
        if layer_ahead is None or not layer_ahead.active(b * t, model.mesh):
            return cls(model, None, None)
        layers = model.moe_layers()
        layer_ahead.check_stack(layers)
        inputs = None
        if layer_ahead.stream is not None:
            inputs = RoutingOnlyStream.inputs_for_rows(b, t, positions, model.mesh)
        return cls(model, layer_ahead, layer_ahead.begin(b * t, model.mesh, inputs))

    def after_layer(self, index: int, gate_input: jax.Array, out: MoEOutput) -> None:
        layers = self.model.moe_layers()
        if self.layer_ahead is None or index + 1 >= len(layers):
            return
        following = layers[index + 1]
        self.state, forecast = self.layer_ahead.forecast(self.state, index, gate_input, out, following)
        self.moves.append(self.layer_ahead.install(following, forecast).moves)

    def copies(self) -> jax.Array:
        """``[L, D]`` weight copies per layer and device (zeros past the last installed layer)."""
        num_layers = len(self.model.layers)
        pad = [jnp.zeros_like(self.moves[0])] * (num_layers - len(self.moves))
        return jnp.stack(self.moves + pad)


def _per_layer(value, layers: int, name: str) -> list:
    """``value`` as one entry per layer: None -> all None; a list must have ``layers`` entries."""
    if value is None or isinstance(value, ReplicaTable):
        return [value] * layers
    value = list(value)
    if len(value) != layers:
        raise InputError(f"{name} has {len(value)} entries; the model has {layers} layers")
    return value


def _name(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _moe_paths(model: nnx.Module) -> list[tuple[tuple, MoELayer]]:
    return [(tuple(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, MoELayer)]


def _table_free_variables(model: nnx.Module):
    """(dotted name, (array, setter)) of every array leaf in the model's variables, the MoE layers' slot
    weights and tables left out. A variable's value may itself be a pytree; each leaf is named."""
    moe_prefixes = [prefix for prefix, _ in _moe_paths(model)]
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        path = tuple(path)
        if any(path[: len(p)] == p and len(path) > len(p) and path[len(p)] in SLOT_STATE
               for p in moe_prefixes):
            continue
        value = variable.get_value()
        leaves, treedef = jax.tree_util.tree_flatten_with_path(value)
        for index, (subpath, leaf) in enumerate(leaves):
            name = _name(path + tuple(_key_name(k) for k in subpath))
            yield name, (leaf, _leaf_setter(variable, treedef, [x for _, x in leaves], index))


def _leaf_setter(variable, treedef, leaves: list, index: int) -> Callable[[jax.Array], None]:
    def set_leaf(new: jax.Array) -> None:
        leaves[index] = new
        variable.set_value(jax.tree_util.tree_unflatten(treedef, leaves))

    return set_leaf


# ---------------------------------------------------------------------------------------------- training
def loss_fn(
    model: MoETransformer,
    tokens: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    buffers: Buffers | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-level cross-entropy (mean over ``mask``) plus the weighted auxiliary MoE losses.

    tokens, targets: [B, T] int32; mask: [B, T] (1 where the target counts). Returns (loss [], metrics:
    cross_entropy, load_balance_loss, router_z_loss, overflow, num_tokens, and the step's expert_counts
    [L, E] and slot_counts [L, P] for a replication controller). A non-zero ``overflow`` means
    some assignments were not computed (nor differentiated): rerun the step with the next rung of
    :meth:`MoETransformer.buffer_ladder` as ``buffers`` (positional, so ``nnx.grad`` can take it; mark it
    static under jit).
    """
    out = model(tokens, buffers=buffers)
    log_probs = jax.nn.log_softmax(out.logits, axis=-1)
    vocab = out.logits.shape[-1]
    # A one-hot product rather than a gather: elementwise, so it keeps the batch sharding on any mesh.
    target_logp = jnp.sum(log_probs * jax.nn.one_hot(targets, vocab, dtype=log_probs.dtype), axis=-1)
    mask = mask.astype(jnp.float32)
    num_tokens = jnp.sum(mask)
    cross_entropy = -jnp.sum(target_logp * mask) / jnp.maximum(num_tokens, 1.0)
    moe = model.config.moe
    loss = (cross_entropy + moe.load_balance_weight * out.load_balance_loss
            + moe.router_z_weight * out.router_z_loss)
    metrics = {
        "cross_entropy": cross_entropy,
        "load_balance_loss": out.load_balance_loss,
        "router_z_loss": out.router_z_loss,
        "overflow": out.overflow,
        "num_tokens": num_tokens,
        "expert_counts": out.expert_counts,
        "slot_counts": out.slot_counts,
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------- generation
def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array) -> jax.Array:
    """``logits [B, V]`` -> ``[B]`` int32: argmax when ``temperature`` is 0, else a softmax sample."""
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@nnx.jit(static_argnames=("buffers", "layer_ahead"))
def _prefill_step(model: MoETransformer, tokens, cache, lengths, key, temperature, buffers, layer_ahead=None):
    """Run right-padded prompts ``[B, T]``; sample each row's next token after its last prompt token."""
    out = model(tokens, cache=cache, buffers=buffers, layer_ahead=layer_ahead)
    last = jax.nn.one_hot(lengths - 1, tokens.shape[1], dtype=out.logits.dtype)  # [B, T]
    # Sum over one-hot weights (exact: one term is x, the others 0): no gather across the sharded batch.
    last_logits = jnp.einsum("bt,btv->bv", last, out.logits, precision=jax.lax.Precision.HIGHEST)
    # The pad positions were written too; each sequence continues at its own prompt length.
    cache = tuple(c._replace(lengths=lengths) for c in out.cache)
    return _sample(last_logits, key, temperature), out._replace(cache=cache)


@nnx.jit(static_argnames=("buffers", "layer_ahead"))
def _decode_step(model: MoETransformer, tokens, cache, key, temperature, buffers, layer_ahead=None):
    """One token per sequence ``[B, 1]`` through the cache; sample each row's next token."""
    out = model(tokens, cache=cache, buffers=buffers, layer_ahead=layer_ahead)
    return _sample(out.logits[:, 0], key, temperature), out


def _dropless(step: Callable[[Buffers], tuple[jax.Array, ModelOutput]], ladder: list[Buffers]):
    """``step(buffers)`` on growing buffers until no assignment overflowed (the last rung cannot)."""
    for buffers in ladder:
        token, out = step(buffers)
        if int(out.overflow) == 0:
            return token, out
    raise RuntimeError(f"MoE layers overflowed even with worst-case buffers {ladder[-1]}")


def generate(
    model: MoETransformer,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    eos_id: int | None = None,
    on_step: Callable[[ModelOutput], None] | None = None,
    layer_ahead: LayerAhead | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns the new tokens of each prompt.

    Prompts of different lengths run together: right-padded for one prefill, then one token per step
    through the KV cache (each step compiled once and reused). The batch is padded to a multiple of the
    mesh's devices with dummy rows whose outputs are discarded. ``temperature`` 0 is greedy; otherwise
    tokens are sampled from ``softmax(logits / temperature)`` with ``seed``. A sequence stops after
    emitting ``eos_id`` (included). ``on_step(output)`` sees every step's :class:`ModelOutput` (prefill
    first), e.g. to read ``expert_counts [L, E]`` and change the MoE layers' tables between steps; the
    counts include padding and dummy rows, which load the experts like real tokens. ``layer_ahead``
    replicates layer-ahead inside every step large enough for it (the same object for every call: it is part
    of the compiled step); the tokens are those of the static tables.
    """
    prompts = _checked_prompts(model.config, prompt_ids, max_new_tokens, temperature, eos_id)
    n, devices = len(prompts), model.num_devices
    batch = -(-n // devices) * devices
    lengths = np.array([len(p) for p in prompts] + [1] * (batch - n), np.int32)
    longest = int(lengths.max())
    width = _round_up(longest, 8)
    padded = np.zeros((batch, width), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = prompt
    mesh = model.mesh
    temp = jnp.float32(temperature)
    base_key = jax.random.key(seed)
    # A full-length cache: one compiled decode step per batch size, whatever the prompt lengths.
    cache = model.init_cache(batch)
    tokens = jax.device_put(padded, batch_sharding(mesh, 2))
    row_lengths = jax.device_put(lengths, batch_sharding(mesh, 1))
    ladder = model.buffer_ladder(batch, width)
    token, out = _dropless(
        lambda buffers: _prefill_step(model, tokens, cache, row_lengths, jax.random.fold_in(base_key, 0),
                                      temp, buffers, layer_ahead),
        ladder,
    )
    decode_ladder = model.buffer_ladder(batch, 1)
    generated: list[list[int]] = [[] for _ in range(n)]
    done = np.zeros(n, bool)
    for step in range(max_new_tokens):
        if on_step is not None:
            on_step(out)
        chosen = np.asarray(token)
        for row in np.flatnonzero(~done):
            generated[row].append(int(chosen[row]))
            stopped = eos_id is not None and chosen[row] == eos_id
            done[row] = stopped or len(generated[row]) == max_new_tokens
        if done.all():
            break
        cache, key = out.cache, jax.random.fold_in(base_key, step + 1)
        tokens = jax.device_put(chosen[:, None], batch_sharding(mesh, 2))
        token, out = _dropless(
            lambda buffers, tokens=tokens, cache=cache, key=key: _decode_step(
                model, tokens, cache, key, temp, buffers, layer_ahead
            ),
            decode_ladder,
        )
    return generated


def _checked_prompts(config: ModelConfig, prompt_ids, max_new_tokens: int, temperature: float,
                     eos_id: int | None) -> list[list[int]]:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    vocab = config.vocab_size
    if eos_id is not None and not 0 <= eos_id < vocab:
        raise InputError(f"eos_id {eos_id} is outside the vocabulary 0..{vocab - 1}")
    prompts = [list(p) for p in prompt_ids]
    if not prompts:
        raise InputError("prompt_ids is empty; give at least one prompt")
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise InputError(f"prompt {row} is empty; every prompt needs at least one token (e.g. a BOS id)")
        bad = [t for t in prompt if not isinstance(t, int | np.integer) or not 0 <= t < vocab]
        if bad:
            raise InputError(f"prompt {row} holds token {bad[0]!r}, outside the vocabulary 0..{vocab - 1}")
        if len(prompt) + max_new_tokens > config.max_seq_len:
            raise InputError(
                f"prompt {row} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                f"max_seq_len={config.max_seq_len}; shorten the prompt or generate fewer tokens"
            )
    return prompts


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple

