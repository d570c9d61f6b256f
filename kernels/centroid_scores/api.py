"""``centroid_scores``: the one entry point; picks the implementation and checks the arguments."""
from __future__ import annotations

import jax

from jaxkv.kernels.centroid_scores.reference import centroid_scores_reference
from jaxkv.kernels.dispatch import IMPLEMENTATIONS, use_kernel, use_tpu_kernel

Array = jax.Array
__all__ = ["IMPLEMENTATIONS", "centroid_scores"]
TPU_OPTIONS = ("block_c", "interpret")


def _check(q, centroids, counts, threshold):
    if q.ndim != 4 or centroids.ndim != 4:
        raise ValueError(f"q must be [B, K, G, H] and centroids [B, K, C, H]; got q {q.shape}, "
                         f"centroids {centroids.shape}")
    b, kh, _, h = q.shape
    if centroids.shape[:2] != (b, kh) or centroids.shape[3] != h:
        raise ValueError(f"centroids {centroids.shape} do not match q {q.shape} in batch, KV heads or head dim")
    if counts.shape != centroids.shape[:3]:
        raise ValueError(f"counts must be [B, K, C] = {list(centroids.shape[:3])}, got {list(counts.shape)}")
    if threshold.shape != (b,):
        raise ValueError(f"threshold must be [B] = [{b}], got {list(threshold.shape)}")


def centroid_scores(q: Array, centroids: Array, counts: Array, threshold: Array, *, scale: float | None = None,
                    implementation: str | None = None, **kernel_options) -> tuple[Array, Array]:
    """Each cluster's estimated attention weight for one decode query per row, and whether it
    passes ``threshold [B]``: ``(weights [B, K, C] fp32, kept [B, K, C] bool)`` from ``q [B, K,
    G, H]``, ``centroids [B, K, C, H]``, ``counts [B, K, C]`` (see ``reference``).
    ``implementation``: ``"pallas_gpu"``, ``"pallas_tpu"`` or ``"reference"``; explicit ones that
    cannot run raise, None takes the GPU kernel on a GPU and otherwise warns and runs the
    reference (the TPU kernel is asked for by name: tested in the TPU interpreter and lowered
    for the TPU, not yet run on one). ``kernel_options`` go to the kernel: ``block_c``,
    ``num_warps``, ``num_stages``, ``interpret`` for the GPU's; ``block_c``, ``interpret`` for
    the TPU's."""
    _check(q, centroids, counts, threshold)
    if use_tpu_kernel(implementation, kernel_options, TPU_OPTIONS):
        from jaxkv.kernels.centroid_scores.pallas_tpu import centroid_scores_pallas_tpu

        return centroid_scores_pallas_tpu(q, centroids, counts, threshold, scale=scale, **kernel_options)

    def why_not():
        h = q.shape[-1]
        if jax.default_backend() != "gpu":
            return f"the backend is {jax.default_backend()}, not gpu"
        return f"head_dim ({h}) must be a power of two" if h & (h - 1) else None

    if use_kernel("centroid_scores", implementation, kernel_options, why_not):
        from jaxkv.kernels.centroid_scores.pallas_gpu import centroid_scores_pallas_gpu

        return centroid_scores_pallas_gpu(q, centroids, counts, threshold, scale=scale, **kernel_options)
    return centroid_scores_reference(q, centroids, counts, threshold, scale=scale)
