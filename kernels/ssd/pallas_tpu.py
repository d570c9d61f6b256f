"""The SSD scan on the TPU: Pallas with its Mosaic lowering; the forward as a kernel, the
backward by recomputation through the reference.

The grid is ``(b, H, chunks)``: the row and head axes are parallel, the chunk axis is the
sequential one (``arbitrary``), and the ``[P, N]`` state lives in an fp32 VMEM scratch carried
from one chunk's grid step to the next (set from the initial state at chunk 0, written out
at the last). Per chunk of ``Q`` steps the math is ``pallas_gpu``'s (the chunked form of
``reference.py``, stages 1-4 fused), laid out for the TPU's tiles: the tensors go in head-major
(``x [b, H, T, P]``, ``B, C [b, G, T, N]``) so that every block's last two dimensions are
``(Q, P)`` or ``(Q, N)``, and the log-decays come in twice, as a column ``[Q, 1]`` and a row
``[1, Q]``, so that the running sum ``cum`` and the decay matrix ``exp(cum_i - cum_j)`` are
matrix products with a triangular mask and a broadcast, with no transpose inside the kernel::

    cum = tri @ la                  (column; and la^T @ tri^T as a row)
    y   = ((C B^T) * L) X + exp(cum) * (C S^T)
    S   = exp(cum_Q) S + X^T (exp(cum_Q - cum) * B)

Dots run on the input dtype with fp32 accumulation (fp32 inputs at HIGHEST precision, so the
MXU does not round them to bf16). The backward (``jax.custom_vjp``) recomputes through
``reference.ssd_chunked`` and differentiates that: correct and exact, but not faster than the
reference's own backward (a TPU backward kernel is still to be written).

Tested in interpret mode on the CPU against the recurrence, and lowered for the TPU
(``jax.export`` with ``platforms=["tpu"]``, which runs Pallas's Mosaic lowering, not Mosaic's
own compiler). It has not been compiled or timed on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxkv.kernels.ssd.reference import ssd_chunked

Array = jax.Array
__all__ = ["ssd_pallas_tpu"]


def _dot(a, b, contract, exact):
    """``dot_general`` contracting ``contract`` = (lhs dim, rhs dim), fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST if exact else None,
                               preferred_element_type=jnp.float32)


def _fwd_kernel(x_ref, dt_ref, lac_ref, lar_ref, b_ref, c_ref, s0_ref, y_ref, sf_ref, s_scr, *, q: int,
                exact: bool):
    ci = pl.program_id(2)
    dtype = jnp.float32 if exact else x_ref.dtype

    @pl.when(ci == 0)
    def _():
        s_scr[...] = s0_ref[...].astype(jnp.float32)

    x = x_ref[...].astype(jnp.float32)  # [Q, P]
    dt = dt_ref[...].astype(jnp.float32)  # [Q, 1]
    la_c, la_r = lac_ref[...].astype(jnp.float32), lar_ref[...].astype(jnp.float32)  # [Q, 1], [1, Q]
    bm, cm = b_ref[...].astype(dtype), c_ref[...].astype(dtype)  # [Q, N]
    s = s_scr[...]  # [P, N]
    i = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    tri = (i >= j).astype(jnp.float32)
    cum_c = _dot(tri, la_c, (1, 0), True)  # [Q, 1]: sum_{k <= i} la_k
    cum_r = _dot(la_r, tri, (1, 1), True)  # [1, Q]: the same, as a row
    tot = jnp.sum(la_r, axis=1, keepdims=True)  # [1, 1]
    xx = x * dt  # X = dt * x
    g = _dot(cm, bm, (1, 1), exact)  # C B^T [Q, Q]
    m = jnp.where(i >= j, g * jnp.exp(cum_c - cum_r), 0.0)
    y = _dot(m.astype(dtype), xx.astype(dtype), (1, 0), exact)  # [Q, P]
    y = y + jnp.exp(cum_c) * _dot(cm, s.astype(dtype), (1, 1), exact)
    y_ref[...] = y.astype(y_ref.dtype)
    w = jnp.exp(tot - cum_c)  # [Q, 1]
    s = jnp.exp(tot) * s + _dot(xx.astype(dtype), (bm.astype(jnp.float32) * w).astype(dtype), (0, 0), exact)
    s_scr[...] = s

    @pl.when(ci == pl.num_programs(2) - 1)
    def _():
        sf_ref[...] = s


