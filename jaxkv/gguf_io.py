"""GGUF checkpoints (llama.cpp, Ollama, LM Studio) -> jaxkv config, params and tokenizer.

A ``.gguf`` file holds the hyper-parameters and the tokenizer as metadata and the weights as
(often quantized) tensors. jaxkv reads the header (metadata and tensor table) itself, 40x faster
than the ``gguf`` package's reader and tested equal to it; the ``gguf`` package, the format's own
library, supplies the tensor types and dequantizes every type it knows (F32, F16, BF16, Q4_0/1,
Q5_0/1, Q8_0, the K-quants, ...) with numpy. What jaxkv does on top:

* **Config** from ``{arch}.*`` metadata, for the llama-family architectures ``llama`` (Llama,
  Mistral and SmolLM as llama.cpp converts them) and ``qwen2``; any other architecture is
  refused by name. A ``rope_freqs`` tensor (Llama-3.1 RoPE scaling) is accepted only when it is
  exactly the ``llama3`` scaling of some factor with Llama-3.1's other constants.
* **Weights**: llama.cpp's names mapped to jaxkv's tree; GGUF lists dimensions innermost first,
  so a tensor of GGUF shape ``[in, out]`` is the numpy (and transformers) ``[out, in]``.
  llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` of the ``llama``
  architecture so that each head's rotary pairs are adjacent (its "normal" RoPE); ``_unpermute``
  undoes it to transformers' half-split layout (the inverse of the converter's ``permute``, as
  transformers' GGUF loader does; the SmolLM2 parity test checks the direction). ``qwen2`` files
  are not permuted (NEOX RoPE). Every tensor is dequantized to float32, checked finite and cast
  to the requested dtype.
* **Tokenizer** from ``tokenizer.ggml.*``: the ``gpt2`` model (byte-level BPE from tokens +
  merges, with the pre-tokenizer that ``tokenizer.ggml.pre`` names) and the ``llama`` model
  (SentencePiece BPE from tokens + scores, byte fallback); control tokens become special added
  tokens (``<|im_start|>``), BOS/EOS follow ``add_bos_token`` / ``add_eos_token``.

Everything is checked (metadata, tensor names, shapes, types) before a weight is dequantized,
and any problem raises one ``CheckpointError`` naming the file and the key or tensor; no partial
parameter tree is returned.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxkv.config import ConfigError, LlamaConfig, RopeScaling
from jaxkv.errors import UserError

__all__ = ["GGUF_SUFFIX", "is_gguf", "GGUFModel", "read_gguf", "gguf_name_map"]

GGUF_SUFFIX = ".gguf"
_MAGIC = b"GGUF"
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # GGUF arch -> jaxkv family
_PERMUTED_QK = {"llama"}  # architectures whose q/k rows llama.cpp's converter permutes

# GGUF token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes of the tokenizers llama.cpp names in `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE_TOKENIZERS = ("default", "gpt2", "gpt-2", "smollm", "llama-bpe", "llama3", "llama-v3", "qwen2")
# llama.cpp's Llama-3 pre-tokenizers: a word that is itself a token is taken whole (ignore_merges,
# as Llama-3's tokenizer.json says too) and a BOS is added unless the file says otherwise
_LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3")


def _error(path: Path, message: str) -> UserError:
    from jaxkv.checkpoints import CheckpointError

    return CheckpointError(f"{os.fspath(path)}: {message}")


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a file named ``*.gguf`` or starting with the GGUF magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == GGUF_SUFFIX:
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def gguf_name_map(config: LlamaConfig) -> dict[str, tuple]:
    """llama.cpp tensor name -> path in jaxkv's params tree, for every parameter."""
    names: dict[str, tuple] = {
        "token_embd.weight": ("embed", "embedding"),
        "output_norm.weight": ("norm", "weight"),
    }
    if not config.tie_word_embeddings:
        names["output.weight"] = ("lm_head", "kernel")
    proj = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}
    for i in range(config.num_layers):
        pre = f"blk.{i}."
        names[pre + "attn_norm.weight"] = ("layers", i, "attn_norm", "weight")
        names[pre + "ffn_norm.weight"] = ("layers", i, "mlp_norm", "weight")
        for p, g in proj.items():
            names[pre + f"{g}.weight"] = ("layers", i, "attn", p, "kernel")
        for p in "qkv" if config.qkv_bias else "":
            names[pre + f"{proj[p]}.bias"] = ("layers", i, "attn", p, "bias")
        for p in ("gate", "up", "down"):
            names[pre + f"ffn_{p}.weight"] = ("layers", i, "mlp", p, "kernel")
    return names


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows (head, pair, 2) -> (head, 2, pair)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """The per-frequency divisors that llama.cpp stores as ``rope_freqs`` for ``llama3`` RoPE."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / s.factor + smooth)
    return np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, s.factor, mid))


# --- the file's index (metadata and tensor table) --------------------------------------------------
# Our own reader of the GGUF header: the gguf package's GGUFReader builds a numpy view per part of
# every metadata value (two per vocabulary string: 7 s for SmolLM2's 49,152 tokens and 48,900
# merges), where reading the strings straight from the file takes a tenth of a second. Tensors
# are numpy views of one read-only memmap, shaped as GGUFReader shapes them (what
# ``gguf.quants.dequantize`` takes); the gguf package still dequantizes.
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
            12: "<f8"}
_STRING, _ARRAY = 8, 9
_TYPED_TENSORS = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                  "I32": np.int32, "I64": np.int64}


class _Tensor:
    """One tensor of the table: ``name``, ``tensor_type`` (``gguf.GGMLQuantizationType``),
    ``shape`` (GGUF order, innermost first, as a uint64 array) and ``data`` (a memmap view)."""

    __slots__ = ("name", "tensor_type", "shape", "data")

    def __init__(self, name, tensor_type, shape, data):
        self.name, self.tensor_type, self.shape, self.data = name, tensor_type, shape, data


class _Index:
    """``fields`` (key -> Python value: str, int, float, bool or a list of them) and ``tensors``."""

    def __init__(self, path: str, gguf):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            read = f.read

            def take(n: int) -> bytes:
                b = read(n)
                if len(b) != n:
                    raise ValueError(f"the file ends inside its header (wanted {n} bytes at offset {f.tell()})")
                return b

            def u32() -> int:
                return int.from_bytes(take(4), "little")

            def u64() -> int:
                return int.from_bytes(take(8), "little")

            def string() -> str:
                n = u64()
                if n > size:
                    raise ValueError(f"a string of {n} bytes in a file of {size}")
                return take(n).decode("utf-8")

            def value(kind: int):
                if kind == _STRING:
                    return string()
                if kind == _ARRAY:
                    item, count = u32(), u64()
                    if item == _STRING:
                        return [string() for _ in range(count)]
                    if item not in _SCALARS:
                        raise ValueError(f"array of unknown value type {item}")
                    dt = np.dtype(_SCALARS[item])
                    if count * dt.itemsize > size:
                        raise ValueError(f"an array of {count} values in a file of {size} bytes")
                    return np.frombuffer(take(count * dt.itemsize), dt).tolist()
                if kind not in _SCALARS:
                    raise ValueError(f"unknown value type {kind}")
                dt = np.dtype(_SCALARS[kind])
                return np.frombuffer(take(dt.itemsize), dt).tolist()[0]

            if take(4) != _MAGIC:
                raise ValueError("no GGUF magic")
            version = u32()
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (2 and 3 are read)")
            n_tensors, n_fields = u64(), u64()
            self.fields = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_fields}
            for _ in range(n_fields):
                key = string()
                self.fields[key] = value(u32())
            table = []
            for _ in range(n_tensors):
                name = string()
                dims = [u64() for _ in range(u32())]
                table.append((name, dims, u32(), u64()))
            align = int(self.fields.get("general.alignment", 32))
            start = -(-f.tell() // align) * align
        mm = np.memmap(path, np.uint8, "r")
        self.tensors = []
        for name, dims, kind, offset in table:
            qtype = gguf.GGMLQuantizationType(kind)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims, dtype=np.int64))
            n_bytes = n * type_size // block
            begin = start + offset
            if begin + n_bytes > size:
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            shape = tuple(reversed(dims))
            raw = mm[begin:begin + n_bytes]
            if qtype.name in _TYPED_TENSORS:
                data = raw.view(_TYPED_TENSORS[qtype.name]).reshape(shape)
            else:
                data = raw.reshape(gguf.quant_shape_to_byte_shape(shape, qtype))
            self.tensors.append(_Tensor(name, qtype, np.asarray(dims, np.uint64), data))


class GGUFModel:
    """One opened GGUF file: metadata, tensors, and what jaxkv builds from them.

    ``config`` is read on construction (bad metadata raises at once); ``params(dtype)``,
    ``tokenizer()`` and ``chat_template`` read the rest on demand.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            import gguf
        except ImportError:  # pragma: no cover - gguf is a dependency
            raise UserError("reading GGUF files needs the `gguf` package: pip install gguf") from None
        if not self.path.is_file():
            raise _error(self.path, "no such GGUF file")
        try:
            self._reader = _Index(os.fspath(self.path), gguf)
        except Exception as e:  # the reader raises ValueError/KeyError/IndexError on damaged files
            raise _error(self.path, f"not a readable GGUF file ({type(e).__name__}: {e})") from None
        self._gguf = gguf
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.architecture = self.meta("general.architecture")
        if self.architecture not in _ARCHITECTURES:
            raise _error(self.path, f"architecture {self.architecture!r} is not supported "
                                    f"(supported: {', '.join(sorted(_ARCHITECTURES))})")
        self.config = self._read_config()

    # ------------------------------------------------------------------ metadata
    def meta(self, key: str, default: Any = ...) -> Any:
        """The value of metadata ``key`` (strings, numbers, lists); ``default`` if absent."""
        if key not in self._reader.fields:
            if default is ...:
                raise _error(self.path, f"metadata key {key!r} is missing")
            return default
        return self._reader.fields[key]

    def _float(self, key: str, default: Any = ...) -> float:
        """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
        9.9999997e-06), as the HF config it was converted from wrote it."""
        value = self.meta(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise _error(self.path, f"metadata {key!r} must be a number, got {value!r}")
        return float(np.format_float_positional(np.float32(value), unique=True, trim="0"))

    def _bool(self, key: str, default: bool) -> bool:
        value = self.meta(key, default)
        if not isinstance(value, (bool, np.bool_)):
            raise _error(self.path, f"metadata {key!r} must be a boolean, got {value!r}")
        return bool(value)

    def _int(self, key: str, default: Any = ...) -> int | None:
        value = self.meta(key, default)
        if value is None or value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise _error(self.path, f"metadata {key!r} must be an integer, got {value!r}")
        return int(value)

    def _read_config(self) -> LlamaConfig:
        a = self.architecture
        tensors = self._tensors
        if "token_embd.weight" not in tensors:
            raise _error(self.path, "tensor 'token_embd.weight' is missing")
        if len(tensors["token_embd.weight"].shape) != 2:
            raise _error(self.path, f"tensor 'token_embd.weight' must be 2-D [D, V], got shape "
                                    f"{list(tensors['token_embd.weight'].shape)}")
        vocab = int(tensors["token_embd.weight"].shape[1])  # GGUF order: [D, V]
        hidden = self._int(f"{a}.embedding_length")
        heads = self._int(f"{a}.attention.head_count")
        head_dim = self._int(f"{a}.attention.key_length", None) or (hidden // heads if heads else None)
        value_dim = self._int(f"{a}.attention.value_length", None)
        if value_dim is not None and value_dim != head_dim:
            raise _error(self.path, f"{a}.attention.value_length={value_dim} differs from the key length "
                                    f"{head_dim}; jaxkv needs equal key and value head sizes")
        rope_dims = self._int(f"{a}.rope.dimension_count", None)
        if rope_dims is not None and rope_dims != head_dim:
            raise _error(self.path, f"{a}.rope.dimension_count={rope_dims} rotates only part of the "
                                    f"{head_dim}-dimensional heads; partial RoPE is not supported")
        scaling_type = self.meta(f"{a}.rope.scaling.type", "none")
        if scaling_type not in ("none", None):
            raise _error(self.path, f"{a}.rope.scaling.type={scaling_type!r} is not supported")
        if self.meta(f"{a}.attention.sliding_window", None) is not None:
            raise _error(self.path, f"{a}.attention.sliding_window is not supported for GGUF files")
        has_bias = "blk.0.attn_q.bias" in tensors
        if a == "llama" and (has_bias or "blk.0.attn_output.bias" in tensors):
            raise _error(self.path, "attention biases in a 'llama' GGUF are not supported")
        if a == "qwen2" and not has_bias:
            raise _error(self.path, "a 'qwen2' GGUF must hold q/k/v biases (tensor 'blk.0.attn_q.bias')")
        theta = self._float(f"{a}.rope.freq_base", 10000.0)
        bos = self._int("tokenizer.ggml.bos_token_id", None)
        eos = self._int("tokenizer.ggml.eos_token_id", None)
        try:
            config = LlamaConfig(
                family=_ARCHITECTURES[a],
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=self._int(f"{a}.feed_forward_length"),
                num_layers=self._int(f"{a}.block_count"),
                num_heads=heads,
                num_kv_heads=self._int(f"{a}.attention.head_count_kv", heads),
                head_dim=head_dim,
                rms_norm_eps=self._float(f"{a}.attention.layer_norm_rms_epsilon"),
                rope_theta=theta,
                max_position_embeddings=self._int(f"{a}.context_length"),
                qkv_bias=has_bias,
                tie_word_embeddings="output.weight" not in tensors,
                bos_token_id=bos,
                eos_token_ids=() if eos is None else (eos,),
            )
        except ConfigError as e:
            raise _error(self.path, str(e)) from None
        if "rope_freqs.weight" in tensors:
            config = config.replace(rope_scaling=self._llama3_scaling(config))
        return config

    def _llama3_scaling(self, config: LlamaConfig) -> RopeScaling:
        t = self._tensors["rope_freqs.weight"]
        stored = np.asarray(self._dequantize(t), np.float64).reshape(-1)
        if stored.shape != (config.head_dim // 2,):
            raise _error(self.path, f"tensor 'rope_freqs.weight' has {stored.size} values, "
                                    f"expected {config.head_dim // 2}")
        scaling = RopeScaling(factor=float(stored.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)
        want = _llama3_factors(config.head_dim, config.rope_theta, scaling)
        if not np.allclose(stored, want, rtol=1e-5, atol=1e-6):
            raise _error(self.path, "tensor 'rope_freqs.weight' is not Llama-3.1's llama3 RoPE scaling "
                                    "(low/high frequency factors 1/4, original context 8192); other "
                                    "frequency tables are not supported")
        return scaling

    # ------------------------------------------------------------------ weights
    def _dequantize(self, t) -> np.ndarray:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            out = self._gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise _error(self.path, f"tensor {t.name!r} has type {t.tensor_type.name}, which the gguf "
                                    "package cannot dequantize") from None
        except Exception as e:
            raise _error(self.path, f"tensor {t.name!r} cannot be read ({type(e).__name__}: {e})") from None
        return np.asarray(out, np.float32).reshape(shape)

    def _dequantizable(self, t) -> bool:
        q = self._gguf.GGMLQuantizationType
        return t.tensor_type in (q.F32, q.F16) or hasattr(self._gguf.quants, t.tensor_type.name)

    def params(self, dtype=None) -> dict:
        """The params tree; every tensor dequantized, checked finite, cast to ``dtype`` (float32)."""
        import jax.numpy as jnp

        from jaxkv.checkpoints import _set, _get, check_float_dtype
        from jaxkv.models.llama import abstract_params

        dtype = check_float_dtype(dtype if dtype is not None else jnp.float32)
        config = self.config
        names = gguf_name_map(config)
        allowed = set(names) | {"rope_freqs.weight"}
        missing = sorted(set(names) - set(self._tensors))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise _error(self.path, f"tensor {missing[0]!r} is missing{more}")
        unexpected = sorted(set(self._tensors) - allowed)
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise _error(self.path, f"unexpected tensor {unexpected[0]!r} for a {config.num_layers}-layer "
                                    f"{self.architecture} model{more}")
        abstract = abstract_params(config)
        # Pass 1: shapes and types of every tensor, before any is dequantized.
        for name, tree_path in names.items():
            t = self._tensors[name]
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            want = tuple(_get(abstract, tree_path).shape)
            if shape != want:
                raise _error(self.path, f"tensor {name!r} has shape {list(shape)} (numpy order), the "
                                        f"metadata implies {list(want)}")
            if not self._dequantizable(t):
                raise _error(self.path, f"tensor {name!r} has type {t.tensor_type.name}, which the gguf "
                                        "package cannot dequantize")
        # Pass 2: dequantize, undo the q/k permutation, check, cast.
        params: dict = {}
        for name, tree_path in names.items():
            array = self._dequantize(self._tensors[name])
            if self.architecture in _PERMUTED_QK and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = config.num_heads if "attn_q" in name else config.num_kv_heads
                array = _unpermute(array, heads)
            if not np.isfinite(array).all():
                raise _error(self.path, f"tensor {name!r} holds NaN or infinite values")
            _set(params, tree_path, jnp.asarray(array, dtype=dtype))
        return params

    # ------------------------------------------------------------------ tokenizer
    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the file (``tokenizer.chat_template``), if any."""
        value = self.meta("tokenizer.chat_template", None)
        return value if isinstance(value, str) and value.strip() else None

    def tokenizer(self):
        """A ``tokenizers.Tokenizer`` built from the ``tokenizer.ggml.*`` metadata."""
        from tokenizers import AddedToken

        kind = self.meta("tokenizer.ggml.model", None)
        if kind is None:
            raise _error(self.path, "holds no tokenizer (metadata 'tokenizer.ggml.model' is missing)")
        if kind not in ("gpt2", "llama"):
            raise _error(self.path, f"tokenizer model {kind!r} (tokenizer.ggml.model) cannot be built; "
                                    "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)")
        tokens = self.meta("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise _error(self.path, "metadata 'tokenizer.ggml.tokens' must be a non-empty list of strings")
        if len(tokens) > self.config.vocab_size:
            raise _error(self.path, f"the tokenizer has {len(tokens)} tokens, more than the model's "
                                    f"{self.config.vocab_size} embeddings")
        types = self.meta("tokenizer.ggml.token_type", None)
        types = [_NORMAL] * len(tokens) if types is None else types
        if not isinstance(types, list) or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                                                  for t in types):
            raise _error(self.path, "metadata 'tokenizer.ggml.token_type' must be a list of integers")
        if len(types) != len(tokens):
            raise _error(self.path, f"'tokenizer.ggml.token_type' has {len(types)} entries for "
                                    f"{len(tokens)} tokens")
        try:
            llama3 = kind == "gpt2" and self.meta("tokenizer.ggml.pre", "default") in _LLAMA3_PRES
            tok = self._bpe_tokenizer(tokens, llama3) if kind == "gpt2" else self._spm_tokenizer(tokens, types)
        except UserError:
            raise
        except Exception as e:  # tokenizers raises bare Exceptions on inconsistent vocabularies
            raise _error(self.path, f"the {kind!r} tokenizer cannot be built ({e})") from None
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                   if ty == _CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                if ty == _USER_DEFINED]
        tok.add_special_tokens(special)
        tok.add_tokens(user)
        self._post_process(tok, tokens, default_bos=kind == "llama" or llama3)
        return tok

    def _bpe_tokenizer(self, tokens: list[str], llama3: bool):
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

        merges = self.meta("tokenizer.ggml.merges", None)
        if not isinstance(merges, list):
            raise _error(self.path, "a 'gpt2' tokenizer needs 'tokenizer.ggml.merges'")
        pairs = []
        for i, m in enumerate(merges):
            left, sep, right = m.partition(" ")
            if not sep:
                raise _error(self.path, f"tokenizer.ggml.merges[{i}] = {m!r} is not two tokens")
            pairs.append((left, right))
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=llama3))
        pre = self.meta("tokenizer.ggml.pre", "default")
        prefix = self._bool("tokenizer.ggml.add_space_prefix", False)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
        if pre in ("default", "gpt2", "gpt-2"):
            tok.pre_tokenizer = byte_level
        elif pre == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in _LLAMA3_PRES + ("qwen2",):
            split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])
            if pre == "qwen2":
                tok.normalizer = normalizers.NFC()
        else:
            raise _error(self.path, f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                                    f"supported: {', '.join(BPE_PRE_TOKENIZERS)}")
        tok.decoder = decoders.ByteLevel()
        return tok

    def _spm_tokenizer(self, tokens: list[str], types: list[int]):
        from tokenizers import Tokenizer, decoders, models, normalizers

        scores = self.meta("tokenizer.ggml.scores", None)
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise _error(self.path, "a 'llama' tokenizer needs one 'tokenizer.ggml.scores' entry per token")
        vocab = {t: i for i, t in enumerate(tokens)}
        # SentencePiece BPE merges the pair whose union scores highest: rebuild the merge list
        # from every split of every normal token into two tokens of the vocabulary.
        merges = []
        for piece, i in vocab.items():
            if types[i] != _NORMAL or len(piece) < 2:
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    merges.append((-float(scores[i]), vocab[left], vocab[right], left, right))
        merges.sort()
        unk_id = self._int("tokenizer.ggml.unknown_token_id", None)
        unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
        tok = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
        prefix = self._bool("tokenizer.ggml.add_space_prefix", True)
        steps = [normalizers.Prepend("\u2581")] if prefix else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
        return tok

    def _post_process(self, tok, tokens: list[str], *, default_bos: bool) -> None:
        from tokenizers import processors

        def special(key: str, add_key: str, default: bool) -> tuple[str, int] | None:
            i = self._int(key, None)
            if i is None or not self._bool(add_key, default):
                return None
            if not 0 <= i < len(tokens):
                raise _error(self.path, f"{key}={i} is outside the {len(tokens)} tokens")
            return tokens[i], i

        bos = special("tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token", default_bos)
        eos = special("tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_eos_token", False)
        if bos is None and eos is None:
            return
        single = " ".join(([bos[0]] if bos else []) + ["$A"] + ([eos[0]] if eos else []))
        pair = " ".join(([bos[0]] if bos else []) + ["$A"] + ([eos[0]] if eos else []) +
                        ([bos[0]] if bos else []) + ["$B"] + ([eos[0]] if eos else []))
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[s for s in {bos, eos} if s is not None])

    def special_token(self, key: str) -> str | None:
        """The text of the token whose id metadata ``key`` holds (e.g. the BOS token)."""
        i = self._int(key, None)
        tokens = self.meta("tokenizer.ggml.tokens", None) or []
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Open a GGUF file and read its config (raises ``CheckpointError`` naming what is wrong)."""
    return GGUFModel(path)
