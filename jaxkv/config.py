"""Model configurations: frozen dataclasses read from and written to HF ``config.json``.

``LlamaConfig`` covers the Llama family as transformers defines it: Llama-2, Llama-3/3.1
(``rope_scaling`` of type ``llama3``), Mistral (sliding-window attention) and Qwen2/2.5
(q/k/v bias, tied embeddings). Fields use jaxkv's own names; ``from_hf`` / ``to_hf`` translate.
Every invariant is checked in ``__post_init__`` and a bad value raises ``ConfigError`` naming the
field, so a config that constructs is one the model can run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from jaxkv.errors import UserError

__all__ = ["ConfigError", "RopeScaling", "LlamaConfig", "PRESETS", "preset"]


class ConfigError(UserError):
    """An invalid or unsupported configuration value; the message names the field."""


def json_flag(hf: dict, key: str, default: bool = False) -> bool:
    """``hf[key]`` as a JSON boolean (``default`` when absent or null): the string "false" is
    truthy in Python and must not read as true."""
    value = hf.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def check_token_ids(vocab_size: int, bos_token_id, eos_token_ids) -> tuple[int | None, tuple[int, ...]]:
    """``(bos, eos)`` checked: integers (not bools, floats or strings) in ``[0, vocab_size)``."""
    def one(name, t):
        if isinstance(t, bool) or not isinstance(t, int) and not (hasattr(t, "dtype") and t.dtype.kind in "iu"):
            raise ConfigError(f"{name} must be an integer token id, got {t!r}")
        if not 0 <= int(t) < vocab_size:
            raise ConfigError(f"{name} {int(t)} is outside the vocabulary [0, {vocab_size})")
        return int(t)

    bos = None if bos_token_id is None else one("bos_token_id", bos_token_id)
    if isinstance(eos_token_ids, (str, bytes)) or not hasattr(eos_token_ids, "__iter__"):
        raise ConfigError(f"eos_token_ids must be a sequence of token ids, got {eos_token_ids!r}")
    return bos, tuple(one("eos_token_id", t) for t in eos_token_ids)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3.1 RoPE frequency scaling (``rope_type: llama3``).

    Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are divided
    by ``factor``; shorter than ``original_max_position_embeddings / high_freq_factor`` are kept;
    those in between are interpolated smoothly.
    """

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type != "llama3":
            raise ConfigError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported (supported: 'llama3')"
            )
        if not self.factor > 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(
                "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ConfigError(
                "rope_scaling.original_max_position_embeddings must be > 0, got "
                f"{self.original_max_position_embeddings}"
            )


_FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """A decoder-only Llama-family transformer (GQA, RoPE, RMSNorm, SwiGLU).

    Attributes:
      family: ``llama``, ``mistral`` or ``qwen2`` (decides the HF architecture name on save).
      vocab_size, hidden_size, intermediate_size, num_layers: model sizes (V, D, F, L).
      num_heads, num_kv_heads, head_dim: query heads N, KV heads K, head dim H (N % K == 0).
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base; rope_scaling: optional Llama-3.1 scaling.
      max_position_embeddings: the longest context the checkpoint was trained for.
      qkv_bias: bias on q/k/v projections (Qwen2); o_bias: bias on the output projection.
      tie_word_embeddings: the LM head reuses the embedding matrix (Qwen2 small models).
      sliding_window: Mistral's attention window in tokens (query i sees keys j with
        0 <= i - j < sliding_window), or None for full causal attention.
      bos_token_id, eos_token_ids: special ids from the checkpoint (may be None / empty).
    """

    family: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.family not in _FAMILIES.values():
            raise ConfigError(
                f"family={self.family!r} is not supported (supported: {sorted(_FAMILIES.values())})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                    f"({self.num_heads}); set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim must be a positive even integer, got {self.head_dim!r}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not (self.rope_theta > 1 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be > 1, got {self.rope_theta}")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int)
            or self.sliding_window <= 0
        ):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be a RopeScaling or None, got {type(self.rope_scaling).__name__}")
        bos, eos = check_token_ids(self.vocab_size, self.bos_token_id, self.eos_token_ids)
        object.__setattr__(self, "bos_token_id", bos)
        object.__setattr__(self, "eos_token_ids", eos)

    # ----------------------------------------------------------------- derived sizes
    @property
    def group_size(self) -> int:
        """G: query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings and LM head included once each unless tied)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += d
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V one token adds to a full cache, over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- HF translation
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from the dict of an HF ``config.json``; unsupported fields raise ConfigError."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config must be a JSON object, got {type(hf).__name__}")
        archs = hf.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"architectures must be a list of names, got {archs!r}")
        if not isinstance(hf.get("model_type"), (str, type(None))):
            raise ConfigError(f"model_type must be a name, got {hf['model_type']!r}")
        family = None
        for arch in archs:
            family = _FAMILIES.get(arch)
            if family:
                break
        if family is None:
            family = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(hf.get("model_type"))
        if family is None:
            raise ConfigError(
                f"architectures={archs!r} (model_type={hf.get('model_type')!r}) is not supported; "
                f"supported architectures: {sorted(_FAMILIES)}"
            )

        def need(key):
            if key not in hf:
                raise ConfigError(f"config.json is missing the required field {key!r}")
            return hf[key]

        def flag(key, default=False):
            return json_flag(hf, key, default)

        def number(key, default, value=None):
            value = hf.get(key, default) if value is None else value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key} must be a number, got {value!r}")
            return float(value)

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
        if flag("mlp_bias"):
            raise ConfigError("mlp_bias=true is not supported")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"pretraining_tp={hf['pretraining_tp']!r} is not supported (only 1)")

        # transformers >= 5 nests rope settings in `rope_parameters`; older configs use
        # `rope_theta` + `rope_scaling`. Accept both.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or None
        if hf.get("rope_parameters") and hf.get("rope_scaling"):  # both: they must not disagree on the scaling
            def scaling_of(r):
                if not isinstance(r, dict):
                    return r
                r = {k: v for k, v in r.items() if k != "rope_theta"}
                return {} if r.get("rope_type", r.get("type", "default")) == "default" else r

            if scaling_of(hf["rope_parameters"]) != scaling_of(hf["rope_scaling"]):
                raise ConfigError(f"rope_parameters ({hf['rope_parameters']!r}) and rope_scaling "
                                  f"({hf['rope_scaling']!r}) disagree; keep one of them")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None and isinstance(hf.get("rope_parameters"), dict):
            rope_theta = hf["rope_parameters"].get("rope_theta")
        if rope_theta is None:
            rope_theta = 10000.0
        scaling = None
        if rope is not None:
            if not isinstance(rope, dict):
                raise ConfigError(f"rope_scaling must be an object or null, got {rope!r}")
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type == "llama3":
                for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if key not in rope:
                        raise ConfigError(f"rope_scaling of type 'llama3' is missing {key!r}")
                    if isinstance(rope[key], bool) or not isinstance(rope[key], (int, float)):
                        raise ConfigError(f"rope_scaling.{key} must be a number, got {rope[key]!r}")
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            elif rope_type != "default":
                raise ConfigError(
                    f"rope_scaling.rope_type={rope_type!r} is not supported (supported: 'default', 'llama3')"
                )

        sliding_window = None
        if family == "mistral":
            sliding_window = hf.get("sliding_window")
        elif family == "qwen2":
            if flag("use_sliding_window"):
                raise ConfigError("use_sliding_window=true is not supported for qwen2")
        elif hf.get("sliding_window") is not None:
            raise ConfigError("sliding_window is only supported for the mistral family")

        if family == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = flag("attention_bias")

        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            family=family,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=need("num_attention_heads"),
            num_kv_heads=need("num_attention_heads") if hf.get("num_key_value_heads") is None
            else hf["num_key_value_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=number("rms_norm_eps", 1e-6),
            rope_theta=number("rope_theta", 10000.0, value=rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            tie_word_embeddings=flag("tie_word_embeddings"),
            sliding_window=sliding_window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LlamaConfig":
        try:
            with open(path) as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config file at {os.fspath(path)!r}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{os.fspath(path)!r} is not valid JSON: {e}") from None
        return cls.from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (transformers 4.x field names, which 5.x also reads)."""
        arch = {v: k for k, v in _FAMILIES.items()}[self.family]
        hf: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        if self.family == "mistral":
            hf["sliding_window"] = self.sliding_window
        elif self.family == "qwen2":
            if not self.qkv_bias or self.o_bias:
                raise ConfigError("the qwen2 family has q/k/v bias and no output bias")
            hf["use_sliding_window"] = False
        else:
            if self.qkv_bias != self.o_bias:
                raise ConfigError("the llama family sets q/k/v and output bias together (attention_bias)")
            hf["attention_bias"] = self.qkv_bias
        if self.sliding_window is not None and self.family != "mistral":
            raise ConfigError("sliding_window is only supported for the mistral family")
        return hf


PRESETS: dict[str, LlamaConfig] = {
    # For tests and the quick-start: a few hundred thousand parameters.
    "tiny": LlamaConfig(
        family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=2048,
        bos_token_id=1, eos_token_ids=(2,),
    ),
    # Llama-3.2-1B shapes (1.24B parameters, tied embeddings, llama3 RoPE scaling).
    "llama-1b": LlamaConfig(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=(128001,),
    ),
}


def preset(name: str) -> LlamaConfig:
    """A named configuration from ``PRESETS``."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None
