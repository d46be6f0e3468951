"""Training the MoE language model: optax AdamW with warm-up and cosine decay, dropless steps, held-out
perplexity, orbax checkpoints with resume, a progress bar and a loss curve.

A step is two jitted calls: the gradient (with static MoE buffer sizes) and the optimizer update. When a
gradient call reports ``overflow > 0`` (some assignments did not fit the buffers and were neither computed
nor differentiated), the step is recomputed on the next rung of :meth:`MoETransformer.buffer_ladder` before
anything is updated, so every step trains on every token.

The replication controller can run inside the loop (``replication`` in :class:`TrainConfig`): it observes the
step's expert counts without blocking, installs new tables between steps, and moves the optimizer's moments
with the slot weights (:func:`moeless_jax.moe.follow_moves`). Training under any table gives the same model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moeless_jax.config import ConfigError, require, require_positive_ints
from moeless_jax.errors import InputError
from moeless_jax.model.checkpoint import save_model
from moeless_jax.model.config import ModelConfig, preset
from moeless_jax.model.transformer import MoETransformer, loss_fn
from moeless_jax.moe import make_ep_mesh, token_axes
from moeless_jax.moe.capacity import Buffers


@dataclass(frozen=True)
class TrainConfig:
    """What ``moeless train`` does.

    model: a preset name (see :data:`moeless_jax.model.PRESETS`) or a path to a model YAML.
    steps: optimizer steps. batch_size: sequences per step (a multiple of the device count).
    seq_len: tokens per sequence. learning_rate: peak AdamW rate, reached after ``warmup_steps`` and decayed
    by a cosine to ``min_learning_rate_ratio`` of it. weight_decay, grad_clip: AdamW decay, global-norm clip.
    num_devices: devices on the ``ep`` axis (host CPU devices are used on a CPU machine). eval_every: steps
    between held-out evaluations (on ``eval_batches`` batches; the final evaluation uses all held-out text).
    checkpoint_every: steps between resumable checkpoints. seed: parameters and data order.
    save_dtype: dtype of the exported model checkpoint (``bfloat16`` ships small).
    dtype: parameter and activation dtype: ``auto`` (bfloat16 on a GPU or TPU, float32 on CPU, where bfloat16
    matmuls are emulated and slow), or a dtype name; the model config's own dtype when ``None``.
    """

    model: str = "mixtral_tiny"
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    num_devices: int = 1
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 200
    seed: int = 0
    save_dtype: str | None = "bfloat16"
    dtype: str | None = "auto"

    def __post_init__(self) -> None:
        require_positive_ints(
            self,
            "steps", "batch_size", "seq_len", "num_devices", "eval_every", "eval_batches", "checkpoint_every"
        )
        require(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.steps, "warmup_steps",
                f"must lie in 0..steps-1={self.steps - 1}, got {self.warmup_steps!r}")
        require(self.batch_size % self.num_devices == 0, "batch_size",
                f"{self.batch_size} is not a multiple of num_devices={self.num_devices}")
        require(self.learning_rate > 0, "learning_rate", f"must be positive, got {self.learning_rate}")
        require(0 <= self.min_learning_rate_ratio <= 1, "min_learning_rate_ratio",
                f"must lie in [0, 1], got {self.min_learning_rate_ratio}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.grad_clip > 0, "grad_clip", f"must be positive, got {self.grad_clip}")

    def model_config(self) -> ModelConfig:
        config = ModelConfig.from_yaml(self.model) if Path(self.model).suffix in (".yaml", ".yml") \
            else preset(self.model)
        if self.dtype is None:
            return config
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        return dataclasses.replace(config, dtype=dtype)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine decay to ``min_learning_rate_ratio`` x peak."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.learning_rate * config.min_learning_rate_ratio,
    )


def make_optimizer(model: MoETransformer, config: TrainConfig) -> nnx.Optimizer:
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.95, weight_decay=config.weight_decay),
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class TokenData:
    """Packed windows ``[N, seq_len + 1]`` int32 of the train and held-out text."""

    train: np.ndarray
    heldout: np.ndarray
    sources: tuple[dict, ...]

    def batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Training batch ``[B, seq_len + 1]`` of ``step``: one shuffled pass per epoch, a pure function of
        (step, seed), so a resumed run sees the same batches."""
        per_epoch = len(self.train) // batch_size
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng((seed, epoch)).permutation(len(self.train))
        return self.train[order[index * batch_size : (index + 1) * batch_size]]