def _forward(x, dt, la, bm, cm, s0, *, q: int, interpret: bool):
    """Head-major inputs (``x [b, H, T, P]``, ``dt, la [b, H, T]``, ``B, C [b, G, T, N]``, T a
    multiple of ``q``) -> ``(y [b, H, T, P], final [b, H, P, N] fp32)``."""
    b, h, t, p = x.shape
    g, n = bm.shape[1], bm.shape[3]
    hpg = h // g
    exact = x.dtype == jnp.float32
    tok = lambda last: pl.BlockSpec((None, None, q, last), lambda i, j, c: (i, j, c, 0))  # noqa: E731
    grp = pl.BlockSpec((None, None, q, n), lambda i, j, c: (i, j // hpg, c, 0))
    state = pl.BlockSpec((None, None, p, n), lambda i, j, c: (i, j, 0, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, q=q, exact=exact),
        grid=(b, h, t // q),
        in_specs=[tok(p), tok(1), tok(1), pl.BlockSpec((None, None, 1, q), lambda i, j, c: (i, j, 0, c)),
                  grp, grp, state],
        out_specs=[tok(p), state],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((p, n), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="jaxkv_ssd_fwd_tpu",
    )(x, dt[..., None], la[..., None], la[:, :, None, :], bm, cm, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _ssd(x, dt, A, B, C, s0, q, interpret):
    b, t, h, p = x.shape
    pad = -t % q
    la = dt.astype(jnp.float32) * jnp.broadcast_to(A.astype(jnp.float32), dt.shape)
    dtf = dt.astype(jnp.float32)
    if pad:  # dt = 0 past the end: no decay, no input
        tp = lambda a: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))  # noqa: E731
        x, dtf, la, B, C = tp(x), tp(dtf), tp(la), tp(B), tp(C)
    hm = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [b, T, H, ...] -> [b, H, T, ...]
    y, final = _forward(hm(x), hm(dtf), hm(la), hm(B.astype(x.dtype)), hm(C.astype(x.dtype)), s0, q=q,
                        interpret=interpret)
    return hm(y)[:, :t].astype(jnp.float32), final


def _ssd_fwd(x, dt, A, B, C, s0, q, interpret):
    return _ssd(x, dt, A, B, C, s0, q, interpret), (x, dt, A, B, C, s0)


def _ssd_bwd(q, interpret, res, cts):
    _, vjp = jax.vjp(functools.partial(ssd_chunked, chunk_size=q), *res)  # recomputation: the reference's gradient
    return vjp(cts)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


@functools.partial(jax.jit, static_argnames=("block_t", "interpret"))
def ssd_pallas_tpu(x: Array, dt: Array, A: Array, B: Array, C: Array, initial_state: Array | None = None, *,
                   block_t: int = 128, interpret: bool = False) -> tuple[Array, Array]:
    """``(y [b, T, H, P] fp32, final_state [b, H, P, N] fp32)``, the reference's contract.
    ``block_t`` (the kernel's chunk) is a multiple of 8, and of 128 to lower for a TPU (the
    log-decay row's block ``[1, block_t]`` must fill whole 128-lane tiles); T is padded to a
    multiple of it with dt = 0 when it is not one. Differentiable (the backward recomputes through the reference)."""
    if isinstance(block_t, bool) or not isinstance(block_t, int) or block_t < 8 or block_t % 8:
        raise ValueError(f"block_t must be a positive multiple of 8, got {block_t!r}")
    b, _, h, p = x.shape
    n = B.shape[-1]
    s0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    return _ssd(x, dt, A, B, C, s0, int(block_t), bool(interpret))
