"""``razor``: RazorAttention — retrieval heads keep every token, the others keep sinks, a recent
window and one compensation token.

1. **Calibrate** (data-free, ``head_scores``): feed ``n`` random token ids repeated 4 times after
   BOS. For every query in repeats 2-4, a head's *echo* score is the attention mass on earlier
   occurrences of the same token, its *induction* score the mass on the token right after each
   earlier occurrence; both are averaged over those queries and max-pooled over the query heads
   of each KV head (GQA), giving ``[L, K]`` scores.
2. **Select** (``select_heads``): retrieval KV heads = the global top ``induction_share`` (14%)
   by induction plus the top ``echo_share`` (1%) by echo, over all layers.
3. **Cache**: per layer the retrieval heads are stored as a full cache ``[B, Kr, S, H]``, the
   others as ``sinks`` + a ring of the last ``window`` tokens ``[B, Kn, sinks + window, H]`` plus
   the compensation token: the running sums of every dropped key and value and their count,
   attended as their mean. ``compensation="weighted"`` (the paper's form) adds ``log n`` to its
   score, so it weighs as the ``n`` tokens it stands for; ``"mean"`` attends the plain mean (the
   shipped deploy version); ``"none"`` drops them (the ablation). Tokens leaving the window
   during decode are folded in as they are overwritten. The prompt's own attention is dense.
   Bytes really shrink: the two head groups are separate arrays.

Deviations: the calibration uses ``n_tokens=512`` random ids by default (the paper: 2,500),
capped so the 4 repeats fit the model's context, since scores are means and small models have
short contexts; the compensation token's position (for masks) is the newest token it holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxkv.attention import attend_reference, attention_weights
from jaxkv.cache.kv import KVCache
from jaxkv.cache.policy import CachePolicy, LayerSpec, init_cache, register_policy
from jaxkv.cache.streaming import StreamingCache
from jaxkv.errors import UserError
from jaxkv.typing import Array

__all__ = ["RazorCache", "RazorLayer", "RazorState", "head_scores", "select_heads", "COMPENSATIONS"]

COMPENSATIONS = ("weighted", "mean", "none")
CALIBRATION_METHOD = "razor"


# ------------------------------------------------------------------ 1. calibration
@struct.dataclass
class _Scores:
    echo: Array       # [K, G]
    induction: Array  # [K, G]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _HeadProbe(CachePolicy):
    """A probe, not a cache: its prefill measures echo and induction scores of one layer."""

    name = "_razor_probe"
    n: int
    offset: int  # 1 when a BOS token precedes the repeats

    def capacity(self, max_len):
        return 0

    def init(self, *, batch, max_len, dtype, layer):
        g = layer.config.group_size
        return _Scores(echo=jnp.zeros((layer.num_kv_heads, g)), induction=jnp.zeros((layer.num_kv_heads, g)))

    def expected_nbytes(self, *, batch, max_len, dtype, layer):
        return 2 * layer.num_kv_heads * layer.config.group_size * 4

    def prefill(self, state, *, q, k, v, positions, layer, params=None):
        t = q.shape[1]
        p = attention_weights(q, k.transpose(0, 2, 1, 3), positions, positions)  # [B, K, G, T, S]
        echo, induction, rows = score_masks(t, self.n, self.offset)
        rows = jnp.asarray(rows)
        mean = lambda m: jnp.sum(jnp.sum(p * jnp.asarray(m), axis=-1) * rows, axis=-1) / rows.sum()  # noqa: E731
        return _Scores(echo=jnp.mean(mean(echo), axis=0), induction=jnp.mean(mean(induction), axis=0))


def score_masks(t: int, n: int, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a sequence of ``offset`` BOS tokens then ids repeating with period ``n``: the ``[T, T]``
    echo mask (key = an earlier occurrence of the query's token), induction mask (key = the token
    right after an earlier occurrence) and the ``[T]`` rows scored (queries in repeats 2 on)."""
    u = np.arange(t) - offset  # index within the repeated ids (BOS: -1)
    qi, ki = u[:, None], u[None, :]
    d = qi - ki
    echo = (ki >= 0) & (d >= n) & (d % n == 0)
    d = qi - (ki - 1)
    induction = (ki >= 1) & (d >= n) & (d % n == 0)
    return echo, induction, u >= n


