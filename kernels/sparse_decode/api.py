"""``sparse_decode``: the one entry point; picks the implementation and checks the arguments."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkv.kernels.dispatch import IMPLEMENTATIONS, use_kernel, use_tpu_kernel
from jaxkv.kernels.sparse_decode.reference import sparse_decode_reference

Array = jax.Array
__all__ = ["IMPLEMENTATIONS", "dense_decode", "sparse_decode"]


def _check(q, k, v, lengths, block_indices, block_counts, block_size, kv_mask=None):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [B, K, G, H] and k, v one [B, K, S, H] shape; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    b, kh, _, h = q.shape
    if k.shape[0] != b or k.shape[1] != kh or k.shape[3] != h:
        raise ValueError(f"k {k.shape} does not match q {q.shape} in batch, KV heads or head dim")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B] = [{b}], got {lengths.shape}")
    if block_indices.ndim != 3 or block_indices.shape[:2] != (b, kh):
        raise ValueError(f"block_indices must be [B, K, M] = [{b}, {kh}, M], got {block_indices.shape}")
    if block_counts.shape != (b, kh):
        raise ValueError(f"block_counts must be [B, K] = [{b}, {kh}], got {block_counts.shape}")
    if kv_mask is not None and kv_mask.shape != k.shape[:3]:
        raise ValueError(f"kv_mask must be [B, K, S] = {list(k.shape[:3])}, got {kv_mask.shape}")
    if kv_mask is not None and kv_mask.dtype != jnp.bool_:  # the backends would read other dtypes differently
        raise ValueError(f"kv_mask must be bool, got {kv_mask.dtype}")
    if not isinstance(block_size, int) or block_size < 1 or k.shape[2] % block_size:
        raise ValueError(f"block_size must be a positive int dividing the cache's {k.shape[2]} slots, "
                         f"got {block_size!r}")


def _pallas_gpu_ok(q, block_size) -> str | None:
    """Why the Pallas GPU kernel cannot run here, or None."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()}, not gpu"
    h = q.shape[-1]
    if h & (h - 1) or h < 16 or block_size & (block_size - 1) or block_size < 16:  # tl.dot: K and N >= 16
        return f"head_dim ({h}) and block_size ({block_size}) must be powers of two >= 16"
    return None


def sparse_decode(q: Array, k: Array, v: Array, lengths: Array, block_indices: Array, block_counts: Array, *,
                  block_size: int, scale: float | None = None, kv_mask: Array | None = None,
                  implementation: str | None = None, **kernel_options) -> tuple[Array, Array]:
    """Attention of one new token per row over the listed KV blocks of a head-major cache:
    ``(out [B, K, G, H], lse [B, K, G])``. ``q [B, K, G, H]`` (the query heads of each KV head),
    ``k, v [B, K, S, H]``, ``lengths [B]`` (slots ``< lengths`` hold tokens), ``block_indices [B,
    K, M]`` blocks of ``block_size`` slots, the first ``block_counts [B, K]`` of them real (a
    count above M counts as M), none listed twice, the padding never attended. ``kv_mask [B, K,
    S]`` (bool, optional): slots of the listed blocks to leave out too (a layout whose blocks mix
    kept and dropped tokens, e.g. ``squeezed``'s clusters).
    ``implementation``: ``"pallas_gpu"``, ``"pallas_tpu"`` or ``"reference"``;
    an explicit one that cannot run raises; None takes the GPU kernel on a GPU, else the
    reference with a warning (the TPU kernel is asked for by name: tested in the TPU interpreter
    and lowered for the TPU, not yet run on one). ``kernel_options`` go to the kernel:
    ``blocks_per_split``, ``num_warps``, ``num_stages``, ``merge``, ``interpret`` for the GPU's,
    ``interpret`` for the TPU's."""
    _check(q, k, v, lengths, block_indices, block_counts, block_size, kv_mask)
    if block_indices.shape[-1] == 0:  # nothing listed: nothing visible (a kernel would have no block to run)
        b, kh, g, _ = q.shape
        return jnp.zeros(q.shape, q.dtype), jnp.full((b, kh, g), -jnp.inf, jnp.float32)
    if use_tpu_kernel(implementation, kernel_options, ("interpret",)):
        from jaxkv.kernels.sparse_decode.pallas_tpu import sparse_decode_pallas_tpu


        return sparse_decode_pallas_tpu(q, k, v, lengths, block_indices, block_counts, block_size=block_size,
                                        scale=scale, kv_mask=kv_mask, **kernel_options)
    if use_kernel("sparse_decode", implementation, kernel_options, lambda: _pallas_gpu_ok(q, block_size)):
        from jaxkv.kernels.sparse_decode.pallas_gpu import sparse_decode_pallas_gpu

        return sparse_decode_pallas_gpu(q, k, v, lengths, block_indices, block_counts, block_size=block_size,
                                        scale=scale, kv_mask=kv_mask, **kernel_options)
    return sparse_decode_reference(q, k, v, lengths, block_indices, block_counts, block_size=block_size,
                                   scale=scale, kv_mask=kv_mask)


def dense_decode(q: Array, k: Array, v: Array, lengths: Array, *, block_size: int = 64, **options
                 ) -> tuple[Array, Array]:
    """Sparse decode with every block a row reaches: dense decode over a head-major cache."""
    from jaxkv.kernels.sparse_decode.reference import dense_blocks

    idx, counts = dense_blocks(jnp.asarray(lengths), num_kv_heads=k.shape[1], num_slots=k.shape[2],
                               block_size=block_size)
    return sparse_decode(q, k, v, lengths, idx, counts, block_size=block_size, **options)
