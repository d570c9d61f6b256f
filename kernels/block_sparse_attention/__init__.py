"""Block-sparse (and dense) prefill attention with masks from positions and segment ids, forward
and backward: ``mask.py`` (``MaskSpec``, ``visible``, ``block_plan``: the mask compiled into
empty / partial / full blocks), ``reference.py`` (jnp, the specification), ``pallas_gpu.py``
(Pallas, Triton lowering, custom VJP), ``api.py`` (``block_sparse_attention``, the dispatch). No
TPU kernel yet: on a TPU the reference runs (with a warning)."""
from jaxkv.kernels.block_sparse_attention.api import IMPLEMENTATIONS, block_sparse_attention
from jaxkv.kernels.block_sparse_attention.mask import EMPTY, FULL, PARTIAL, BlockPlan, MaskSpec, block_plan, visible
from jaxkv.kernels.block_sparse_attention.reference import block_sparse_attention_reference, dense_visibility

__all__ = ["IMPLEMENTATIONS", "block_sparse_attention", "block_sparse_attention_reference", "dense_visibility",
           "MaskSpec", "BlockPlan", "block_plan", "visible", "EMPTY", "PARTIAL", "FULL"]
