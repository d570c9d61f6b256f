"""``cskv``: CSKV — a channel-shrunk KV cache. Old tokens are stored as low-rank latents of the
attention input, recent ones at full rank.

Each layer's K and V projections ``W [K*H, D]`` are approximated by a low-rank product: the
latent ``x @ down [D, r]`` is what the cache stores (pre-RoPE, ``r = density * K * H`` channels
shared by all KV heads), and attention rebuilds ``k = latent @ up [r, K*H]`` (+ the projection's
bias) with RoPE applied at each token's absolute position (``LayerInput.rope``), ``v`` likewise
without RoPE. The bi-branch: the last ``window`` tokens are also kept exactly (post-RoPE, full
rank) in a ring, and attention reads them from there; older tokens come from their latents. The
two key sets are disjoint and merged by log-sum-exp. Bytes are real: per token ``(r_k + r_v)``
values plus a position, plus the window's ``window`` full slots per KV head.

Factors (``decomposition``):
  ``svd``     data-free: the top-``r`` singular vectors of ``W^T`` (``svd_factors``);
  ``asvd``    activation-aware: ``S = diag(mean|x| ** alpha)`` from calibration text (``jaxkv
              calibrate cskv``), the SVD of ``S W^T``, ``down = S^-1 U sqrt(Sigma)``, ``up =
              sqrt(Sigma) V^T`` (the paper's initialisation; needs ``calibration=FILE``);
  ``random``  scaled Gaussian factors (the paper's failing baseline);
a calibration file that holds trained factors (``jaxkv train cskv``) is used as it is.

Deviations: the prompt's own attention is exact (the compressed keys serve later queries only,
as every other policy here); an extend chunk longer than ``window`` reads its own earlier
tokens from their latents.

Quantization (``bits``): the latents as packed low-bit codes, keys per channel in groups of
``group`` tokens (quantized once a group is complete; its tokens are read from the exact window
until then), values per token, scales and zeros in fp16; real bytes, decoded at attention.
A quantized prompt must sit at positions 0, 1, ... per row (padding at the end, as ``generate``
lays it out): its key groups are cut by index, and any other layout comes back as NaN.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxkv.attention import attend_with_lse, merge_attention
from jaxkv.cache.kv import KVCache
from jaxkv.cache.policy import CachePolicy, LayerInput, LayerSpec, check_ints, register_policy
from jaxkv.cache.quant import packed_length, quantize, unpack
from jaxkv.errors import UserError
from jaxkv.typing import Array

__all__ = ["CSKVCache", "CSKVState", "KeyCodes", "ValueCodes", "CSKVFactors", "svd_factors", "init_factors", "rank_for",
           "CALIBRATION_METHOD", "INITS"]

CALIBRATION_METHOD = "cskv"
INITS = ("svd", "asvd", "random")


def rank_for(density: float, config) -> int:
    """Latent channels for a density: ``round(density * K * H)``, at least 1."""
    return max(1, int(round(density * config.num_kv_heads * config.head_dim)))


def svd_factors(w: np.ndarray, rank: int, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(down [D, r], up [r, out])`` with ``x @ down @ up ~= x @ w.T`` for a projection ``w [out,
    D]``: the rank-``r`` SVD of ``diag(scale) @ w.T`` split as ``diag(1/scale) U sqrt(Sigma)`` and
    ``sqrt(Sigma) V^T`` (ASVD); ``scale=None`` is the plain SVD. fp64 for the decomposition."""
    wt = np.asarray(w, np.float64).T  # [D, out]
    s = np.ones(wt.shape[0]) if scale is None else np.asarray(scale, np.float64)
    if s.shape != (wt.shape[0],) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise UserError(f"cskv: the activation scale must be {wt.shape[0]} finite positive values")
    u, sig, vt = np.linalg.svd(s[:, None] * wt, full_matrices=False)
    r = min(rank, sig.shape[0])
    root = np.sqrt(sig[:r])
    down = (u[:, :r] * root) / s[:, None]
    up = root[:, None] * vt[:r]
    return down.astype(np.float32), up.astype(np.float32)


