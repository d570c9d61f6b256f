"""``page_select``: the one entry point; picks the implementation and checks the arguments."""
from __future__ import annotations

import jax

from jaxkv.kernels.dispatch import IMPLEMENTATIONS, use_kernel, use_tpu_kernel
from jaxkv.kernels.page_select.reference import page_select_reference

Array = jax.Array
__all__ = ["IMPLEMENTATIONS", "MAX_KERNEL_PAGES", "page_select"]
MAX_KERNEL_PAGES = 32768  # the select kernel holds a row's physical-page scores in registers
TPU_OPTIONS = ("block_l", "interpret")


def _check(q, kmin, kmax, group, count):
    if q.ndim != 4 or kmin.ndim != 4 or kmax.shape != kmin.shape:
        raise ValueError(f"q must be [B, K, G, H] and kmin, kmax one [B, K, L, H] shape; got q {q.shape}, "
                         f"kmin {kmin.shape}, kmax {kmax.shape}")
    b, kh, _, h = q.shape
    if kmin.shape[:2] != (b, kh) or kmin.shape[3] != h:
        raise ValueError(f"kmin {kmin.shape} does not match q {q.shape} in batch, KV heads or head dim")
    if not isinstance(group, int) or group < 1 or kmin.shape[2] % group:
        raise ValueError(f"group must be a positive int dividing the {kmin.shape[2]} logical pages, got {group!r}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")


def page_select(q: Array, kmin: Array, kmax: Array, *, group: int, count: int, implementation: str | None = None,
                **kernel_options) -> Array:
    """LServe's page selection for one decode query per row: ``[B, K, count]`` int32, the
    ``count`` physical pages of highest Quest bound in ascending order, -1 after them where
    fewer pages hold keys. ``q [B, K, G, H]``; ``kmin, kmax [B, K, L, H]`` each logical page's
    per-channel key min/max (``+inf``/``-inf`` for an empty page); ``group`` logical pages a
    physical page. ``implementation``: ``"pallas_gpu"``, ``"pallas_tpu"`` or ``"reference"``; an
    explicit one that cannot run raises, None takes the GPU kernel on a GPU, else the reference
    with a warning (the TPU kernel is asked for by name: tested in the TPU interpreter and lowered
    for the TPU, not yet run on one). ``kernel_options``: ``chunk``, ``scoring``, ``num_warps`` (the
    scoring kernel), ``select_warps``, ``interpret`` for the GPU's; ``block_l``, ``interpret`` for the
    TPU's."""
    _check(q, kmin, kmax, group, count)
    if use_tpu_kernel(implementation, kernel_options, TPU_OPTIONS):
        from jaxkv.kernels.page_select.pallas_tpu import page_select_pallas_tpu

        return page_select_pallas_tpu(q, kmin, kmax, group=group, count=count, **kernel_options)

    def why_not():
        h, pages = q.shape[-1], kmin.shape[2] // group
        if jax.default_backend() != "gpu":
            return f"the backend is {jax.default_backend()}, not gpu"
        if h & (h - 1) or h < 16:  # tl.dot: K >= 16
            return f"head_dim ({h}) must be a power of two >= 16"
        if pages > MAX_KERNEL_PAGES:
            return f"{pages} physical pages a row exceed the kernel's {MAX_KERNEL_PAGES}"
        return None

    if use_kernel("page_select", implementation, kernel_options, why_not):
        from jaxkv.kernels.page_select.pallas_gpu import page_select_pallas_gpu

        return page_select_pallas_gpu(q, kmin, kmax, group=group, count=count, **kernel_options)
    return page_select_reference(q, kmin, kmax, group=group, count=count)
