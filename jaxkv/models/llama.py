"""The Llama-family decoder (Llama-2/3, Mistral, Qwen2) in Flax NNX, used as pure functions.

The modules are NNX; what users hold is a plain nested dict of arrays (``params``), and
``forward(params, tokens, positions, cache, config=...)`` rebuilds the module inside the traced
function (``nnx.merge``), so nothing is mutable and everything jit-compiles.

Inputs:
  tokens     ``[B, T]`` int token ids (any value where the position is -1).
  positions  ``[B, T]`` int absolute positions; -1 marks padding. RoPE and every mask come
             from positions, so right-padding, ragged batches and caches that evict or reorder
             slots all stay exact.
  segment_ids ``[B, T]`` optional, for packed rows (cache-free forward only): tokens attend
             within their segment.
  cache      ``None`` for a cache-free forward, or a ``ModelCache`` (see ``jaxkv.cache``).

Parameter tree (``params``)::

  embed/embedding [V, D]
  layers/<i>/attn_norm/weight [D]
  layers/<i>/attn/{q,k,v,o}/kernel [N*H, D] | [K*H, D] | [D, N*H]  (+ bias)
  layers/<i>/mlp_norm/weight [D]
  layers/<i>/mlp/{gate,up,down}/kernel
  norm/weight [D]
  lm_head/kernel [V, D]            (absent when embeddings are tied)

Matrices are ``[out, in]``, the layout of transformers' checkpoints.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkv.attention import attend_dense
from jaxkv.cache.kv import ModelCache
from jaxkv.cache.policy import LayerInput, LayerSpec, Phase
from jaxkv.config import LlamaConfig
from jaxkv.models.layers import MLP, Linear, RMSNorm, apply_rope, rope_angles, rope_inv_freq
from jaxkv.typing import Array
from jaxkv.errors import UserError

__all__ = ["LlamaForCausalLM", "init_params", "abstract_params", "forward"]


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (vocab, dim), param_dtype))

    def __call__(self, tokens: Array, dtype) -> Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

    def attend(self, x: Array) -> Array:
        return x @ self.embedding[...].astype(x.dtype).T


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs):
        d, h = config.hidden_size, config.head_dim
        n, k = config.num_heads, config.num_kv_heads
        self.q = Linear(d, n * h, bias=config.qkv_bias, param_dtype=param_dtype, rngs=rngs)
        self.k = Linear(d, k * h, bias=config.qkv_bias, param_dtype=param_dtype, rngs=rngs)
        self.v = Linear(d, k * h, bias=config.qkv_bias, param_dtype=param_dtype, rngs=rngs)
        self.o = Linear(n * h, d, bias=config.o_bias, param_dtype=param_dtype, rngs=rngs)
        self.num_kv_heads, self.group, self.head_dim = k, config.group_size, h
        self.window = config.sliding_window

    def __call__(self, x, positions, cos, sin, *, layer_cache, policy, phase, layer, params, segment_ids,
                 inv_freq=None, attention_implementation=None, attention_sharding=None, packing=None,
                 anchor=False):
        b, t, _ = x.shape
        kh, g, h = self.num_kv_heads, self.group, self.head_dim
        q = apply_rope(self.q(x).reshape(b, t, kh * g, h), cos, sin).reshape(b, t, kh, g, h)
        k = apply_rope(self.k(x).reshape(b, t, kh, h), cos, sin)
        v = self.v(x).reshape(b, t, kh, h)
        if layer_cache is None:  # cache-free forward (training, scoring): dense attention
            out = attend_dense(q, k, v, positions, window=self.window, segment_ids=segment_ids,
                               implementation=attention_implementation, sharding=attention_sharding, anchor=anchor)
        elif packing is not None:  # a packed prefill (jaxkv.prepack): rows hold several prompts
            out = policy.prefill_attend(q, k, v, positions, layer=layer, packing=packing,
                                        implementation=attention_implementation)
            # the policy sees each prompt's own Q/K/V, as if it had been prefilled alone
            extra = ({"inputs": LayerInput(x=packing.unpack(x), inv_freq=inv_freq)} if policy.wants_layer_input
                     else {})
            layer_cache = policy.prefill(layer_cache, q=packing.unpack(q), k=packing.unpack(k), v=packing.unpack(v),
                                         positions=packing.positions, layer=layer, params=params, **extra)
        else:
            extra = {"inputs": LayerInput(x=x, inv_freq=inv_freq)} if policy.wants_layer_input else {}
            if phase is Phase.PREFILL:
                out = policy.prefill_attend(q, k, v, positions, layer=layer, implementation=attention_implementation)
                layer_cache = policy.prefill(layer_cache, q=q, k=k, v=v, positions=positions, layer=layer,
                                             params=params, **extra)
            else:
                out, layer_cache = policy.append(layer_cache, q=q, k=k, v=v, positions=positions, phase=phase,
                                                 layer=layer, params=params, **extra)
        return self.o(out.reshape(b, t, kh * g * h)), layer_cache


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.attn_norm = RMSNorm(config.hidden_size, eps=eps, param_dtype=param_dtype)
        self.attn = Attention(config, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=eps, param_dtype=param_dtype)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, cos, sin, **kw):
        a, layer_cache = self.attn(self.attn_norm(x), positions, cos, sin, **kw)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), layer_cache


class LlamaForCausalLM(nnx.Module):
    """Embedding, ``num_layers`` decoder layers, final norm and LM head."""

    def __init__(self, config: LlamaConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embed(config.vocab_size, config.hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [DecoderLayer(config, param_dtype=param_dtype, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = (
            None if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, param_dtype=param_dtype, rngs=rngs)
        )

    def __call__(self, tokens, positions, cache: ModelCache | None = None, *,
                 segment_ids=None, compute_dtype=jnp.float32, logits_at=None, hidden_only=False,
                 attention_implementation=None, attention_sharding=None, packing=None, anchor=False, remat=None):
        cfg = self.config
        if cache is not None and segment_ids is not None:
            raise UserError("segment_ids are for the cache-free forward of packed rows; "
                             "pass cache=None or drop segment_ids (a packed prefill takes packing=)")
        if packing is not None and (cache is None or cache.prefilled or logits_at is not None):
            raise UserError("packing is for the prefill of an empty cache (jaxkv.prepack): pass a fresh cache "
                            "and no logits_at (the logits come at each prompt's last token)")
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos, sin = rope_angles(positions, inv_freq)
        # padding may hold any id (even out of range, which gathers NaN and would poison the row
        # through attention's zero weights): read id 0 there instead
        x = self.embed(jnp.where(positions >= 0, tokens, 0), compute_dtype)
        phase = None
        if cache is not None:
            phase = Phase.DECODE if tokens.shape[1] == 1 else Phase.EXTEND
            phase = phase if cache.prefilled else Phase.PREFILL
        states = None if cache is None else list(cache.layers)
        for i, layer in enumerate(self.layers):
            spec = LayerSpec(i, cfg)
            if remat is not None and cache is None:  # the cache-free forward, each layer rematerialised
                x = _remat_layer(layer, x, remat, positions, cos, sin, layer=spec, segment_ids=segment_ids,
                                 inv_freq=inv_freq, attention_implementation=attention_implementation,
                                 attention_sharding=attention_sharding, anchor=anchor)
                continue
            # a state may serve several layers (CachePolicy.state_index): read and update its owner's
            owner = i if cache is None else cache.policies[i].state_index(spec)
            x, layer_cache = layer(
                x, positions, cos, sin,
                layer_cache=None if cache is None else states[owner],
                policy=None if cache is None else cache.policies[i],
                params=None if cache is None else cache.params[i],
                layer=spec, phase=phase, segment_ids=segment_ids, inv_freq=inv_freq,
                attention_implementation=attention_implementation, attention_sharding=attention_sharding,
                packing=packing, anchor=anchor,
            )
            if cache is not None:
                states[owner] = layer_cache
        if packing is not None:
            x = packing.last_hidden(x)  # [P, 1, D]: one row per prompt from here on
        if logits_at is not None:
            x = jnp.take_along_axis(x, jnp.asarray(logits_at, jnp.int32)[:, None, None], axis=1)
        x = self.norm(x)
        if hidden_only:  # the LM head's input; cache-free only (checked in `forward`)
            return x, None
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        if cache is not None:
            cache = cache.replace(layers=tuple(states), prefilled=True)
            if phase is Phase.PREFILL and cache.method is not None:
                cache = cache.method.after_prefill(cache)  # the model-level hook sees every layer
        return logits.astype(jnp.float32), cache


def attention_inputs(params: dict, tokens: Array, positions: Array, *, config: LlamaConfig,
                     segment_ids: Array | None = None, compute_dtype=None) -> list[Array]:
    """Each layer's attention input ``[B, T, D]`` (the residual stream after ``attn_norm``: what
    the q/k/v projections read) in a cache-free forward; what CSKV calibrates and trains on."""
    if compute_dtype is None:
        compute_dtype = params["embed"]["embedding"].dtype
    model = nnx.merge(_graphdef(config), params)
    cos, sin = rope_angles(positions, rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
    x = model.embed(jnp.where(positions >= 0, tokens, 0), compute_dtype)
    out = []
    for i, layer in enumerate(model.layers):
        out.append(layer.attn_norm(x))
        if i + 1 < len(model.layers):  # the last layer's own output feeds nothing asked for
            x, _ = layer(x, positions, cos, sin, layer_cache=None, policy=None, params=None, layer=None, phase=None,
                         segment_ids=segment_ids)
    return out


@functools.lru_cache(maxsize=32)
def _graphdef(config: LlamaConfig):
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(model)
    return graphdef


def init_params(config: LlamaConfig, key: jax.Array, *, dtype=jnp.float32) -> dict:
    """Random parameters: normal(0, 0.02) matrices (Llama's initializer range), ones for norms,
    zeros for biases."""
    model = LlamaForCausalLM(config, param_dtype=dtype, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model))


def abstract_params(config: LlamaConfig, dtype=jnp.float32) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (no memory used)."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, param_dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model))


# ``forward(remat=)``: what each layer's backward keeps from its forward (the rest is recomputed)
REMAT_POLICIES = {
    "full": None,  # nothing but the layer's input: the whole layer runs again in the backward
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the matmuls' outputs kept
}


def _remat_layer(module, x, remat: str, positions, cos, sin, **kwargs):
    """One cache-free layer (``module``) under ``jax.checkpoint`` with ``REMAT_POLICIES[remat]``."""
    graphdef, state = nnx.split(module)

    def run(state, x):
        out, _ = nnx.merge(graphdef, state)(x, positions, cos, sin, layer_cache=None, policy=None, params=None,
                                            phase=None, packing=None, **kwargs)
        return out

    return jax.checkpoint(run, policy=REMAT_POLICIES[remat])(state, x)


def forward(params: dict, tokens: Array, positions: Array, cache: ModelCache | None = None, *,
            config: LlamaConfig, segment_ids: Array | None = None, compute_dtype=None,
            logits_at: Array | None = None, hidden_only: bool = False, attention_implementation: str | None = None,
            attention_sharding=None, packing=None, anchor: bool = False, remat: str | None = None):
    """``(logits [B, T, V] float32, cache)``; pure and jit-able (``config`` is static).

    ``logits_at [B]`` (token indices): run the LM head only there and return ``[B, 1, V]`` (a
    prefill needs one row's logits, not ``T x V`` of them: 16 GiB at 32k tokens and a 128k
    vocabulary).

    ``hidden_only``: return the final norm's output ``[B, T, D]`` (compute dtype) instead of
    logits, for a loss that applies the head in chunks (``lm_head``); cache-free forwards only.
    ``attention_implementation``, ``attention_sharding``: the cache-free attention's
    (``attention.attend_dense``'s ``implementation`` and ``sharding``; None: its defaults).

    ``anchor`` (cache-free, with ``segment_ids``): every document of a row also sees the row's
    first token, the shared anchor of AnchorAttention.

    ``remat`` (cache-free): rematerialise each layer in the backward, keeping what
    ``REMAT_POLICIES[remat]`` says (``'full'``: only the layer's input; ``'dots'``: the matmuls'
    outputs too); None keeps every activation. The same values, less memory, more compute.

    ``packing``: a ``jaxkv.prepack.PackedLayout`` for a packed prefill: ``tokens, positions`` are
    the packed rows ``[R, C]``, ``cache`` an empty cache with one row per prompt; returns the
    logits at each prompt's last token ``[P, 1, V]`` and the cache filled as if each prompt had
    been prefilled alone.

    ``compute_dtype`` defaults to the dtype of the embedding parameters. Token ids outside the
    vocabulary are refused with ``UserError`` when ``tokens`` is concrete; under a caller's jit
    they cannot be checked and give NaN logits for their row (padding, position -1, may hold any id).
    """
    if tokens.ndim != 2 or positions.shape != tokens.shape:
        raise UserError(f"tokens and positions must both be [B, T]; got {tokens.shape} and {positions.shape}")
    if segment_ids is not None and segment_ids.shape != tokens.shape:
        raise UserError(f"segment_ids must be [B, T] like tokens; got {segment_ids.shape}")
    for name, a in (("tokens", tokens), ("positions", positions), ("logits_at", logits_at)):
        dtype = None if a is None else jnp.result_type(a)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
            raise UserError(f"{name} must be integers, got {dtype}")
    if anchor and cache is not None:
        raise UserError("anchor is for the cache-free forward (training, scoring): drop cache, or anchor")
    if cache is not None and packing is None:
        from jaxkv.cache.kv import KVCache

        kv = next((x for x in jax.tree.leaves(cache.layers, is_leaf=lambda x: isinstance(x, KVCache))
                   if isinstance(x, KVCache)), None)
        if kv is not None and kv.positions.shape[0] != tokens.shape[0]:
            raise UserError(f"tokens hold {tokens.shape[0]} rows, the cache {kv.positions.shape[0]} "
                            "(init_cache(batch=...))")
    if logits_at is not None and not isinstance(logits_at, jax.core.Tracer):
        at = np.asarray(logits_at)
        if at.shape == tokens.shape[:1] and ((at < 0) | (at >= tokens.shape[1])).any():
            raise UserError(f"logits_at must be indices in [0, {tokens.shape[1]}) (the tokens of a row), got "
                            f"{at.tolist()}")
    if not isinstance(tokens, jax.core.Tracer) and not isinstance(positions, jax.core.Tracer):
        # eager call: check ids (under jit, ids are the caller's contract)
        ids = np.asarray(tokens)
        bad = (ids < 0) | (ids >= config.vocab_size)
        if np.issubdtype(ids.dtype, np.integer) and (bad & (np.asarray(positions) >= 0)).any():
            raise UserError(f"tokens hold ids outside [0, {config.vocab_size}) (the model's vocabulary), "
                            f"e.g. {int(ids[bad & (np.asarray(positions) >= 0)][0])}")
    if logits_at is not None and jnp.shape(logits_at) != tokens.shape[:1]:
        raise UserError(f"logits_at must be [B] token indices; got shape {jnp.shape(logits_at)} for B={tokens.shape[0]}")
    if hidden_only and (cache is not None or logits_at is not None):
        raise UserError("hidden_only is for the cache-free forward of every token: drop cache and logits_at")
    if remat is not None and (remat not in REMAT_POLICIES or cache is not None):
        raise UserError(f"remat must be one of {sorted(REMAT_POLICIES)} or None, and for the cache-free forward "
                        f"(training); got {remat!r}" + (" with a cache" if cache is not None else ""))
    if compute_dtype is None:
        compute_dtype = params["embed"]["embedding"].dtype
    model = nnx.merge(_graphdef(config), params)
    out = model(tokens, positions, cache, segment_ids=segment_ids, compute_dtype=compute_dtype, logits_at=logits_at,
                hidden_only=hidden_only, attention_implementation=attention_implementation,
                attention_sharding=attention_sharding, packing=packing, anchor=anchor, remat=remat)
    if cache is not None and cache.max_len is not None and packing is None:
        # a row at a position the cache was not made for: NaN logits, whatever the policy did with
        # the token (some drop it, some round their capacity up), never a quietly wrong answer
        logits, new_cache = out
        lost = jnp.any(positions >= cache.max_len, axis=1)
        out = jnp.where(lost[:, None, None], jnp.nan, logits), new_cache
    return out


def lm_head(params: dict, hidden: Array, *, config: LlamaConfig) -> Array:
    """Logits ``[..., V]`` float32 of ``hidden [..., D]`` (``forward(hidden_only=True)``'s output)."""
    model = nnx.merge(_graphdef(config), params)
    logits = model.embed.attend(hidden) if model.lm_head is None else model.lm_head(hidden)
    return logits.astype(jnp.float32)
