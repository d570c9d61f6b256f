"""``minicache``: MiniCache — adjacent layers from the middle of the model up share one set of
key/value directions.

From layer ``S = round(start * L)`` upward, layers pair as ``(S, S+1), (S+2, S+3), ...`` (an odd
layer left at the top and the layers below ``S`` keep a full cache). Per token and KV head a
vector is split as ``x = |x| * x_hat``; a pair stores

* ``dirs``   one slot array (``KVCache``, or ``QuantizedKV`` in ``minicache+mikv``) of merged
             directions ``e = SLERP(x_hat_lo, x_hat_hi; t)`` for keys and values, slot = position;
* ``norms [2 layers, 2 (k, v), B, K, S]``  both layers' norms (cache dtype), so layer ``i`` is
             restored as ``|x_i| * e``;
* a **retention buffer** of ``R = round(retain * max_len)`` slots: the tokens whose angular
  distance ``d = angle(x_hat_lo, x_hat_hi) / pi`` (the larger of the key's and the value's) is
  largest, kept unmerged for both layers and scattered back over the merged vector at attention.
  A token is a candidate when ``d >= d_min + (d_max - d_min) * gamma`` over the tokens merged so
  far (per row and head); the buffer keeps the ``R`` largest candidates, new tokens displacing
  smaller ones during decode.

``merge="average"`` is the paper's baseline: the plain mean of the two layers' vectors, used for
both, no norms stored.

Merging happens in the upper layer of each pair, in prefill and in every append: the lower layer
leaves its chunk in the shared state (``pending``), the upper one merges both. Each layer's
attention sees its own new tokens exactly and its older tokens restored from the merge; the
prompt's own attention is dense, as in the paper (compression happens after prefill).

The pair's state serves two layers: the upper layer's ``state_index`` is the lower one's
(``CachePolicy.state_index``), and its own entry in ``ModelCache.layers`` is None.

Deviations: the paper gives no rule for decode tokens; here they are merged as they arrive and
compete for the retention buffer, whose fixed size ``R`` (the paper's retained set grows with
``gamma``) keeps shapes static. ``d`` is per KV head and the larger of the key's and value's
angle (the paper states one distance per token). Pairs start at ``S`` itself (the paper's
``(l-1, l)`` from ``l = S+1``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxkv.cache.full import FullCache
from jaxkv.cache.kv import KVCache
from jaxkv.cache.policy import CachePolicy, LayerSpec, check_shares, register_policy
from jaxkv.errors import UserError
from jaxkv.typing import Array

__all__ = ["MiniCache", "MiniCacheLayer", "MergedPair", "MERGES", "slerp", "merge_pair_reference"]

MERGES = ("slerp", "average")
_EPS = 1e-12


@struct.dataclass
class MergedPair:
    """Two adjacent layers' K/V as one set of directions (see the module docstring)."""

    dirs: Any          # KVCache | QuantizedKV: merged directions (or means), positions
    norms: Array       # [2, 2, B, K, S] cache dtype; shape [0] for merge="average"
    kept_k: Array      # [2, B, K, R, H] the retained tokens' original keys, per layer of the pair
    kept_v: Array      # [2, B, K, R, H]
    kept_pos: Array    # [B, K, R] int32, -1 = empty
    kept_d: Array      # [B, K, R] float32 their angular distance (-inf = empty)
    d_range: Array     # [2, B, K] float32: min and max distance over the tokens merged so far
    pending: Any = None  # the lower layer's chunk (k, v) until the upper layer merges it


def _split(x: Array) -> tuple[Array, Array]:
    """``x [..., H]`` as (norm ``[...]``, unit direction ``[..., H]``), float32."""
    x = x.astype(jnp.float32)
    n = jnp.sqrt(jnp.sum(x * x, axis=-1))
    return n, x / jnp.maximum(n, _EPS)[..., None]


def slerp(a: Array, b: Array, t: float) -> tuple[Array, Array]:
    """Spherical interpolation of unit vectors ``a, b [..., H]`` at ``t`` (0 gives ``a``), and
    their angular distance ``angle / pi`` in [0, 1]. Near-parallel (or opposite) pairs, where
    ``sin`` of the angle vanishes, fall back to linear interpolation, renormalised."""
    cos = jnp.clip(jnp.sum(a * b, axis=-1), -1.0, 1.0)
    omega = jnp.arccos(cos)
    so = jnp.sin(omega)
    flat = so < 1e-6
    safe = jnp.where(flat, 1.0, so)
    wa = jnp.where(flat, 1.0 - t, jnp.sin((1.0 - t) * omega) / safe)
    wb = jnp.where(flat, t, jnp.sin(t * omega) / safe)
    e = wa[..., None] * a + wb[..., None] * b
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), _EPS)
    return e, omega / jnp.pi


