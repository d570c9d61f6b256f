"""Sparse (and dense) decode attention over a head-major KV cache: ``reference.py`` (jnp, the
specification), ``pallas_gpu.py`` (Pallas, Triton lowering), ``api.py`` (``sparse_decode``, the
dispatch). A Mosaic TPU kernel is not written yet: on a TPU the reference runs (with a warning)."""
from jaxkv.kernels.sparse_decode.api import IMPLEMENTATIONS, dense_decode, sparse_decode
from jaxkv.kernels.sparse_decode.reference import dense_blocks, sparse_decode_reference, visible_slots

__all__ = ["IMPLEMENTATIONS", "dense_blocks", "dense_decode", "sparse_decode", "sparse_decode_reference",
           "visible_slots"]
