"""``mikv``: MiKV ("No Token Left Behind") — important tokens in full precision, every other
token kept at low precision instead of evicted.

State per layer (every token at its slot = position in the low tier, so nothing is dropped):

* ``hi``     ``KVCache [B, K, Sh, H]``: the important tokens in the cache dtype, with their
             accumulated attention ``score [B, K, Sh]``;
* ``lo``     ``QuantizedKV [B, K, S]`` (``jaxkv.cache.storage``): per-token asymmetric
             ``bits``-bit codes of *every* token, packed into bytes;
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

``decode_kernel="pallas_gpu"`` (or ``"pallas_tpu"``, ``"reference"``) runs a decode step's low tier through
``jaxkv.kernels.quantized_decode`` over the packed codes and merges it with the hi tier (jnp)
by their log-sum-exps; prefill, extend chunks and sliding-window layers keep the jnp path.

``bits=0`` keeps no low tier: the tokens outside ``hi`` are evicted (H2O with an observation
window), the baseline the paper's "drop vs keep at low precision" check compares against.

Deviations: importance at prefill comes from an observation window of queries (SnapKV-style)
rather than all prompt queries, to keep prefill memory linear in the window; the low tier holds
every token (important ones too, their copy masked at attention) so that demoting a token costs
nothing, which adds ``bits``/16 of a token's bytes per important token. ``Sh`` is a share of the
cache's slots (``max_len``: in ``generate``, the batch's longest prompt plus the new tokens), so
a short prompt batched with a long one keeps more of its tokens in full precision than alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxkv.attention import attention_weights, merge_attention, visibility_mask
from jaxkv.cache.kv import KVCache
from jaxkv.cache.policy import (CachePolicy, Phase, check_decode_kernel, kernel_block, kernel_options,
                                register_policy)
from jaxkv.cache.storage import DenseStorage, QuantizedKV, QuantizedStorage
from jaxkv.errors import UserError
from jaxkv.typing import Array

__all__ = ["MiKVCache", "MiKVState"]


@struct.dataclass
class MiKVState:
    hi: KVCache
    score: Array       # [B, K, Sh] float32
    lo: QuantizedKV    # every token, slot = position
    balance: Array     # [B, K, H] float32


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
    decode_kernel: str | None = None  # pallas_gpu | pallas_tpu | reference: the low tier's decode via quantized_decode
    kernel_interpret: bool = False    # run that kernel in Pallas interpret mode (a CPU check; slow)

    def __post_init__(self):
        super().__post_init__()
        if self.kv_bits is not None:
            raise UserError("mikv stores its own tiers (bits=...); it takes no kv_bits")
        if isinstance(self.important, bool) or not isinstance(self.important, (int, float)) or not 0 <= self.important <= 1:
            raise UserError(f"mikv: important must be a number in [0, 1], got {self.important!r}")
        if self.budget is not None and self.important != type(self).important:
            raise UserError(f"mikv: important ({self.important}) and budget ({self.budget}) both size the "
                            "full-precision tier; give one of them")
        for f, low in (("recent", 1), ("obs_window", 1)):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"mikv: {f} must be an integer >= {low}, got {value!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in (0, 2, 3, 4, 8):
            raise UserError(f"mikv: bits must be 2, 3, 4 or 8 (or 0: evict the rest), got {self.bits!r}")
        if not isinstance(self.balancer, bool):
            raise UserError(f"mikv: balancer must be true or false, got {self.balancer!r}")
        check_decode_kernel(self.name, self.decode_kernel, self.kernel_interpret)

    @property
    def quantized(self) -> bool:  # its low tier rounds to codes (see the conformance test)
        return self.bits > 0

    def hi_slots(self, max_len: int) -> int:
        return min(max_len, max(self.recent, round(self.important * max_len)))

    def capacity(self, max_len):
        return max_len

    # ------------------------------------------------------------------ sizing
    @classmethod
    def from_budget(cls, budget: float, context_len: int, **named) -> "MiKVCache":
        if "important" in named:  # named: kept, so prepare has nothing to size
            return cls(**named)
        return cls(budget=budget, context_len=context_len, **named)

    def prepare(self, params, config) -> "MiKVCache":
        if self.budget is None or self.context_len is None:
            return self
        sized = dict(budget=None, context_len=None)  # sized: nothing left for another prepare to do
        if self.budget >= 1:  # everything in full precision (the low tier comes on top)
            return dataclasses.replace(self, important=1.0, **sized)
        dtype = params["embed"]["embedding"].dtype
        full = DenseStorage().slot_bytes(config.head_dim, dtype)  # one token-head, full cache
        low = 0 if self.bits == 0 else self._low().slot_bytes(config.head_dim, dtype)
        # budget * full = low + important * (full + 4 [score])  (the low tier holds every token)
        share = (self.budget * full - low) / (full + 4)
        return dataclasses.replace(self, important=float(min(1.0, max(0.0, share))), **sized)

    def _low(self) -> QuantizedStorage:
        return QuantizedStorage(bits=self.bits)

    def expected_nbytes(self, *, batch, max_len, dtype, layer):
        k, h = layer.num_kv_heads, layer.head_dim
        hi = batch * k * self.hi_slots(max_len) * (DenseStorage().slot_bytes(h, dtype) + 4)  # + score
        lo = 0 if self.bits == 0 else batch * k * max_len * self._low().slot_bytes(h, dtype)
        return hi + lo + batch * k * h * 4

    # ------------------------------------------------------------------ state
    def init(self, *, batch, max_len, dtype, layer):
        k, h = layer.num_kv_heads, layer.head_dim
        sh = self.hi_slots(max_len)
        return MiKVState(hi=KVCache.empty(batch=batch, num_kv_heads=k, slots=sh, head_dim=h, dtype=dtype),
                         score=jnp.zeros((batch, k, sh), jnp.float32),
                         lo=None if self.bits == 0 else
                         self._low().new_kv(batch=batch, num_kv_heads=k, slots=max_len, head_dim=h, dtype=dtype),
                         balance=jnp.ones((batch, k, h), jnp.float32))

    def _write_lo(self, state, k, v, positions):
        """Quantize tokens ``k, v [B, T, K, H]`` (``k`` already balanced) into slot = position."""
        if state.lo is None:  # bits=0: the tokens not in hi are gone
            return state
        return state.replace(lo=state.lo.write(k, v, positions, state.lo.slot_or_drop(positions)))

    def prefill(self, state, *, q, k, v, positions, layer, params=None):
        if state.lo is not None and k.shape[1] > state.lo.num_slots:
            raise UserError(f"mikv: a prompt of {k.shape[1]} tokens does not fit a cache of "
                            f"{state.lo.num_slots} slots")
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
        # importance: attention of the obs_window latest real queries of each row, gathered
        # first so that memory stays linear in the prompt ([W, T] scores, not [T, T])
        last = jnp.max(positions, axis=1, keepdims=True)
        latest = jax.lax.top_k(positions, min(self.obs_window, positions.shape[1]))[1]  # [B, W]
        obs_pos = jnp.take_along_axis(positions, latest, axis=1)
        q_obs = jnp.take_along_axis(qf, latest[:, :, None, None, None], axis=1)  # [B, W, K, G, H]
        p = attention_weights(q_obs, kf.transpose(0, 2, 1, 3), obs_pos, positions)  # [B, K, G, W, T]
        importance = jnp.sum(p * (obs_pos >= 0)[:, None, None, :, None], axis=(2, 3))  # [B, K, S=T]
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

        def admit(st, token):  # each new token takes the least important non-recent hi slot
            return self._admit(st, *token), None

        state, _ = jax.lax.scan(admit, state, (kb.swapaxes(0, 1), v.swapaxes(0, 1), positions.swapaxes(0, 1)))
        if self.decode_kernel is not None and phase is Phase.DECODE and layer.sliding_window is None \
                and state.lo is not None:
            out, p_hi = self._kernel_attend(state, q, positions)
        else:
            out, p_hi = self._attend(state, q, positions, layer)
        return out, state.replace(score=state.score + p_hi)

    def attended_keys(self, state):  # every token (hi, and the low copies of the rest)
        kv = state.hi if state.lo is None else state.lo
        return jnp.sum(kv.positions >= 0, axis=(1, 2)).astype(jnp.float32)

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

    @staticmethod
    def _in_hi(state) -> Array:
        """``[B, K, S]``: the low-tier slots (slot = position) whose token is also in ``hi``, so
        that its low copy is masked at attention."""
        hi, s_lo = state.hi, state.lo.num_slots
        b = jnp.arange(hi.positions.shape[0])[:, None, None]
        kk = jnp.arange(hi.positions.shape[1])[None, :, None]
        in_hi = jnp.zeros(hi.positions.shape[:2] + (s_lo + 1,), bool)
        in_hi = in_hi.at[b, kk, jnp.where(hi.positions >= 0, jnp.minimum(hi.positions, s_lo), s_lo)].set(True)
        return in_hi[..., :s_lo]

    def _kernel_attend(self, state, q, positions):
        """``_attend`` for one decode token per row (``q [B, 1, K, G, H]``): the hi tier in jnp,
        the low tier through ``jaxkv.kernels.quantized_decode`` over its packed codes, merged by
        their log-sum-exps; the probabilities on hi are against the merged normaliser."""
        from jaxkv.kernels.quantized_decode import quantized_decode

        hi, lo = state.hi, state.lo
        qb = q[:, 0].astype(jnp.float32) / state.balance[:, :, None, :]  # [B, K, G, H]
        pos = positions[:, 0]  # [B]
        # the hi tier: its own scores, softmax and log-sum-exp
        s_hi = jnp.einsum("BKGH,BKSH->BKGS", qb, hi.k.astype(jnp.float32)) * qb.shape[-1] ** -0.5
        seen_hi = visibility_mask(positions, hi.positions)[:, :, 0]  # [B, K, Sh]: the attention contract's rule
        s_hi = jnp.where(seen_hi[:, :, None], s_hi, -jnp.inf)
        lse_hi = jax.nn.logsumexp(s_hi, axis=-1)  # [B, K, G]
        p_loc = jnp.where(seen_hi[:, :, None], jnp.exp(s_hi - jnp.where(jnp.isfinite(lse_hi), lse_hi, 0.0)[..., None]),
                          0.0)
        out_hi = jnp.einsum("BKGS,BKSH->BKGH", p_loc, hi.v.astype(jnp.float32))
        # the low tier: every token up to this one whose full-precision copy is not in hi
        s_lo = lo.num_slots
        upto = jnp.arange(s_lo)[None, None, :] <= pos[:, None, None]
        kv_pos = jnp.where(self._in_hi(state) | ~upto, -1, lo.positions)
        options = kernel_options(self.decode_kernel, self.kernel_interpret)
        if self.decode_kernel in ("pallas_gpu", "pallas_tpu"):
            options["block_size"] = kernel_block(self.name, self.decode_kernel, s_lo)
        qk, qv = lo.qk, lo.qv
        out_lo, lse_lo = quantized_decode(qb, qk.codes, qk.scale[..., 0], qk.zero[..., 0], qv.codes, qv.scale[..., 0],
                                          qv.zero[..., 0], kv_pos, bits=qk.bits, implementation=self.decode_kernel,
                                          **options)
        # the merge (attention.merge_attention), and hi's probabilities against the merged normaliser
        out = merge_attention([(out_hi[:, None], lse_hi[..., None]), (out_lo[:, None].astype(jnp.float32),
                                                                        lse_lo[..., None])])
        lse = jnp.logaddexp(lse_hi, lse_lo)
        w_hi = jnp.where(jnp.isfinite(lse_hi), jnp.exp(lse_hi - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
        p_hi = jnp.sum(p_loc * w_hi[..., None], axis=2)  # [B, K, Sh]
        return out.astype(hi.v.dtype), p_hi

    def _attend(self, state, q, positions, layer):
        """Attention over hi + the low tier's tokens not in hi; also the probabilities on hi."""
        hi = state.hi
        sh = hi.num_slots
        lo = state.lo
        qb = q.astype(jnp.float32) / state.balance[:, None, :, None, :]
        keys, values, kpos = hi.k.astype(jnp.float32), hi.v.astype(jnp.float32), hi.positions
        if lo is not None:
            in_hi = self._in_hi(state)
            keys = jnp.concatenate([keys, lo.k.astype(jnp.float32)], axis=2)  # balanced keys
            values = jnp.concatenate([values, lo.v.astype(jnp.float32)], axis=2)
            kpos = jnp.concatenate([kpos, jnp.where(in_hi, -1, lo.positions)], axis=2)
        p = attention_weights(qb, keys, positions, kpos, window=layer.sliding_window)
        out = jnp.einsum("BKGTS,BKSH->BTKGH", p, values).astype(hi.v.dtype)
        real = (positions >= 0)[:, None, None, :, None]
        return out, jnp.sum(p[..., :sh] * real, axis=(2, 3))