def merge_pair_reference(x_lo: Array, x_hi: Array, *, t: float = 0.6, merge: str = "slerp"):
    """What one pair stores for vectors ``x_lo, x_hi [..., H]`` and what each layer gets back
    (no retention): ``(restored_lo, restored_hi, distance)``. The reference the tests hold the
    cache's restore path to."""
    n_lo, u_lo = _split(x_lo)
    n_hi, u_hi = _split(x_hi)
    e, d = slerp(u_lo, u_hi, t)
    if merge == "average":
        m = (x_lo.astype(jnp.float32) + x_hi.astype(jnp.float32)) / 2
        return m, m, d
    return n_lo[..., None] * e, n_hi[..., None] * e, d


@dataclasses.dataclass(frozen=True, kw_only=True)
class MiniCacheLayer(CachePolicy):
    """One layer of a merged pair: ``role`` 0 is the lower layer (it owns the pair's state),
    1 the upper one (it merges)."""

    name = "_minicache_layer"
    role: int
    t: float = 0.6
    gamma: float = 0.05
    retain: float = 0.05
    merge: str = "slerp"

    # ------------------------------------------------------------------ shapes and bytes
    def capacity(self, max_len):
        return max_len

    def kept_slots(self, max_len: int) -> int:
        return min(max_len, round(self.retain * max_len))

    def state_index(self, layer: LayerSpec) -> int:
        return layer.index - self.role

    def init(self, *, batch, max_len, dtype, layer):
        if self.role == 1:
            return None
        k, h, r = layer.num_kv_heads, layer.head_dim, self.kept_slots(max_len)
        norms = (2, 2, batch, k, max_len) if self.merge == "slerp" else (0,)
        return MergedPair(
            dirs=self.new_kv(batch=batch, num_kv_heads=k, slots=max_len, head_dim=h, dtype=dtype),
            norms=jnp.zeros(norms, dtype),
            kept_k=jnp.zeros((2, batch, k, r, h), dtype), kept_v=jnp.zeros((2, batch, k, r, h), dtype),
            kept_pos=jnp.full((batch, k, r), -1, jnp.int32), kept_d=jnp.full((batch, k, r), -jnp.inf),
            d_range=jnp.stack([jnp.full((batch, k), jnp.inf), jnp.full((batch, k), -jnp.inf)]))

    def expected_nbytes(self, *, batch, max_len, dtype, layer):
        if self.role == 1:
            return 0
        k, h, r = layer.num_kv_heads, layer.head_dim, self.kept_slots(max_len)
        item = jnp.dtype(dtype).itemsize
        dirs = batch * k * max_len * self.kv_slot_bytes(h, dtype)
        norms = 4 * batch * k * max_len * item if self.merge == "slerp" else 0
        kept = 2 * 2 * batch * k * r * h * item + batch * k * r * (4 + 4)
        return dirs + norms + kept + 2 * batch * k * 4

    # ------------------------------------------------------------------ restore and attend
    def restore(self, state: MergedPair) -> KVCache:
        """This layer's keys and values as attention sees them: ``|x| * e`` (or the mean), the
        retained tokens' originals scattered back over them."""
        k, v = state.dirs.k, state.dirs.v
        if self.merge == "slerp":
            k = state.norms[self.role, 0][..., None].astype(k.dtype) * k
            v = state.norms[self.role, 1][..., None].astype(v.dtype) * v
        s = k.shape[2]
        b = jnp.arange(k.shape[0])[:, None, None]
        h = jnp.arange(k.shape[1])[None, :, None]
        slot = jnp.where(state.kept_pos >= 0, state.kept_pos, s)
        k = k.at[b, h, slot].set(state.kept_k[self.role].astype(k.dtype), mode="drop")
        v = v.at[b, h, slot].set(state.kept_v[self.role].astype(v.dtype), mode="drop")
        return KVCache(k=k, v=v, positions=state.dirs.positions)

    def attended_keys(self, state: MergedPair):
        return jnp.sum(state.dirs.positions >= 0, axis=(1, 2)).astype(jnp.float32)

    def prefill(self, state, *, q, k, v, positions, layer, params=None):
        FullCache._check_fits(state.dirs, k.shape[1])
        if self.role == 0:
            return state.replace(pending=(k, v))
        return self._merge(state, k, v, positions)

    def append(self, state, *, q, k, v, positions, phase, layer, params=None):
        FullCache._check_fits(state.dirs, k.shape[1])
        view = self.restore(state)
        view = view.write(k, v, positions, view.slot_or_drop(positions))  # the chunk itself exactly
        out = self.attend(view, q, positions, layer)
        lost = FullCache._overflow(view, positions).reshape((-1,) + (1,) * (out.ndim - 1))
        out = jnp.where(lost, jnp.nan, out).astype(out.dtype)
        if self.role == 0:
            return out, state.replace(pending=(k, v))
        return out, self._merge(state, k, v, positions)

    # ------------------------------------------------------------------ the merge
    def _merge(self, state: MergedPair, k_hi: Array, v_hi: Array, positions: Array) -> MergedPair:
        """Merge the lower layer's pending chunk with this layer's ``k, v [B, T, K, H]``."""
        if state.pending is None:
            raise UserError("minicache: the upper layer of a pair ran before the lower one")
        k_lo, v_lo = state.pending
        tr = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, K, T, H]
        nk_lo, uk_lo = _split(tr(k_lo))
        nk_hi, uk_hi = _split(tr(k_hi))
        nv_lo, uv_lo = _split(tr(v_lo))
        nv_hi, uv_hi = _split(tr(v_hi))
        ek, dk = slerp(uk_lo, uk_hi, self.t)
        ev, dv = slerp(uv_lo, uv_hi, self.t)
        dist = jnp.maximum(dk, dv)  # [B, K, T]
        if self.merge == "average":
            ek = (tr(k_lo).astype(jnp.float32) + tr(k_hi).astype(jnp.float32)) / 2
            ev = (tr(v_lo).astype(jnp.float32) + tr(v_hi).astype(jnp.float32)) / 2
        slots = state.dirs.slot_or_drop(positions)  # [B, T]: slot = position
        dirs = state.dirs.write(tr(ek), tr(ev), positions, slots)
        dirs = dirs.poison(FullCache._overflow(dirs, positions))  # a row that lost a token says so
        norms = state.norms
        if self.merge == "slerp":
            b = jnp.arange(slots.shape[0])[:, None, None]
            h = jnp.arange(k_hi.shape[2])[None, :, None]
            new = jnp.stack([jnp.stack([nk_lo, nv_lo]), jnp.stack([nk_hi, nv_hi])]).astype(norms.dtype)
            norms = norms.at[:, :, b, h, slots[:, None, :]].set(new, mode="drop")
        state = state.replace(dirs=dirs, norms=norms, pending=None)
        return self._retain(state, dist, positions, (tr(k_lo), tr(k_hi)), (tr(v_lo), tr(v_hi)))

    def _retain(self, state, dist, positions, ks, vs):
        """Update the distance range and the retention buffer with the chunk's tokens."""
        real = jnp.broadcast_to((positions >= 0)[:, None, :], dist.shape)
        lo = jnp.minimum(state.d_range[0], jnp.min(jnp.where(real, dist, jnp.inf), axis=-1))
        hi = jnp.maximum(state.d_range[1], jnp.max(jnp.where(real, dist, -jnp.inf), axis=-1))
        state = state.replace(d_range=jnp.stack([lo, hi]))
        r = state.kept_pos.shape[-1]
        if r == 0:
            return state
        threshold = lo + (hi - lo) * self.gamma  # [B, K]
        cand = jnp.where(real & (dist >= threshold[..., None]), dist, -jnp.inf)
        score = jnp.concatenate([state.kept_d, cand], axis=-1)  # [B, K, R + T]
        best, idx = jax.lax.top_k(score, r)
        pos = jnp.broadcast_to(positions[:, None, :], dist.shape)
        pick = lambda old, new: jnp.take_along_axis(  # noqa: E731
            jnp.concatenate([old, new.astype(old.dtype)], axis=2), idx[..., None], axis=2)
        kept_k = jnp.stack([pick(state.kept_k[i], ks[i]) for i in range(2)])
        kept_v = jnp.stack([pick(state.kept_v[i], vs[i]) for i in range(2)])
        kept_pos = jnp.take_along_axis(jnp.concatenate([state.kept_pos, pos], axis=-1), idx, axis=-1)
        kept_pos = jnp.where(best > -jnp.inf, kept_pos, -1)
        return state.replace(kept_k=kept_k, kept_v=kept_v, kept_pos=kept_pos, kept_d=best)


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class MiniCache(CachePolicy):
    """The model-level MiniCache policy: full layers below ``start`` of the depth, merged pairs
    above (see the module docstring)."""

    name = "minicache"
    start: float = 0.5     # share of the depth below which layers keep a full cache (paper: L/2)
    t: float = 0.6         # SLERP interpolation towards the upper layer
    gamma: float = 0.05    # retention threshold within the distance range
    retain: float = 0.05   # retention buffer, as a share of the cache's slots
    merge: str = "slerp"   # or "average" (the paper's baseline)

    def __post_init__(self):
        super().__post_init__()
        check_shares("minicache", self, ("start", "t", "gamma", "retain"))
        if self.merge not in MERGES:
            raise UserError(f"minicache: merge must be one of {', '.join(MERGES)}, got {self.merge!r}")

    @classmethod
    def from_budget(cls, budget: float, context_len: int, **named) -> "MiniCache":
        # a merged pair holds about half of its two layers' bytes: merging a share m of the depth
        # keeps 1 - m/2 of them, so budget b merges m = 2 (1 - b); below 0.5 everything merges
        return cls(**{"start": float(min(1.0, max(0.0, 2 * budget - 1))), **named})

    def start_layer(self, num_layers: int) -> int:
        return min(num_layers, round(self.start * num_layers))

    def capacity(self, max_len):
        return max_len

    def for_layer(self, layer: LayerSpec) -> CachePolicy:
        s, n = self.start_layer(layer.num_layers), layer.num_layers
        i = layer.index
        pairs_end = s + 2 * ((n - s) // 2)
        if i < s or i >= pairs_end:
            return FullCache(kv_bits=self.kv_bits)
        return MiniCacheLayer(role=(i - s) % 2, t=self.t, gamma=self.gamma, retain=self.retain,
                              merge=self.merge, kv_bits=self.kv_bits)
