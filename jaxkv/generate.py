"""jit-compiled generation: one prefill call, then the whole decode loop in one jitted loop.

Prompts of different lengths are right-padded to a bucket (the next power of two, at least 16)
with position -1 on the padding, so every prompt of a bucket reuses the same compiled prefill
and decode loop. The decode loop runs on device until ``max_new_tokens`` or until every row has
produced a stop token; rows that stopped feed position -1, which writes nothing to the cache.

Sampling: ``temperature == 0`` is greedy (argmax); otherwise softmax sampling at that
temperature, restricted to the smallest set of tokens whose probability reaches ``top_p``.
Temperature and top-p are traced values, so changing them does not recompile; only switching
between greedy and sampling does (greedy compiles no sampling branch), as does switching between
stop tokens and none (without any, the loop has a static trip count instead of an early exit).

The same functions run a Mamba-2 (``jaxkv.models.mamba2``): its cache is its fixed-size state
(``Mamba2State``), which right padding and the padded steps of finished rows leave as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache import ModelCache, init_cache, make_policy
from jaxkv.cache.policy import CachePolicy
from jaxkv.config import LlamaConfig
from jaxkv.errors import UserError
from jaxkv.models import llama, mamba2

__all__ = ["GenerationResult", "generate", "sample_logits", "bucket_length", "pad_prompts", "prefill", "decode",
           "model_forward", "init_model_cache", "is_state_space"]

MIN_BUCKET = 16


def is_state_space(config) -> bool:
    """True for a Mamba-2 config: a model whose cache is a fixed-size state, not a KV cache."""
    return isinstance(config, mamba2.Mamba2Config)


def model_forward(config):
    """The forward of the model ``config`` describes (a transformer's or a Mamba-2's); both take
    ``(params, tokens, positions, cache, *, config, logits_at=None)``."""
    return mamba2.forward if is_state_space(config) else llama.forward


def init_model_cache(config, policy: CachePolicy | None, *, batch: int, max_len: int, dtype):
    """An empty cache for ``batch`` rows: the policy's KV cache of ``max_len`` tokens for a
    transformer, the zero state for a Mamba-2 (``policy`` and ``max_len`` unused: it has one size)."""
    if is_state_space(config):
        return mamba2.init_state(config, batch=batch, dtype=dtype)
    return init_cache(config, policy, batch=batch, max_len=max_len, dtype=dtype)


def bucket_length(n: int) -> int:
    """The padded prompt length for a prompt of ``n`` tokens (next power of two, >= 16)."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad token lists into one bucket: ``tokens, positions [B, T]`` (position -1 on the
    padding) and ``lengths [B]``, as host arrays ready for ``prefill``."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    t = bucket_length(int(lengths.max()))
    tokens = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    steps = np.arange(t, dtype=np.int32)
    positions = np.where(steps[None, :] < lengths[:, None], steps[None, :], -1).astype(np.int32)
    return tokens, positions, lengths


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next tokens ``[B]`` from ``logits [B, V]`` (greedy when ``temperature == 0``)."""

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def nucleus(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token if the mass before it is below top_p (the first token is always kept), and
        # every token as likely as the last one kept (ties at the cut are not broken by id);
        # top_p >= 1 keeps everything (the float32 running sum may reach 1 before the end)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cut = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        keep = keep | (sorted_logits >= cut) | (top_p >= 1)
        choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, nucleus, greedy, None)


# The cache's buffers are donated to the jitted prefill and decode, so that a long context's
# cache is not held twice; its small leaves (thresholds, lengths, counters: under
# SMALL_LEAF_BYTES) are not. With every leaf donated, XLA on the GPU (jax 0.11.2) returned some
# copies of a value held in several leaves (Squeezed's global threshold, one per layer) as the
# donated input's zeros, silently; tests/test_policy_conformance.py checks every policy on the GPU.
SMALL_LEAF_BYTES = 1 << 16


def split_donated(cache: ModelCache):
    """``(big, small, treedef)``: the cache's leaves of at least ``SMALL_LEAF_BYTES`` (donated)
    and the rest, each a tuple with None in the other's places; ``join_donated`` inverts it."""
    leaves, tree = jax.tree.flatten(cache)
    big = tuple(x if x.size * x.dtype.itemsize >= SMALL_LEAF_BYTES else None for x in leaves)
    return big, tuple(x if b is None else None for x, b in zip(leaves, big)), tree


