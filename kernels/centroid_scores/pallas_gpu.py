"""Centroid scores on the GPU: Pallas with its Triton lowering.

Grid ``(B, K)``: each program holds its KV head's ``G`` queries (padded to 16 rows for
``dot``) and reads the centroids twice in blocks of ``block_c``: the first pass keeps an
online log-sum-exp of ``s + log(count)`` per query head, the second writes each cluster's
weight (the mean over query heads of ``exp(s - lse)``) and whether it passes the threshold, so
the scores themselves never reach HBM. Same result as ``reference.centroid_scores_reference``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array
_NEG = -1e30
_MIN_ROWS = 16


def _kernel(thr_ref, q_ref, c_ref, n_ref, w_ref, kept_ref, *, block_c: int, groups: int, scale: float, exact: bool):
    q = q_ref[...]  # [Gp, H]
    rows = q.shape[0]
    n_blocks = c_ref.shape[0] // block_c
    allow_tf32 = False if exact else None
    real = (jnp.arange(rows) < groups)[:, None]

    def scores(i):
        start = pl.multiple_of(i * block_c, block_c)
        cb = c_ref[pl.ds(start, block_c), :]
        n = n_ref[pl.ds(start, block_c)]
        s = plgpu.dot(q, cb, trans_b=True, allow_tf32=allow_tf32).astype(jnp.float32) * scale  # [Gp, bc]
        has = (n > 0)[None, :]
        return jnp.where(has, s, _NEG), n, has, start

    def first(i, carry):
        m, l = carry
        s, n, has, _ = scores(i)
        t = s + jnp.log(jnp.maximum(n, 1e-30))[None, :]
        m_new = jnp.maximum(m, jnp.max(jnp.where(has, t, _NEG), axis=1))
        e = jnp.where(has, jnp.exp(t - m_new[:, None]), 0.0)
        return m_new, jnp.exp(m - m_new) * l + jnp.sum(e, axis=1)

    m, l = jax.lax.fori_loop(0, n_blocks, first, (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32)))
    lse = m + jnp.log(jnp.where(l > 0, l, 1.0))
    thr = thr_ref[0]

    def second(i, _):
        s, _, has, start = scores(i)
        p = jnp.where(has & real, jnp.exp(s - lse[:, None]), 0.0)
        w = jnp.sum(p, axis=0) / groups  # [bc]
        w_ref[pl.ds(start, block_c)] = w
        kept_ref[pl.ds(start, block_c)] = (w >= thr).astype(jnp.int8)
        return 0

    jax.lax.fori_loop(0, n_blocks, second, 0)


@functools.partial(jax.jit, static_argnames=("scale", "block_c", "num_warps", "num_stages", "interpret"))
def centroid_scores_pallas_gpu(q: Array, centroids: Array, counts: Array, threshold: Array, *,
                               scale: float | None = None, block_c: int = 64, num_warps: int = 4,
                               num_stages: int = 2, interpret: bool = False) -> tuple[Array, Array]:
    """``(weights [B, K, C], kept [B, K, C])``, in fp32 throughout (no TF32: the threshold
    compares small weights). Clusters are padded to a multiple of ``block_c`` (empty, sliced
    off after); a cache that allocates such a multiple avoids that copy."""
    b, kh, g, h = q.shape
    c = centroids.shape[2]
    scale = h ** -0.5 if scale is None else float(scale)
    rows = max(_MIN_ROWS, 1 << (g - 1).bit_length())
    cp = -(-c // block_c) * block_c
    qp = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    cent = jnp.pad(centroids.astype(jnp.float32), ((0, 0), (0, 0), (0, cp - c), (0, 0)))
    n = jnp.pad(counts.astype(jnp.float32), ((0, 0), (0, 0), (0, cp - c)))
    kernel = functools.partial(_kernel, block_c=block_c, groups=g, scale=scale, exact=True)
    w, kept = pl.pallas_call(
        kernel,
        grid=(b, kh),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (i,)),  # threshold
            pl.BlockSpec((None, None, rows, h), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, cp, h), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, cp), lambda i, j: (i, j, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, cp), lambda i, j: (i, j, 0)),
                   pl.BlockSpec((None, None, cp), lambda i, j: (i, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kh, cp), jnp.float32), jax.ShapeDtypeStruct((b, kh, cp), jnp.int8)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxkv_centroid_scores",
    )(threshold.astype(jnp.float32), qp, cent, n)
    return w[:, :, :c], kept[:, :, :c].astype(bool)