def load_token_data(data_dir: str | Path, seq_len: int, batch_size: int) -> TokenData:
    """Tokenise the corpus under ``data_dir`` with the shipped tokenizer and pack it into windows."""
    from moeless_jax.model.text import load_corpus, pack_tokens
    from moeless_jax.model.tokenizer import default_tokenizer

    corpus = load_corpus(data_dir)
    tokenizer = default_tokenizer()
    train = pack_tokens(tokenizer.encode_batch(list(corpus.train)), seq_len, tokenizer.eos_id)
    heldout = pack_tokens(tokenizer.encode_batch(list(corpus.heldout)), seq_len, tokenizer.eos_id)
    if len(train) < batch_size:
        raise InputError(f"{data_dir}: {len(train)} training windows of {seq_len + 1} tokens cannot fill one "
                         f"batch of {batch_size}; lower batch_size or seq_len")
    return TokenData(train, heldout, corpus.sources)


# ---------------------------------------------------------------------------------------------- steps
COUNTS = ("expert_counts", "slot_counts")  # loss_fn metrics that are arrays, for a replication controller


def _shard_batch(model: MoETransformer, windows: np.ndarray) -> tuple[jax.Array, jax.Array]:
    sharding = NamedSharding(model.mesh, P(token_axes(model.mesh)))
    windows = jax.device_put(np.asarray(windows, np.int32), sharding)
    return windows[:, :-1], windows[:, 1:]


@nnx.jit(static_argnames="buffers")
def _grad_step(model: MoETransformer, tokens, targets, buffers: Buffers):
    mask = jnp.ones(tokens.shape, jnp.float32)
    (loss, metrics), grads = nnx.value_and_grad(
        lambda m: loss_fn(m, tokens, targets, mask, buffers=buffers), has_aux=True
    )(model)
    return loss, metrics, grads


@nnx.jit
def _apply(model: MoETransformer, optimizer: nnx.Optimizer, grads) -> None:
    optimizer.update(model, grads)


@nnx.jit(static_argnames="buffers")
def _eval_step(model: MoETransformer, tokens, targets, buffers: Buffers):
    metrics = loss_fn(model, tokens, targets, jnp.ones(tokens.shape, jnp.float32), buffers=buffers)[1]
    return {k: v for k, v in metrics.items() if k not in COUNTS}


def dropless[T](run: Callable[[Buffers], T], ladder: list[Buffers]) -> tuple[T, int]:
    """``run(buffers)`` up ``ladder`` until its metrics report no overflow: (result, rungs climbed)."""
    for rung, buffers in enumerate(ladder):
        result = run(buffers)
        metrics = result[1] if isinstance(result, tuple) else result
        if int(metrics["overflow"]) == 0:
            return result, rung
    raise RuntimeError("the last rung of the buffer ladder overflowed; it must be the worst case")


def train_step(model, optimizer, windows: np.ndarray, controller=None) -> dict[str, float]:
    """One dropless optimizer step on ``windows [B, T + 1]``; returns float metrics (blocks on the loss).

    ``controller``: a :class:`~moeless_jax.replication.ReplicationController` built with
    ``on_moves=optimizer_follower(model, optimizer)``; it sees the step's counts and may install new tables
    (with the optimizer's moments moved alongside) before the next step.
    """
    tokens, targets = _shard_batch(model, windows)
    ladder = model.buffer_ladder(*tokens.shape)
    with jax.set_mesh(model.mesh):
        (loss, metrics, grads), rung = dropless(lambda b: _grad_step(model, tokens, targets, b), ladder)
        _apply(model, optimizer, grads)
    counts = {name: metrics.pop(name) for name in COUNTS}
    if controller is not None:
        controller.observe(counts["expert_counts"], counts["slot_counts"])
    return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}, "buffer_rung": rung}


def optimizer_follower(model: MoETransformer, optimizer: nnx.Optimizer):
    """``on_moves`` for a controller in a training loop: move the optimizer state with each layer's table."""
    from moeless_jax.moe.optimizer_state import follow_moves

    layers = model.moe_layers()

    def on_moves(layer_index: int, plan) -> None:
        follow_moves(optimizer, model, layers[layer_index], plan)

    return on_moves


def evaluate(model: MoETransformer, windows: np.ndarray, batch_size: int) -> dict[str, float]:
    """Mean cross-entropy and perplexity over ``windows`` (whole batches; the ragged tail is left out)."""
    total, count = 0.0, 0.0
    for start in range(0, len(windows) - batch_size + 1, batch_size):
        tokens, targets = _shard_batch(model, windows[start : start + batch_size])
        with jax.set_mesh(model.mesh):
            metrics, _ = dropless(lambda b, t=tokens, y=targets: _eval_step(model, t, y, b),
                                  model.buffer_ladder(*tokens.shape))
        total += float(metrics["cross_entropy"]) * float(metrics["num_tokens"])
        count += float(metrics["num_tokens"])
    if count == 0:
        raise InputError(f"{len(windows)} held-out windows cannot fill one batch of {batch_size}")
    return {"cross_entropy": total / count, "perplexity": math.exp(total / count), "tokens": count}


