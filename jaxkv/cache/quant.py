"""Low-bit storage for caches: asymmetric round-to-nearest quantization, packed into bytes.

Bytes must be honest below one byte: an ``ml_dtypes`` int4/int2 array still spends a whole byte
per value, so it saves nothing. Here ``bits``-bit codes (``bits`` in 1..8) are packed
``8 // bits`` to a ``uint8`` along the last axis (3-bit codes use 2 per byte, the densest
layout that keeps codes inside one byte and the unpack a shift and a mask): a ``[..., H]`` tensor
at 2 bits is stored as ``[..., ceil(H / 4)]`` bytes, and ``nbytes`` counts exactly that.

``quantize(x, bits, axis)`` computes a scale and zero point per slice along ``axis`` (per token:
the head dim; per channel: the token axis), ``scale = (max - min) / (2^bits - 1)``, ``zero =
min``, codes ``round((x - min) / scale)`` clipped to ``[0, 2^bits - 1]``; ``dequantize``
inverts it, within half a step of the original. Everything is jit-able with static ``bits``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import struct

from jaxkv.errors import UserError
from jaxkv.typing import Array

__all__ = ["codes_per_byte", "packed_length", "pack", "unpack", "Quantized", "quantize", "dequantize"]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise UserError(f"bits must be an integer in [1, 8], got {bits!r}")


def codes_per_byte(bits: int) -> int:
    """How many ``bits``-bit codes one byte holds in the packed layout."""
    _check_bits(bits)
    return 8 // bits


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take along the packed axis."""
    return math.ceil(n / codes_per_byte(bits))


def pack(codes: Array, bits: int) -> Array:
    """``uint8`` codes in ``[0, 2^bits)`` along the last axis -> packed ``uint8`` bytes.

    Code ``i`` of a byte sits at bit ``i * bits`` (little-endian within the byte); a last axis
    that is not a multiple of ``codes_per_byte`` is padded with zero codes."""
    per = codes_per_byte(bits)
    n = codes.shape[-1]
    pad = packed_length(n, bits) * per - n
    c = jnp.pad(codes.astype(jnp.uint8), [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    c = c.reshape(c.shape[:-1] + (c.shape[-1] // per, per))
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    # the codes occupy disjoint bits, so their sum is their bitwise or
    return jnp.sum(jnp.left_shift(c, shifts).astype(jnp.uint32), axis=-1).astype(jnp.uint8)


def unpack(packed: Array, bits: int, n: int) -> Array:
    """The inverse of ``pack``: ``n`` ``uint8`` codes along the last axis."""
    per = codes_per_byte(bits)
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    mask = jnp.uint8((1 << bits) - 1)
    c = jnp.bitwise_and(jnp.right_shift(packed[..., None], shifts), mask)
    return c.reshape(packed.shape[:-1] + (packed.shape[-1] * per,))[..., :n]


@struct.dataclass
class Quantized:
    """Packed codes plus the per-slice scale and zero point that decode them.

    ``codes`` is ``uint8`` with the packed axis last; ``scale`` and ``zero`` keep the reduced
    ``axis`` with size 1 (so they broadcast back). ``bits``, ``n`` (values along the packed
    axis) and ``axis`` are static."""

    codes: Array
    scale: Array
    zero: Array
    bits: int = struct.field(pytree_node=False)
    n: int = struct.field(pytree_node=False)
    axis: int = struct.field(pytree_node=False)

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in (self.codes, self.scale, self.zero))


def quantize(x: Array, bits: int, *, axis: int = -1, scale_dtype=jnp.float16) -> Quantized:
    """Asymmetric round-to-nearest ``bits``-bit quantization of ``x`` with one scale and zero per
    slice along ``axis`` (the values sharing a scale); packed along the last axis. Scale and
    zero are stored in ``scale_dtype`` (float16, as KIVI and MiKV keep them; bfloat16's 8-bit
    mantissa is too coarse for 8-bit codes)."""
    _check_bits(bits)
    axis = axis % x.ndim
    xf = x.astype(jnp.float32)
    lo = jnp.min(xf, axis=axis, keepdims=True)
    hi = jnp.max(xf, axis=axis, keepdims=True)
    levels = (1 << bits) - 1
    # codes are computed against the stored (rounded) zero and scale, the scale from the rounded
    # zero, so dequantize reproduces every value within about half a step
    zero = lo.astype(scale_dtype)
    scale = ((hi - zero.astype(jnp.float32)) / levels).astype(scale_dtype)
    s = jnp.where(scale.astype(jnp.float32) > 0, scale.astype(jnp.float32), 1.0)
    codes = jnp.clip(jnp.round((xf - zero.astype(jnp.float32)) / s), 0, levels).astype(jnp.uint8)
    return Quantized(codes=pack(codes, bits), scale=scale, zero=zero, bits=bits, n=x.shape[-1], axis=axis)


def dequantize(q: Quantized, dtype=jnp.float32) -> Array:
    """The values ``q`` encodes, in ``dtype``."""
    codes = unpack(q.codes, q.bits, q.n).astype(jnp.float32)
    return (codes * q.scale.astype(jnp.float32) + q.zero.astype(jnp.float32)).astype(dtype)
