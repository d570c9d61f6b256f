"""Mamba-2 (a pure function of its parameters): config, parameters, the chunked forward, the
recurrent decode step, and its typed state.

A layer (HF ``Mamba2Block``): ``x + mixer(rmsnorm(x))`` with the residual in fp32. The mixer:

  1. ``in_proj`` -> gate ``z [I]``, ``xBC [I + 2 G N]``, ``dt [H]`` (I = expand * D = H * P)
  2. causal depthwise conv (``conv_kernel`` taps) over ``xBC``, then SiLU -> ``x [H, P]``, ``B, C [G, N]``
  3. ``dt = clamp(softplus(dt + dt_bias), time_step_limit)``, ``A = -exp(A_log)``; the SSD scan
     (``jaxkv.kernels.ssd``: chunked over a prompt, one recurrent step in decode), ``y += D * x``
  4. gated RMSNorm per group of ``I / G`` channels: ``norm(y * silu(z))`` (``norm_before_gate``
     False, the HF form) or ``norm(y) * silu(z)`` (True, mamba_ssm's option), then ``out_proj``.

The cache is ``Mamba2State``: per layer the conv's last ``conv_kernel - 1`` inputs and the SSM
state ``[B, H, P, N]`` (fp32) — a fixed size whatever the context. Padding (position -1) is
zeroed before ``in_proj`` and after the conv, as HF does, and also at the conv's input, which HF
does not: with ``use_bias`` HF's padding feeds the in_proj bias into the first real tokens' conv,
so only here are left-padded rows exact for every config.

Deviation: transformers' Mamba-2 ignores ``norm_before_gate`` (always gate, then norm); jaxkv
reads it from ``config.json`` and implements both (True is tested against a hand reference).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxkv.config import ConfigError, check_token_ids, json_flag
from jaxkv.errors import UserError
from jaxkv.fileio import read_json_object
from jaxkv.kernels.ssd import ssd, ssd_recurrent, ssd_windowed, why_no_kernel
from jaxkv.typing import Array

__all__ = ["Mamba2Config", "Mamba2State", "Mamba2LayerState", "init_params", "abstract_params", "forward",
           "init_state", "hf_name_map", "HF_ARCHITECTURE", "StateMitigation", "calibrate_norm_cap"]

HF_ARCHITECTURE = "Mamba2ForCausalLM"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Config:
    """Sizes and options of a Mamba-2 language model (the fields of HF's ``Mamba2Config``)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    state_size: int = 128
    n_groups: int = 1
    expand: int = 2
    conv_kernel: int = 4
    chunk_size: int = 256
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_before_gate: bool = False
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "state_size", "n_groups",
                     "expand", "conv_kernel", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.expand * self.hidden_size != self.num_heads * self.head_dim:
            raise ConfigError(f"hidden_size * expand ({self.expand * self.hidden_size}) must equal num_heads * "
                              f"head_dim ({self.num_heads * self.head_dim})")
        if self.num_heads % self.n_groups:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups})")
        if not (self.layer_norm_epsilon > 0 and math.isfinite(self.layer_norm_epsilon)):
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        lo, hi = (float(v) for v in self.time_step_limit)
        if not 0 <= lo < hi:
            raise ConfigError(f"time_step_limit must be (low, high) with 0 <= low < high, got {self.time_step_limit}")
        object.__setattr__(self, "time_step_limit", (lo, hi))
        bos, eos = check_token_ids(self.vocab_size, self.bos_token_id, self.eos_token_ids)
        object.__setattr__(self, "bos_token_id", bos)
        object.__setattr__(self, "eos_token_ids", eos)

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @property
    def state_elements(self) -> int:
        """SSM state elements of the whole model (Stuffed Mamba's N_S): layers x H x P x N."""
        return self.num_layers * self.num_heads * self.head_dim * self.state_size

    @property
    def num_params(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(self)))

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "Mamba2Config":
        """From the fields of an HF ``config.json`` (``model_type`` mamba2)."""
        if hf.get("model_type", "mamba2") != "mamba2":
            raise ConfigError(f"model_type is {hf.get('model_type')!r}, not mamba2")
        try:
            eos = hf.get("eos_token_id")
            eos = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
            limit = [_json_float(v) for v in hf.get("time_step_limit", (0.0, math.inf))]
            return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                       num_heads=hf["num_heads"], head_dim=hf["head_dim"], state_size=hf.get("state_size", 128),
                       n_groups=hf.get("n_groups", 1), expand=hf.get("expand", 2),
                       conv_kernel=hf.get("conv_kernel", 4), chunk_size=hf.get("chunk_size", 256),
                       use_bias=json_flag(hf, "use_bias", False), use_conv_bias=json_flag(hf, "use_conv_bias", True),
                       norm_before_gate=json_flag(hf, "norm_before_gate", False),
                       layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                       residual_in_fp32=json_flag(hf, "residual_in_fp32", True),
                       time_step_limit=tuple(float(v) for v in limit),
                       tie_word_embeddings=json_flag(hf, "tie_word_embeddings", False),
                       bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos)
        except KeyError as e:
            raise ConfigError(f"config.json lacks {e.args[0]!r}, which a Mamba-2 config needs") from None
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Mamba2Config":
        return cls.from_hf(read_json_object(path, error=ConfigError))

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": [HF_ARCHITECTURE], "model_type": "mamba2", "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "state_size": self.state_size, "n_groups": self.n_groups,
                "expand": self.expand, "conv_kernel": self.conv_kernel, "chunk_size": self.chunk_size,
                "use_bias": self.use_bias, "use_conv_bias": self.use_conv_bias,
                "norm_before_gate": self.norm_before_gate, "layer_norm_epsilon": self.layer_norm_epsilon,
                "residual_in_fp32": self.residual_in_fp32, "time_step_limit": list(self.time_step_limit),
                "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
                "eos_token_id": list(self.eos_token_ids) or None}