# ---------------------------------------------------------------------------------------------- resume
def _state_dir(out_dir: Path) -> Path:
    return out_dir / "train_state"


def save_train_state(out_dir: Path, step: int, model, optimizer, log: list[dict]) -> None:
    """A resumable checkpoint: model and optimizer state (orbax) at ``step`` and the log so far."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(_state_dir(out_dir).absolute(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1)) as manager:
        manager.save(step, args=ocp.args.StandardSave(nnx.state((model, optimizer))), force=True)
        manager.wait_until_finished()
    (out_dir / "train_log.json").write_text(json.dumps(log))


def restore_train_state(out_dir: Path, model, optimizer) -> tuple[int, list[dict]]:
    """Restore the latest resumable checkpoint into ``model`` and ``optimizer``: (step, log), or (0, [])
    when there is none."""
    import orbax.checkpoint as ocp

    directory = _state_dir(out_dir)
    if not directory.exists():
        return 0, []
    with ocp.CheckpointManager(directory.absolute()) as manager:
        step = manager.latest_step()
        if step is None:
            return 0, []
        # Optimizer counters live on one device; restore everything onto the model's mesh.
        replicated = NamedSharding(model.mesh, P())
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding if isinstance(
                a.sharding, NamedSharding) else replicated),
            nnx.state((model, optimizer)),
        )
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise InputError(f"{directory}: cannot resume from step {step} ({err}); the run directory holds "
                             "another model or a damaged checkpoint: use a fresh --out") from None
    nnx.update((model, optimizer), restored)
    log_file = out_dir / "train_log.json"
    log = json.loads(log_file.read_text()) if log_file.exists() else []
    return int(step), [row for row in log if row["step"] <= step]


# ---------------------------------------------------------------------------------------------- the loop
def train(config: TrainConfig, data: TokenData, out_dir: str | Path, *, resume: bool = True,
          progress: bool = True, model_config: ModelConfig | None = None,
          stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) a model; writes ``out_dir/model`` (the exported checkpoint), ``train_state/``,
    ``train_log.json``, ``summary.json`` and ``loss.png``. Returns the summary.

    ``model_config`` overrides ``config.model``. ``stop_at``: save a resumable state after that many steps
    and return ``{"stopped_at": step}`` (an interrupted run; a later call resumes it).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config = model_config or config.model_config()
    mesh = make_ep_mesh(config.num_devices)
    model = MoETransformer(model_config, mesh=mesh, rngs=nnx.Rngs(config.seed))
    optimizer = make_optimizer(model, config)
    start, log = restore_train_state(out_dir, model, optimizer) if resume else (0, [])
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    began = time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=config.steps, disable=not progress,
               desc=f"train {config.model}", unit="step")
    for step in bar:
        row = {"step": step + 1, **train_step(model, optimizer, data.batch(step, config.batch_size,
                                                                             config.seed))}
        if (step + 1) % config.eval_every == 0:
            held = data.heldout[: config.eval_batches * config.batch_size]
            row["heldout_cross_entropy"] = evaluate(model, held, config.batch_size)["cross_entropy"]
        log.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < end:
            save_train_state(out_dir, step + 1, model, optimizer, log)
    if end < config.steps:
        save_train_state(out_dir, end, model, optimizer, log)
        return {"stopped_at": end}
    seconds = time.perf_counter() - began
    save_train_state(out_dir, config.steps, model, optimizer, log)
    final = evaluate(model, data.heldout, config.batch_size)
    save_model(out_dir / "model", model, step=config.steps, dtype=config.save_dtype, overwrite=True,
               extra={"train_config": asdict(config), "heldout_perplexity": final["perplexity"]})
    summary = {
        "model": config.model,
        "model_config": model_config.to_dict(),
        "train_config": asdict(config),
        "steps": config.steps,
        "resumed_from_step": start,
        "train_seconds_this_run": seconds,
        "heldout": final,
        "final_train_loss": log[-1]["loss"] if log else None,
        "buffer_retries": int(sum(row["buffer_rung"] > 0 for row in log)),
        "data_sources": list(data.sources),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_losses(log, out_dir / "loss.png", title=config.model)
    return summary


def plot_losses(log: list[dict], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in log], [r["cross_entropy"] for r in log], label="train cross-entropy", lw=1)
    held = [r for r in log if "heldout_cross_entropy" in r]
    if held:
        ax.plot([r["step"] for r in held], [r["heldout_cross_entropy"] for r in held], "o-",
                label="held-out cross-entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_data_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--data-dir: {path} is not a directory; it must hold sharegpt/*.json and "
                          "moe-beyond/prompt_datasets/tagged_puffin_prompts.txt (see docs/training.md)")
    return path
