"""Sparse decode attention, the reference (plain jnp).

One new token per sequence attends, for each KV head, only the KV blocks chosen for that
(row, KV head): the cache is head-major, ``k, v [B, K, S, H]``, cut into ``S / block_size``
blocks of ``block_size`` slots; ``block_indices [B, K, M]`` lists the chosen blocks, of which
the first ``block_counts [B, K]`` are real (the rest is padding, never read); slot ``s`` of a
row holds a token only if ``s < lengths[b]``. The ``G = N / K`` query heads of a KV head share
its blocks (GQA): ``q [B, K, G, H]``.

  1. visible[b, k, s] = s < lengths[b]  and  s // block_size in block_indices[b, k, :count]
     (and ``kv_mask[b, k, s]`` when a mask is given: slots inside a listed block left out)
  2. scores = q . k / sqrt(H) (or ``scale``), -inf where not visible
  3. out = softmax(scores) @ v; lse = logsumexp(scores) (-inf, and out = 0, if nothing is visible)

``lse`` lets a caller merge this part with attention over other keys (``attention.merge_attention``).
With every block listed (``dense_blocks``) it is dense decode.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def visible_slots(block_indices: Array, block_counts: Array, lengths: Array, *, num_slots: int,
                  block_size: int) -> Array:
    """Step 1: ``[B, K, S]`` the slots the listed blocks cover that hold a token."""
    m = block_indices.shape[-1]
    listed = jnp.arange(m)[None, None, :] < block_counts[:, :, None]  # [B, K, M]
    block_of = jnp.arange(num_slots) // block_size  # [S]
    chosen = jnp.any((block_indices[:, :, :, None] == block_of[None, None, None, :]) & listed[..., None], axis=2)
    return chosen & (jnp.arange(num_slots)[None, None, :] < lengths[:, None, None])


def sparse_decode_reference(q: Array, k: Array, v: Array, lengths: Array, block_indices: Array,
                            block_counts: Array, *, block_size: int, scale: float | None = None,
                            kv_mask: Array | None = None) -> tuple[Array, Array]:
    """``(out [B, K, G, H] in q's dtype, lse [B, K, G] fp32)``; see the module docstring."""
    s_len, h = k.shape[2], q.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    vis = visible_slots(block_indices, block_counts, lengths, num_slots=s_len, block_size=block_size)
    if kv_mask is not None:
        vis = vis & kv_mask.astype(bool)
    scores = jnp.einsum("BKGH,BKSH->BKGS", q.astype(jnp.float32), k.astype(jnp.float32), precision="highest") * scale
    scores = jnp.where(vis[:, :, None, :], scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)
    p = jnp.where(vis[:, :, None, :], jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("BKGS,BKSH->BKGH", p, v.astype(jnp.float32), precision="highest")
    return out.astype(q.dtype), lse


def dense_blocks(lengths: Array, *, num_kv_heads: int, num_slots: int, block_size: int) -> tuple[Array, Array]:
    """Every block a row's ``lengths`` reaches, for every KV head: ``(block_indices [B, K, S /
    block_size], block_counts [B, K])``; sparse decode over them is dense decode."""
    n = num_slots // block_size
    b = lengths.shape[0]
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, num_kv_heads, n))
    counts = jnp.broadcast_to(((lengths + block_size - 1) // block_size).astype(jnp.int32)[:, None], (b, num_kv_heads))
    return idx, jnp.minimum(counts, n)