def _json_float(v) -> float:
    """A float from config.json: a number, ``"Infinity"``-like text, or transformers' encoding of
    a non-finite float, ``{"__float__": "Infinity"}``."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"time_step_limit holds {v!r}, not a number")
    return float(v)


def hf_name_map(config: Mamba2Config) -> dict[str, tuple[tuple, object]]:
    """HF tensor name -> (path in the params tree, layout kind: True = transpose a Linear
    ``[out, in]`` into ``[in, out]``, ``"conv"`` = a Conv1d ``[C, 1, K]`` into ``[K, C]``)."""
    names: dict[str, tuple[tuple, object]] = {"backbone.embeddings.weight": (("embed", "embedding"), False),
                                              "backbone.norm_f.weight": (("norm_f", "weight"), False)}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(config.num_layers):
        pre, at = f"backbone.layers.{i}.", ("layers", str(i))
        names[pre + "norm.weight"] = (at + ("norm", "weight"), False)
        m = pre + "mixer."
        for proj in ("in_proj", "out_proj"):
            names[m + proj + ".weight"] = (at + ("mixer", proj, "kernel"), True)
            if config.use_bias:
                names[m + proj + ".bias"] = (at + ("mixer", proj, "bias"), False)
        names[m + "conv1d.weight"] = (at + ("mixer", "conv", "kernel"), "conv")
        if config.use_conv_bias:
            names[m + "conv1d.bias"] = (at + ("mixer", "conv", "bias"), False)
        for leaf in ("dt_bias", "A_log", "D"):
            names[m + leaf] = (at + ("mixer", leaf), False)
        names[m + "norm.weight"] = (at + ("mixer", "norm", "weight"), False)
    return names


# ------------------------------------------------------------------ parameters
def _layer_shapes(c: Mamba2Config) -> dict:
    proj = c.intermediate_size + c.conv_dim + c.num_heads
    mixer = {"in_proj": {"kernel": (c.hidden_size, proj)}, "conv": {"kernel": (c.conv_kernel, c.conv_dim)},
             "dt_bias": (c.num_heads,), "A_log": (c.num_heads,), "D": (c.num_heads,),
             "norm": {"weight": (c.intermediate_size,)}, "out_proj": {"kernel": (c.intermediate_size, c.hidden_size)}}
    if c.use_bias:
        mixer["in_proj"]["bias"] = (proj,)
        mixer["out_proj"]["bias"] = (c.hidden_size,)
    if c.use_conv_bias:
        mixer["conv"]["bias"] = (c.conv_dim,)
    return {"norm": {"weight": (c.hidden_size,)}, "mixer": mixer}


def _shapes(c: Mamba2Config) -> dict:
    tree = {"embed": {"embedding": (c.vocab_size, c.hidden_size)},
            "layers": {str(i): _layer_shapes(c) for i in range(c.num_layers)}, "norm_f": {"weight": (c.hidden_size,)}}
    if not c.tie_word_embeddings:
        tree["lm_head"] = {"kernel": (c.hidden_size, c.vocab_size)}
    return tree


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def abstract_params(config: Mamba2Config, dtype=jnp.float32) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), _shapes(config), is_leaf=_is_shape)


def init_params(config: Mamba2Config, key: Array, *, dtype=jnp.float32) -> dict:
    """Random parameters as Mamba-2 initialises them: normal(0, 0.02) matrices, ones for norms
    and D, ``A_log = log(1..H)``, ``dt_bias`` the inverse softplus of dt ~ logU(0.001, 0.1)."""
    shapes = _shapes(config)
    leaves, tree = jax.tree.flatten(shapes, is_leaf=_is_shape)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    h = config.num_heads
    for path, shape, k in zip(paths, leaves, keys):
        name = jax.tree_util.keystr(path)
        if "'A_log'" in name:
            v = jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32))
        elif "'D'" in name or "'weight'" in name:
            v = jnp.ones(shape, jnp.float32)
        elif "'dt_bias'" in name:
            dt = jnp.exp(jax.random.uniform(k, shape) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            dt = jnp.maximum(dt, 1e-4)
            v = dt + jnp.log(-jnp.expm1(-dt))
        elif "'bias'" in name:
            v = jnp.zeros(shape, jnp.float32)
        elif "'conv'" in name:
            v = jax.random.uniform(k, shape, minval=-1.0, maxval=1.0) / math.sqrt(config.conv_kernel)
        else:
            v = 0.02 * jax.random.normal(k, shape, jnp.float32)
        out.append(v.astype(dtype))
    return jax.tree.unflatten(tree, out)


# ------------------------------------------------------------------ state
@struct.dataclass
class Mamba2LayerState:
    """One layer: ``conv [B, conv_kernel - 1, conv_dim]`` (the conv's last inputs, compute dtype)
    and ``ssm [B, H, P, N]`` (fp32)."""

    conv: Array
    ssm: Array


@struct.dataclass
class Mamba2State:
    """The model's cache: one ``Mamba2LayerState`` per layer; ``nbytes`` is what it holds."""

    layers: tuple

    @property
    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))


