"""Decode attention over a cache of packed low-bit per-token codes (MiKV's low tier):
``reference.py`` (jnp, the specification), ``pallas_gpu.py`` (Pallas, Triton lowering; reads the
packed bytes and dequantizes in registers), ``api.py`` (``quantized_decode``, the dispatch). A
Mosaic TPU kernel is not written yet: on a TPU the reference runs (with a warning)."""
from jaxkv.kernels.quantized_decode.api import IMPLEMENTATIONS, quantized_decode
from jaxkv.kernels.quantized_decode.reference import dequantize_tokens, quantized_decode_reference

__all__ = ["IMPLEMENTATIONS", "dequantize_tokens", "quantized_decode", "quantized_decode_reference"]
