"""Centroid scores on the TPU: Pallas with its Mosaic lowering.

The grid is ``(B, K, 2 x C / block_c)``: one (row, KV head) pair per parallel step, and a
sequential axis that walks the cluster blocks twice. The first walk keeps each query head's
running log-sum-exp of ``s + log counts`` over the clusters in VMEM scratch. The second walk
recomputes each block's scores and writes ``weight[c] = mean_g exp(s[g, c] - lse[g])``, zero
for empty clusters. The weights' output block stays at block 0 through the first walk, which
writes nothing, so nothing unwritten is copied out. The scores are never written to HBM.
Counts and weights travel as rows ``[B, K, 1, C]``, so their blocks are whole lane tiles.
The threshold comparison is a jnp op on the weights (XLA fuses it).

Tested in the TPU interpreter (``pltpu.InterpretParams``) on the CPU against the reference,
and lowered for the TPU (``jax.export`` with ``platforms=["tpu"]``: Pallas's Mosaic lowering,
not Mosaic's own compiler). It has not been compiled or timed on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array
__all__ = ["centroid_scores_pallas_tpu"]


def _kernel(q_ref, c_ref, n_ref, w_ref, m_scr, l_scr, *, blocks: int, scale: float):
    step = pl.program_id(2)
    s = jax.lax.dot_general(q_ref[...].astype(jnp.float32), c_ref[...].astype(jnp.float32),
                            (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32) * scale  # [G, bc]
    counts = n_ref[...].astype(jnp.float32)  # [1, bc]
    has = counts > 0
    s = jnp.where(has, s, -jnp.inf)

    @pl.when(step == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)

    @pl.when(step < blocks)  # walk 1: the log-sum-exp of s + log counts per query head
    def _():
        t = s + jnp.log(jnp.maximum(counts, 1e-30))
        m_old = m_scr[...]
        m_new = jnp.maximum(m_old, jnp.max(t, axis=1, keepdims=True))
        safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        l_scr[...] = jnp.exp(m_old - safe) * l_scr[...] + jnp.sum(jnp.exp(t - safe), axis=1, keepdims=True)
        m_scr[...] = m_new

    @pl.when(step >= blocks)  # walk 2: the weights
    def _():
        l = l_scr[...]
        lse = jnp.where(l > 0, m_scr[...] + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)  # [G, 1]
        w_ref[...] = jnp.mean(jnp.where(has, jnp.exp(s - lse), 0.0), axis=0, keepdims=True)


@functools.partial(jax.jit, static_argnames=("scale", "block_c", "interpret"))
def centroid_scores_pallas_tpu(q: Array, centroids: Array, counts: Array, threshold: Array, *,
                               scale: float | None = None, block_c: int = 512, interpret: bool = False
                               ) -> tuple[Array, Array]:
    """``(weights [B, K, C] fp32, kept [B, K, C] bool)``, the reference's contract. ``block_c``
    (clusters per block) is a multiple of 8, and of 128 to lower for a TPU (the counts' and
    weights' row blocks ``[1, block_c]`` must fill whole lane tiles); C is padded to a multiple
    of it with empty clusters. ``interpret``: run in the TPU interpreter on any backend."""
    if isinstance(block_c, bool) or not isinstance(block_c, int) or block_c < 8 or block_c % 8:
        raise ValueError(f"block_c must be a positive multiple of 8, got {block_c!r}")
    b, kh, g, h = q.shape
    c = centroids.shape[2]
    bc = int(block_c)
    pad = -c % bc
    cent = jnp.pad(centroids, ((0, 0), (0, 0), (0, pad), (0, 0)))
    cnt = jnp.pad(counts.astype(jnp.float32), ((0, 0), (0, 0), (0, pad)))[:, :, None, :]  # [B, K, 1, C']
    blocks = (c + pad) // bc
    scale = h ** -0.5 if scale is None else float(scale)
    at = lambda st: st % blocks  # noqa: E731  both walks read the same blocks in order
    weights = pl.pallas_call(
        functools.partial(_kernel, blocks=blocks, scale=scale),
        grid=(b, kh, 2 * blocks),
        in_specs=[pl.BlockSpec((None, None, g, h), lambda i, j, st: (i, j, 0, 0)),
                  pl.BlockSpec((None, None, bc, h), lambda i, j, st: (i, j, at(st), 0)),
                  pl.BlockSpec((None, None, 1, bc), lambda i, j, st: (i, j, 0, at(st)))],
        out_specs=pl.BlockSpec((None, None, 1, bc), lambda i, j, st: (i, j, 0, jnp.maximum(st - blocks, 0))),
        out_shape=jax.ShapeDtypeStruct((b, kh, 1, c + pad), jnp.float32),
        scratch_shapes=[pltpu.VMEM((g, 1), jnp.float32), pltpu.VMEM((g, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxkv_centroid_scores_tpu",
    )(q, cent, cnt)[:, :, 0, :c]
    return weights, weights >= threshold[:, None, None]