def init_state(config: Mamba2Config, *, batch: int, dtype=jnp.float32) -> Mamba2State:
    """The state before any token: zeros."""
    one = lambda: Mamba2LayerState(  # noqa: E731
        conv=jnp.zeros((batch, config.conv_kernel - 1, config.conv_dim), dtype),
        ssm=jnp.zeros((batch, config.num_heads, config.head_dim, config.state_size), jnp.float32))
    return Mamba2State(layers=tuple(one() for _ in range(config.num_layers)))


# ------------------------------------------------------------------ state-collapse mitigations
@struct.dataclass
class StateMitigation:
    """Stuffed Mamba's training-free mitigations of state collapse, for ``forward``:

    1. ``decay_scale`` λ and ``input_scale`` γ: forget more, remember less, a_t <- λ a_t and
       B_t <- γ B_t (the paper's example: λ = 0.9999, γ = 0.75);
    2. ``norm_cap [L, H]``: after every step a head whose state norm exceeds its cap is divided
       by norm / cap (``calibrate_norm_cap`` measures the caps on a prompt; the public code
       multiplies instead, which inverts it: not copied); the scan runs step by step then;
    3. ``window`` r: each output reads the state of only the last r tokens, by state difference
       (``kernels.ssd.ssd_windowed``: exact, r states held); a whole-sequence forward only.
       ``keep_first`` k keeps the first k tokens' state beside the window, as attention sinks
       (not in the paper, for models that lean on their first token; on ``synthetic:bindings``
       it did not restore the loss, README).
    """

    decay_scale: float = struct.field(pytree_node=False, default=1.0)
    input_scale: float = struct.field(pytree_node=False, default=1.0)
    window: int | None = struct.field(pytree_node=False, default=None)
    keep_first: int = struct.field(pytree_node=False, default=0)
    norm_cap: Array | None = None

    def __post_init__(self):
        if not 0 < self.decay_scale <= 1:
            raise UserError(f"decay_scale must be in (0, 1], got {self.decay_scale!r}")
        if not self.input_scale > 0:
            raise UserError(f"input_scale must be > 0, got {self.input_scale!r}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise UserError(f"window must be None or a positive int, got {self.window!r}")
        if isinstance(self.keep_first, bool) or not isinstance(self.keep_first, int) or self.keep_first < 0:
            raise UserError(f"keep_first must be an int >= 0, got {self.keep_first!r}")
        if self.keep_first and self.window is None:
            raise UserError("keep_first keeps the first tokens beside a window: give window too")
        if self.window is not None and self.norm_cap is not None:
            raise UserError("window and norm_cap are separate mitigations: the windowed scan applies no cap; "
                            "give one of them")
        if isinstance(self.norm_cap, (np.ndarray, jax.Array)) and not isinstance(self.norm_cap, jax.core.Tracer):
            cap = np.asarray(self.norm_cap)
            if not (np.isfinite(cap).all() and (cap > 0).all()):
                raise UserError("norm_cap must hold positive finite caps (a cap <= 0 or NaN disables it silently)")


def calibrate_norm_cap(params: dict, tokens: Array, *, config: Mamba2Config) -> Array:
    """``[L, H]``: each head's final-state norm after ``tokens [B, T]`` (the largest over the
    rows): mitigation 2's caps, measured on a prompt the model handles (e.g. of its training
    length)."""
    _, state = forward(params, tokens, config=config)
    norms = [jnp.max(jnp.sqrt(jnp.sum(s.ssm * s.ssm, axis=(2, 3))), axis=0) for s in state.layers]
    return jnp.stack(norms)


# ------------------------------------------------------------------ forward
def _rmsnorm(x, w, eps):
    xf = x.astype(jnp.float32)
    return (w * (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)).astype(x.dtype))