def join_donated(big, small, tree) -> ModelCache:
    return jax.tree.unflatten(tree, [s if b is None else b for b, s in zip(big, small)])


@functools.partial(jax.jit, static_argnames=("config", "tree"), donate_argnames=("big",))
def _prefill(params, tokens, positions, lengths, big, small, *, config: LlamaConfig, tree):
    logits, cache = model_forward(config)(params, tokens, positions, join_donated(big, small, tree), config=config,
                            logits_at=lengths - 1)
    return logits[:, 0], cache


def prefill(params, tokens, positions, lengths, cache: ModelCache, *, config: LlamaConfig):
    """Run the prompt through the model; returns the logits of each row's last real token and
    the prefilled cache (jitted; the cache's large buffers are donated: do not reuse ``cache``)."""
    big, small, tree = split_donated(cache)
    return _prefill(params, tokens, positions, lengths, big, small, config=config, tree=tree)


def _concrete(x):
    """``x`` as a numpy value, or None when it is traced (decode called under an outer jit)."""
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def decode(params, cache: ModelCache, first_logits, lengths, key, temperature, top_p, stop_tokens,
           *, config: LlamaConfig, max_new_tokens: int):
    """Sample up to ``max_new_tokens`` tokens per row; returns ``(tokens [B, N], cache)`` with -1
    after a row's stop token (the stop token itself is kept). Jitted, one compile per shape (and
    per mode: a temperature of 0 compiles a greedy loop without the sampling branch, and stop
    tokens that cannot occur, all negative, a loop of a fixed trip count: on a GPU a runtime
    branch or loop condition is read back by the host every step); the cache's large buffers are
    donated."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    if isinstance(stop_tokens, (list, tuple)):  # a list would reach the jit as a pytree of scalars
        stop_tokens = np.asarray(stop_tokens, np.int32).reshape(-1)
    big, small, tree = split_donated(cache)
    t, stops = _concrete(temperature), _concrete(stop_tokens)
    greedy = t is not None and float(t) == 0.0
    fixed = stops is not None and bool(np.all(stops < 0))
    return _decode(params, big, small, first_logits, lengths, key, temperature, top_p, stop_tokens,
                   config=config, max_new_tokens=max_new_tokens, tree=tree, greedy=greedy, fixed=fixed)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "tree", "greedy", "fixed"),
                   donate_argnames=("big",))
def _decode(params, big, small, first_logits, lengths, key, temperature, top_p, stop_tokens,
            *, config: LlamaConfig, max_new_tokens: int, tree, greedy: bool = False, fixed: bool = False):
    cache = join_donated(big, small, tree)
    b = first_logits.shape[0]

    def pick(logits, step):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample_logits(logits, jax.random.fold_in(key, step), temperature, top_p)

    def stopped(tok):
        return jnp.any(tok[:, None] == stop_tokens[None, :], axis=-1)

    first = pick(first_logits, 0)
    out = jnp.full((b, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
    done = stopped(first)

    def cond(carry):
        step, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, out, done = carry
        prev = out[:, step - 1]
        pos = jnp.where(done, -1, lengths + step - 1)
        logits, cache = model_forward(config)(params, jnp.maximum(prev, 0)[:, None], pos[:, None], cache,
                                              config=config)
        tok = jnp.where(done, -1, pick(logits[:, 0], step))
        out = out.at[:, step].set(tok)
        return step + 1, cache, out, done | stopped(tok)

    if fixed:  # no stop token can end a row: every step runs, and the loop's trip count is static
        _, cache, out, _ = jax.lax.fori_loop(1, max_new_tokens, lambda i, c: body(c), (jnp.int32(1), cache, out, done))
    else:
        _, cache, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, done))
    return out, cache


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """``tokens``: list of new-token lists (stop token included, nothing after it);
    ``cache_nbytes``: bytes the cache held."""

    tokens: list[list[int]]
    cache_nbytes: int


def _validate_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple, np.ndarray)) or len(prompts) == 0:
        raise UserError("prompts must be a non-empty list of token-id sequences")
    out = []
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.ndim != 1 or ids.size == 0:
            raise UserError(f"prompts[{i}] must be a non-empty 1-D sequence of token ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"prompts[{i}] must hold integer token ids, got dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise UserError(f"prompts[{i}] has token ids outside [0, {vocab_size})")
        out.append(ids.astype(np.int32).tolist())
    return out


def generate(
    params: dict,
    config: LlamaConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    policy: CachePolicy | str = "full",
    policy_params: dict | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    stop_tokens: Sequence[int] | None = None,
    prepack: bool | str = False,
    hold_out_last: bool = False,
) -> GenerationResult:
    """Generate continuations of ``prompts`` (lists of token ids, any lengths).

    ``policy`` is a policy object or a registered name (``jaxkv.cache.available_policies()``)
    constructed with ``policy_params``; a Mamba-2 (``config`` a ``Mamba2Config``) takes only
    ``'full'``: its state is its cache. ``stop_tokens`` default to the config's EOS ids.
    ``key`` is required when ``temperature > 0``.

    ``prepack``: prefill the prompts packed into rows instead of padded (``jaxkv.prepack``;
    ``True`` or ``'greedy'``: bin packing by decreasing length, ``'exact'``: an integer program);
    the cache and the tokens are those of the padded run. ``hold_out_last`` (with ``prepack``):
    leave each prompt's last token out of the rows and feed it as the first decode input (the
    paper's form; a compressing policy then compresses all but that token).
    """
    prompts = _validate_prompts(prompts, config.vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise UserError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if temperature > 0 and key is None:
        raise UserError("sampling with temperature > 0 needs an explicit PRNG key (key=jax.random.key(seed))")
    longest = max(len(p) for p in prompts)
    if is_state_space(config):
        name = policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__)
        if name != "full" or policy_params:
            raise UserError(f"policy {name!r}: a Mamba-2's cache is its fixed-size state; cache policies "
                            "compress a transformer's KV cache (use policy='full', the default)")
        if prepack:
            raise UserError("prepack packs prompts for a transformer's segment attention; a Mamba-2 runs "
                            "them padded (exactly): pass prepack=False")
        policy = None
    else:
        policy = make_policy(policy, **(policy_params or {})).prepare(params, config)
    if policy is not None and longest + max_new_tokens > config.max_position_embeddings:
        raise UserError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {config.max_position_embeddings} tokens"
        )
    stop = tuple(config.eos_token_ids if stop_tokens is None else stop_tokens)
    for t in stop:
        if not 0 <= int(t) < config.vocab_size:
            raise UserError(f"stop token {t} is outside [0, {config.vocab_size})")

    if prepack not in (False, True, "greedy", "exact"):
        raise UserError(f"prepack must be False, True, 'greedy' or 'exact', got {prepack!r}")
    if hold_out_last and not prepack:
        raise UserError("hold_out_last is a prepacking option: pass prepack=True with it")
    tokens, positions, lengths = pad_prompts(prompts)
    b, t = tokens.shape
    dtype = params["embed"]["embedding"].dtype
    cache = init_model_cache(config, policy, batch=b, max_len=t + max_new_tokens, dtype=dtype)
    nbytes = cache.nbytes

    if prepack:
        from jaxkv.prepack import pack_prompts, prepacked_prefill

        packing = pack_prompts(prompts, method="greedy" if prepack is True else prepack, hold_out_last=hold_out_last)
        last, cache = prepacked_prefill(params, packing, prompts, cache, config=config)
    else:
        last, cache = prefill(params, tokens, positions, lengths, cache, config=config)
    key = jax.random.key(0) if key is None else key
    stop_arr = np.array(stop if stop else (-2,), np.int32)  # -2 never matches a sampled id
    out, _ = decode(params, cache, last, lengths, key, np.float32(temperature), np.float32(top_p),
                    stop_arr, config=config, max_new_tokens=max_new_tokens)
    out = np.asarray(out)
    result = [[int(x) for x in row if x >= 0] for row in out]
    return GenerationResult(tokens=result, cache_nbytes=nbytes)
