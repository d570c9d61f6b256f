import json

import pytest

from jaxkv.config import ConfigError, LlamaConfig, RopeScaling, preset
from conftest import PARITY


def _hf(fam):
    return json.loads((PARITY / fam / "config.json").read_text())


def test_reads_the_three_families():
    llama = LlamaConfig.from_hf(_hf("llama3"))
    assert llama.family == "llama" and llama.rope_scaling == RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.group_size) == (4, 2, 16, 2)
    mistral = LlamaConfig.from_hf(_hf("mistral"))
    assert mistral.family == "mistral" and mistral.sliding_window == 8 and mistral.rope_scaling is None
    qwen = LlamaConfig.from_hf(_hf("qwen2"))
    assert qwen.qkv_bias and not qwen.o_bias and qwen.tie_word_embeddings and qwen.head_dim == 16


def test_reads_transformers_4_style_rope_scaling():
    hf = _hf("llama3")
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = rope
    assert LlamaConfig.from_hf(hf) == LlamaConfig.from_hf(_hf("llama3"))


@pytest.mark.parametrize("fam", ["llama3", "mistral", "qwen2"])
def test_hf_round_trip(fam):
    config = LlamaConfig.from_hf(_hf(fam))
    assert LlamaConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "low_freq_factor"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"head_dim": 15}, "head_dim"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"pretraining_tp": 2}, "pretraining_tp"),
    ({"architectures": 5}, "architectures"),
    ({"architectures": [["LlamaForCausalLM"]]}, "architectures"),
    ({"architectures": [], "model_type": ["llama"]}, "model_type"),
    ({"eos_token_id": "abc"}, "eos_token_id"),
    ({"eos_token_id": 2.7}, "eos_token_id"),
    ({"eos_token_id": [1, 99999]}, "outside the vocabulary"),
    ({"bos_token_id": "x"}, "bos_token_id"),
    ({"bos_token_id": True}, "bos_token_id"),
    ({"num_key_value_heads": 0}, "num_kv_heads"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "disagree"),
])
def test_bad_fields_name_the_field(change, field):
    hf = _hf("llama3")
    hf.update(change)
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.from_hf(hf)


def test_missing_field_and_bad_json(tmp_path):
    hf = _hf("llama3")
    del hf["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        LlamaConfig.from_hf(hf)
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.from_json(bad)
    with pytest.raises(ConfigError, match="no config file"):
        LlamaConfig.from_json(tmp_path / "absent.json")


def test_unsupported_sliding_windows():
    hf = _hf("qwen2")
    hf["use_sliding_window"] = True
    with pytest.raises(ConfigError, match="use_sliding_window"):
        LlamaConfig.from_hf(hf)
    hf = _hf("llama3")
    hf["sliding_window"] = 4
    with pytest.raises(ConfigError, match="sliding_window"):
        LlamaConfig.from_hf(hf)


def test_presets_and_derived_sizes():
    one_b = preset("llama-1b")
    assert 1.2e9 < one_b.num_params < 1.3e9  # Llama-3.2-1B: 1.24B
    assert one_b.kv_bytes_per_token(2) == 2 * 16 * 8 * 64 * 2
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")
    with pytest.raises(ConfigError, match="num_heads"):
        preset("tiny").replace(num_heads=3)


def test_sliding_window_must_be_an_integer_and_rope_fields_may_agree():
    hf = _hf("mistral")
    hf["sliding_window"] = True
    with pytest.raises(ConfigError, match="sliding_window"):
        LlamaConfig.from_hf(hf)
    hf = _hf("llama3")  # transformers 5 may keep both fields: the same scaling in each is fine
    hf["rope_scaling"] = {k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"}
    assert LlamaConfig.from_hf(hf) == LlamaConfig.from_hf(_hf("llama3"))
    hf = _hf("mistral")
    hf["rope_scaling"] = {"rope_type": "default"}
    assert LlamaConfig.from_hf(hf) == LlamaConfig.from_hf(_hf("mistral"))
