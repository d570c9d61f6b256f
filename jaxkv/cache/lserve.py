"""``lserve``: LServe — static streaming heads plus query-aware page selection for the rest.

1. **Head split** (static): per layer, KV heads are *streaming* (attention sinks + a local window,
   in prefill and decode) or *dense*. The split is the global top ``1 - streaming_share`` of KV
   heads by RazorAttention's data-free induction score (``jaxkv.cache.razor.head_scores``; the
   same calibration file, ``jaxkv calibrate razor``, serves both). Streaming heads store only
   ``sinks + window`` slots: their bytes really shrink.
2. **Paged dense heads**: every token at slot = position, in physical pages of ``page`` (64)
   tokens split into logical pages of ``logical_page`` (16) tokens, each with the per-channel
   min and max of its keys, kept current as tokens are appended (a scatter-min/max of the new
   keys as stored).
3. **Decode** (Quest-style): a logical page's score is the upper bound of ``q . k`` over its
   keys, ``sum_c max(q_c kmin_c, q_c kmax_c)``, maxed over the query heads of the KV head; a
   physical page scores the max of its logical pages. The top ``token_budget / page`` physical
   pages are attended, plus always the page of the newest token; the selection is reused for
   ``reuse`` decode steps, each also reading every page written since it was made
   (``jaxkv.kernels.page_select``: with ``decode_kernel="pallas_gpu"`` its GPU kernels score and
   choose the pages without a sort; with ``"pallas_tpu"`` its TPU kernel scores them). With fewer pages than the budget every page is attended (dense).
   An extend chunk (``T > 1``) attends every page and makes the next decode step select anew.
   ``decode_kernel="pallas_gpu"`` (or ``"pallas_tpu"``, ``"reference"``) runs that attention through
   ``jaxkv.kernels.sparse_decode`` over the chosen pages in place (no gather into a copy);
   the jnp path gathers them first.

Deviations: the head split comes from Razor-style induction scores, a training-free proxy for
DuoAttention's optimised gates (the paper's source); the prompt's own attention is dense for
dense heads and sinks + ``prefill_window`` for streaming heads (``attention.attend_sinks_window``:
the block-sparse kernel on a GPU in 16 bits, reading only the sink and local blocks, else a
blocked jnp pass); pages are slices of one slot array (slot =
position) rather than a page table, since the cache's shapes are fixed per request.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxkv.attention import attend_dense, attend_reference, attend_sinks_window
from jaxkv.cache.full import FullCache
from jaxkv.cache.kv import KVCache
from jaxkv.cache.policy import (CachePolicy, LayerSpec, Phase, check_decode_kernel, check_ints, check_shares,
                                kernel_options, register_policy)
from jaxkv.cache.razor import check_heads, normalize_heads, retrieval_scores, select_heads, split_heads
from jaxkv.cache.streaming import StreamingCache
from jaxkv.errors import UserError
from jaxkv.kernels.page_select import page_scores, page_select  # page_scores: Quest's bound, re-exported
from jaxkv.typing import Array

__all__ = ["LServeCache", "LServeLayer", "LServeState", "page_bounds", "page_scores"]


@struct.dataclass
class LServeState:
    """One layer. ``dense`` ``[B, Kd, S, H]`` (S a multiple of ``page``) with ``kmin, kmax
    [B, Kd, S / logical_page, H]``; ``selected [B, Kd, n]`` the physical pages the last
    selection chose (-1: none), ``since`` the decode steps since it ran and ``anchor [B]`` the
    newest token's page then (-1: none; the pages from it on are read until the next selection,
    so a reused selection never misses the tokens written after it); ``attended [B]`` the
    (token, KV head) pairs the last step attended, over all heads; ``local`` the streaming
    heads' sinks + window. ``dense``/``local`` are None when the layer has no such heads."""

    dense: KVCache | None
    kmin: Array
    kmax: Array
    selected: Array
    since: Array
    attended: Array
    anchor: Array
    local: KVCache | None


