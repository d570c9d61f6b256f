"""Quantized decode attention, the reference (plain jnp).

One new token per sequence attends a head-major cache whose keys and values are stored as
per-token asymmetric ``bits``-bit codes packed into bytes (``jaxkv.cache.quant``: code ``i`` of a
byte sits at bit ``i * bits``, ``8 // bits`` codes a byte, channel ``h`` in byte ``h // per`` at
code ``h % per``), with one float16 scale and zero per token and head: ``k_codes, v_codes [B, K,
S, H / per]`` ``uint8``, ``k_scale, k_zero, v_scale, v_zero [B, K, S]``. Slot ``s`` holds a
visible token when ``kv_positions[b, k, s] >= 0`` (MiKV marks the low copies of its
full-precision tokens -1). The ``G`` query heads of a KV head share it: ``q [B, K, G, H]``.

  1. k[s] = codes_k[s] * k_scale[s] + k_zero[s]; v likewise (per token, every channel)
  2. scores = q . k / sqrt(H) (or ``scale``), -inf where ``kv_positions < 0``
  3. out = softmax(scores) @ v; lse = logsumexp(scores) (-inf, and out = 0, if nothing is visible)

``lse`` merges this part with attention over other keys (MiKV's full-precision tier).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkv.cache.quant import unpack

Array = jax.Array


def dequantize_tokens(codes: Array, scale: Array, zero: Array, *, bits: int, head_dim: int) -> Array:
    """Step 1: ``[B, K, S, H]`` fp32 from packed codes and per-token ``scale, zero [B, K, S]``."""
    c = unpack(codes, bits, head_dim).astype(jnp.float32)
    return c * scale.astype(jnp.float32)[..., None] + zero.astype(jnp.float32)[..., None]


def quantized_decode_reference(q: Array, k_codes: Array, k_scale: Array, k_zero: Array, v_codes: Array,
                               v_scale: Array, v_zero: Array, kv_positions: Array, *, bits: int,
                               scale: float | None = None) -> tuple[Array, Array]:
    """``(out [B, K, G, H] in q's dtype, lse [B, K, G] fp32)``; see the module docstring."""
    h = q.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    k = dequantize_tokens(k_codes, k_scale, k_zero, bits=bits, head_dim=h)
    v = dequantize_tokens(v_codes, v_scale, v_zero, bits=bits, head_dim=h)
    vis = kv_positions >= 0  # [B, K, S]
    s = jnp.einsum("BKGH,BKSH->BKGS", q.astype(jnp.float32), k, precision="highest") * scale
    s = jnp.where(vis[:, :, None, :], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(vis[:, :, None, :], jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("BKGS,BKSH->BKGH", p, v, precision="highest")
    return out.astype(q.dtype), lse
