"""Split-K flash decoding, shared by the decode kernels: how many splits, and the merge of their partials."""
from __future__ import annotations

import functools
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


def _merge_kernel(o_ref, lse_ref, out_ref, lse_out_ref, *, splits: int, rows: int):
    s2 = o_ref.shape[0]
    real = jnp.arange(s2) < splits  # the buffer's splits past ``splits`` were never written
    for g in range(rows):  # one independent [splits, H] load a query head: no loop-carried wait
        part = o_ref[:, g, :]  # [S2, H] fp32
        lse = jnp.where(real, lse_ref[:, g], -jnp.inf)  # [S2]
        top = jnp.max(lse)
        w = jnp.where(lse > -jnp.inf, jnp.exp(lse - jnp.where(top > -jnp.inf, top, 0.0)), 0.0)
        total = jnp.sum(w)
        out = jnp.sum(w[:, None] * jnp.where(real[:, None], part, 0.0), axis=0) / jnp.where(total > 0, total, 1.0)
        out_ref[g, :] = out.astype(out_ref.dtype)
        lse_out_ref[g] = jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def merge_splits_pallas_gpu(o: Array, lse: Array, *, splits: int, rows: int, dtype, interpret: bool = False
                            ) -> tuple[Array, Array]:
    """``merge_splits`` as one Pallas GPU kernel (grid ``(B, K)``) over a partials buffer of
    ``S2 >= splits`` splits (``o [B, K, S2, R, H]``, ``lse [B, K, S2, R]``; splits from
    ``splits`` on are never read as data), merging only the first ``rows`` rows (the real query
    heads of the padded ``R``) and writing ``(out [B, K, rows, H] in dtype, lse [B, K, rows])``
    directly: one launch in place of the jnp merge's reductions, slices and casts."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, kh, s2, r, h = o.shape
    return pl.pallas_call(
        functools.partial(_merge_kernel, splits=splits, rows=rows),
        grid=(b, kh),
        in_specs=[pl.BlockSpec((None, None, s2, r, h), lambda i, j: (i, j, 0, 0, 0)),
                  pl.BlockSpec((None, None, s2, r), lambda i, j: (i, j, 0, 0))],
        out_specs=[pl.BlockSpec((None, None, rows, h), lambda i, j: (i, j, 0, 0)),
                   pl.BlockSpec((None, None, rows), lambda i, j: (i, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kh, rows, h), dtype), jax.ShapeDtypeStruct((b, kh, rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="jaxkv_merge_splits",
    )(o, lse)
