"""``mikv``: MiKV ("No Token Left Behind") — important tokens in full precision, every other
token kept at low precision instead of evicted.

State per layer (every token at its slot = position in the low tier, so nothing is dropped):

* ``hi``     ``KVCache [B, K, Sh, H]``: the important tokens in the cache dtype, with their
             accumulated attention ``score [B, K, Sh]``;
* ``lo_k``, ``lo_v``  ``Quantized`` per-token asymmetric ``bits``-bit codes of *every* token,
             packed into bytes (``jaxkv.cache.quant``), ``lo_pos [B, S]`` their positions;
* ``balance [B, K, H]``: the channel balancer ``b = sqrt(max|q| / max|k|)`` per head and
             channel from the prompt; keys are stored as ``k * b`` and queries used as ``q / b``,
             so ``q . k`` is unchanged while outlier key channels flatten before quantization.

1. Prefill: importance = attention of the last ``obs_window`` prompt queries summed over them
   and the query heads of each KV head; the ``recent`` newest tokens always count as important;
   the top ``Sh`` tokens per head go to ``hi``; all tokens are quantized into the low tier.
2. Append (decode, extend): each new token is quantized into the low tier and enters ``hi`` in
   place of its least important non-recent token (an empty slot first); attention runs over
   ``hi`` plus the low tier's dequantized tokens not in ``hi``; the attention each ``hi`` token
   gets is added to its score (importance updated during decode, H2O-style).

Deviations: importance at prefill comes from an observation window of queries (SnapKV-style)
rather than all prompt queries, to keep prefill memory linear in the window; the low tier holds
every token (important ones too, their copy masked at attention) so that demoting a token costs
nothing, which adds ``bits``/16 of a token's bytes per important token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxkv.attention import _MASKED, visibility_mask
from jaxkv.cache.kv import KVCache
from jaxkv.cache.policy import CachePolicy, register_policy
from jaxkv.cache.quant import Quantized, dequantize, packed_length, quantize
from jaxkv.errors import UserError
from jaxkv.typing import Array

__all__ = ["MiKVCache", "MiKVState"]


@struct.dataclass
class MiKVState:
    hi: KVCache
    score: Array       # [B, K, Sh] float32
    lo_k: Quantized    # codes [B, K, S, packed(H)], scale/zero [B, K, S, 1]
    lo_v: Quantized
    lo_pos: Array      # [B, S] int32
    balance: Array     # [B, K, H] float32


def _quantize_tokens(x, bits):  # x [B, K, T, H]: one scale and zero per token and head
    return quantize(x, bits, axis=-1)


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class MiKVCache(CachePolicy):
    name = "mikv"
    important: float = 0.5  # share of the context kept in full precision (Sh = important * max_len)
    recent: int = 16
    bits: int = 3
    balancer: bool = True
    obs_window: int = 32
    budget: float | None = None  # set by from_budget: prepare sizes `important` to the bytes
    context_len: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.kv_bits is not None:
            raise UserError("mikv stores its own tiers (bits=...); it takes no kv_bits")
        if isinstance(self.important, bool) or not isinstance(self.important, (int, float)) or not 0 <= self.important <= 1:
            raise UserError(f"mikv: important must be a number in [0, 1], got {self.important!r}")
        for f, low in (("recent", 1), ("obs_window", 1)):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"mikv: {f} must be an integer >= {low}, got {value!r}")
        if self.bits not in (2, 3, 4, 8):
            raise UserError(f"mikv: bits must be 2, 3, 4 or 8, got {self.bits!r}")
        if not isinstance(self.balancer, bool):
            raise UserError(f"mikv: balancer must be true or false, got {self.balancer!r}")

    @property
    def quantized(self) -> bool:  # its low tier rounds to codes (see the conformance test)
        return True

    def hi_slots(self, max_len: int) -> int:
        return min(max_len, max(self.recent, round(self.important * max_len)))

    def capacity(self, max_len):
        return max_len

    # ------------------------------------------------------------------ sizing
    def _token_bytes(self, head_dim: int, item: int) -> tuple[float, float]:
        """(bytes of one token-head in the full cache, in the low tier)."""
        full = 2 * head_dim * item + 4
        low = 2 * (packed_length(head_dim, self.bits) + 2 * 2)
        return full, low

    @classmethod
    def from_budget(cls, budget: float, context_len: int) -> "MiKVCache":
        return cls(budget=budget, context_len=context_len)

    def prepare(self, params, config) -> "MiKVCache":
        if self.budget is None or self.context_len is None:
            return self
        if self.budget >= 1:  # everything in full precision (the low tier comes on top)
            return dataclasses.replace(self, important=1.0)
        item = jnp.dtype(params["embed"]["embedding"].dtype).itemsize
        full, low = self._token_bytes(config.head_dim, item)
        # budget * full = low + important * (full + 4 [score])  (the low tier holds every token)
        share = (self.budget * full - low) / (full + 4)
        return dataclasses.replace(self, important=float(min(1.0, max(0.0, share))))

    def expected_nbytes(self, *, batch, max_len, dtype, layer):
        k, h, item = layer.num_kv_heads, layer.head_dim, jnp.dtype(dtype).itemsize
        sh = self.hi_slots(max_len)
        hi = batch * k * sh * (2 * h * item + 4 + 4)
        lo = 2 * batch * k * max_len * (packed_length(h, self.bits) + 2 * 2) + batch * max_len * 4
        return hi + lo + batch * k * h * 4

    # ------------------------------------------------------------------ state
    def init(self, *, batch, max_len, dtype, layer):
        k, h = layer.num_kv_heads, layer.head_dim
        sh = self.hi_slots(max_len)
        empty = lambda: _quantize_tokens(jnp.zeros((batch, k, max_len, h), dtype), self.bits)  # noqa: E731
        # two separate arrays: one buffer held twice could not be donated to a decode loop
        return MiKVState(hi=KVCache.empty(batch=batch, num_kv_heads=k, slots=sh, head_dim=h, dtype=dtype),
                         score=jnp.zeros((batch, k, sh), jnp.float32), lo_k=empty(), lo_v=empty(),
                         lo_pos=jnp.full((batch, max_len), -1, jnp.int32),
                         balance=jnp.ones((batch, k, h), jnp.float32))

    def _write_lo(self, state, k, v, positions):
        """Quantize tokens ``k, v [B, T, K, H]`` (``k`` already balanced) into slot = position."""
        s = state.lo_pos.shape[1]
        slots = jnp.where((positions >= 0) & (positions < s), positions, s)  # [B, T]
        qk = _quantize_tokens(k.transpose(0, 2, 1, 3), self.bits)
        qv = _quantize_tokens(v.transpose(0, 2, 1, 3), self.bits)
        b = jnp.arange(k.shape[0])[:, None]

        def put(old: Quantized, new: Quantized) -> Quantized:
            def scatter(dst, src):  # dst [B, K, S, X], src [B, K, T, X]
                return dst.at[b, :, slots].set(src.transpose(0, 2, 1, 3), mode="drop")
            return old.replace(codes=scatter(old.codes, new.codes), scale=scatter(old.scale, new.scale),
                               zero=scatter(old.zero, new.zero))

        lo_pos = state.lo_pos.at[b, slots].set(positions, mode="drop")
        return state.replace(lo_k=put(state.lo_k, qk), lo_v=put(state.lo_v, qv), lo_pos=lo_pos)

    def prefill(self, state, *, q, k, v, positions, layer, params=None):
        if k.shape[1] > state.lo_pos.shape[1]:
            raise UserError(f"mikv: a prompt of {k.shape[1]} tokens does not fit a cache of "
                            f"{state.lo_pos.shape[1]} slots")
        qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
        real = (positions >= 0)[:, :, None, None]
        if self.balancer:
            qmax = jnp.max(jnp.where(real[..., None], jnp.abs(qf), 0), axis=(1, 3))  # [B, K, H]
            kmax = jnp.max(jnp.where(real, jnp.abs(kf), 0), axis=1)
            balance = jnp.where((qmax > 0) & (kmax > 0), jnp.sqrt(qmax / jnp.maximum(kmax, 1e-30)), 1.0)
        else:
            balance = state.balance
        kb = (kf * balance[:, None]).astype(k.dtype)
        state = self._write_lo(state.replace(balance=balance), kb, v, positions)
        # importance: attention of the last obs_window real queries of each row
        last = jnp.max(positions, axis=1, keepdims=True)
        obs = (positions > last - self.obs_window) & (positions >= 0)  # [B, T]
        s = jnp.einsum("BTKGH,BSKH->BKGTS", qf, kf) * q.shape[-1] ** -0.5
        mask = visibility_mask(positions, positions)[:, :, None] & obs[:, None, None, :, None]
        p = jax.nn.softmax(jnp.where(mask, s, _MASKED), axis=-1) * obs[:, None, None, :, None]
        importance = jnp.sum(p, axis=(2, 3))  # [B, K, S=T]
        recent = positions > last - self.recent
        key = jnp.where(positions[:, None, :] < 0, -jnp.inf,
                        jnp.where(recent[:, None, :], jnp.inf, importance))
        sh = state.hi.num_slots
        top = jax.lax.top_k(key, min(sh, key.shape[-1]))[1]  # [B, K, Sh'] token indices
        chosen_ok = jnp.take_along_axis(key, top, axis=-1) > -jnp.inf
        gather = lambda x: jnp.take_along_axis(x.transpose(0, 2, 1, 3), top[..., None], axis=2)  # noqa: E731
        hk, hv = gather(kb), gather(v)  # [B, K, Sh', H]
        hpos = jnp.where(chosen_ok, jnp.take_along_axis(jnp.broadcast_to(positions[:, None], key.shape), top, -1), -1)
        n = top.shape[-1]
        hi = state.hi.replace(k=state.hi.k.at[:, :, :n].set(hk.astype(state.hi.k.dtype)),
                              v=state.hi.v.at[:, :, :n].set(hv.astype(state.hi.v.dtype)),
                              positions=state.hi.positions.at[:, :, :n].set(hpos))
        score = state.score.at[:, :, :n].set(jnp.where(chosen_ok, jnp.take_along_axis(importance, top, -1), 0.0))
        return state.replace(hi=hi, score=score)

    def append(self, state, *, q, k, v, positions, phase, layer, params=None):
        kb = (k.astype(jnp.float32) * state.balance[:, None]).astype(k.dtype)
        state = self._write_lo(state, kb, v, positions)
        for t in range(k.shape[1]):  # each new token takes the least important non-recent hi slot
            state = self._admit(state, kb[:, t], v[:, t], positions[:, t])
        out, p_hi = self._attend(state, q, positions, layer)
        return out, state.replace(score=state.score + p_hi)

    def _admit(self, state, k, v, pos):
        """Put token ``k, v [B, K, H]`` at ``pos [B]`` into the hi tier of every head."""
        hi = state.hi
        protected = hi.positions > (pos[:, None, None] - self.recent)
        key = jnp.where(hi.positions < 0, -jnp.inf, jnp.where(protected, jnp.inf, state.score))
        victim = jnp.argmin(key, axis=-1)  # [B, K]
        ok = (pos >= 0)[:, None]
        onehot = (jnp.arange(hi.num_slots) == victim[..., None]) & ok[..., None]  # [B, K, Sh]
        hi = hi.replace(k=jnp.where(onehot[..., None], k[:, :, None].astype(hi.k.dtype), hi.k),
                        v=jnp.where(onehot[..., None], v[:, :, None].astype(hi.v.dtype), hi.v),
                        positions=jnp.where(onehot, pos[:, None, None], hi.positions))
        return state.replace(hi=hi, score=jnp.where(onehot, 0.0, state.score))

    def _attend(self, state, q, positions, layer):
        """Attention over hi + the low tier's tokens not in hi; also the probabilities on hi."""
        hi = state.hi
        sh = hi.num_slots
        qb = q.astype(jnp.float32) / state.balance[:, None, :, None, :]
        lo_k = dequantize(state.lo_k)  # [B, K, S, H] balanced keys
        lo_v = dequantize(state.lo_v)
        b = jnp.arange(q.shape[0])[:, None, None]
        kh = hi.k.shape[1]
        kk = jnp.arange(kh)[None, :, None]
        s_lo = state.lo_pos.shape[1]
        in_hi = jnp.zeros((q.shape[0], kh, s_lo + 1), bool)
        in_hi = in_hi.at[b, kk, jnp.where(hi.positions >= 0, jnp.minimum(hi.positions, s_lo), s_lo)].set(True)[..., :s_lo]
        lo_pos = jnp.where(in_hi, -1, state.lo_pos[:, None, :])  # [B, K, S]
        keys = jnp.concatenate([hi.k.astype(jnp.float32), lo_k], axis=2)
        values = jnp.concatenate([hi.v.astype(jnp.float32), lo_v], axis=2)
        kpos = jnp.concatenate([hi.positions, lo_pos], axis=2)
        s = jnp.einsum("BTKGH,BKSH->BKGTS", qb, keys) * q.shape[-1] ** -0.5
        mask = visibility_mask(positions, kpos, window=layer.sliding_window)[:, :, None]
        p = jax.nn.softmax(jnp.where(mask, s, _MASKED), axis=-1)
        out = jnp.einsum("BKGTS,BKSH->BTKGH", p, values).astype(hi.v.dtype)
        real = (positions >= 0)[:, None, None, :, None]
        return out, jnp.sum(p[..., :sh] * real, axis=(2, 3))
