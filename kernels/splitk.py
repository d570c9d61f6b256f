"""Split-K flash decoding's last step, shared by the decode kernels: merge per-split partials."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


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