def _linear(x, p):
    y = x @ p["kernel"].astype(x.dtype)
    return y + p["bias"].astype(x.dtype) if "bias" in p else y


def _gated_norm(y, z, w, c: Mamba2Config):
    """Gated RMSNorm over groups of ``I / G`` channels (fp32 inside)."""
    yf, zf = y.astype(jnp.float32), z.astype(jnp.float32)
    if not c.norm_before_gate:
        yf = yf * jax.nn.silu(zf)
    shape = yf.shape
    g = yf.reshape(shape[:-1] + (c.n_groups, -1))
    g = g * jax.lax.rsqrt(jnp.mean(g * g, -1, keepdims=True) + c.layer_norm_epsilon)
    out = g.reshape(shape)
    if c.norm_before_gate:
        out = out * jax.nn.silu(zf)
    return w * out.astype(y.dtype)


def _ssd_implementation(requested: str | None, head_dim: int, state_size: int) -> str:
    """The SSD scan's backend: ``requested`` if given; otherwise the Pallas kernel on a GPU when
    the dispatch says it can run (``why_no_kernel``), the jnp reference elsewhere, silently: an
    automatic choice, not a request that could fail."""
    if requested is not None:
        return requested
    return "pallas_gpu" if why_no_kernel(head_dim, state_size) is None else "reference"


