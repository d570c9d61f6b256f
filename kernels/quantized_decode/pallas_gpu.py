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

Unpacking: at 2, 3 and 4 bits with a 16-bit query (compiled, not interpreted) the codes of four
bytes become 16-bit floats in packed registers by inline PTX, two values an instruction: a byte
permute spreads two bytes into the halves of a 32-bit word, one ``lop3`` takes a code's bits and
ORs in the exponent of 128 (bf16) or 1024 (fp16), and one ``fma.rn.{bf16,f16}x2`` subtracts that
offset, exactly (``unpack="ptx"``): 1.5 to 2 instructions a code, where a shift, a mask, an
int-to-float and a float-to-16-bit conversion one value at a time take four or more
(``unpack="shift"``, also the interpret-mode, fp32 and 8-bit path). Same result as
``reference.quantized_decode_reference``; ``tests`` run the PTX programs through a small
emulator on the CPU and the kernel against ``"shift"`` on the GPU (bit for bit). On an H100 at
128k tokens it took the kernel from 500 to 369 µs at INT4 and from 479 to 344 µs at INT2, and
3 pipeline stages then to 358 and 328 (BENCHMARKS.md), so both are the defaults.
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


_PTX_FLOAT = {  # (offset's bit pattern in each 16-bit half, fma type, 1.0 pair, -offset pair)
    jnp.dtype(jnp.bfloat16): (0x43004300, "bf16x2", 0x3F803F80, 0xC300C300),  # 128 + c, c < 128
    jnp.dtype(jnp.float16): (0x64006400, "f16x2", 0x3C003C00, 0xE400E400),  # 1024 + c, c < 1024
}


def ptx_program(bits: int, dtype, index: int) -> str:
    """The inline PTX that turns four packed bytes (``$2``) into code ``index`` of each, as two
    32-bit words of two ``dtype`` values (``$0``: bytes 0 and 1, ``$1``: bytes 2 and 3; the low
    half holds the lower byte's)."""
    magic, kind, one, neg = _PTX_FLOAT[jnp.dtype(dtype)]
    field = (1 << bits) - 1
    lines = ["{", ".reg .b32 t, u, one, neg;", f"mov.b32 one, {one:#x};", f"mov.b32 neg, {neg:#x};"]
    for r, sel in enumerate(("0x4140", "0x4342")):  # bytes 0, 1 (then 2, 3) -> the low byte of each half
        lines.append(f"prmt.b32 t, $2, 0, {sel};")
        if index:
            lines.append(f"shr.b32 t, t, {index * bits};")
        # (t & the field in each half) | magic: lop3's table for (a & b) | c is 0xEA
        lines.append(f"lop3.b32 u, t, {field | field << 16:#x}, {magic:#x}, 0xEA;")
        lines.append(f"fma.rn.{kind} ${r}, u, one, neg;")
    lines.append("}")
    return "\n".join(lines)


def _ptx_unpack(packed: Array, bits: int, dtype) -> list[Array]:
    """The ``8 // bits`` code tiles of ``packed`` (``uint8``) as ``dtype`` (bf16 or fp16), by
    ``ptx_program`` on packed registers. One asm per code index: Pallas lowers an asm of one
    result only."""
    return [plgpu.elementwise_inline_asm(ptx_program(bits, dtype, i), args=[packed], constraints="=r,=r,r",
                                         pack=4, result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, dtype)])[0]
            for i in range(8 // bits)]


def _kernel(q_ref, qsum_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, pos_ref, o_ref, lse_ref, *,
            bits: int, block_size: int, blocks_per_split: int, scale: float, exact: bool, ptx: bool):
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
        packed = ref[pl.ds(start, block_size), :]  # [bs, H / per] uint8
        if ptx:
            return _ptx_unpack(packed, bits, dt)
        packed = packed.astype(jnp.int32)
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
                                             "num_stages", "unpack", "interpret"))
def quantized_decode_pallas_gpu(q: Array, k_codes: Array, k_scale: Array, k_zero: Array, v_codes: Array,
                                v_scale: Array, v_zero: Array, kv_positions: Array, *, bits: int,
                                block_size: int = 64, scale: float | None = None,
                                blocks_per_split: int | None = None, num_warps: int = 4, num_stages: int = 3,
                                unpack: str = "auto", interpret: bool = False) -> tuple[Array, Array]:
    """``(out [B, K, G, H], lse [B, K, G])``: see ``reference.quantized_decode_reference``.
    The cache's slots must be a multiple of ``block_size``. ``unpack``: ``"auto"`` (the default:
    PTX where it applies, compiled at 2-4 bits with a bf16 or fp16 query), ``"ptx"`` or
    ``"shift"``; see the module docstring."""
    b, kh, g, h = q.shape
    s_len, hs = k_codes.shape[2], k_codes.shape[3]
    per = 8 // bits
    if h % per:
        raise ValueError(f"quantized_decode_pallas_gpu: head_dim ({h}) must be a multiple of {per} (whole bytes of "
                         f"{bits}-bit codes); the reference and the TPU kernel take any head_dim")
    ptx_ok = not interpret and bits <= 4 and jnp.dtype(q.dtype) in _PTX_FLOAT
    if unpack not in ("auto", "ptx", "shift"):
        raise ValueError(f"unpack must be 'auto', 'ptx' or 'shift', got {unpack!r}")
    if unpack == "ptx" and not ptx_ok:
        raise ValueError(f"unpack='ptx' needs a compiled kernel (not interpret), bits of 2-4 (got {bits}) and a "
                         f"bfloat16 or float16 query (got {q.dtype})")
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
                               exact=q.dtype == jnp.float32, ptx=ptx_ok and unpack != "shift")
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