def init_factors(params: dict, config, *, key_rank: int, value_rank: int, decomposition: str = "svd",
                 scales: np.ndarray | None = None, alpha: float = 0.5, seed: int = 0) -> list[dict]:
    """Per layer ``{"k_down", "k_up", "v_down", "v_up"}`` (fp32 numpy) for the model's K and V
    projections. ``asvd`` needs ``scales [L, D]`` (mean |x| of each layer's attention input)."""
    init = decomposition
    if init not in INITS:
        raise UserError(f"cskv: decomposition must be one of {', '.join(INITS)}, got {init!r}")
    if init == "asvd" and scales is None:
        raise UserError("cskv: decomposition='asvd' needs activation statistics: make them with `jaxkv calibrate cskv "
                        "--model ... --out FILE` and pass calibration=FILE")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(config.num_layers):
        attn = params["layers"][i]["attn"]
        layer = {}
        for name, rank in (("k", key_rank), ("v", value_rank)):
            w = np.asarray(attn[name]["kernel"], np.float32)
            if init == "random":
                d = w.shape[1]
                down = rng.normal(size=(d, rank)).astype(np.float32) / np.sqrt(d)
                up = rng.normal(size=(rank, w.shape[0])).astype(np.float32) * float(np.std(w)) * np.sqrt(d / rank)
            else:
                scale = None
                if init == "asvd":
                    scale = np.maximum(np.asarray(scales[i], np.float64), 1e-6) ** alpha
                down, up = svd_factors(w, rank, scale)
            layer[f"{name}_down"], layer[f"{name}_up"] = down, up
        out.append(layer)
    return out


class CSKVFactors:
    """Per-layer factors held by a prepared policy: compared and hashed by a digest of their
    bytes, so a policy holding them stays a hashable, static jit argument."""

    def __init__(self, layers: list[dict], source: str):
        self.layers = [{k: np.asarray(v, np.float32) for k, v in layer.items()} for layer in layers]
        h = hashlib.sha256()  # content only: the same factors from a file or a decomposition are equal
        for layer in self.layers:
            for k in sorted(layer):
                h.update(k.encode())
                h.update(np.ascontiguousarray(layer[k]).tobytes())
        self.digest = h.hexdigest()[:16]
        self.source = source

    def __eq__(self, other):
        return isinstance(other, CSKVFactors) and other.digest == self.digest

    def __hash__(self):
        return hash(self.digest)

    def __repr__(self):
        return f"CSKVFactors({self.source}, {self.digest})"


@struct.dataclass
class KeyCodes:
    """Key latents at ``bits`` bits, per channel in groups of ``group`` slots (KIVI's layout for
    keys): ``codes [B, S, packed r_k]`` (uint8), ``scale, zero [B, S / group, r_k]`` (fp16).
    A group is quantized once all its tokens are in (sealed); until then its latents wait in
    ``tail [B, group, r_k]`` (slot = position % group). The unsealed slots are always inside the
    exact window (``group <= window``), so attention never reads their codes."""

    codes: Array
    scale: Array
    zero: Array
    tail: Array


@struct.dataclass
class ValueCodes:
    """Value latents at ``bits`` bits, per token: ``codes [B, S, packed r_v]``, ``scale, zero
    [B, S, 1]`` (fp16)."""

    codes: Array
    scale: Array
    zero: Array


