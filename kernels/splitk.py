"""Split-K flash decoding, shared by the decode kernels: how many splits, and the merge of their partials."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def default_blocks_per_split(batch: int, num_kv_heads: int, n_blocks: int, *, programs: int = 512) -> int:
    """Enough splits that about ``programs`` programs run (a few per SM of an H100/H200)."""
    return max(1, math.ceil(n_blocks * batch * num_kv_heads / programs))


def merge_splits(o: Array, lse: Array) -> tuple[Array, Array]:
    """Merge ``o [B, K, splits, R, H]`` (each split's normalised output) and ``lse [B, K, splits,
    R]`` (its log-sum-exp, -inf where it saw nothing) into ``(out [B, K, R, H], lse [B, K, R])``
    by log-sum-exp weights; a row no split saw gets out = 0, lse = -inf."""
    top = jnp.max(lse, axis=2, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lse - top)  # 0 for a split that saw nothing
    total = jnp.sum(w, axis=2)
    out = jnp.sum(w[..., None] * o, axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
    lse_out = jnp.where(total > 0, top[:, :, 0] + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return out, lse_out
