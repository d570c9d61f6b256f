"""Block-sparse attention on the TPU: Pallas with its Mosaic lowering, the forward.

The grid is ``(B, N, query blocks, key-block list)``. The block plan's lists (``kv_blocks``,
``n_full``, ``n_partial``) are prefetched scalars, so the index maps of ``k, v`` and of the key
positions read the key block each step lists. The pipeline copies exactly the listed blocks
into VMEM; an empty block is never read. A padding entry of a list maps to the last real block,
which is already in VMEM, and its step is skipped. Full blocks take no mask. Partial blocks
apply ``mask.visible`` (rules 1-4) element by element, from the positions and segment ids: a
column ``[block_q, 1]`` for the queries and a row ``[1, block_k]`` for the keys. The selection
(rule 5) is in the plan already, whole blocks at a time. An online softmax over the listed
blocks lives in VMEM scratch; the output and the log-sum-exp are written at the last step (a
query that sees no key: out 0, lse -inf). The tensors go in head-major, ``q [B, N, T, H]``,
``k, v [B, K, S, H]``.

The backward is the api's (``jax.vjp`` of the dense reference: exact, but ``O(T x S)`` in
memory; a TPU backward kernel is still to be written).

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

from jaxkv.kernels.block_sparse_attention.mask import BlockPlan, MaskSpec, visible
from jaxkv.kernels.tpu_softmax import softmax_finish, softmax_init, softmax_step

Array = jax.Array
__all__ = ["block_sparse_attention_pallas_tpu"]


def _mask_head(hm: int, n: int, kh: int):
    """The plan's head for query head ``n``: its only one, its KV head's, or its own."""
    if hm == 1:
        return lambda h: 0
    if hm == kh:
        return lambda h: h // (n // kh)
    return lambda h: h


def _kernel(kvb_ref, nf_ref, np_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, o_ref, lse_ref,
            m_scr, l_scr, acc_scr, *, spec: MaskSpec, segments: bool, head, block_k: int, scale: float,
            exact: bool):
    b, n, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    hm = head(n)
    n_full = nf_ref[b, hm, i]
    count = n_full + np_ref[b, hm, i]

    @pl.when(j == 0)
    def _():
        softmax_init(m_scr, l_scr, acc_scr)

    @pl.when(j < count)
    def _():
        dtype = jnp.float32 if exact else q_ref.dtype
        prec = jax.lax.Precision.HIGHEST if exact else None
        s = jax.lax.dot_general(q_ref[...].astype(dtype), k_ref[...].astype(dtype), (((1,), (1,)), ((), ())),
                                precision=prec, preferred_element_type=jnp.float32) * scale  # [bq, bk]
        blk = kvb_ref[b, hm, i, j]
        k_index = blk * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, s.shape[1]), 1)
        seen = visible(spec, qp_ref[...], kp_ref[...], qs_ref[...] if segments else None,
                       ks_ref[...] if segments else None, k_index)
        s = jnp.where(seen | (j < n_full), s, -jnp.inf)  # full blocks: every pair visible
        softmax_step(s, v_ref[...], m_scr, l_scr, acc_scr, dtype=dtype, precision=prec)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        softmax_finish(o_ref, lse_ref, m_scr, l_scr, acc_scr)


@functools.partial(jax.jit, static_argnames=("mask", "scale", "interpret"))
def block_sparse_attention_pallas_tpu(q: Array, k: Array, v: Array, q_positions: Array, k_positions: Array,
                                      plan: BlockPlan, *, mask: MaskSpec, q_segments: Array | None = None,
                                      k_segments: Array | None = None, scale: float | None = None,
                                      interpret: bool = False) -> tuple[Array, Array]:
    """``(out [B, T, N, H] in q's dtype, lse [B, N, T] fp32)`` over inputs padded to whole
    blocks of ``plan`` (as the api pads them). ``plan.block_q`` is a multiple of 8 and
    ``plan.block_k`` of 128 to lower for a TPU (the key rows' blocks ``[1, block_k]`` fill whole
    lane tiles). Not differentiable by itself: the api gives it the reference's backward."""
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    bq, bk = plan.block_q, plan.block_k
    nq, nk = t // bq, s_len // bk
    hm = plan.kv_blocks.shape[1]
    head = _mask_head(hm, n, kh)
    g = n // kh
    scale = h ** -0.5 if scale is None else float(scale)
    segments = q_segments is not None
    qs = (q_segments if segments else jnp.zeros((b, t), jnp.int32)).astype(jnp.int32)[:, :, None]
    ks = (k_segments if segments else jnp.zeros((b, s_len), jnp.int32)).astype(jnp.int32)[:, None, :]
    kvb = plan.kv_blocks.astype(jnp.int32)
    nf, npart = plan.n_full.astype(jnp.int32), plan.n_partial.astype(jnp.int32)

    def key_block(bi, ni, qi, ji, kvb_ref, nf_ref, np_ref):
        hi = head(ni)
        last = jnp.maximum(nf_ref[bi, hi, qi] + np_ref[bi, hi, qi] - 1, 0)
        return kvb_ref[bi, hi, qi, jnp.minimum(ji, last)]

    qmap = lambda bi, ni, qi, ji, *_: (bi, ni, qi, 0)  # noqa: E731
    kvmap = lambda bi, ni, qi, ji, *refs: (bi, ni // g, key_block(bi, ni, qi, ji, *refs), 0)  # noqa: E731
    qcol = lambda bi, ni, qi, ji, *_: (bi, qi, 0)  # noqa: E731
    krow = lambda bi, ni, qi, ji, *refs: (bi, 0, key_block(bi, ni, qi, ji, *refs))  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, n, nq, nk),
        in_specs=[pl.BlockSpec((None, None, bq, h), qmap), pl.BlockSpec((None, None, bk, h), kvmap),
                  pl.BlockSpec((None, None, bk, h), kvmap), pl.BlockSpec((None, bq, 1), qcol),
                  pl.BlockSpec((None, 1, bk), krow), pl.BlockSpec((None, bq, 1), qcol),
                  pl.BlockSpec((None, 1, bk), krow)],
        out_specs=[pl.BlockSpec((None, None, bq, h), qmap), pl.BlockSpec((None, None, bq, 1), qmap)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, h), jnp.float32)],
    )
    hmaj = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  token-major -> head-major
    out, lse = pl.pallas_call(
        functools.partial(_kernel, spec=mask, segments=segments, head=head, block_k=bk, scale=scale,
                          exact=q.dtype == jnp.float32),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, n, t, h), q.dtype), jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxkv_block_sparse_attention_tpu",
    )(kvb, nf, npart, hmaj(q), hmaj(k), hmaj(v), q_positions.astype(jnp.int32)[:, :, None],
      k_positions.astype(jnp.int32)[:, None, :], qs, ks)
    return hmaj(out), lse[..., 0]
