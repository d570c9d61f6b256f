"""Sparse decode on the TPU: Pallas with its Mosaic lowering.

The grid is ``(B, K, M)``: one (row, KV head) pair per parallel step, and the listed blocks as
the sequential axis. ``block_indices``, ``block_counts`` and ``lengths`` are prefetched
scalars (SMEM), so the index map of ``k, v`` reads each step's block number and the pipeline
fetches exactly the listed blocks of the head-major cache, in place. A padding entry of the
list (``m >= count``) maps to the last real block, which is already in VMEM (no new copy), and
its step is skipped. The online softmax (running max, sum and output of the ``G`` query heads
of the KV head) lives in VMEM scratch across the blocks and is written at the last one:
``out [G, H]`` and ``lse [G]`` (-inf, out 0, when no slot is visible). Slots at or past the
row's length are masked inside their block, and so are the slots a ``kv_mask`` leaves out (read
as ``[B, K, S / bs, 1, bs]`` int32, each listed block's mask row fetched beside its keys).

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

from jaxkv.kernels.tpu_softmax import softmax_finish, softmax_init, softmax_step

Array = jax.Array
__all__ = ["sparse_decode_pallas_tpu"]


def _kernel(idx_ref, cnt_ref, len_ref, q_ref, k_ref, v_ref, *refs, block_size: int, scale: float, exact: bool):
    mask_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs if len(refs) == 6 else (None, *refs)
    b, kh, m = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    count = cnt_ref[b, kh]

    @pl.when(m == 0)
    def _():
        softmax_init(m_scr, l_scr, acc_scr)

    @pl.when(m < count)
    def _():
        dtype = jnp.float32 if exact else q_ref.dtype
        prec = jax.lax.Precision.HIGHEST if exact else None
        s = jax.lax.dot_general(q_ref[...].astype(dtype), k_ref[...].astype(dtype), (((1,), (1,)), ((), ())),
                                precision=prec, preferred_element_type=jnp.float32) * scale  # [G, bs]
        slot = idx_ref[b, kh, m] * block_size + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        seen = slot < len_ref[b]
        if mask_ref is not None:
            seen = seen & (mask_ref[...] != 0)  # [1, bs] against [G, bs]
        s = jnp.where(seen, s, -jnp.inf)
        softmax_step(s, v_ref[...], m_scr, l_scr, acc_scr, dtype=dtype, precision=prec)

    @pl.when(m == pl.num_programs(2) - 1)
    def _():
        softmax_finish(o_ref, lse_ref, m_scr, l_scr, acc_scr)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "interpret"))
def sparse_decode_pallas_tpu(q: Array, k: Array, v: Array, lengths: Array, block_indices: Array,
                             block_counts: Array, *, block_size: int, scale: float | None = None,
                             interpret: bool = False, kv_mask: Array | None = None) -> tuple[Array, Array]:
    """``(out [B, K, G, H] in q's dtype, lse [B, K, G] fp32)``, the reference's contract.
    ``block_size`` must be a multiple of 8 (a whole number of sublane tiles). ``interpret``: run
    in the TPU interpreter on any backend."""
    b, kh, g, h = q.shape
    m = block_indices.shape[-1]
    if block_size % 8:
        raise ValueError(f"block_size must be a multiple of 8 for the TPU kernel, got {block_size}")
    scale = h ** -0.5 if scale is None else float(scale)
    # in bounds whatever the padding holds: a head with no block still fetches one (never attended)
    idx = jnp.clip(block_indices.astype(jnp.int32), 0, k.shape[2] // block_size - 1)
    cnt = jnp.minimum(block_counts.astype(jnp.int32), m)

    def kv_map(bi, ki, mi, idx_ref, cnt_ref, len_ref):
        last = jnp.maximum(cnt_ref[bi, ki] - 1, 0)  # padding entries: the last real block again (no copy)
        return bi, ki, idx_ref[bi, ki, jnp.minimum(mi, last)], 0

    def mask_map(bi, ki, mi, idx_ref, cnt_ref, len_ref):
        return kv_map(bi, ki, mi, idx_ref, cnt_ref, len_ref)[:3] + (0, 0)

    head = lambda bi, ki, mi, *_: (bi, ki, 0, 0)  # noqa: E731
    masks = [] if kv_mask is None else [pl.BlockSpec((None, None, None, 1, block_size), mask_map)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, kh, m),
        in_specs=[pl.BlockSpec((None, None, g, h), head),
                  pl.BlockSpec((None, None, block_size, h), kv_map),
                  pl.BlockSpec((None, None, block_size, h), kv_map)] + masks,
        out_specs=[pl.BlockSpec((None, None, g, h), head), pl.BlockSpec((None, None, g, 1), head)],
        scratch_shapes=[pltpu.VMEM((g, 1), jnp.float32), pltpu.VMEM((g, 1), jnp.float32),
                        pltpu.VMEM((g, h), jnp.float32)],
    )
    out, lse = pl.pallas_call(
        functools.partial(_kernel, block_size=block_size, scale=scale, exact=q.dtype == jnp.float32),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, kh, g, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxkv_sparse_decode_tpu",
    )(idx, cnt, lengths.astype(jnp.int32), q, k, v,
      *([] if kv_mask is None else [kv_mask.astype(jnp.int32).reshape(b, kh, -1, 1, block_size)]))
    return out, lse[..., 0]
