"""Sparse decode attention on the GPU: Pallas with its Triton lowering (flash-decoding).

Grid ``(B, K, splits)``: each program takes one (row, KV head) and a contiguous share of its
listed blocks (``blocks_per_split`` of them, split-K), loads each block's ``block_size`` keys
and values once for all ``G`` query heads of the KV head (GQA packed: the queries padded to 16
rows so the scores are one ``dot``), keeps an online softmax, and writes its normalised partial
output and log-sum-exp. A log-sum-exp merge over the splits follows, by default as one more Pallas
kernel (``splitk.merge_splits_pallas_gpu``: one launch where the jnp merge ran four small XLA
kernels, 5.4 of the 27.8 us of a 4,096-token sparse decode on the H200). Same signature and
result as ``reference.sparse_decode_reference`` plus the block sizes, ``merge`` and ``interpret``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxkv.kernels.splitk import default_blocks_per_split, merge_splits, merge_splits_pallas_gpu

Array = jax.Array
_NEG = -1e30  # masked scores: finite, so that a program with nothing visible makes no NaN
_MIN_ROWS = 16  # tl.dot's smallest M


def _kernel(lengths_ref, counts_ref, idx_ref, q_ref, k_ref, v_ref, *refs, block_size: int,
            blocks_per_split: int, scale: float, exact: bool):
    mask_ref, o_ref, lse_ref = refs if len(refs) == 3 else (None, *refs)
    split = pl.program_id(2)
    length = lengths_ref[0]
    first = split * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, counts_ref[0])
    cdt = jnp.float32 if exact else k_ref.dtype  # fp32 queries: fp32 dots, whatever the cache holds
    q = q_ref[...].astype(cdt)  # [Gp, H]
    rows, h = q.shape
    allow_tf32 = False if exact else None

    def body(j, carry):
        acc, m, l = carry
        start = pl.multiple_of(idx_ref[j] * block_size, block_size)
        kb = k_ref[pl.ds(start, block_size), :].astype(cdt)  # [bs, H]
        s = plgpu.dot(q, kb, trans_b=True, allow_tf32=allow_tf32).astype(jnp.float32) * scale  # [Gp, bs]
        seen = start + jnp.arange(block_size) < length
        if mask_ref is not None:  # slots of a listed block left out by the caller's mask
            seen = seen & (mask_ref[pl.ds(start, block_size)] != 0)
        seen = seen[None, :]
        s = jnp.where(seen, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(seen, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        vb = v_ref[pl.ds(start, block_size), :].astype(cdt)
        pv = plgpu.dot(p.astype(cdt), vb, allow_tf32=allow_tf32).astype(jnp.float32)
        return alpha[:, None] * acc + pv, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(first, jnp.maximum(last, first), body, init)
    some = l > 0
    o_ref[...] = jnp.where(some[:, None], acc / jnp.where(some, l, 1.0)[:, None], 0.0)
    lse_ref[...] = jnp.where(some, m + jnp.log(jnp.where(some, l, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("block_size", "blocks_per_split", "scale", "num_warps", "num_stages",
                                             "merge", "interpret"))  # kv_mask: None or an array (traced)
def sparse_decode_pallas_gpu(q: Array, k: Array, v: Array, lengths: Array, block_indices: Array, block_counts: Array,
                             *, block_size: int, scale: float | None = None, blocks_per_split: int | None = None,
                             num_warps: int = 4, num_stages: int = 2, merge: str = "pallas",
                             interpret: bool = False, kv_mask: Array | None = None) -> tuple[Array, Array]:
    """``(out [B, K, G, H], lse [B, K, G])``: see ``reference.sparse_decode_reference``
    (``kv_mask``: read as int8, one byte a slot, inside the listed blocks only).
    ``merge``: ``"pallas"`` merges the splits in one more Pallas kernel
    (``splitk.merge_splits_pallas_gpu``), ``"jnp"`` in XLA (``splitk.merge_splits``)."""
    if merge not in ("pallas", "jnp"):
        raise ValueError(f"merge must be 'pallas' or 'jnp', got {merge!r}")
    b, kh, g, h = q.shape
    s_len = k.shape[2]
    m = block_indices.shape[-1]
    scale = h ** -0.5 if scale is None else float(scale)
    per = blocks_per_split or default_blocks_per_split(b, kh, m)
    splits = max(1, -(-m // per))
    s2 = 1 << (splits - 1).bit_length()  # the partials buffer: a power of two of splits for the merge's tile
    rows = max(_MIN_ROWS, 1 << (g - 1).bit_length())
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    m_pad = 1 << max(m - 1, 0).bit_length()  # the block list padded to a power of two (never read past counts)
    idx = jnp.pad(block_indices.astype(jnp.int32), ((0, 0), (0, 0), (0, m_pad - m)))
    kernel = functools.partial(_kernel, block_size=block_size, blocks_per_split=per, scale=scale,
                               exact=q.dtype == jnp.float32)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kh, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j, s: (i,)),  # lengths
            pl.BlockSpec((None, None, 1), lambda i, j, s: (i, j, 0)),  # counts
            pl.BlockSpec((None, None, m_pad), lambda i, j, s: (i, j, 0)),  # block indices
            pl.BlockSpec((None, None, rows, h), lambda i, j, s: (i, j, 0, 0)),  # q
            pl.BlockSpec((None, None, s_len, h), lambda i, j, s: (i, j, 0, 0)),  # k: the row's head, sliced by block
            pl.BlockSpec((None, None, s_len, h), lambda i, j, s: (i, j, 0, 0)),  # v
        ] + ([] if kv_mask is None else [pl.BlockSpec((None, None, s_len), lambda i, j, s: (i, j, 0))]),
        out_specs=[
            pl.BlockSpec((None, None, None, rows, h), lambda i, j, s: (i, j, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, kh, s2, rows, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, s2, rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxkv_sparse_decode",
    )(lengths.astype(jnp.int32), jnp.minimum(block_counts.astype(jnp.int32), m)[:, :, None], idx, qp, k, v,
      *([] if kv_mask is None else [kv_mask.astype(jnp.int8)]))
    if merge == "pallas":
        return merge_splits_pallas_gpu(o, lse, splits=splits, rows=g, dtype=q.dtype, interpret=interpret)
    out, lse_out = merge_splits(o[:, :, :splits], lse[:, :, :splits])
    return out[:, :, :g].astype(q.dtype), lse_out[:, :, :g]
