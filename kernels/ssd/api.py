"""``ssd``: the one entry point for the SSD scan; picks the implementation and checks the arguments."""
from __future__ import annotations

import jax

from jaxkv.kernels.dispatch import IMPLEMENTATIONS, use_kernel, use_tpu_kernel
from jaxkv.kernels.ssd.reference import ssd_chunked

Array = jax.Array
__all__ = ["IMPLEMENTATIONS", "ssd", "why_no_kernel"]
TPU_OPTIONS = ("block_t", "interpret")


def _pow2(v: int) -> bool:
    return v >= 16 and not v & (v - 1)


def why_no_kernel(head_dim: int, state_size: int) -> str | None:
    """Why the Pallas GPU kernel cannot run a scan of these sizes here (None: it can)."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()}, not gpu"
    if not (_pow2(head_dim) and _pow2(state_size)):
        return f"head_dim P ({head_dim}) and state size N ({state_size}) must be powers of two >= 16"
    return None


def _check(x, dt, A, B, C, initial_state):
    if x.ndim != 4:
        raise ValueError(f"x must be [b, T, H, P], got shape {x.shape}")
    b, t, h, p = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"dt must be [b, T, H] = {[b, t, h]}, got {list(dt.shape)}")
    if A.shape not in ((h,), (b, t, h)):
        raise ValueError(f"A must be [H] = [{h}] or [b, T, H] = {[b, t, h]}, got {list(A.shape)}")
    if B.ndim != 4 or B.shape[:2] != (b, t) or B.shape != C.shape:
        raise ValueError(f"B and C must both be [b, T, G, N] with b, T = {b}, {t}; got {B.shape} and {C.shape}")
    if h % B.shape[2]:
        raise ValueError(f"the heads ({h}) must be a multiple of the groups of B and C ({B.shape[2]})")
    if initial_state is not None and initial_state.shape != (b, h, p, B.shape[3]):
        raise ValueError(f"initial_state must be [b, H, P, N] = {[b, h, p, B.shape[3]]}, "
                         f"got {list(initial_state.shape)}")


def ssd(x: Array, dt: Array, A: Array, B: Array, C: Array, initial_state: Array | None = None, *,
        chunk_size: int = 256, implementation: str | None = None, **kernel_options) -> tuple[Array, Array]:
    """Mamba-2's SSD scan, ``(y [b, T, H, P] fp32, final_state [b, H, P, N] fp32)`` (the
    contract of ``reference.ssd_chunked``; differentiable either way). ``chunk_size`` is the
    reference's chunk; the kernels tile by their own ``block_t``. ``implementation``:
    ``"pallas_gpu"``, ``"pallas_tpu"`` or ``"reference"``; an explicit one that cannot run
    raises, None takes the GPU kernel on a GPU and otherwise warns and runs the reference (the
    TPU kernel is asked for by name: it is tested in interpret mode and lowered for the TPU, not
    yet run on one). ``kernel_options`` go to the kernel: ``block_t``, ``block_p``, ``split``,
    ``backward_heads``, ``num_warps``, ``num_stages``, ``interpret`` for the GPU's; ``block_t``, ``interpret`` for
    the TPU's."""
    _check(x, dt, A, B, C, initial_state)
    if use_tpu_kernel(implementation, kernel_options, TPU_OPTIONS):
        from jaxkv.kernels.ssd.pallas_tpu import ssd_pallas_tpu

        return ssd_pallas_tpu(x, dt, A, B, C, initial_state, **kernel_options)
    if use_kernel("ssd", implementation, kernel_options, lambda: why_no_kernel(x.shape[3], B.shape[3])):
        from jaxkv.kernels.ssd.pallas_gpu import ssd_pallas_gpu

        return ssd_pallas_gpu(x, dt, A, B, C, initial_state, **kernel_options)
    return ssd_chunked(x, dt, A, B, C, initial_state, chunk_size=chunk_size)