def head_scores(params: dict, config, *, n_tokens: int = 512, repeats: int = 4, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Echo and induction scores ``[L, K]`` (max over each KV head's query heads)."""
    if repeats < 2:
        raise UserError(f"razor: repeats must be >= 2, got {repeats}")
    has_bos = config.bos_token_id is not None
    n = min(int(n_tokens), (config.max_position_embeddings - int(has_bos)) // repeats)
    if n < 4:
        raise UserError(f"razor: n_tokens must be >= 4 (and fit {repeats} repeats in the context), got {n}")
    special = {config.bos_token_id, *config.eos_token_ids}
    rng = np.random.default_rng(seed)
    pool = np.array([i for i in range(config.vocab_size) if i not in special])
    ids = rng.choice(pool, size=n, replace=len(pool) < n)
    seq = np.concatenate([[config.bos_token_id]] * has_bos + [np.tile(ids, repeats)]).astype(np.int32)
    from jaxkv.models.llama import forward

    probe = _HeadProbe(n=n, offset=int(has_bos))
    f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    cache = init_cache(config, probe, batch=1, max_len=len(seq), dtype=jnp.float32)
    run = jax.jit(functools.partial(forward, config=config))
    _, cache = run(f32, jnp.asarray(seq)[None], jnp.arange(len(seq))[None], cache)
    echo = np.stack([np.asarray(layer.echo).max(axis=1) for layer in cache.layers])
    induction = np.stack([np.asarray(layer.induction).max(axis=1) for layer in cache.layers])
    return echo, induction


def select_heads(echo: np.ndarray, induction: np.ndarray, *, induction_share: float, echo_share: float
                 ) -> tuple[tuple[int, ...], ...]:
    """Per layer, the sorted KV heads in the global top ``induction_share`` by induction score
    or the top ``echo_share`` by echo score."""
    layers, heads = induction.shape
    chosen = np.zeros(layers * heads, bool)
    for scores, share in ((induction, induction_share), (echo, echo_share)):
        k = math.ceil(share * layers * heads) if share > 0 else 0
        if k:
            chosen[np.argsort(-scores.reshape(-1), kind="stable")[:k]] = True
    chosen = chosen.reshape(layers, heads)
    return tuple(tuple(int(h) for h in np.flatnonzero(row)) for row in chosen)


# ------------------------------------------------------------------ 3. the cache
@struct.dataclass
class RazorState:
    """One layer: ``full`` (retrieval heads) and ``local`` (the others) ``KVCache``s, either None
    when it has no heads, and the compensation token of each local head: float32 sums of dropped
    keys and values ``[B, Kn, H]``, their count and newest position ``[B, Kn]``."""

    full: KVCache | None
    local: KVCache | None
    comp_k: Array
    comp_v: Array
    comp_n: Array
    comp_pos: Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class RazorLayer(CachePolicy):
    """One layer of ``razor``: ``retrieval`` KV heads keep everything."""

    name = "_razor_layer"
    retrieval: tuple[int, ...]
    sinks: int
    window: int
    compensation: str

    def _split(self, layer: LayerSpec):
        return split_heads(self.retrieval, layer.num_kv_heads)

    def _ring(self) -> StreamingCache:
        return StreamingCache(sinks=self.sinks, window=self.window)

    def capacity(self, max_len):
        return max_len

    def init(self, *, batch, max_len, dtype, layer):
        r, rest = self._split(layer)
        h = layer.head_dim
        empty = lambda heads, slots: (self.new_kv(batch=batch, num_kv_heads=heads, slots=slots, head_dim=h,  # noqa: E731
                                                  dtype=dtype) if heads else None)
        kn = len(rest)
        return RazorState(full=empty(len(r), max_len), local=empty(kn, self._ring().capacity(max_len)),
                          comp_k=jnp.zeros((batch, kn, h), jnp.float32), comp_v=jnp.zeros((batch, kn, h), jnp.float32),
                          comp_n=jnp.zeros((batch, kn), jnp.int32), comp_pos=jnp.full((batch, kn), -1, jnp.int32))

    def expected_nbytes(self, *, batch, max_len, dtype, layer):
        r, rest = self._split(layer)
        h = layer.head_dim
        kv = lambda heads, slots: batch * heads * slots * self.kv_slot_bytes(h, dtype)  # noqa: E731
        return kv(len(r), max_len) + kv(len(rest), self._ring().capacity(max_len)) + batch * len(rest) * (2 * h * 4 + 8)

    def prefill(self, state, *, q, k, v, positions, layer, params=None):
        r, rest = self._split(layer)
        full, local = state.full, state.local
        comp = (state.comp_k, state.comp_v, state.comp_n, state.comp_pos)
        if len(r):
            full = full.write(k[:, :, r], v[:, :, r], positions, full.slot_or_drop(positions))
        if len(rest):
            ring = self._ring()
            last = jnp.max(positions, axis=1, keepdims=True)
            keep = (positions < self.sinks) | (positions > last - self.window)
            kl, vl = k[:, :, rest], v[:, :, rest]
            local = local.write(kl, vl, positions, ring._slots(local, positions, keep))
            dropped = (positions >= 0) & ~keep  # [B, T]
            comp = self._fold(comp, kl, vl, positions[:, :, None], dropped[:, :, None])
        return RazorState(full, local, *comp)

    @staticmethod
    def _fold(comp, k, v, pos, mask):
        """Add tokens ``k, v [B, T, Kn, H]`` where ``mask [B, T, Kn]`` to the compensation sums."""
        ck, cv, cn, cp = comp
        m = mask.astype(jnp.float32)[..., None]
        ck = ck + jnp.sum(k.astype(jnp.float32) * m, axis=1)
        cv = cv + jnp.sum(v.astype(jnp.float32) * m, axis=1)
        cn = cn + jnp.sum(mask, axis=1).astype(jnp.int32)
        cp = jnp.maximum(cp, jnp.max(jnp.where(mask, pos, -1), axis=1))
        return ck, cv, cn, cp

    def append(self, state, *, q, k, v, positions, phase, layer, params=None):
        r, rest = self._split(layer)
        b, t, kh, g, h = q.shape
        out = jnp.zeros(q.shape, v.dtype)
        full, local = state.full, state.local
        comp = (state.comp_k, state.comp_v, state.comp_n, state.comp_pos)
        if len(r):
            full = full.write(k[:, :, r], v[:, :, r], positions, full.slot_or_drop(positions))
            out = out.at[:, :, r].set(self.attend(full, q[:, :, r], positions, layer).astype(v.dtype))
        if len(rest):
            if t > self.window:
                raise UserError(f"razor: a {phase.value} chunk of {t} tokens exceeds window={self.window}")
            slots = self._ring()._slots(local, positions, True)  # [B, T]
            s = local.num_slots
            safe = jnp.minimum(slots, s - 1)
            old_pos = jnp.take_along_axis(local.positions, safe[:, None, :], axis=2)  # [B, Kn, T]
            old_k = jnp.take_along_axis(local.k, safe[:, None, :, None], axis=2)      # [B, Kn, T, H]
            old_v = jnp.take_along_axis(local.v, safe[:, None, :, None], axis=2)
            evicted = (slots < s)[:, None, :] & (old_pos >= 0) & (old_pos != positions[:, None, :])
            if self.compensation != "none":  # the tokens this write overwrites leave the window
                comp = self._fold(comp, old_k.transpose(0, 2, 1, 3), old_v.transpose(0, 2, 1, 3),
                                  old_pos.transpose(0, 2, 1), evicted.transpose(0, 2, 1))
            local = local.write(k[:, :, rest], v[:, :, rest], positions, slots)
            out = out.at[:, :, rest].set(self._attend_local(local, comp, q[:, :, rest], positions, layer))
        return out, RazorState(full, local, *comp)

    def attended_keys(self, state):
        count = lambda kv: 0.0 if kv is None else jnp.sum(kv.positions >= 0, axis=(1, 2))  # noqa: E731
        comp = jnp.sum(state.comp_n > 0, axis=1) if self.compensation != "none" else 0.0
        return (count(state.full) + count(state.local) + comp) * jnp.ones((state.comp_n.shape[0],), jnp.float32)

    def _attend_local(self, local, comp, q, positions, layer):
        if self.compensation == "none":
            return self.attend(local, q, positions, layer).astype(local.v.dtype)
        ck, cv, cn, cp = comp
        n = jnp.maximum(cn, 1).astype(jnp.float32)[..., None]
        keys = jnp.concatenate([local.k, (ck / n).astype(local.k.dtype)[:, :, None]], axis=2)
        values = jnp.concatenate([local.v, (cv / n).astype(local.v.dtype)[:, :, None]], axis=2)
        kpos = jnp.concatenate([local.positions, jnp.where(cn > 0, cp, -1)[..., None]], axis=2)
        bias = jnp.zeros(kpos.shape, jnp.float32)
        if self.compensation == "weighted":  # the token weighs as the cn tokens it stands for
            bias = bias.at[..., -1].set(jnp.log(jnp.maximum(cn, 1).astype(jnp.float32)))
        return attend_reference(q, keys, values, positions, kpos, window=layer.sliding_window,
                                k_bias=bias).astype(local.v.dtype)


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class RazorCache(CachePolicy):
    """RazorAttention. Retrieval heads come from ``heads`` (one tuple of KV heads per layer),
    from a ``calibration`` file (``jaxkv calibrate razor``), or, when neither is given, from the
    data-free calibration run on the model in ``prepare``."""

    name = "razor"
    calibration: str | None = None
    heads: tuple | None = None
    sinks: int = 4
    window: int = 256
    compensation: str = "weighted"
    induction_share: float = 0.14
    echo_share: float = 0.01
    n_tokens: int = 512
    seed: int = 0
    budget: float | None = None  # set by from_budget: prepare sizes the window to the real share
    context_len: int | None = None

    def __post_init__(self):
        super().__post_init__()
        for f in ("sinks", "window", "n_tokens", "seed"):
            value = getattr(self, f)
            low = 1 if f in ("window", "n_tokens") else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"razor: {f} must be an integer >= {low}, got {value!r}")
        if self.compensation not in COMPENSATIONS:
            raise UserError(f"razor: compensation must be one of {', '.join(COMPENSATIONS)}, got {self.compensation!r}")
        for f in ("induction_share", "echo_share"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise UserError(f"razor: {f} must be a number in [0, 1], got {value!r}")
        if self.heads is not None:
            object.__setattr__(self, "heads", normalize_heads(self.heads, "razor"))
        if self.budget is not None and self.window not in (
                type(self).window, self._window_for(self.budget, self.context_len,
                                                    self.induction_share + self.echo_share, self.sinks)):
            raise UserError(f"razor: window ({self.window}) and budget ({self.budget}) both size the local "
                            "heads' window; give one of them")

    @staticmethod
    def _window_for(budget: float, context_len: int, share: float, sinks: int) -> int:
        """The window that makes retrieval heads (``share`` of them, keeping everything) plus
        the others (sinks + window) hold ``budget`` of a ``context_len`` prompt (at least 1)."""
        share = min(share, 0.999)
        local = (budget - share) / (1 - share) if budget > share else 0.0
        return max(1, round(local * context_len) - sinks)

    @classmethod
    def from_budget(cls, budget: float, context_len: int, **named) -> "RazorCache":
        """Sized for ``budget`` with the expected retrieval share (``induction_share +
        echo_share``); ``prepare`` resizes the window once the real share is known. A budget
        below the retrieval share cannot be met: the window shrinks to 1 and the bytes held say so.
        A named ``window`` is kept (nothing left to size)."""
        if "window" in named:
            return cls(**named)
        share = named.get("induction_share", cls.induction_share) + named.get("echo_share", cls.echo_share)
        window = cls._window_for(budget, context_len, share, named.get("sinks", cls.sinks))
        return cls(window=window, budget=budget, context_len=context_len, **named)

    def prepare(self, params, config) -> "RazorCache":
        if self.heads is None:
            echo, induction = retrieval_scores(params, config, calibration=self.calibration,
                                               n_tokens=self.n_tokens, seed=self.seed)
            heads = select_heads(echo, induction, induction_share=self.induction_share, echo_share=self.echo_share)
            self = dataclasses.replace(self, heads=heads)
        check_heads(self.heads, config, "razor")
        if self.budget is not None and self.context_len is not None:
            window = self._window_for(self.budget, self.context_len, self.retrieval_share(config), self.sinks)
            self = dataclasses.replace(self, window=window, budget=None, context_len=None)  # sized
        return self

    def retrieval_share(self, config) -> float:
        """The share of the model's KV heads kept whole (once heads are set)."""
        if self.heads is None:
            raise UserError("razor: retrieval heads are not set yet (prepare the policy first)")
        return sum(map(len, self.heads)) / (config.num_layers * config.num_kv_heads)

    def for_layer(self, layer: LayerSpec) -> RazorLayer:
        if self.heads is None:
            raise UserError("razor needs its retrieval heads: call policy.prepare(params, config) (generate and "
                            "jaxkv eval do), pass heads=..., or --cache-arg calibration=FILE")
        check_heads(self.heads, layer.config, "razor")
        return RazorLayer(retrieval=self.heads[layer.index], sinks=self.sinks, window=self.window,
                          compensation=self.compensation, kv_bits=self.kv_bits)


def split_heads(chosen: tuple[int, ...], num_kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """The KV heads ``chosen`` for a layer (kept whole) and the others, as index arrays."""
    rest = [h for h in range(num_kv_heads) if h not in chosen]
    return np.array(chosen, np.int32), np.array(rest, np.int32)


def normalize_heads(heads, method: str) -> tuple[tuple[int, ...], ...]:
    """``heads`` (one list of KV head indices per layer) as sorted tuples, or a UserError."""
    try:
        rows = [list(row) for row in heads]
    except TypeError:
        rows = None
    if rows is None or any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) for row in rows for h in row):
        raise UserError(f"{method}: heads must be one list of integer KV head indices per layer, got {heads!r}")
    return tuple(tuple(sorted({int(h) for h in row})) for row in rows)


def check_heads(heads, config, method: str) -> None:
    if len(heads) != config.num_layers or any(h < 0 or h >= config.num_kv_heads for row in heads for h in row) \
            or any(len(set(row)) != len(row) for row in heads):
        raise UserError(f"{method}: heads must list distinct KV heads in [0, {config.num_kv_heads}) for each of "
                        f"{config.num_layers} layers, got {heads!r}")


def retrieval_scores(params, config, *, calibration: str | None, n_tokens: int, seed: int):
    """Echo and induction scores ``[L, K]``: from a ``jaxkv calibrate razor`` file (refused if
    made on another model), else the data-free calibration run once per process."""
    from jaxkv.calibration import load_calibration, model_fingerprint

    if calibration is not None:
        tensors, _ = load_calibration(calibration, method=CALIBRATION_METHOD,
                                      fingerprint=model_fingerprint(config, params), required=("echo", "induction"))
        return tensors["echo"], tensors["induction"]
    return _cached_scores(params, config, n_tokens, seed)


_SCORES: dict = {}


def _cached_scores(params, config, n_tokens, seed):
    """Data-free scores, computed once per (model, settings) in a process."""
    from jaxkv.calibration import model_fingerprint

    key = (model_fingerprint(config, params), n_tokens, seed)
    if key not in _SCORES:
        _SCORES[key] = head_scores(params, config, n_tokens=n_tokens, seed=seed)
    return _SCORES[key]
