"""Quantized decode on the TPU: Pallas with its Mosaic lowering.

The grid is ``(B, K, S / block_size)``: one (row, KV head) pair per parallel step and the cache's
blocks as the sequential axis, with an online softmax in VMEM scratch. The kernel reads the
packed ``uint8`` codes and never writes dequantized keys or values. A byte holds ``per = 8 //
bits`` codes: channel ``h`` sits in byte ``h // per`` at code ``h % per``. Unpacking a block
to ``[block, H]`` would interleave lanes, so the kernel works per code position ``i`` instead:

    q . k_s   = k_scale_s * sum_i q[i::per] . code_i(k_s) + k_zero_s * sum(q)
    out[i::per] = (p * v_scale) @ code_i(v) + p . v_zero

``q`` comes in split by code position, as rows ``[per x G, H / per]``; the output goes out the
same way and is interleaved back outside. The per-token scales, zeros and positions travel as
rows ``[B, K, 1, S]``, so their blocks are whole lane tiles. Codes are widened to int32 for the
shifts, then cast to the dot's dtype (fp32 for an fp32 query, else the query's).

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
__all__ = ["quantized_decode_pallas_tpu"]


def _kernel(q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, pos_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr,
            *, bits: int, g: int, scale: float, exact: bool):
    step = pl.program_id(2)
    per = 8 // bits
    mask = (1 << bits) - 1
    dtype = jnp.float32 if exact else q_ref.dtype
    prec = jax.lax.Precision.HIGHEST if exact else None

    @pl.when(step == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    kc, vc = kc_ref[...].astype(jnp.int32), vc_ref[...].astype(jnp.int32)  # [bs, H / per]
    qs = q_ref[...].astype(jnp.float32)  # [per * G, H / per], rows (code position, head)
    dots = jnp.zeros((g, kc.shape[0]), jnp.float32)
    qsum = jnp.zeros((g, 1), jnp.float32)
    for i in range(per):
        qi = qs[i * g:(i + 1) * g]
        code = ((kc >> (i * bits)) & mask).astype(dtype)
        dots = dots + jax.lax.dot_general(qi.astype(dtype), code, (((1,), (1,)), ((), ())), precision=prec,
                                          preferred_element_type=jnp.float32)
        qsum = qsum + jnp.sum(qi, axis=1, keepdims=True)
    ks, kz = ks_ref[...].astype(jnp.float32), kz_ref[...].astype(jnp.float32)  # [1, bs]
    s = (dots * ks + qsum * kz) * scale
    s = jnp.where(pos_ref[...] >= 0, s, -jnp.inf)
    m_old = m_scr[...]
    m_new = jnp.maximum(m_old, jnp.max(s, axis=1, keepdims=True))
    safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_old - safe)
    p = jnp.exp(s - safe)  # [G, bs]
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = (p * vs_ref[...].astype(jnp.float32)).astype(dtype)
    pz = jnp.sum(p * vz_ref[...].astype(jnp.float32), axis=1, keepdims=True)  # [G, 1]
    for i in range(per):
        code = ((vc >> (i * bits)) & mask).astype(dtype)
        part = jax.lax.dot_general(pv, code, (((1,), (0,)), ((), ())), precision=prec,
                                   preferred_element_type=jnp.float32) + pz
        acc_scr[i * g:(i + 1) * g, :] = alpha * acc_scr[i * g:(i + 1) * g, :] + part
    m_scr[...] = m_new

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        l = l_scr[...]
        seen = l > 0
        inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        for i in range(per):
            o_ref[i * g:(i + 1) * g, :] = (acc_scr[i * g:(i + 1) * g, :] * inv).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("bits", "scale", "block_size", "interpret"))
def quantized_decode_pallas_tpu(q: Array, k_codes: Array, k_scale: Array, k_zero: Array, v_codes: Array,
                                v_scale: Array, v_zero: Array, kv_positions: Array, *, bits: int,
                                scale: float | None = None, block_size: int = 128, interpret: bool = False
                                ) -> tuple[Array, Array]:
    """``(out [B, K, G, H] in q's dtype, lse [B, K, G] fp32)``, the reference's contract.
    ``block_size`` (slots per block) divides the cache's slots and is a multiple of 8, and of
    128 to lower for a TPU (the per-token rows' blocks ``[1, block_size]`` must fill whole lane
    tiles). ``interpret``: run in the TPU interpreter on any backend."""
    b, kh, g, h = q.shape
    s_len, hs = k_codes.shape[2], k_codes.shape[3]
    per = 8 // bits
    if block_size % 8 or s_len % block_size:
        raise ValueError(f"block_size ({block_size}) must be a multiple of 8 dividing the cache's {s_len} slots")
    scale = h ** -0.5 if scale is None else float(scale)
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, hs * per - h)))  # channels past H: zero
    q_split = jnp.moveaxis(qp.reshape(b, kh, g, hs, per), 4, 2).reshape(b, kh, per * g, hs)  # rows (i, g)
    row = lambda a: a[:, :, None, :]  # noqa: E731  [B, K, S] -> [B, K, 1, S]
    head = pl.BlockSpec((None, None, per * g, hs), lambda i, j, c: (i, j, 0, 0))
    codes = pl.BlockSpec((None, None, block_size, hs), lambda i, j, c: (i, j, c, 0))
    tok = pl.BlockSpec((None, None, 1, block_size), lambda i, j, c: (i, j, 0, c))
    out, lse = pl.pallas_call(
        functools.partial(_kernel, bits=bits, g=g, scale=scale, exact=q.dtype == jnp.float32),
        grid=(b, kh, s_len // block_size),
        in_specs=[head, codes, tok, tok, codes, tok, tok, tok],
        out_specs=[head, pl.BlockSpec((None, None, g, 1), lambda i, j, c: (i, j, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kh, per * g, hs), q.dtype), jax.ShapeDtypeStruct((b, kh, g, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((g, 1), jnp.float32), pltpu.VMEM((g, 1), jnp.float32),
                        pltpu.VMEM((per * g, hs), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxkv_quantized_decode_tpu",
    )(q_split, k_codes, row(k_scale), row(k_zero), v_codes, row(v_scale), row(v_zero),
      row(kv_positions.astype(jnp.int32)))
    out = jnp.moveaxis(out.reshape(b, kh, per, g, hs), 2, 4).reshape(b, kh, g, hs * per)[..., :h]
    return out, lse[..., 0]