def page_bounds(k: Array, positions: Array, logical_page: int) -> tuple[Array, Array]:
    """Per-channel min and max of the keys of each logical page: ``k [B, K, S, H]`` with
    ``positions [B, K, S]`` (empty slots ignored) -> ``[B, K, S / logical_page, H]`` each (an
    empty page has min +inf, max -inf)."""
    b, kh, s, h = k.shape
    pages = k.astype(jnp.float32).reshape(b, kh, s // logical_page, logical_page, h)
    real = (positions >= 0).reshape(b, kh, s // logical_page, logical_page)[..., None]
    return (jnp.min(jnp.where(real, pages, jnp.inf), axis=3), jnp.max(jnp.where(real, pages, -jnp.inf), axis=3))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Paging(CachePolicy):
    """The knobs ``lserve`` and each of its layers share, validated once here."""

    sinks: int = 128           # streaming heads: attention sinks
    window: int = 256          # streaming heads: local window in decode
    prefill_window: int = 8192  # streaming heads: local window in the prompt's own pass
    token_budget: int = 4096   # dense heads: tokens attended per decode step (whole pages)
    page: int = 64             # physical page, tokens
    logical_page: int = 16     # logical page (its key min/max is kept), tokens
    reuse: int = 4             # decode steps a page selection serves
    decode_kernel: str | None = None  # pallas_gpu | pallas_tpu | reference: decode over the pages via sparse_decode
    kernel_interpret: bool = False    # run that kernel in Pallas interpret mode (a CPU check; slow)

    def __post_init__(self):
        super().__post_init__()
        check_decode_kernel("lserve", self.decode_kernel, self.kernel_interpret)
        if self.decode_kernel is not None and self.quantized:
            raise UserError("lserve: decode_kernel reads full-precision pages; with low-bit storage (lserve+mikv) "
                            "leave decode_kernel unset (the jnp path dequantizes the chosen pages)")
        check_ints("lserve", self, {"sinks": 0, "window": 1, "prefill_window": 1, "token_budget": 1, "page": 1,
                                    "logical_page": 1, "reuse": 1})
        if self.page % self.logical_page:
            raise UserError(f"lserve: page ({self.page}) must be a multiple of logical_page ({self.logical_page})")
        if self.token_budget < self.page:
            raise UserError(f"lserve: token_budget ({self.token_budget}) must hold at least one page ({self.page})")

    def paging(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(_Paging)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LServeLayer(_Paging):
    """One layer of ``lserve``: ``dense_heads`` paged with page selection, the others streaming."""

    name = "_lserve_layer"
    dense_heads: tuple[int, ...]

    def _split(self, layer: LayerSpec):
        return split_heads(self.dense_heads, layer.num_kv_heads)

    def _ring(self) -> StreamingCache:
        return StreamingCache(sinks=self.sinks, window=self.window)

    def capacity(self, max_len):
        return math.ceil(max_len / self.page) * self.page

    def selected_pages(self) -> int:
        return max(1, self.token_budget // self.page)

    # ------------------------------------------------------------------ state and bytes
    def init(self, *, batch, max_len, dtype, layer):
        d, rest = self._split(layer)
        h, s = layer.head_dim, self.capacity(max_len)
        nl = s // self.logical_page
        return LServeState(
            dense=self.new_kv(batch=batch, num_kv_heads=len(d), slots=s, head_dim=h, dtype=dtype) if len(d) else None,
            kmin=jnp.full((batch, len(d), nl, h), jnp.inf, dtype), kmax=jnp.full((batch, len(d), nl, h), -jnp.inf, dtype),
            selected=jnp.full((batch, len(d), self.selected_pages()), -1, jnp.int32),
            since=jnp.zeros((), jnp.int32), attended=jnp.zeros((batch,), jnp.float32),
            anchor=jnp.full((batch,), -1, jnp.int32),
            local=(self.new_kv(batch=batch, num_kv_heads=len(rest), slots=self._ring().capacity(max_len), head_dim=h,
                               dtype=dtype) if len(rest) else None))

    def expected_nbytes(self, *, batch, max_len, dtype, layer):
        d, rest = self._split(layer)
        h, s = layer.head_dim, self.capacity(max_len)
        item = jnp.dtype(dtype).itemsize
        dense = batch * len(d) * s * self.kv_slot_bytes(h, dtype)
        bounds = 2 * batch * len(d) * (s // self.logical_page) * h * item
        meta = batch * len(d) * self.selected_pages() * 4 + 4 + 2 * batch * 4
        local = batch * len(rest) * self._ring().capacity(max_len) * self.kv_slot_bytes(h, dtype)
        return dense + bounds + meta + local

    # ------------------------------------------------------------------ prefill
    def prefill_attend(self, q, k, v, positions, *, layer, packing=None, implementation=None):
        if packing is not None:  # the Λ-shaped heads on each packed prompt alone
            return packing.pack(self.prefill_attend(packing.unpack(q), packing.unpack(k), packing.unpack(v),
                                                    packing.positions, layer=layer))
        d, rest = self._split(layer)
        t = q.shape[1]
        w = layer.sliding_window
        if not len(rest) or t <= self.prefill_window or (w is not None and w <= self.prefill_window):
            # nothing outside the local window yet (or the model's own window is narrower): dense
            return attend_dense(q, k, v, positions, window=layer.sliding_window)
        out = jnp.zeros(q.shape, v.dtype)
        if len(d):
            out = out.at[:, :, d].set(attend_dense(q[:, :, d], k[:, :, d], v[:, :, d], positions,
                                                   window=layer.sliding_window).astype(v.dtype))
        if w is not None:
            raise UserError(f"lserve: the model's sliding window ({w}) is wider than prefill_window "
                            f"({self.prefill_window}); raise prefill_window to at least the window")
        local = attend_sinks_window(q[:, :, rest], k[:, :, rest], v[:, :, rest], positions,
                                    sinks=self.sinks, window=self.prefill_window)
        return out.at[:, :, rest].set(local.astype(v.dtype))

    def _stored(self, k, v, positions, heads):
        """``k`` as the dense storage holds it (rounded to its codes when quantized)."""
        b, t, _, h = k.shape
        tmp = self.new_kv(batch=b, num_kv_heads=heads, slots=t, head_dim=h, dtype=k.dtype)
        tmp = tmp.write(k, v, positions, jnp.broadcast_to(jnp.arange(t), (b, t)))
        return tmp.k  # [B, Kd, T, H]

    def _write_dense(self, state, k, v, positions):
        dense = state.dense
        FullCache._check_fits(dense, k.shape[1])
        slots = dense.slot_or_drop(positions)
        dense = dense.write(k, v, positions, slots)
        stored = self._stored(k, v, positions, dense.k.shape[1]).astype(jnp.float32)
        page = jnp.where(slots < dense.num_slots, slots // self.logical_page, state.kmin.shape[2])  # [B, T]
        b = jnp.arange(k.shape[0])[:, None, None]
        hh = jnp.arange(stored.shape[1])[None, :, None]
        idx = page[:, None, :]
        kmin = state.kmin.at[b, hh, idx].min(stored.astype(state.kmin.dtype), mode="drop")
        kmax = state.kmax.at[b, hh, idx].max(stored.astype(state.kmax.dtype), mode="drop")
        dense = dense.poison(FullCache._overflow(dense, positions))
        return state.replace(dense=dense, kmin=kmin, kmax=kmax)

    def prefill(self, state, *, q, k, v, positions, layer, params=None):
        d, rest = self._split(layer)
        if len(d):
            state = self._write_dense(state, k[:, :, d], v[:, :, d], positions)
        if len(rest):  # streaming heads: a StreamingCache over their slots
            local = self._ring().prefill(state.local, q=None, k=k[:, :, rest], v=v[:, :, rest], positions=positions,
                                         layer=layer)
            state = state.replace(local=local)
        return state.replace(since=jnp.zeros((), jnp.int32))

    # ------------------------------------------------------------------ append
    def _select(self, state, q):
        """The top physical pages for ``q [B, 1, Kd, G, H]`` within the token budget, ascending
        (``jaxkv.kernels.page_select``: its GPU or TPU kernel where ``decode_kernel`` names one,
        else the jnp reference)."""
        impl = self.decode_kernel if self.decode_kernel in ("pallas_gpu", "pallas_tpu") else "reference"
        options = {"interpret": True} if impl != "reference" and self.kernel_interpret else {}
        return page_select(q[:, 0], state.kmin, state.kmax, group=self.page // self.logical_page,
                           count=self.selected_pages(), implementation=impl, **options)

    def _pages(self, state, positions):
        """``[B, Kd, n + R]`` the pages a decode step reads (-1: none): the selection's, and the
        pages from the newest token's page at the selection (``anchor``) to its page now, at most
        ``R = (reuse - 1) // page + 2`` of them; each page once."""
        b, kd, _ = state.selected.shape
        newest_pos = jnp.max(positions, axis=1)  # [B]
        newest = jnp.where(newest_pos >= 0, newest_pos // self.page, -1)
        recent = newest[:, None] - jnp.arange((self.reuse - 1) // self.page + 2)[None]  # [B, R]
        recent = jnp.where((recent >= state.anchor[:, None]) & (recent >= 0) & (newest[:, None] >= 0), recent, -1)
        recent = jnp.broadcast_to(recent[:, None], (b, kd, recent.shape[1]))
        sel = state.selected
        dup = jnp.any((sel[..., None] == recent[..., None, :]) & (recent[..., None, :] >= 0), axis=-1)
        return jnp.concatenate([jnp.where(dup, -1, sel), recent], -1)

    def _attend_pages(self, state, q, positions, layer):
        """Attention of one decode query over the pages of ``_pages``."""
        dense = state.dense
        b, kd, s, h = dense.k.shape
        pp = s // self.page
        pages = self._pages(state, positions)
        safe = jnp.clip(pages, 0, pp - 1)
        shape = (b, kd, pp, self.page)
        gather = lambda x: jnp.take_along_axis(x.reshape(shape + x.shape[3:]), safe.reshape(  # noqa: E731
            safe.shape + (1,) * (x.ndim - 2)), axis=2).reshape((b, kd, -1) + x.shape[3:])
        kp = jnp.where((pages >= 0)[..., None], jnp.take_along_axis(
            dense.positions.reshape(shape), safe[..., None], axis=2), -1).reshape(b, kd, -1)
        out = attend_reference(q, gather(dense.k), gather(dense.v), positions, kp, window=layer.sliding_window)
        return out, jnp.sum(kp >= 0, axis=(1, 2)).astype(jnp.float32)

    def _kernel_pages(self, state, q, positions):
        """``_attend_pages`` through ``jaxkv.kernels.sparse_decode``: the pages of ``_pages``,
        sorted (memory order), as the kernel's block list; slot = position, so the row's length is
        its newest position + 1 (a row at position -1 sees nothing)."""
        from jaxkv.kernels.sparse_decode import sparse_decode

        dense = state.dense
        s = dense.k.shape[2]
        pp = s // self.page
        newest_pos = jnp.max(positions, axis=1)  # [B]
        pages = self._pages(state, positions)
        real = pages >= 0
        order = jnp.sort(jnp.where(real, pages, pp), axis=-1)
        counts = jnp.sum(real, axis=-1).astype(jnp.int32)
        idx = jnp.where(order < pp, order, 0).astype(jnp.int32)
        lengths = jnp.maximum(newest_pos + 1, 0).astype(jnp.int32)
        options = kernel_options(self.decode_kernel, self.kernel_interpret)
        out, _ = sparse_decode(q[:, 0], dense.k, dense.v, lengths, idx, counts, block_size=self.page,
                               implementation=self.decode_kernel, **options)
        filled = jnp.clip(lengths[:, None, None] - order * self.page, 0, self.page)  # tokens per listed page
        return out[:, None], jnp.sum(jnp.where(order < pp, filled, 0), axis=(1, 2)).astype(jnp.float32)

    def append(self, state, *, q, k, v, positions, phase, layer, params=None):
        d, rest = self._split(layer)
        out = jnp.zeros(q.shape, v.dtype)
        attended = jnp.zeros((q.shape[0],), jnp.float32)
        if len(d):
            state = self._write_dense(state, k[:, :, d], v[:, :, d], positions)
            qd = q[:, :, d]
            if phase is Phase.DECODE:
                fresh = state.since % self.reuse == 0
                selected = jax.lax.cond(fresh, lambda: self._select(state, qd), lambda: state.selected)
                newest_pos = jnp.max(positions, axis=1)
                anchor = jnp.where(fresh, jnp.where(newest_pos >= 0, newest_pos // self.page, -1), state.anchor)
                state = state.replace(selected=selected, since=state.since + 1, anchor=anchor)
                if self.decode_kernel is not None and layer.sliding_window is None:
                    o, n = self._kernel_pages(state, qd, positions)
                else:
                    o, n = self._attend_pages(state, qd, positions, layer)
            else:  # a multi-token chunk attends every page; the next decode step selects anew
                state = state.replace(since=jnp.zeros((), jnp.int32))
                o = self.attend(state.dense, qd, positions, layer)
                n = jnp.sum(state.dense.positions >= 0, axis=(1, 2)).astype(jnp.float32)
            out = out.at[:, :, d].set(o.astype(v.dtype))
            attended = attended + n
        if len(rest):
            o, local = self._ring().append(state.local, q=q[:, :, rest], k=k[:, :, rest], v=v[:, :, rest],
                                           positions=positions, phase=phase, layer=layer)
            state = state.replace(local=local)
            out = out.at[:, :, rest].set(o.astype(v.dtype))
            attended = attended + jnp.sum(local.positions >= 0, axis=(1, 2)).astype(jnp.float32)
        lost = FullCache._overflow(state.dense, positions) if len(d) else jnp.zeros((q.shape[0],), bool)
        out = jnp.where(lost.reshape((-1,) + (1,) * (out.ndim - 1)), jnp.nan, out).astype(out.dtype)
        return out, state.replace(attended=attended)

    def attended_keys(self, state) -> Array:
        return state.attended


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class LServeCache(_Paging):
    """LServe. Dense heads come from ``heads`` (one tuple of dense KV heads per layer), from a
    Razor ``calibration`` file, or from the data-free calibration run in ``prepare``."""

    name = "lserve"
    streaming_share: float = 0.5
    calibration: str | None = None
    heads: tuple | None = None
    n_tokens: int = 512
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_shares("lserve", self, ("streaming_share",))
        check_ints("lserve", self, {"n_tokens": 4, "seed": 0})
        if self.heads is not None:
            object.__setattr__(self, "heads", normalize_heads(self.heads, "lserve"))

    @classmethod
    def from_budget(cls, budget: float, context_len: int, **named) -> "LServeCache":
        """``budget`` is the share of the context a dense head attends per decode step (the token
        budget, whole pages); streaming heads keep their sinks and window whatever the budget."""
        page = named.get("page", cls.page)
        return cls(**{"token_budget": max(page, int(round(budget * context_len / page)) * page), **named})

    def prepare(self, params, config) -> "LServeCache":
        if self.heads is None:
            echo, induction = retrieval_scores(params, config, calibration=self.calibration,
                                               n_tokens=self.n_tokens, seed=self.seed)
            heads = select_heads(echo, induction, induction_share=1 - self.streaming_share, echo_share=0.0)
            self = dataclasses.replace(self, heads=heads)
        check_heads(self.heads, config, "lserve")
        return self

    def capacity(self, max_len):
        return math.ceil(max_len / self.page) * self.page

    def for_layer(self, layer: LayerSpec) -> LServeLayer:
        if self.heads is None:
            raise UserError("lserve needs its head split: call policy.prepare(params, config) (generate and "
                            "jaxkv eval do), pass heads=..., or --cache-arg calibration=FILE")
        check_heads(self.heads, layer.config, "lserve")
        return LServeLayer(dense_heads=self.heads[layer.index], **self.paging())