def _mixer(p, x, real, state: Mamba2LayerState, c: Mamba2Config, chunk_size: int,
           mitigation: StateMitigation | None = None, norm_cap: Array | None = None,
           ssd_implementation: str | None = None):
    """``x [B, T, D]`` -> ``([B, T, D], new state)``; T == 1 with a state takes the recurrent step."""
    b, t, _ = x.shape
    i, h, hd, n, g = c.intermediate_size, c.num_heads, c.head_dim, c.state_size, c.n_groups
    x = jnp.where(real[..., None], x, 0)
    zxbcdt = _linear(x, p["in_proj"])
    z, xbc, dt = zxbcdt[..., :i], zxbcdt[..., i:i + c.conv_dim], zxbcdt[..., i + c.conv_dim:]
    xbc = jnp.where(real[..., None], xbc, 0)  # padding feeds the conv zeros, as the start of a row does
    # causal depthwise conv over [previous K-1 inputs, this chunk]
    k = c.conv_kernel
    full = jnp.concatenate([state.conv.astype(xbc.dtype), xbc], axis=1)  # [B, K-1+T, conv_dim]
    w = p["conv"]["kernel"].astype(xbc.dtype)  # [K, conv_dim]
    conv = sum(full[:, j:j + t] * w[j] for j in range(k))
    if "bias" in p["conv"]:
        conv = conv + p["conv"]["bias"].astype(xbc.dtype)
    if k > 1 and t == 1:  # a decode step: shifted by one where the token is real, else as it was (no sort)
        new_conv = jnp.where(real[:, :, None], full[:, 1:], full[:, :k - 1])
    elif k > 1:  # the conv's next state: the last K-1 real inputs (the state's own count as real)
        seen = jnp.concatenate([jnp.ones((b, k - 1), bool), real], axis=1)
        order = jnp.argsort(~seen, axis=1, stable=True)  # real entries first, in order
        last = jnp.sum(seen, axis=1, keepdims=True) - (k - 1) + jnp.arange(k - 1)[None]
        new_conv = jnp.take_along_axis(full, jnp.take_along_axis(order, last, axis=1)[..., None], axis=1)
    else:
        new_conv = state.conv
    xbc = jnp.where(real[..., None], jax.nn.silu(conv), 0)
    xs = xbc[..., :i].reshape(b, t, h, hd)
    B = xbc[..., i:i + g * n].reshape(b, t, g, n)
    C = xbc[..., i + g * n:].reshape(b, t, g, n)
    lo, hi = c.time_step_limit
    dt = jnp.clip(jax.nn.softplus(dt.astype(jnp.float32) + p["dt_bias"].astype(jnp.float32)), lo, hi)
    dt = jnp.where(real[..., None], dt, 0.0)  # padding neither decays nor feeds the state: exact anywhere
    A = -jnp.exp(p["A_log"].astype(jnp.float32))
    m = mitigation
    if m is not None and m.decay_scale != 1.0:  # dt * A' = dt * A + log(lambda): a per-step A
        A = A + math.log(m.decay_scale) / jnp.maximum(dt, 1e-30)
    if m is not None and m.input_scale != 1.0:
        B = B * m.input_scale
    if m is not None and m.window is not None:
        y, ssm = ssd_windowed(xs, dt, A, B, C, window=m.window, keep_first=m.keep_first,
                              return_state=True)  # from the zero state
    elif t == 1 or norm_cap is not None:
        y, ssm = ssd_recurrent(xs, dt, A, B, C, state.ssm, norm_cap=norm_cap)
    else:
        y, ssm = ssd(xs, dt, A, B, C, state.ssm, chunk_size=chunk_size,
                     implementation=_ssd_implementation(ssd_implementation, hd, n))
    y = y + xs.astype(jnp.float32) * p["D"].astype(jnp.float32)[:, None]
    y = _gated_norm(y.reshape(b, t, i).astype(x.dtype), z, p["norm"]["weight"].astype(x.dtype), c)
    log_decay = jnp.sum(jnp.where(real[..., None], dt * A, 0.0), axis=1)  # [B, H]: log prod of this call's a_t
    return _linear(y, p["out_proj"]), Mamba2LayerState(conv=new_conv.astype(state.conv.dtype), ssm=ssm), log_decay


