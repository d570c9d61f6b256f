"""Block-sparse attention, the reference (plain jnp, dense in memory: the specification).

Shapes are token-major, as projected: ``q [B, T, N, H]``, ``k, v [B, S, K, H]`` with the ``G = N
/ K`` query heads ``n = k * G + g`` sharing KV head ``k`` (GQA). The mask is ``mask.visible``
(rules 1-4) and, when given, the selection ``block_mask`` (rule 5):

  1. s[n, i, j] = q[i, n] . k[j, n // G] * scale   (scale = 1 / sqrt(H) unless given)
  2. s = -inf where query i may not see key j
  3. out[i, n] = softmax_j(s) @ v;  lse[n, i] = logsumexp_j(s)
     (a query that sees no key: out = 0, lse = -inf)

Differentiable: ``jax.vjp`` of this function is the reference for the kernels' backward pass (the
softmax is taken over finite scores and zeroed where masked, so a query that sees nothing has
zero gradients instead of NaN).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkv.kernels.block_sparse_attention.mask import MaskSpec, visible

Array = jax.Array
__all__ = ["block_sparse_attention_reference", "dense_visibility"]


def dense_visibility(spec: MaskSpec, q_positions: Array, k_positions: Array, *, q_segments: Array | None = None,
                     k_segments: Array | None = None, block_mask: Array | None = None,
                     mask_block: int | None = None, num_heads: int = 1) -> Array:
    """Rules 1-5 as a dense ``[B, Hm, T, S]`` boolean (Hm: the block mask's heads, else 1)."""
    t, s = q_positions.shape[1], k_positions.shape[1]
    qs = None if q_segments is None else q_segments[:, :, None]
    ks = None if k_segments is None else k_segments[:, None, :]
    vis = visible(spec, q_positions[:, :, None], k_positions[:, None, :], qs, ks, jnp.arange(s)[None, None, :])
    vis = vis[:, None]
    if block_mask is not None:
        if mask_block is None:
            raise ValueError("block_mask needs mask_block (the tokens a side of one of its cells)")
        cells = jnp.repeat(jnp.repeat(block_mask, mask_block, axis=2), mask_block, axis=3)[:, :, :t, :s]
        vis = vis & cells
    return vis


def block_sparse_attention_reference(q: Array, k: Array, v: Array, q_positions: Array, k_positions: Array, *,
                                     mask: MaskSpec = MaskSpec(), q_segments: Array | None = None,
                                     k_segments: Array | None = None, block_mask: Array | None = None,
                                     mask_block: int | None = None, scale: float | None = None
                                     ) -> tuple[Array, Array]:
    """``(out [B, T, N, H] in q's dtype, lse [B, N, T] fp32)``; see the module docstring."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scale = h ** -0.5 if scale is None else scale
    vis = dense_visibility(mask, q_positions, k_positions, q_segments=q_segments, k_segments=k_segments,
                           block_mask=block_mask, mask_block=mask_block)  # [B, Hm, T, S]
    hm = vis.shape[1]
    vis = jnp.repeat(vis, n // hm, axis=1).reshape(b, kh, g, t, -1)  # query head n = k * G + g
    qg = q.reshape(b, t, kh, g, h).astype(jnp.float32)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32), precision="highest") * scale
    lse = jax.nn.logsumexp(jnp.where(vis, s, -jnp.inf), axis=-1)
    p = jax.nn.softmax(jnp.where(vis, s, -1e30), axis=-1) * vis  # finite: no NaN gradient for empty rows
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(jnp.float32), precision="highest")
    return out.reshape(b, t, n, h).astype(q.dtype), jax.lax.stop_gradient(lse.reshape(b, n, t))
