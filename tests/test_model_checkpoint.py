"""Model checkpoints: table-independent round trips, storage dtype, shipped sizes and one-line errors."""

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moeless_jax.errors import InputError
from moeless_jax.model import (
    PRESETS,
    ModelConfig,
    MoESection,
    MoETransformer,
    load_model,
    read_checkpoint,
    save_model,
)
from moeless_jax.moe import ReplicaTable, make_ep_mesh

# After a failed read of a truncated file orbax leaves an asyncio callback behind, reported (harmlessly) when
# it is garbage-collected, i.e. during whichever test runs next.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CONFIG = ModelConfig(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_seq_len=16,
    moe=MoESection(num_experts=8, top_k=2, d_ff=16, router="deepseek", num_shared_experts=1, d_ff_shared=8,
                   expert_kernel="ragged", split="even"),
)
forward = nnx.jit(lambda model, tokens: model(tokens))
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 8)).astype(np.int32)


def _random_tables(model: MoETransformer, seed: int) -> list[ReplicaTable]:
    rng = np.random.default_rng(seed)
    c = model.moe_layers()[0].config
    return [ReplicaTable.random(rng, num_experts=c.num_experts, num_devices=c.num_devices,
                                slots_per_device=c.slots_per_device) for _ in range(CONFIG.num_layers)]


@pytest.fixture(scope="module")
def model():
    net = MoETransformer(CONFIG, mesh=make_ep_mesh(8), rngs=nnx.Rngs(0))
    # Save from a replicated layout: the checkpoint must not depend on it.
    for layer, table in zip(net.moe_layers(), _random_tables(net, 1), strict=True):
        layer.set_table(table)
    return net


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("ckpt") / "model", model, step=12, extra={"tokenizer": "bpe"})


def _logits(model) -> np.ndarray:
    out = forward(model, TOKENS)
    assert int(out.overflow) == 0
    return np.asarray(out.logits)


def test_round_trip_restores_identical_logits(model, saved):
    loaded = load_model(saved, mesh=make_ep_mesh(8), tables=[layer.replica_table()
                                                             for layer in model.moe_layers()])
    np.testing.assert_array_equal(_logits(loaded), _logits(model))
    restored = loaded.logical_state()
    for name, array in model.logical_state().items():
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(array), err_msg=name)
    info = read_checkpoint(saved)
    assert (info.config, info.step, info.extra, info.dtype) == (CONFIG, 12, {"tokenizer": "bpe"}, None)


def test_loading_picks_its_own_tables_mesh_and_sharding(model, saved):
    expected = _logits(model)
    static = load_model(saved, mesh=make_ep_mesh(8))
    assert static.moe_layers()[0].replica_table() == ReplicaTable.static(num_experts=8, num_devices=8,
                                                                         slots_per_device=2)
    np.testing.assert_allclose(_logits(static), expected, atol=1e-6, rtol=0)
    other = load_model(saved, mesh=make_ep_mesh(8), tables=_random_tables(model, 5))
    np.testing.assert_allclose(_logits(other), expected, atol=1e-6, rtol=0)
    single = load_model(saved, mesh=make_ep_mesh(1))
    np.testing.assert_allclose(_logits(single), expected, atol=1e-5, rtol=0)
    # Non-MoE parameters live on every device of the mesh, not on one.
    for array in (static.embed[...], static.layers[1].attn.q[...], static.moe_layers()[0].router[...]):
        assert array.sharding.is_fully_replicated and len(array.sharding.device_set) == 8


def test_bfloat16_storage_halves_the_size_and_rounds_each_weight(model, saved, tmp_path):
    small = save_model(tmp_path / "bf16", model, dtype="bfloat16")
    assert _size(small) < 0.75 * _size(saved)
    assert read_checkpoint(small).dtype == "bfloat16"
    loaded = load_model(small, mesh=make_ep_mesh(8))
    assert loaded.embed[...].dtype == jnp.float32  # runs in the config's dtype
    for name, array in model.logical_state().items():
        rounded = np.asarray(jnp.asarray(array).astype(jnp.bfloat16).astype(array.dtype))
        np.testing.assert_array_equal(np.asarray(loaded.logical_state()[name]), rounded, err_msg=name)
    as_bf16 = load_model(small, mesh=make_ep_mesh(8), dtype="bfloat16")
    assert as_bf16.config.dtype == "bfloat16" and as_bf16.layers[0].attn.q[...].dtype == jnp.bfloat16


def test_shipped_presets_fit_in_20_megabytes(tmp_path):
    total = 0
    for name, config in PRESETS.items():
        net = MoETransformer(config, mesh=make_ep_mesh(1), rngs=nnx.Rngs(0))
        total += _size(save_model(tmp_path / name, net, dtype="bfloat16"))
    assert total <= 20 * 2**20, total


# ---------------------------------------------------------------------------------------------- errors
def test_missing_directory_and_existing_target(model, saved, tmp_path):
    with pytest.raises(InputError, match=r"nowhere: no model checkpoint here \(not a directory\)"):
        load_model(tmp_path / "nowhere", mesh=make_ep_mesh(8))
    with pytest.raises(InputError, match=r"already exists; pass overwrite=True"):
        save_model(saved, model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"cannot read the checkpoint's metadata"):
        load_model(tmp_path / "empty", mesh=make_ep_mesh(8))


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_array_files_are_named(model, tmp_path, damage):
    path = save_model(tmp_path / "model", model)
    biggest = max((p for p in (path / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if damage == "delete":
        biggest.unlink()
    else:
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cannot read the checkpoint's params \(missing or damaged files"):
        load_model(path, mesh=make_ep_mesh(8))


def test_config_mismatch_is_refused(saved):
    other = dataclasses.replace(CONFIG, num_layers=3)
    with pytest.raises(InputError, match=r"differs from the given one in \['num_layers'\] "
                                         r"\(e\.g\. num_layers: saved 2, given 3\)"):
        load_model(saved, mesh=make_ep_mesh(8), config=other)
    # The dtype is the caller's choice, not a mismatch.
    loaded = load_model(saved, mesh=make_ep_mesh(8), config=dataclasses.replace(CONFIG, dtype="bfloat16"))
    assert loaded.config.dtype == "bfloat16"


def _edit_metadata(path: Path, edit) -> None:
    file = path / "metadata" / "metadata"
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def test_unreadable_or_inconsistent_config_is_refused(model, tmp_path):
    path = save_model(tmp_path / "model", model)
    _edit_metadata(path, lambda d: d["config"].update(num_kv_heads=3))
    with pytest.raises(InputError, match=r"unreadable model config .*num_kv_heads: 3 does not divide"):
        load_model(path, mesh=make_ep_mesh(8))
    _edit_metadata(path, lambda d: d["config"].update(num_kv_heads=2, d_ff_typo=1))
    with pytest.raises(InputError, match=r"unreadable model config .*unknown field\(s\) \['d_ff_typo'\]"):
        read_checkpoint(path)
    _edit_metadata(path, lambda d: (d["config"].pop("d_ff_typo"), d["config"]["moe"].update(d_ff=12)))
    with pytest.raises(InputError, match=r"array 'layers.0.moe.logical_experts.gate' has shape "
                                         r"\(8, 32, 16\); the config needs \(8, 32, 12\)"):
        load_model(path, mesh=make_ep_mesh(8))
    (path / "metadata" / "metadata").write_text("{not json")
    with pytest.raises(InputError, match=r"cannot read the checkpoint's metadata"):
        load_model(path, mesh=make_ep_mesh(8))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
