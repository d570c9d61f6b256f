"""``quantized_decode``: the one entry point; picks the implementation and checks the arguments."""
from __future__ import annotations

import jax

from jaxkv.kernels.dispatch import IMPLEMENTATIONS, use_kernel, use_tpu_kernel
from jaxkv.kernels.quantized_decode.reference import quantized_decode_reference

Array = jax.Array
__all__ = ["IMPLEMENTATIONS", "quantized_decode"]
BITS = (2, 3, 4, 8)


def _check(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, kv_positions, bits):
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, K, G, H], got {q.shape}")
    b, kh, _, h = q.shape
    per = 8 // bits
    hs = -(-h // per)
    for name, a in (("k_codes", k_codes), ("v_codes", v_codes)):
        if a.ndim != 4 or a.shape[:2] != (b, kh) or a.shape[3] != hs:
            raise ValueError(f"{name} must be [B, K, S, ceil(H / {per})] = [{b}, {kh}, S, {hs}] uint8 for "
                             f"{bits}-bit codes of head dim {h}, got {a.shape}")
        if a.dtype != jax.numpy.uint8:
            raise ValueError(f"{name} must be uint8 (packed codes), got {a.dtype}")
    if v_codes.shape != k_codes.shape:
        raise ValueError(f"v_codes {v_codes.shape} must have k_codes' shape {k_codes.shape}")
    want = k_codes.shape[:3]
    for name, a in (("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale), ("v_zero", v_zero),
                    ("kv_positions", kv_positions)):
        if a.shape != want:
            raise ValueError(f"{name} must be [B, K, S] = {list(want)} (one per token), got {list(a.shape)}")


def _pallas_gpu_ok(q, num_slots, bits, block_size) -> str | None:
    """Why the Pallas GPU kernel cannot run here, or None."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()}, not gpu"
    h = q.shape[-1]
    if h & (h - 1) or h // (8 // bits) < 16:
        return f"head_dim ({h}) must be a power of two with at least 16 bytes of {bits}-bit codes"
    if num_slots % block_size:
        return f"the cache's {num_slots} slots are not a multiple of block_size ({block_size})"
    return None


def quantized_decode(q: Array, k_codes: Array, k_scale: Array, k_zero: Array, v_codes: Array, v_scale: Array,
                     v_zero: Array, kv_positions: Array, *, bits: int, scale: float | None = None,
                     implementation: str | None = None, **kernel_options) -> tuple[Array, Array]:
    """Attention of one new token per row over a head-major cache of packed ``bits``-bit
    per-token codes (``jaxkv.cache.quant``'s layout): ``(out [B, K, G, H], lse [B, K, G])`` from
    ``q [B, K, G, H]``, codes ``[B, K, S, H / (8 // bits)]`` ``uint8``, per-token scales and zeros
    ``[B, K, S]``, ``kv_positions [B, K, S]`` (a slot is attended when ``>= 0``); see
    ``reference``. ``implementation``: ``"pallas_gpu"``, ``"pallas_tpu"`` or ``"reference"``; an
    explicit one that cannot run raises; None takes the GPU kernel on a GPU and otherwise warns
    and runs the reference (the TPU kernel is asked for by name: tested in the TPU interpreter
    and lowered for the TPU, not yet run on one). ``kernel_options`` go to the kernel:
    ``block_size``, ``blocks_per_split``, ``num_warps``, ``num_stages``, ``unpack``, ``interpret``
    for the GPU's; ``block_size``, ``interpret`` for the TPU's."""
    _check(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, kv_positions, bits)
    block_size = kernel_options.get("block_size", 64)
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    num_slots = k_codes.shape[2]
    if kernel_options.get("interpret") and num_slots % block_size:
        raise ValueError(f"block_size ({block_size}) must divide the cache's {num_slots} slots")

    def why_not():
        return _pallas_gpu_ok(q, num_slots, bits, block_size)

    if use_tpu_kernel(implementation, kernel_options, ("block_size", "interpret")):
        from jaxkv.kernels.quantized_decode.pallas_tpu import quantized_decode_pallas_tpu

        return quantized_decode_pallas_tpu(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, kv_positions,
                                           bits=bits, scale=scale, **kernel_options)
    if use_kernel("quantized_decode", implementation, kernel_options, why_not):
        from jaxkv.kernels.quantized_decode.pallas_gpu import quantized_decode_pallas_gpu

        return quantized_decode_pallas_gpu(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, kv_positions,
                                           bits=bits, scale=scale, **kernel_options)
    return quantized_decode_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, kv_positions,
                                      bits=bits, scale=scale)
