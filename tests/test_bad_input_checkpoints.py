"""Loading refuses what would otherwise give silently wrong results (load_checkpoint,
load_tokenizer, LlamaConfig.from_hf)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxkv.checkpoints import CheckpointError, load_checkpoint, load_tokenizer
from jaxkv.config import ConfigError, LlamaConfig
from jaxkv.tiny import create_tiny_checkpoint, make_tokenizer


@pytest.fixture()
def tiny(tmp_path):
    return create_tiny_checkpoint(tmp_path / "tiny")


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_tied_config_with_a_different_stored_lm_head_is_refused(tiny):
    # the tiny checkpoint is untied: tie it in config.json while its own lm_head stays
    _edit_config(tiny, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="stores a different lm_head.weight"):
        load_checkpoint(tiny)


def test_tied_config_with_an_equal_stored_copy_loads(tiny):
    _edit_config(tiny, tie_word_embeddings=True)
    _edit_weights(tiny, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
    config, params = load_checkpoint(tiny, dtype=jnp.bfloat16)
    assert config.tie_word_embeddings and "lm_head" not in params


@pytest.mark.parametrize("field", ["tie_word_embeddings", "attention_bias", "mlp_bias"])
def test_a_string_where_a_boolean_belongs_is_refused(tiny, field):
    _edit_config(tiny, **{field: "false"})
    with pytest.raises(CheckpointError, match=f"{field} must be true or false, got 'false'"):
        load_checkpoint(tiny)


def test_a_non_number_names_its_field(tiny):
    _edit_config(tiny, rms_norm_eps="x")
    with pytest.raises(CheckpointError, match="rms_norm_eps must be a number, got 'x'"):
        load_checkpoint(tiny)
    with pytest.raises(ConfigError, match="rope_scaling.factor must be a number"):
        LlamaConfig.from_hf({**json.loads((tiny / "config.json").read_text()), "rms_norm_eps": 1e-5,
                             "rope_scaling": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1,
                                              "high_freq_factor": 4, "original_max_position_embeddings": 64}})


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused(tiny, value):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 4] = value
    _edit_weights(tiny, poison)
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' holds NaN or infinite"):
        load_checkpoint(tiny)


def test_integer_dtype_is_refused(tiny):
    with pytest.raises(CheckpointError, match="floating-point"):
        load_checkpoint(tiny, dtype=jnp.int8)


def test_a_tokenizer_larger_than_the_model_is_refused(tiny):
    make_tokenizer(512).save(str(tiny / "tokenizer.json"))
    _edit_config(tiny, vocab_size=256)
    with pytest.raises(CheckpointError, match="do not belong together"):
        load_tokenizer(tiny)


@pytest.mark.parametrize("index", [
    "not json", json.dumps({"weight_map": ["a", "b"]}), json.dumps([1, 2]),
    json.dumps({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}),
])
def test_a_malformed_index_is_one_error(tiny, index):
    (tiny / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_checkpoint(tiny)
