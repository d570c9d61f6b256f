"""Quantized decode attention on the GPU: Pallas with its Triton lowering, reading packed codes.

Split-K flash decoding as in ``sparse_decode.pallas_gpu`` (grid ``(B, K, splits)``, GQA query
heads packed and padded to 16 rows, online softmax, log-sum-exp merge in jnp), but each block of
``block_size`` tokens is loaded as its packed ``uint8`` codes and per-token float16 scale and
zero, and never dequantized to a ``[bs, H]`` tensor. With ``per = 8 // bits`` codes a byte,
channel ``h = j * per + i`` sits at code ``i`` of byte ``j``; so the query is split by ``i``
into ``per`` sub-vectors of ``H / per`` channels, and per token

    q . k = k_scale * sum_i (q_i . codes_i) + k_zero * sum(q)
    p @ v = sum over tokens of (p * v_scale) codes_i (for each i)  +  sum(p * v_zero)

each ``codes_i = (byte >> i * bits) & mask`` a shift and a mask in registers and each sum a
``dot`` over ``H / per`` channels. The partial outputs per ``i`` are interleaved back into
``H`` channels once, after the kernel. (Interleaving the codes into one ``[bs, H]`` tile in
registers for one ``dot`` a block, via Triton's ``join``, was tried and dropped: 1.2-1.6x slower
on an H100, and wrong for 2- and 3-bit codes in bf16 once compiled; BENCHMARKS.md.)
Same result as ``reference.quantized_decode_reference``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxkv.kernels.splitk import default_blocks_per_split, merge_splits

Array = jax.Array
_NEG = -1e30  # finite: a program with nothing visible makes no NaN
_MIN_ROWS = 16  # tl.dot's smallest M


def _kernel(q_ref, qsum_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, pos_ref, o_ref, lse_ref, *,
            bits: int, block_size: int, blocks_per_split: int, scale: float, exact: bool):
    per = q_ref.shape[0]
    split = pl.program_id(2)
    n_blocks = kc_ref.shape[0] // block_size
    first = split * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, n_blocks)
    mask = (1 << bits) - 1
    dt = q_ref.dtype  # fp32 (exact), else the query's 16-bit type: codes < 256 are exact in either
    allow_tf32 = False if exact else None
    qs = [q_ref[i].astype(dt) for i in range(per)]  # [Gp, H / per] each
    qsum = qsum_ref[...]  # [Gp] fp32
    rows, hs = qs[0].shape

    def codes(ref, start):
        packed = ref[pl.ds(start, block_size), :].astype(jnp.int32)  # [bs, H / per]
        return [((packed >> (i * bits)) & mask).astype(dt) for i in range(per)]

    def body(j, carry):
        accs, zacc, m, l = carry
        start = pl.multiple_of(j * block_size, block_size)
        kcs = codes(kc_ref, start)
        raw = sum(plgpu.dot(qs[i], kcs[i], trans_b=True, allow_tf32=allow_tf32).astype(jnp.float32)
                  for i in range(per))  # [Gp, bs]
        k_scale = ks_ref[pl.ds(start, block_size)].astype(jnp.float32)
        k_zero = kz_ref[pl.ds(start, block_size)].astype(jnp.float32)
        s = (raw * k_scale[None, :] + qsum[:, None] * k_zero[None, :]) * scale
        seen = (pos_ref[pl.ds(start, block_size)] >= 0)[None, :]
        s = jnp.where(seen, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(seen, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        v_scale = vs_ref[pl.ds(start, block_size)].astype(jnp.float32)
        v_zero = vz_ref[pl.ds(start, block_size)].astype(jnp.float32)
        pw = (p * v_scale[None, :]).astype(dt)
        vcs = codes(vc_ref, start)
        accs = tuple(alpha[:, None] * accs[i] + plgpu.dot(pw, vcs[i], allow_tf32=allow_tf32).astype(jnp.float32)
                     for i in range(per))
        zacc = alpha * zacc + jnp.sum(p * v_zero[None, :], axis=1)
        return accs, zacc, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (tuple(jnp.zeros((rows, hs), jnp.float32) for _ in range(per)), jnp.zeros((rows,), jnp.float32),
            jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32))
    accs, zacc, m, l = jax.lax.fori_loop(first, jnp.maximum(last, first), body, init)
    some = l > 0
    inv = 1.0 / jnp.where(some, l, 1.0)
    for i in range(per):
        o_ref[i] = jnp.where(some[:, None], (accs[i] + zacc[:, None]) * inv[:, None], 0.0)
    lse_ref[...] = jnp.where(some, m + jnp.log(jnp.where(some, l, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("bits", "block_size", "scale", "blocks_per_split", "num_warps",
                                             "num_stages", "interpret"))
def quantized_decode_pallas_gpu(q: Array, k_codes: Array, k_scale: Array, k_zero: Array, v_codes: Array,
                                v_scale: Array, v_zero: Array, kv_positions: Array, *, bits: int,
                                block_size: int = 64, scale: float | None = None,
                                blocks_per_split: int | None = None, num_warps: int = 4, num_stages: int = 2,
                                interpret: bool = False) -> tuple[Array, Array]:
    """``(out [B, K, G, H], lse [B, K, G])``: see ``reference.quantized_decode_reference``.
    The cache's slots must be a multiple of ``block_size``."""
    b, kh, g, h = q.shape
    s_len, hs = k_codes.shape[2], k_codes.shape[3]
    per = 8 // bits
    if h % per:
        raise ValueError(f"quantized_decode_pallas_gpu: head_dim ({h}) must be a multiple of {per} (whole bytes of "
                         f"{bits}-bit codes); the reference and the TPU kernel take any head_dim")
    scale = h ** -0.5 if scale is None else float(scale)
    n_blocks = s_len // block_size
    bps = blocks_per_split or default_blocks_per_split(b, kh, n_blocks)
    splits = max(1, -(-n_blocks // bps))
    rows = max(_MIN_ROWS, 1 << (g - 1).bit_length())
    qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    qsum = jnp.sum(qf, axis=-1)  # [B, K, Gp]
    q_split = jnp.moveaxis(qf.reshape(b, kh, rows, hs, per), -1, 2)  # [B, K, per, Gp, H / per]
    q_split = q_split.astype(q.dtype if q.dtype in (jnp.float32, jnp.float16) else jnp.bfloat16)
    per_token = lambda: pl.BlockSpec((None, None, s_len), lambda i, j, t: (i, j, 0))  # noqa: E731
    packed = lambda: pl.BlockSpec((None, None, s_len, hs), lambda i, j, t: (i, j, 0, 0))  # noqa: E731
    kernel = functools.partial(_kernel, bits=bits, block_size=block_size, blocks_per_split=bps, scale=scale,
                               exact=q.dtype == jnp.float32)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kh, splits),
        in_specs=[
            pl.BlockSpec((None, None, per, rows, hs), lambda i, j, t: (i, j, 0, 0, 0)),  # q by code index
            pl.BlockSpec((None, None, rows), lambda i, j, t: (i, j, 0)),  # sum(q)
            packed(), per_token(), per_token(),  # k codes, scale, zero
            packed(), per_token(), per_token(),  # v codes, scale, zero
            per_token(),  # kv positions
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, per, rows, hs), lambda i, j, t: (i, j, t, 0, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, t: (i, j, t, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, kh, splits, per, rows, hs), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, splits, rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxkv_quantized_decode",
    )(q_split, qsum, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, kv_positions.astype(jnp.int32))
    o = jnp.moveaxis(o, 3, -1).reshape(b, kh, splits, rows, h)  # channel j * per + i
    out, lse_out = merge_splits(o, lse)
    return out[:, :, :g].astype(q.dtype), lse_out[:, :, :g]
