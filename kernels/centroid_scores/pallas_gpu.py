"""Centroid scores on the GPU: Pallas with its Triton lowering.

The cost is reading the centroids (``C x H`` fp32 per row and KV head, one per ~20 keys), so the
kernel is a GEMV tiled for parallelism: grid ``(B, K, ceil(C / block_c))``; each program loads
one block of ``block_c`` centroids and, for each of its KV head's ``G`` query heads, reduces
``q[g] * centroid`` over the head dimension in fp32 (exact, no TF32; a ``dot`` would need the
queries padded to 16 rows), writing that block's scaled scores. The scores are ``G / H`` of the
bytes read (1/32 at G = 4, H = 128), so the softmax normalisation over clusters, the mean over
query heads and the threshold run as one XLA fusion over them afterwards
(``reference.weights_from_scores``). When ``C`` is not a multiple of ``block_c`` the last
program's block is moved back to end at ``C`` (it rewrites a few scores with the same values)
instead of padding, which would copy every centroid. Same result as
``reference.centroid_scores_reference``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxkv.kernels.centroid_scores.reference import weights_from_scores

Array = jax.Array


def _kernel(q_ref, c_ref, s_ref, *, block_c: int, scale: float):
    num_c = c_ref.shape[0]
    start = jnp.minimum(pl.program_id(2) * block_c, num_c - block_c)
    cb = c_ref[pl.ds(start, block_c), :]  # [bc, H] fp32
    for g in range(q_ref.shape[0]):  # G is small and static: one reduction per query head
        s_ref[g, pl.ds(start, block_c)] = jnp.sum(cb * q_ref[g, :][None, :], axis=1) * scale


def _block_c(num_c: int, block_c: int) -> int:
    """The largest power of two <= min(block_c, num_c), at least 16."""
    return max(16, min(block_c, 1 << (num_c.bit_length() - 1)))


@functools.partial(jax.jit, static_argnames=("scale", "block_c", "num_warps", "num_stages", "interpret"))
def centroid_scores_pallas_gpu(q: Array, centroids: Array, counts: Array, threshold: Array, *,
                               scale: float | None = None, block_c: int = 32, num_warps: int = 4,
                               num_stages: int = 1, interpret: bool = False) -> tuple[Array, Array]:
    """``(weights [B, K, C], kept [B, K, C])``, in fp32 throughout (no TF32: the threshold
    compares small weights)."""
    b, kh, g, h = q.shape
    c = centroids.shape[2]
    scale = h ** -0.5 if scale is None else float(scale)
    bc = _block_c(c, block_c)
    cent = centroids.astype(jnp.float32)
    if c < bc:  # fewer clusters than the smallest block: padding copies little
        cent = jnp.pad(cent, ((0, 0), (0, 0), (0, bc - c), (0, 0)))
    cp = cent.shape[2]
    s = pl.pallas_call(
        functools.partial(_kernel, block_c=bc, scale=scale),
        grid=(b, kh, -(-cp // bc)),
        in_specs=[
            pl.BlockSpec((None, None, g, h), lambda i, j, t: (i, j, 0, 0)),
            pl.BlockSpec((None, None, cp, h), lambda i, j, t: (i, j, 0, 0)),  # the head's centroids, sliced by block
        ],
        out_specs=pl.BlockSpec((None, None, g, cp), lambda i, j, t: (i, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kh, g, cp), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxkv_centroid_scores",
    )(q.astype(jnp.float32), cent)
    return weights_from_scores(s[..., :c], counts.astype(jnp.float32), threshold.astype(jnp.float32))
