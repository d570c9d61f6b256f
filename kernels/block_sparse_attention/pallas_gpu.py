"""Block-sparse attention on the GPU: Pallas with its Triton lowering, forward and backward.

Forward, grid ``(B, N, T / block_q)``: each program holds one query block of one query head in
registers and walks the key blocks its ``BlockPlan`` lists for it: first the full ones (no mask
at all), then the partial ones (``mask.visible`` element by element); empty blocks are never
read. Online softmax in fp32, dots in the input dtype with fp32 accumulation (no TF32 for fp32
inputs). It writes the output and the log-sum-exp (the backward's residual).

Backward (``jax.custom_vjp``): ``delta = rowsum(out * d_out)`` in jnp, then two kernels that
recompute the probabilities from the log-sum-exp: ``dq`` over the same per-query-block lists
(grid ``(B, N, T / block_q)``), and ``dk, dv`` over the transposed lists, per key block and query
head (grid ``(B, N, S / block_k)``); the ``G`` query heads' ``dk, dv`` of a KV head are summed in
jnp afterwards (fp32 ``[B, S, N, H]`` in between: simpler than a reduction across programs).
The log-sum-exp is an output, not differentiated.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxkv.kernels.block_sparse_attention.mask import BlockPlan, MaskSpec, kernel_segments, visible

Array = jax.Array
_NEG = -1e30  # masked scores: finite, so a row with nothing visible makes no NaN
_LOG2E = 1.4426950408889634  # scores are kept in base 2 inside the kernels (exp2 is the native instruction)

__all__ = ["block_sparse_attention_pallas_gpu", "Config"]


@dataclasses.dataclass(frozen=True)
class Config:
    """The static part of one call."""

    spec: MaskSpec
    scale: float
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    interpret: bool


def _scores(q, k, scale, exact):
    """``q . k * scale * log2(e)``: scores in base 2."""
    return plgpu.dot(q, k, trans_b=True, allow_tf32=False if exact else None).astype(jnp.float32) * (scale * _LOG2E)


def _tile_mask(spec, qp, qs, kp_ref, ks_ref, start, block_k):
    kp = kp_ref[pl.ds(start, block_k)]
    ks = ks_ref[pl.ds(start, block_k)]
    return visible(spec, qp[:, None], kp[None, :], qs[:, None], ks[None, :],
                   (start + jnp.arange(block_k))[None, :])


def _fwd_kernel(kvb_ref, nf_ref, np_ref, qp_ref, qs_ref, kp_ref, ks_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                cfg: Config, exact: bool):
    q = q_ref[...]  # [bq, H]
    qp, qs = qp_ref[...], qs_ref[...]
    bq, h = q.shape
    bk = cfg.block_k
    nf = nf_ref[0]
    npart = np_ref[0]

    def step(j, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(kvb_ref[j] * bk, bk)
        s = _scores(q, k_ref[pl.ds(start, bk), :], cfg.scale, exact)  # [bq, bk]
        if masked:
            vis = _tile_mask(cfg.spec, qp, qs, kp_ref, ks_ref, start, bk)
            s = jnp.where(vis, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(vis, p, 0.0)
        alpha = jnp.exp2(m - m_new)
        vb = v_ref[pl.ds(start, bk), :]
        pv = plgpu.dot(p.astype(vb.dtype), vb, allow_tf32=False if exact else None).astype(jnp.float32)
        return alpha[:, None] * acc + pv, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32))
    carry = jax.lax.fori_loop(0, nf, functools.partial(step, masked=False), init)
    acc, m, l = jax.lax.fori_loop(nf, nf + npart, functools.partial(step, masked=True), carry)
    some = l > 0
    o_ref[...] = jnp.where(some[:, None], acc / jnp.where(some, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(some, (m + jnp.log2(jnp.where(some, l, 1.0))) / _LOG2E, -jnp.inf)  # natural log


def _dq_kernel(kvb_ref, nf_ref, np_ref, qp_ref, qs_ref, kp_ref, ks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, cfg: Config, exact: bool):
    q, do = q_ref[...], do_ref[...]
    qp, qs = qp_ref[...], qs_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    bk = cfg.block_k
    tf32 = False if exact else None

    def step(j, dq, masked):
        start = pl.multiple_of(kvb_ref[j] * bk, bk)
        kb, vb = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        p = jnp.exp2(_scores(q, kb, cfg.scale, exact) - lse[:, None])
        if masked:
            p = jnp.where(_tile_mask(cfg.spec, qp, qs, kp_ref, ks_ref, start, bk), p, 0.0)
        dp = plgpu.dot(do, vb, trans_b=True, allow_tf32=tf32).astype(jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(kb.dtype), kb, allow_tf32=tf32).astype(jnp.float32)

    nf, npart = nf_ref[0], np_ref[0]
    dq = jax.lax.fori_loop(0, nf, functools.partial(step, masked=False), jnp.zeros(q.shape, jnp.float32))
    dq = jax.lax.fori_loop(nf, nf + npart, functools.partial(step, masked=True), dq)
    dq_ref[...] = dq * cfg.scale


def _dkv_kernel(qb_ref, nf_ref, np_ref, qp_ref, qs_ref, kp_ref, ks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, cfg: Config, exact: bool):
    kb, vb = k_ref[...], v_ref[...]  # [bk, H]
    bq, bk = cfg.block_q, cfg.block_k
    kstart = pl.program_id(2) * bk
    kp = kp_ref[...]
    ks = ks_ref[...]
    k_index = (kstart + jnp.arange(bk))[None, :]
    tf32 = False if exact else None

    def step(i, carry, masked):
        dk, dv = carry
        start = pl.multiple_of(qb_ref[i] * bq, bq)
        q, do = q_ref[pl.ds(start, bq), :], do_ref[pl.ds(start, bq), :]
        lse, delta = lse_ref[pl.ds(start, bq)], delta_ref[pl.ds(start, bq)]
        p = jnp.exp2(_scores(q, kb, cfg.scale, exact) - lse[:, None])  # [bq, bk]
        if masked:
            qp, qs = qp_ref[pl.ds(start, bq)], qs_ref[pl.ds(start, bq)]
            p = jnp.where(visible(cfg.spec, qp[:, None], kp[None, :], qs[:, None], ks[None, :], k_index), p, 0.0)
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, allow_tf32=tf32).astype(jnp.float32)
        dp = plgpu.dot(do, vb, trans_b=True, allow_tf32=tf32).astype(jnp.float32)
        ds = p * (dp - delta[:, None])
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, allow_tf32=tf32).astype(jnp.float32)
        return dk, dv

    zeros = jnp.zeros(kb.shape, jnp.float32)
    nf, npart = nf_ref[0], np_ref[0]
    carry = jax.lax.fori_loop(0, nf, functools.partial(step, masked=False), (zeros, zeros))
    dk, dv = jax.lax.fori_loop(nf, nf + npart, functools.partial(step, masked=True), carry)
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


def _call(cfg, kernel, grid, in_specs, out_specs, out_shape, name, *args):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                          interpret=cfg.interpret, name=name)(*args)


def _specs(cfg, b, t, s, n, kh, h, hm, *, per_key_block: bool):
    """BlockSpecs of (list, counts, counts, qp, qs, kp, ks, q, k, v) for a grid (B, N, blocks)."""
    rep, g = n // hm, n // kh
    bq, bk = cfg.block_q, cfg.block_k
    width = t // bq if per_key_block else s // bk
    lists = [pl.BlockSpec((None, None, None, width), lambda i, j, x: (i, j // rep, x, 0)),
             pl.BlockSpec((None, None, 1), lambda i, j, x: (i, j // rep, x)),
             pl.BlockSpec((None, None, 1), lambda i, j, x: (i, j // rep, x))]
    if per_key_block:  # the program's key block; every query of the head
        tokens = [pl.BlockSpec((None, t), lambda i, j, x: (i, 0)), pl.BlockSpec((None, t), lambda i, j, x: (i, 0)),
                  pl.BlockSpec((None, bk), lambda i, j, x: (i, x)), pl.BlockSpec((None, bk), lambda i, j, x: (i, x))]
        heads = [pl.BlockSpec((None, t, None, h), lambda i, j, x: (i, 0, j, 0)),
                 pl.BlockSpec((None, bk, None, h), lambda i, j, x: (i, x, j // g, 0)),
                 pl.BlockSpec((None, bk, None, h), lambda i, j, x: (i, x, j // g, 0))]
    else:  # the program's query block; every key of the KV head
        tokens = [pl.BlockSpec((None, bq), lambda i, j, x: (i, x)), pl.BlockSpec((None, bq), lambda i, j, x: (i, x)),
                  pl.BlockSpec((None, s), lambda i, j, x: (i, 0)), pl.BlockSpec((None, s), lambda i, j, x: (i, 0))]
        heads = [pl.BlockSpec((None, bq, None, h), lambda i, j, x: (i, x, j, 0)),
                 pl.BlockSpec((None, s, None, h), lambda i, j, x: (i, 0, j // g, 0)),
                 pl.BlockSpec((None, s, None, h), lambda i, j, x: (i, 0, j // g, 0))]
    return lists + tokens + heads


def _forward(cfg: Config, q, k, v, qp, qs, kp, ks, plan: BlockPlan):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    hm = plan.kv_blocks.shape[1]
    in_specs = _specs(cfg, b, t, s, n, kh, h, hm, per_key_block=False)
    out_specs = [pl.BlockSpec((None, cfg.block_q, None, h), lambda i, j, x: (i, x, j, 0)),
                 pl.BlockSpec((None, None, cfg.block_q), lambda i, j, x: (i, j, x))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, exact=q.dtype == jnp.float32)
    return _call(cfg, kernel, (b, n, t // cfg.block_q), in_specs, out_specs, out_shape, "jaxkv_block_sparse_fwd",
                 plan.kv_blocks, plan.n_full, plan.n_partial, qp, qs, kp, ks, q, k, v)


def _backward(cfg: Config, res, cotangents):
    q, k, v, qp, qs, kp, ks, plan, out, lse = res  # `plan`: the backward's own (its blocks may differ)
    cfg = dataclasses.replace(cfg, block_q=plan.block_q, block_k=plan.block_k)
    do = cotangents[0].astype(q.dtype)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    hm = plan.kv_blocks.shape[1]
    exact = q.dtype == jnp.float32
    delta = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), do.astype(jnp.float32))
    lse = jnp.where(jnp.isfinite(lse), lse * _LOG2E, 0.0)  # base 2; rows that see nothing: every p is masked to 0
    extra = [pl.BlockSpec((None, cfg.block_q, None, h), lambda i, j, x: (i, x, j, 0)),  # do
             pl.BlockSpec((None, None, cfg.block_q), lambda i, j, x: (i, j, x)),  # lse
             pl.BlockSpec((None, None, cfg.block_q), lambda i, j, x: (i, j, x))]  # delta
    dq = _call(cfg, functools.partial(_dq_kernel, cfg=cfg, exact=exact), (b, n, t // cfg.block_q),
               _specs(cfg, b, t, s, n, kh, h, hm, per_key_block=False) + extra,
               pl.BlockSpec((None, cfg.block_q, None, h), lambda i, j, x: (i, x, j, 0)),
               jax.ShapeDtypeStruct(q.shape, jnp.float32), "jaxkv_block_sparse_dq",
               plan.kv_blocks, plan.n_full, plan.n_partial, qp, qs, kp, ks, q, k, v, do, lse,
               delta)
    extra = [pl.BlockSpec((None, t, None, h), lambda i, j, x: (i, 0, j, 0)),  # do
             pl.BlockSpec((None, None, t), lambda i, j, x: (i, j, 0)),  # lse
             pl.BlockSpec((None, None, t), lambda i, j, x: (i, j, 0))]  # delta
    per_head = pl.BlockSpec((None, cfg.block_k, None, h), lambda i, j, x: (i, x, j, 0))
    dk, dv = _call(cfg, functools.partial(_dkv_kernel, cfg=cfg, exact=exact), (b, n, s // cfg.block_k),
                   _specs(cfg, b, t, s, n, kh, h, hm, per_key_block=True) + extra, [per_head, per_head],
                   [jax.ShapeDtypeStruct((b, s, n, h), jnp.float32)] * 2, "jaxkv_block_sparse_dkv",
                   plan.q_blocks, plan.nq_full, plan.nq_partial, qp, qs, kp, ks, q, k, v, do,
                   lse, delta)
    g = n // kh
    dk = dk.reshape(b, s, kh, g, h).sum(3).astype(k.dtype)
    dv = dv.reshape(b, s, kh, g, h).sum(3).astype(v.dtype)
    return dq.astype(q.dtype), dk, dv, None, None, None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, qp, qs, kp, ks, plan, plan_bwd):
    return tuple(_forward(cfg, q, k, v, qp, qs, kp, ks, plan))


def _attention_fwd(cfg, q, k, v, qp, qs, kp, ks, plan, plan_bwd):
    out, lse = _forward(cfg, q, k, v, qp, qs, kp, ks, plan)
    return (out, lse), (q, k, v, qp, qs, kp, ks, plan_bwd, out, lse)


_attention.defvjp(_attention_fwd, _backward)


def block_sparse_attention_pallas_gpu(q: Array, k: Array, v: Array, q_positions: Array, k_positions: Array,
                                      plan: BlockPlan, *, mask: MaskSpec, q_segments: Array | None = None,
                                      k_segments: Array | None = None, scale: float | None = None,
                                      backward_plan: BlockPlan | None = None, num_warps: int = 4,
                                      num_stages: int = 3, interpret: bool = False) -> tuple[Array, Array]:
    """``(out [B, T, N, H], lse [B, N, T])`` over a ``plan`` made for these positions and segment
    ids with the same ``mask`` (and ``backward_plan``, the same mask in the backward's blocks;
    default: ``plan``); ``T`` and ``S`` multiples of both plans' blocks (``api`` pads)."""
    h = q.shape[-1]
    mask, qs, ks = kernel_segments(mask, q_positions, k_positions, q_segments, k_segments)
    cfg = Config(spec=mask, scale=h ** -0.5 if scale is None else float(scale), block_q=plan.block_q,
                 block_k=plan.block_k, num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return _attention(cfg, q, k, v, q_positions.astype(jnp.int32), qs, k_positions.astype(jnp.int32), ks, plan,
                      plan if backward_plan is None else backward_plan)