def forward(params: dict, tokens: Array, positions: Array | None = None, state: Mamba2State | None = None, *,
            config: Mamba2Config, compute_dtype=None, chunk_size: int | None = None,
            mitigation: StateMitigation | None = None, return_log_decay: bool = False,
            logits_at: Array | None = None, ssd_implementation: str | None = None):
    """``(logits [B, T, V] float32, state)`` after ``tokens [B, T]`` from ``state`` (zeros if
    None). ``positions [B, T]`` only mark padding (-1), at either end of a row (a Mamba has no
    positional encoding): padding leaves the state as it was, so right-padded prompts and the
    padded steps of finished rows are exact (a gap inside a row is not: the conv spans it). ``logits_at [B]`` (token
    indices): run the LM head only there and return ``[B, 1, V]``, as the transformer's forward.
    ``chunk_size`` overrides the config's SSD chunk; ``mitigation`` applies Stuffed Mamba's
    state-collapse mitigations (``StateMitigation``). ``return_log_decay`` adds a third output,
    ``[L, B, H]``: each head's log cumulative decay over this call's real tokens, ``sum_t dt_t A``
    (what Stuffed Mamba reads state retention from). ``ssd_implementation`` picks the chunked
    scan's backend (``jaxkv.kernels.ssd.ssd``); None: the Pallas kernel on a GPU where the shapes
    suit it, else the reference. Pure and jit-able (``config`` static)."""
    if mitigation is not None and mitigation.window is not None and state is not None:
        raise UserError("mitigation.window reads each output from the last window tokens of this call: "
                        "run the whole sequence in one forward, without a state")
    if mitigation is not None and mitigation.norm_cap is not None \
            and tuple(mitigation.norm_cap.shape) != (config.num_layers, config.num_heads):
        raise UserError(f"mitigation.norm_cap must be [L, H] = [{config.num_layers}, {config.num_heads}], "
                        f"got {list(mitigation.norm_cap.shape)}")
    if tokens.ndim != 2:
        raise UserError(f"tokens must be [B, T], got {tokens.shape}")
    if positions is not None and positions.shape != tokens.shape:
        raise UserError(f"positions must be [B, T] like tokens; got {positions.shape} and {tokens.shape}")
    if logits_at is not None and jnp.shape(logits_at) != tokens.shape[:1]:
        raise UserError(f"logits_at must be [B] token indices; got shape {jnp.shape(logits_at)} for B={tokens.shape[0]}")
    if compute_dtype is None:
        compute_dtype = params["embed"]["embedding"].dtype
    b, t = tokens.shape
    real = jnp.ones((b, t), bool) if positions is None else positions >= 0
    if state is None:
        state = init_state(config, batch=b, dtype=compute_dtype)
    emb = params["embed"]["embedding"]
    x = jnp.take(emb, jnp.where(real, tokens, 0), axis=0).astype(compute_dtype)
    if config.residual_in_fp32:  # the residual stream stays fp32 from the first block on (as HF's)
        x = x.astype(jnp.float32)
    layers, decays = [], []
    for li in range(config.num_layers):
        p = params["layers"][str(li)]
        hdn = _rmsnorm(x.astype(compute_dtype), p["norm"]["weight"].astype(compute_dtype), config.layer_norm_epsilon)
        cap = None if mitigation is None or mitigation.norm_cap is None else mitigation.norm_cap[li]
        out, st, decay = _mixer(p["mixer"], hdn, real, state.layers[li], config, chunk_size or config.chunk_size,
                                mitigation, cap, ssd_implementation)
        x = x + out.astype(x.dtype)
        layers.append(st)
        decays.append(decay)
    if logits_at is not None:
        x = jnp.take_along_axis(x, jnp.asarray(logits_at, jnp.int32)[:, None, None], axis=1)
    x = _rmsnorm(x.astype(compute_dtype), params["norm_f"]["weight"].astype(compute_dtype), config.layer_norm_epsilon)
    head = emb.T if config.tie_word_embeddings else params["lm_head"]["kernel"]
    logits = (x @ head.astype(compute_dtype)).astype(jnp.float32)
    if return_log_decay:
        return logits, Mamba2State(layers=tuple(layers)), jnp.stack(decays)
    return logits, Mamba2State(layers=tuple(layers))
