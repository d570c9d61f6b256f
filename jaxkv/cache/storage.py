"""How kept tokens are stored: the second of the cache's three concerns.

What to keep (eviction, head splits) is a policy's business; how to store what it keeps is a
*storage*: ``DenseStorage`` (the cache dtype, one ``KVCache``) or ``QuantizedStorage`` (per-token
asymmetric ``bits``-bit codes packed into bytes, ``QuantizedKV``). A policy makes its slot
arrays through ``CachePolicy.new_kv`` and counts them with ``CachePolicy.kv_slot_bytes``, so a
composition ``KEEP+STORE`` (``razor+mikv``: Razor's kept tokens in MiKV's packed format) swaps
the storage without touching the policy. ``QuantizedKV`` has ``KVCache``'s interface: ``write``
quantizes, ``k`` / ``v`` dequantize for attention (the pure-jnp path; a decode kernel reads the
codes directly).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import struct

from jaxkv.cache.kv import KVCache
from jaxkv.cache.quant import Quantized, dequantize, packed_length, quantize
from jaxkv.errors import UserError
from jaxkv.typing import Array

__all__ = ["DenseStorage", "QuantizedStorage", "QuantizedKV"]


@struct.dataclass
class QuantizedKV:
    """``KVCache`` with keys and values as per-token packed codes (scale and zero per token and
    head, float16); ``positions [B, K, S]`` as in ``KVCache``."""

    qk: Quantized
    qv: Quantized
    positions: Array
    dtype: str = struct.field(pytree_node=False)

    @classmethod
    def empty(cls, *, batch, num_kv_heads, slots, head_dim, dtype, bits) -> "QuantizedKV":
        shape = (batch, num_kv_heads, slots, head_dim)
        return cls(qk=quantize(jnp.zeros(shape), bits), qv=quantize(jnp.zeros(shape), bits),
                   positions=jnp.full(shape[:3], -1, jnp.int32), dtype=jnp.dtype(dtype).name)

    @property
    def num_slots(self) -> int:
        return self.positions.shape[2]

    @property
    def k(self) -> Array:
        return dequantize(self.qk, jnp.dtype(self.dtype))

    @property
    def v(self) -> Array:
        return dequantize(self.qv, jnp.dtype(self.dtype))

    slot_or_drop = KVCache.slot_or_drop

    def poison(self, rows: Array) -> "QuantizedKV":
        """As ``KVCache.poison``: NaN value scales decode to NaN values."""
        scale = jnp.where(rows[:, None, None, None], jnp.nan, self.qv.scale)
        return self.replace(qv=self.qv.replace(scale=scale))

    def write(self, k: Array, v: Array, positions: Array, slots: Array) -> "QuantizedKV":
        """Quantize tokens ``k, v [B, T, K, H]`` into ``slots [B, T]`` (as ``KVCache.write``)."""
        b = jnp.arange(k.shape[0])[:, None]
        bits = self.qk.bits

        def put(old: Quantized, x: Array) -> Quantized:
            new = quantize(x.transpose(0, 2, 1, 3), bits)  # [B, K, T, ...]: one scale per token

            def scatter(dst, src):
                return dst.at[b, :, slots].set(src.transpose(0, 2, 1, 3).astype(dst.dtype), mode="drop")
            return old.replace(codes=scatter(old.codes, new.codes), scale=scatter(old.scale, new.scale),
                               zero=scatter(old.zero, new.zero))

        pos = jnp.broadcast_to(positions[:, :, None], positions.shape + (k.shape[2],))
        return QuantizedKV(qk=put(self.qk, k), qv=put(self.qv, v),
                           positions=self.positions.at[b, :, slots].set(pos.astype(jnp.int32), mode="drop"),
                           dtype=self.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseStorage:
    """Keys and values in the cache dtype."""

    def new_kv(self, *, batch, num_kv_heads, slots, head_dim, dtype):
        return KVCache.empty(batch=batch, num_kv_heads=num_kv_heads, slots=slots, head_dim=head_dim, dtype=dtype)

    def slot_bytes(self, head_dim: int, dtype) -> int:
        """Bytes one slot of one KV head holds: K and V plus the int32 position."""
        return 2 * head_dim * jnp.dtype(dtype).itemsize + 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedStorage:
    """Per-token asymmetric ``bits``-bit codes packed into bytes (MiKV's low-precision format)."""

    bits: int = 4

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise UserError(f"mikv storage: bits must be 2, 3, 4 or 8, got {self.bits!r}")

    def new_kv(self, *, batch, num_kv_heads, slots, head_dim, dtype):
        return QuantizedKV.empty(batch=batch, num_kv_heads=num_kv_heads, slots=slots, head_dim=head_dim,
                                 dtype=dtype, bits=self.bits)

    def slot_bytes(self, head_dim: int, dtype) -> int:
        return 2 * (packed_length(head_dim, self.bits) + 2 * 2) + 4
