"""Squeezed Attention's query-centroid scores fused with the threshold: ``reference.py`` (jnp),
``pallas_gpu.py`` (Pallas, Triton lowering), ``api.py`` (``centroid_scores``, the dispatch).
No Mosaic TPU kernel yet (the reference runs there, with a warning)."""
from jaxkv.kernels.centroid_scores.api import IMPLEMENTATIONS, centroid_scores
from jaxkv.kernels.centroid_scores.reference import centroid_scores_reference

__all__ = ["IMPLEMENTATIONS", "centroid_scores", "centroid_scores_reference"]