@struct.dataclass
class CSKVState:
    """One layer: ``k_latent [B, S, r_k]``, ``v_latent [B, S, r_v]`` (slot = position; with
    ``bits``, ``KeyCodes`` and ``ValueCodes``), ``positions [B, S]`` (-1: empty), ``recent`` the
    exact last ``window`` tokens (a ring, ``KVCache [B, K, W, H]``)."""

    k_latent: "Array | KeyCodes"
    v_latent: "Array | ValueCodes"
    positions: Array
    recent: KVCache


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class CSKVCache(CachePolicy):
    """CSKV (see the module docstring). Densities are shares of the ``K * H`` channels; the
    paper's defaults are keys 0.25 and values 0.75 (keys tolerate lower density)."""

    name = "cskv"
    wants_layer_input = True
    key_density: float = 0.5
    value_density: float = 0.5
    window: int = 32
    decomposition: str | None = None  # svd | asvd | random; None: asvd with a statistics file, else svd
    alpha: float = 0.5          # ASVD's exponent on mean |x|
    calibration: str | None = None  # `jaxkv calibrate cskv` (statistics) or `jaxkv train cskv` (factors)
    seed: int = 0
    bits: int | None = None     # 2/3/4/8: latents as packed codes (keys per channel, values per token)
    group: int = 32             # with bits: tokens sharing a key scale (<= window)
    factors: CSKVFactors | None = None  # set by prepare

    def __post_init__(self):
        super().__post_init__()
        for f in ("key_density", "value_density"):
            d = getattr(self, f)
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
                raise UserError(f"cskv: {f} must be in (0, 1], got {d!r}")
        check_ints("cskv", self, {"window": 1, "seed": 0, "group": 1})
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(self.bits, int)
                                      or self.bits not in (2, 3, 4, 8)):
            raise UserError(f"cskv: bits must be 2, 3, 4 or 8, got {self.bits!r}")
        if self.bits is not None and self.group > self.window:
            raise UserError(f"cskv: group ({self.group}) must be at most window ({self.window}): a key group is "
                            "quantized once complete, and until then its tokens are read from the exact window")
        if self.decomposition is not None and self.decomposition not in INITS:
            raise UserError(f"cskv: decomposition must be one of {', '.join(INITS)}, got {self.decomposition!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 2:
            raise UserError(f"cskv: alpha must be in [0, 2], got {self.alpha!r}")
        if self.factors is not None and not isinstance(self.factors, CSKVFactors):
            raise UserError("cskv: factors are set by prepare (or give calibration=FILE)")

    @classmethod
    def from_budget(cls, budget: float, context_len: int, **named) -> "CSKVCache":
        return cls(**{"key_density": float(budget), "value_density": float(budget), **named})

    def capacity(self, max_len: int) -> int:
        return max_len

    # ------------------------------------------------------------------ model level
    def prepare(self, params: dict, config) -> "CSKVCache":
        if self.factors is not None:
            return self
        rk, rv = rank_for(self.key_density, config), rank_for(self.value_density, config)
        scales = None
        if self.calibration is not None:
            from jaxkv.calibration import load_calibration, model_fingerprint

            tensors, meta = load_calibration(self.calibration, method=CALIBRATION_METHOD,
                                             fingerprint=model_fingerprint(config, params))
            if "layer0.k_down" in tensors:  # trained (or saved) factors: used as they are
                names = [f"layer{i}.{k}" for i in range(config.num_layers) for k in ("k_down", "k_up", "v_down", "v_up")]
                if [n for n in names if n not in tensors]:
                    raise UserError(f"cskv: {self.calibration} lacks the factors "
                                    f"{[n for n in names if n not in tensors][:4]} of a {config.num_layers}-layer model")
                layers = [{k: tensors[f"layer{i}.{k}"] for k in ("k_down", "k_up", "v_down", "v_up")}
                          for i in range(config.num_layers)]
                got = (layers[0]["k_down"].shape[1], layers[0]["v_down"].shape[1])
                if got != (rk, rv):
                    raise UserError(f"cskv: {self.calibration} holds factors of ranks {got} (key, value); "
                                    f"key_density={self.key_density}, value_density={self.value_density} "
                                    f"need {(rk, rv)}")
                layers = _with_biases(layers, params, config)
                return dataclasses.replace(self, factors=CSKVFactors(layers, f"file:{meta.get('model')}"))
            if "scale" not in tensors:
                raise UserError(f"cskv: {self.calibration} holds neither factors nor activation statistics")
            scales = tensors["scale"]
        init = self.decomposition or ("asvd" if scales is not None else "svd")
        layers = init_factors(params, config, key_rank=rk, value_rank=rv, decomposition=init, scales=scales,
                              alpha=self.alpha, seed=self.seed)
        layers = _with_biases(layers, params, config)
        return dataclasses.replace(self, factors=CSKVFactors(layers, f"{init}:{rk}/{rv}"))

    def layer_params(self, layer: LayerSpec):
        if self.factors is None:
            raise UserError("cskv needs its factors: call policy.prepare(params, config) (generate and "
                            "jaxkv eval do), or pass calibration=FILE")
        return {k: jnp.asarray(v) for k, v in self.factors.layers[layer.index].items()}

    # ------------------------------------------------------------------ layer level
    def ranks(self, layer: LayerSpec) -> tuple[int, int]:
        return rank_for(self.key_density, layer.config), rank_for(self.value_density, layer.config)

    def slots(self, max_len: int) -> int:
        """Latent slots: ``max_len``, rounded up to whole key groups when quantized."""
        return max_len if self.bits is None else -(-max_len // self.group) * self.group

    def init(self, *, batch, max_len, dtype, layer):
        rk, rv = self.ranks(layer)
        w, s = min(self.window, max_len), self.slots(max_len)
        if self.bits is None:
            k_lat, v_lat = jnp.zeros((batch, s, rk), dtype), jnp.zeros((batch, s, rv), dtype)
        else:
            n_g = s // self.group
            k_lat = KeyCodes(codes=jnp.zeros((batch, s, packed_length(rk, self.bits)), jnp.uint8),
                             scale=jnp.zeros((batch, n_g, rk), jnp.float16), zero=jnp.zeros((batch, n_g, rk), jnp.float16),
                             tail=jnp.zeros((batch, self.group, rk), dtype))
            v_lat = ValueCodes(codes=jnp.zeros((batch, s, packed_length(rv, self.bits)), jnp.uint8),
                               scale=jnp.zeros((batch, s, 1), jnp.float16), zero=jnp.zeros((batch, s, 1), jnp.float16))
        return CSKVState(k_latent=k_lat, v_latent=v_lat, positions=jnp.full((batch, s), -1, jnp.int32),
                         recent=KVCache.empty(batch=batch, num_kv_heads=layer.num_kv_heads, slots=w,
                                              head_dim=layer.head_dim, dtype=dtype))

    def expected_nbytes(self, *, batch, max_len, dtype, layer):
        rk, rv = self.ranks(layer)
        item = jnp.dtype(dtype).itemsize
        w, s = min(self.window, max_len), self.slots(max_len)
        recent = batch * layer.num_kv_heads * w * (2 * layer.head_dim * item + 4)
        if self.bits is None:
            return batch * s * ((rk + rv) * item + 4) + recent
        keys = batch * (s * packed_length(rk, self.bits) + 2 * (s // self.group) * rk * 2 + self.group * rk * item)
        values = batch * s * (packed_length(rv, self.bits) + 2 * 2)
        return keys + values + batch * s * 4 + recent

    def attended_keys(self, state):
        return jnp.sum(state.positions >= 0, axis=1).astype(jnp.float32) * state.recent.k.shape[1]

    def _seal_prompt(self, kc: KeyCodes, lat: Array, positions: Array) -> KeyCodes:
        """A prompt's keys (positions 0, 1, ... per row): every group quantized per channel; the
        group holding each row's next position (incomplete) also waits in the tail."""
        b, t, r = lat.shape
        g = self.group
        tp = -(-t // g) * g
        groups = jnp.pad(lat, ((0, 0), (0, tp - t), (0, 0))).reshape(b, tp // g, g, r)
        q = quantize(groups, self.bits, axis=2)
        codes = jax.lax.dynamic_update_slice(kc.codes, q.codes.reshape(b, tp, -1), (0, 0, 0))
        scale = jax.lax.dynamic_update_slice(kc.scale, q.scale[:, :, 0], (0, 0, 0))
        zero = jax.lax.dynamic_update_slice(kc.zero, q.zero[:, :, 0], (0, 0, 0))
        n = jnp.sum(positions >= 0, axis=1)  # the next position per row
        nxt = jnp.minimum(n // g, tp // g - 1)
        tail = jnp.take_along_axis(groups, nxt[:, None, None, None], axis=1)[:, 0]
        tail = jnp.where((n // g < tp // g)[:, None, None], tail, 0.0).astype(kc.tail.dtype)
        return KeyCodes(codes=codes, scale=scale, zero=zero, tail=tail)

    def _seal_chunk(self, kc: KeyCodes, lat: Array, positions: Array) -> KeyCodes:
        """A chunk after the prompt, token by token (a scan: a group completes at most once per
        token): each latent joins the tail; a tail that completes its group is quantized."""
        s, g = kc.codes.shape[1], self.group
        rows = jnp.arange(lat.shape[0])

        def step(kc, xs):
            lat_t, pos_t = xs  # [B, r], [B]
            real = (pos_t >= 0) & (pos_t < s)
            j = jnp.where(real, pos_t % g, g)
            tail = kc.tail.at[rows, j].set(lat_t.astype(kc.tail.dtype), mode="drop")
            seal = real & (pos_t % g == g - 1)
            q = quantize(tail, self.bits, axis=1)  # [B, G, packed], scale [B, 1, r]
            grp = jnp.where(seal, pos_t // g, s // g)
            slot = jnp.where(seal[:, None], grp[:, None] * g + jnp.arange(g), s)
            return KeyCodes(codes=kc.codes.at[rows[:, None], slot].set(q.codes, mode="drop"),
                            scale=kc.scale.at[rows, grp].set(q.scale[:, 0], mode="drop"),
                            zero=kc.zero.at[rows, grp].set(q.zero[:, 0], mode="drop"), tail=tail), None

        kc, _ = jax.lax.scan(step, kc, (lat.transpose(1, 0, 2), positions.T))
        return kc

    def latents(self, state: CSKVState, layer: LayerSpec) -> tuple[Array, Array]:
        """The stored key and value latents, ``[B, S, r]`` fp32 (decoded when quantized; the
        codes of unsealed key groups are garbage, and never read: they are in the window)."""
        if self.bits is None:
            return state.k_latent.astype(jnp.float32), state.v_latent.astype(jnp.float32)
        rk, rv = self.ranks(layer)
        kc, vc = state.k_latent, state.v_latent
        per_slot = lambda a: jnp.repeat(a.astype(jnp.float32), self.group, axis=1)  # noqa: E731
        k = unpack(kc.codes, self.bits, rk).astype(jnp.float32) * per_slot(kc.scale) + per_slot(kc.zero)
        v = unpack(vc.codes, self.bits, rv).astype(jnp.float32) * vc.scale.astype(jnp.float32) + vc.zero.astype(jnp.float32)
        return k, v

    def _write(self, state: CSKVState, k, v, positions, inputs: LayerInput, params, prefill: bool = False) -> CSKVState:
        if params is None or inputs is None:
            raise UserError("cskv: the layer's factors and input are missing (make the cache with init_cache "
                            "from a prepared cskv policy)")
        s = state.positions.shape[1]
        if k.shape[1] > s:
            raise UserError(f"cskv: a chunk of {k.shape[1]} tokens does not fit a cache of {s} slots; make the "
                            "cache at least as long as the prompt plus the tokens to generate (init_cache(max_len=...))")
        x = inputs.x.astype(jnp.float32)
        slots = jnp.where((positions >= 0) & (positions < s), positions, s)
        b = jnp.arange(k.shape[0])[:, None]
        k_lat, v_lat = x @ params["k_down"], x @ params["v_down"]
        if self.bits is None:
            k_store = state.k_latent.at[b, slots].set(k_lat.astype(state.k_latent.dtype), mode="drop")
            v_store = state.v_latent.at[b, slots].set(v_lat.astype(state.v_latent.dtype), mode="drop")
        else:
            qv = quantize(v_lat, self.bits, axis=-1)  # per token
            vc = state.v_latent
            v_store = ValueCodes(codes=vc.codes.at[b, slots].set(qv.codes, mode="drop"),
                                 scale=vc.scale.at[b, slots].set(qv.scale, mode="drop"),
                                 zero=vc.zero.at[b, slots].set(qv.zero, mode="drop"))
            k_store = (self._seal_prompt if prefill else self._seal_chunk)(state.k_latent, k_lat, positions)
        state = state.replace(k_latent=k_store, v_latent=v_store,
                              positions=state.positions.at[b, slots].set(positions, mode="drop"))
        if self.bits is not None and prefill:  # the prompt's key groups are cut by index
            from jaxkv.attention import contiguous_rows

            starts = (positions[:, 0] == 0) | (positions[:, 0] < 0)
            lost_layout = ~(contiguous_rows(positions) & starts)  # [B]: only that row is lost
        else:
            lost_layout = False
        # the exact ring: the chunk's last `window` tokens (earlier ones would collide in the ring)
        w = state.recent.num_slots
        last = jnp.max(positions, axis=1, keepdims=True)
        keep = (positions >= 0) & (positions > last - w)
        recent = state.recent.write(k, v, positions, state.recent.slot_or_drop(positions % w, keep))
        lost = jnp.any(positions >= s, axis=1) | lost_layout  # a row that lost a token says so (NaN), as `full`
        recent = recent.poison(lost)
        return state.replace(recent=recent)

    def prefill(self, state, *, q, k, v, positions, layer, params=None, inputs=None):
        return self._write(state, k, v, positions, inputs, params, prefill=True)

    def rebuild(self, state: CSKVState, layer: LayerSpec, inputs: LayerInput, params) -> tuple[Array, Array]:
        """Keys and values of every slot from the latents, ``[B, K, S, H]`` (keys rotated to their
        positions). Attention rebuilds only the keys (``append`` applies ``v_up`` after the
        weighted sum); this is the reference of both."""
        b, s = state.positions.shape
        kh, h = layer.num_kv_heads, layer.head_dim
        v = (self.latents(state, layer)[1] @ params["v_up"]).reshape(b, s, kh, h)
        if "v_bias" in params:
            v = v + params["v_bias"].reshape(kh, h)
        return self.rebuild_keys(state, layer, inputs, params), v.astype(state.recent.v.dtype).transpose(0, 2, 1, 3)

    def rebuild_keys(self, state: CSKVState, layer: LayerSpec, inputs: LayerInput, params) -> Array:
        b, s = state.positions.shape
        kh, h = layer.num_kv_heads, layer.head_dim
        k = (self.latents(state, layer)[0] @ params["k_up"]).reshape(b, s, kh, h)
        if "k_bias" in params:
            k = k + params["k_bias"].reshape(kh, h)
        k = inputs.rope(k, jnp.maximum(state.positions, 0))
        return k.astype(state.recent.k.dtype).transpose(0, 2, 1, 3)

    def append(self, state, *, q, k, v, positions, phase, layer, params=None, inputs=None):
        state = self._write(state, k, v, positions, inputs, params)
        kh, h = layer.num_kv_heads, layer.head_dim
        v_latent = self.latents(state, layer)[1]
        b, s, rv = v_latent.shape
        lat_pos = jnp.broadcast_to(state.positions[:, None, :], (b, kh, s))
        # old: every latent slot the exact ring does not hold
        ring_start = jnp.min(jnp.where(state.recent.positions >= 0, state.recent.positions, jnp.iinfo(jnp.int32).max),
                             axis=2, keepdims=True)  # [B, K, 1]
        old = (lat_pos >= 0) & (lat_pos < ring_start)
        w = layer.sliding_window
        # values stay latent through the weighted sum: sum_s p_s (lat_s @ up) = (sum_s p_s lat_s) @ up
        lat_v = jnp.broadcast_to(v_latent.astype(state.recent.v.dtype)[:, None], (b, kh, s, rv))
        out_lat, lse = attend_with_lse(q, self.rebuild_keys(state, layer, inputs, params), lat_v, positions, lat_pos,
                                       window=w, visible=old)
        out_old = jnp.einsum("BTKGr,rKH->BTKGH", out_lat.astype(jnp.float32), params["v_up"].reshape(rv, kh, h))
        if "v_bias" in params:
            out_old = out_old + params["v_bias"].reshape(kh, h)
        parts = [(out_old.astype(q.dtype), lse),
                 attend_with_lse(q, state.recent.k, state.recent.v, positions, state.recent.positions, window=w)]
        return merge_attention(parts), state


def _with_biases(layers: list[dict], params: dict, config) -> list[dict]:
    """Each layer's factors plus its K/V projection biases where the model has them (Qwen2)."""
    if not config.qkv_bias:
        return layers
    out = []
    for i, layer in enumerate(layers):
        attn = params["layers"][i]["attn"]
        out.append({**layer, "k_bias": np.asarray(attn["k"]["bias"], np.float32),
                    "v_bias": np.asarray(attn["v"]["bias"], np.float32)})
    return out




# ------------------------------------------------------------------ calibration: activation statistics
def activation_scales(params: dict, config, chunks: np.ndarray, *, batch: int = 4) -> np.ndarray:
    """``[L, D]``: the mean |x| of each layer's attention input (``attention_inputs``) over the
    token ids ``chunks [N, T]``."""
    from jaxkv.models.llama import attention_inputs

    chunks = np.asarray(chunks, np.int32)
    if chunks.ndim != 2 or chunks.shape[0] < 1 or chunks.shape[1] < 1:
        raise UserError(f"cskv: calibration chunks must be [N, T] token ids, got shape {chunks.shape}")
    t = chunks.shape[1]

    @jax.jit
    def sums(tokens, positions):
        real = (positions >= 0).astype(jnp.float32)[..., None]
        xs = attention_inputs(params, tokens, positions, config=config, compute_dtype=jnp.float32)
        return jnp.stack([jnp.sum(jnp.abs(x.astype(jnp.float32)) * real, axis=(0, 1)) for x in xs]), jnp.sum(real)

    total, count = np.zeros((config.num_layers, config.hidden_size)), 0.0
    for i in range(0, chunks.shape[0], batch):
        rows = np.zeros((batch, t), np.int32)
        part = chunks[i:i + batch]
        rows[: len(part)] = part
        pos = np.where(np.arange(batch)[:, None] < len(part), np.arange(t)[None], -1).astype(np.int32)
        s, n = sums(jnp.asarray(rows), jnp.asarray(pos))
        total += np.asarray(s)
        count += float(n)
    return (total / max(count, 1.0)).astype(np.float32)


def calibration_chunks(tokenizer, *, n_tokens: int, seq_len: int, text: str) -> np.ndarray:
    """``[N, seq_len]`` token ids of the calibration ``text`` (``jaxkv calibrate cskv`` passes
    Python's reference documentation unless given ``--text``)."""
    if n_tokens < seq_len or seq_len < 2:
        raise UserError(f"cskv: n_tokens ({n_tokens}) must be at least seq_len ({seq_len}), and seq_len >= 2")
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
    n = min(n_tokens // seq_len, len(ids) // seq_len)
    if n < 1:
        raise UserError(f"cskv: the calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)
