import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxkv.checkpoints import CheckpointError, load_checkpoint, load_tokenizer, save_checkpoint
from jaxkv.tiny import make_tokenizer
from conftest import PARITY


def _assert_same(a, b):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype, p
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_loads_the_sharded_transformers_checkpoint():
    assert (PARITY / "llama3" / "model.safetensors.index.json").exists()
    config, params = load_checkpoint(PARITY / "llama3")
    assert params["layers"][1]["attn"]["k"]["kernel"].shape == (32, 64)
    assert "lm_head" in params


@pytest.mark.parametrize("fam", ["llama3", "mistral", "qwen2"])
@pytest.mark.parametrize("shard", [None, 20_000])
def test_save_load_round_trip(tmp_path, parity_models, fam, shard):
    config, params, _ = parity_models[fam]
    save_checkpoint(tmp_path / "ckpt", config, params, max_shard_bytes=shard)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists() == (shard is not None)
    config2, params2 = load_checkpoint(tmp_path / "ckpt")
    assert config2 == config
    _assert_same(params, params2)


def test_saved_tensors_use_transformers_names_and_layout(tmp_path, parity_models):
    config, params, _ = parity_models["mistral"]
    save_checkpoint(tmp_path / "ckpt", config, params)
    ours = load_file(tmp_path / "ckpt" / "model.safetensors")
    theirs = load_file(PARITY / "mistral" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_dtype_cast_on_load():
    _, params = load_checkpoint(PARITY / "qwen2", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def _copy(tmp_path, fam="mistral"):
    dst = tmp_path / fam
    shutil.copytree(PARITY / fam, dst)
    return dst


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent")

    d = _copy(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config file"):
        load_checkpoint(d)

    d = _copy(tmp_path / "bin")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(d)
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(d)

    d = _copy(tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(d)


def _rewrite(d, edit):
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "'model.layers.1.mlp.up_proj.weight' is missing"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}), "unexpected tensor"),
    (lambda t: t.update({"model.norm.weight": np.zeros((65,), np.float32)}), r"'model.norm.weight' has shape \[65\]"),
    (lambda t: t.update({"model.norm.weight": np.zeros((64,), np.int32)}), "has dtype I32"),
])
def test_tensor_problems_name_the_tensor(tmp_path, edit, message):
    d = _copy(tmp_path)
    _rewrite(d, edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(d)


def test_config_shape_mismatch_and_missing_shard(tmp_path):
    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json implies"):
        load_checkpoint(d)
    d = _copy(tmp_path, "llama3")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shard.name}'"):
        load_checkpoint(d)


def test_save_refuses_to_clobber_and_leaves_nothing_on_failure(tmp_path, parity_models):
    config, params, _ = parity_models["qwen2"]
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        save_checkpoint(target, config, params)
    assert (target / "keep.txt").read_text() == "mine"

    broken = {**params, "norm": {}}
    with pytest.raises(CheckpointError, match="norm/weight"):
        save_checkpoint(tmp_path / "new", config, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left behind


def test_tokenizer_round_trip_and_errors(tmp_path, tiny_model):
    config, params = tiny_model
    tok = make_tokenizer(config.vocab_size)
    for name in ("tokenizer.json", "model-00001-of-00002.safetensors"):  # would replace what was saved
        with pytest.raises(CheckpointError, match="extra_files may not name"):
            save_checkpoint(tmp_path / "ckpt", config, params, tokenizer=tok, extra_files={name: "not json"})
        assert not (tmp_path / "ckpt").exists()
    save_checkpoint(tmp_path / "ckpt", config, params, tokenizer=tok)
    loaded = load_tokenizer(tmp_path / "ckpt")
    text = "The passkey is 71432."
    assert loaded.encode(text).ids == tok.encode(text).ids
    assert loaded.decode(loaded.encode(text).ids, skip_special_tokens=True) == text
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
