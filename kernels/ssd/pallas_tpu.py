"""The SSD scan on the TPU: Pallas with its Mosaic lowering, forward and backward.

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
MXU does not round them to bf16). The backward (``jax.custom_vjp``) is ``pallas_gpu``'s in the
same layout: a reverse pass over the chunks (the index maps walk the chunk axis backwards, the
state's gradient in a VMEM scratch) stores the gradient at every chunk boundary, then one
program per chunk, all in parallel, computes every gradient from the chunk's start state (kept
by the forward) and its end state's gradient.

Tested in the TPU interpreter on the CPU against the recurrence and ``jax.vjp`` of the
reference, and lowered for the TPU
(``jax.export`` with ``platforms=["tpu"]``, which runs Pallas's Mosaic lowering, not Mosaic's
own compiler). It has not been compiled or timed on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array
__all__ = ["ssd_pallas_tpu"]


def _dot(a, b, contract, exact):
    """``dot_general`` contracting ``contract`` = (lhs dim, rhs dim), fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST if exact else None,
                               preferred_element_type=jnp.float32)


def _fwd_kernel(x_ref, dt_ref, lac_ref, lar_ref, b_ref, c_ref, s0_ref, y_ref, sf_ref, st_ref, s_scr, *, q: int,
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
    if st_ref is not None:  # the chunk's start state, for the backward
        st_ref[...] = s
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


def _dstates_kernel(lac_ref, lar_ref, c_ref, dy_ref, dsf_ref, dso_ref, ds0_ref, ds_scr, *, q: int, exact: bool):
    """Backward pass 1, walking the chunks in reverse (the index maps reverse the chunk axis):
    the gradient of the state leaving each chunk, dS_in = exp(cum_Q) dS_out + (exp(cum) dy)^T C."""
    ci = pl.program_id(2)
    dtype = jnp.float32 if exact else dy_ref.dtype

    @pl.when(ci == 0)
    def _():
        ds_scr[...] = dsf_ref[...].astype(jnp.float32)

    ds = ds_scr[...]
    dso_ref[...] = ds
    tri = _tri(q)
    cum_c = _dot(tri, lac_ref[...].astype(jnp.float32), (1, 0), True)
    tot = jnp.sum(lar_ref[...].astype(jnp.float32), axis=1, keepdims=True)
    dy = dy_ref[...].astype(jnp.float32)
    ds = jnp.exp(tot) * ds + _dot((jnp.exp(cum_c) * dy).astype(dtype), c_ref[...].astype(dtype), (0, 0), exact)
    ds_scr[...] = ds

    @pl.when(ci == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = ds


def _grads_kernel(x_ref, dt_ref, lac_ref, lar_ref, b_ref, c_ref, s_ref, dy_ref, ds_ref,
                  dx_ref, ddt_ref, dla_ref, db_ref, dc_ref, *, q: int, exact: bool):
    """Backward pass 2 (one program per chunk, all in parallel): every gradient of one chunk from
    its start state ``s`` (kept by the forward) and its end state's gradient ``ds`` (pass 1);
    ``pallas_gpu._grads_kernel``'s math with column vectors, and row sums turned into columns by
    products with a ones column instead of transposes."""
    dtype = jnp.float32 if exact else x_ref.dtype
    i = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    tri = (i >= j).astype(jnp.float32)
    x, dt = x_ref[...].astype(jnp.float32), dt_ref[...].astype(jnp.float32)  # [Q, P], [Q, 1]
    la_c, la_r = lac_ref[...].astype(jnp.float32), lar_ref[...].astype(jnp.float32)
    bm, cm = b_ref[...].astype(dtype), c_ref[...].astype(dtype)  # [Q, N]
    s, ds, dy = s_ref[...], ds_ref[...], dy_ref[...].astype(jnp.float32)  # [P, N], [P, N], [Q, P]
    cum_c = _dot(tri, la_c, (1, 0), True)
    cum_r = _dot(la_r, tri, (1, 1), True)
    tot = jnp.sum(la_r, axis=1, keepdims=True)
    e, w, et = jnp.exp(cum_c), jnp.exp(tot - cum_c), jnp.exp(tot)
    xx = x * dt
    g = _dot(cm, bm, (1, 1), exact)  # C B^T
    lmat = jnp.where(i >= j, jnp.exp(cum_c - cum_r), 0.0)
    m = g * lmat
    bw = bm.astype(jnp.float32) * w
    dyc, xxc, dsc = dy.astype(dtype), xx.astype(dtype), ds.astype(dtype)
    dm = _dot(dyc, xxc, (1, 1), exact)  # dy X^T
    dxx = _dot(m.astype(dtype), dyc, (0, 0), exact) + _dot(bw.astype(dtype), dsc, (1, 1), exact)
    dg = (dm * lmat).astype(dtype)
    ys = _dot(cm, s.astype(dtype), (1, 1), exact)  # C S^T [Q, P]
    dys = _dot(dyc, s.astype(dtype), (1, 0), exact)  # dy S [Q, N]
    xds = _dot(xxc, dsc, (1, 0), exact)  # X dS [Q, N]
    dc_ref[...] = _dot(dg, bm, (1, 0), exact) + e * dys
    db_ref[...] = _dot(dg, cm, (0, 0), exact) + w * xds
    r = dm * m
    ones = jnp.ones((q, 1), jnp.float32)
    dw = jnp.sum(bm.astype(jnp.float32) * xds, axis=1, keepdims=True)  # [Q, 1]
    dcum = (jnp.sum(r, axis=1, keepdims=True) - _dot(r, ones, (0, 0), True)
            + e * jnp.sum(dy * ys, axis=1, keepdims=True) - w * dw)
    dtot = jnp.sum(w * dw, axis=0, keepdims=True) + et * jnp.sum(jnp.sum(ds * s, axis=1, keepdims=True), axis=0,
                                                                 keepdims=True)
    dla_ref[...] = _dot(tri, dcum, (0, 0), True) + dtot  # the reverse running sum
    dx_ref[...] = (dxx * dt).astype(dx_ref.dtype)
    ddt_ref[...] = jnp.sum(dxx * x, axis=1, keepdims=True)


def _tri(q):
    i = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    return (i >= j).astype(jnp.float32)


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _specs(h, p, n, q, g, reverse_chunks=None):
    """Block specs over the head-major operands; ``reverse_chunks`` (the chunk count) walks the
    chunk axis backwards."""
    hpg = h // g
    at = (lambda c: c) if reverse_chunks is None else (lambda c: reverse_chunks - 1 - c)
    tok = lambda last: pl.BlockSpec((None, None, q, last), lambda i, j, c: (i, j, at(c), 0))  # noqa: E731
    row = pl.BlockSpec((None, None, 1, q), lambda i, j, c: (i, j, 0, at(c)))
    grp = pl.BlockSpec((None, None, q, n), lambda i, j, c: (i, j // hpg, at(c), 0))
    state = pl.BlockSpec((None, None, p, n), lambda i, j, c: (i, j, 0, 0))
    per_chunk = pl.BlockSpec((None, None, None, p, n), lambda i, j, c: (i, j, at(c), 0, 0))
    return tok, row, grp, state, per_chunk


def _forward(x, dt, la, bm, cm, s0, *, q: int, interpret, keep_states: bool):
    """Head-major inputs (``x [b, H, T, P]``, ``dt, la [b, H, T]``, ``B, C [b, G, T, N]``, T a
    multiple of ``q``) -> ``(y [b, H, T, P], final [b, H, P, N] fp32)``, and with
    ``keep_states`` each chunk's start state ``[b, H, chunks, P, N]`` fp32 (for the backward)."""
    b, h, t, p = x.shape
    g, n = bm.shape[1], bm.shape[3]
    chunks = t // q
    tok, row, grp, state, per_chunk = _specs(h, p, n, q, g)
    out_specs = [tok(p), state]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)]
    if keep_states:
        out_specs.append(per_chunk)
        out_shape.append(jax.ShapeDtypeStruct((b, h, chunks, p, n), jnp.float32))
    kernel = functools.partial(_fwd_kernel, q=q, exact=x.dtype == jnp.float32)
    return pl.pallas_call(
        kernel if keep_states else _no_states(kernel),
        grid=(b, h, chunks),
        in_specs=[tok(p), tok(1), tok(1), row, grp, grp, state],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((p, n), jnp.float32)],
        compiler_params=_params(),
        interpret=interpret,
        name="jaxkv_ssd_fwd_tpu",
    )(x, dt[..., None], la[..., None], la[:, :, None, :], bm, cm, s0)


def _no_states(kernel):
    def run(x_ref, dt_ref, lac_ref, lar_ref, b_ref, c_ref, s0_ref, y_ref, sf_ref, s_scr):
        kernel(x_ref, dt_ref, lac_ref, lar_ref, b_ref, c_ref, s0_ref, y_ref, sf_ref, None, s_scr)
    return run


def _backward(x, dt, la, bm, cm, states, dy, dsf, *, q: int, interpret):
    b, h, t, p = x.shape
    g, n = bm.shape[1], bm.shape[3]
    chunks = t // q
    f32 = jnp.float32
    tok, row, grp, state, per_chunk = _specs(h, p, n, q, g, reverse_chunks=chunks)
    dso, ds0 = pl.pallas_call(
        functools.partial(_dstates_kernel, q=q, exact=x.dtype == f32),
        grid=(b, h, chunks),
        in_specs=[tok(1), row, grp, tok(p), state],
        out_specs=[per_chunk, state],
        out_shape=[jax.ShapeDtypeStruct((b, h, chunks, p, n), f32), jax.ShapeDtypeStruct((b, h, p, n), f32)],
        scratch_shapes=[pltpu.VMEM((p, n), f32)],
        compiler_params=_params(), interpret=interpret, name="jaxkv_ssd_bwd_states_tpu",
    )(la[..., None], la[:, :, None, :], cm, dy, dsf)
    tok, row, grp, state, per_chunk = _specs(h, p, n, q, g)
    dx, ddt, dla, db, dc = pl.pallas_call(
        functools.partial(_grads_kernel, q=q, exact=x.dtype == f32),
        grid=(b, h, chunks),
        in_specs=[tok(p), tok(1), tok(1), row, grp, grp, per_chunk, tok(p), per_chunk],
        out_specs=[tok(p), tok(1), tok(1), tok(n), tok(n)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, h, t, 1), f32),
                   jax.ShapeDtypeStruct((b, h, t, 1), f32), jax.ShapeDtypeStruct((b, h, t, n), f32),
                   jax.ShapeDtypeStruct((b, h, t, n), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret, name="jaxkv_ssd_bwd_grads_tpu",
    )(x, dt[..., None], la[..., None], la[:, :, None, :], bm, cm, states, dy, dso)
    group = lambda a: a.reshape(b, g, h // g, t, n).sum(axis=2)  # noqa: E731  per head -> per group
    return dx, ddt[..., 0], dla[..., 0], group(db), group(dc), ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _ssd(x, dt, la, bm, cm, s0, q, interpret):
    return tuple(_forward(x, dt, la, bm, cm, s0, q=q, interpret=interpret, keep_states=False))


def _ssd_fwd(x, dt, la, bm, cm, s0, q, interpret):
    y, sf, states = _forward(x, dt, la, bm, cm, s0, q=q, interpret=interpret, keep_states=True)
    return (y, sf), (x, dt, la, bm, cm, states)


def _ssd_bwd(q, interpret, res, cts):
    x, dt, la, bm, cm, states = res
    dy, dsf = cts
    dx, ddt, dla, db, dc, ds0 = _backward(x, dt, la, bm, cm, states, dy.astype(x.dtype), dsf.astype(jnp.float32),
                                          q=q, interpret=interpret)
    return dx, ddt.astype(dt.dtype), dla.astype(la.dtype), db.astype(bm.dtype), dc.astype(cm.dtype), ds0


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


@functools.partial(jax.jit, static_argnames=("block_t", "interpret"))
def ssd_pallas_tpu(x: Array, dt: Array, A: Array, B: Array, C: Array, initial_state: Array | None = None, *,
                   block_t: int = 128, interpret: bool = False) -> tuple[Array, Array]:
    """``(y [b, T, H, P] fp32, final_state [b, H, P, N] fp32)``, the reference's contract.
    ``block_t`` (the kernel's chunk) is a multiple of 8, and of 128 to lower for a TPU (the
    log-decay row's block ``[1, block_t]`` must fill whole 128-lane tiles); T is padded to a
    multiple of it with dt = 0 when it is not one. ``interpret``: run in the TPU interpreter
    (``pltpu.InterpretParams``: the grid's order, the scratch and the block copies as a TPU
    runs them) on any backend."""
    if isinstance(block_t, bool) or not isinstance(block_t, int) or block_t < 8 or block_t % 8:
        raise ValueError(f"block_t must be a positive multiple of 8, got {block_t!r}")
    b, t, h, p = x.shape
    n = B.shape[-1]
    q = int(block_t)
    pad = -t % q
    la = dt.astype(jnp.float32) * jnp.broadcast_to(A.astype(jnp.float32), dt.shape)  # log-decay [b, T, H]
    dtf = dt.astype(jnp.float32)
    if pad:  # dt = 0 past the end: no decay, no input
        tp = lambda a: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))  # noqa: E731
        x, dtf, la, B, C = tp(x), tp(dtf), tp(la), tp(B), tp(C)
    s0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    hm = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [b, T, H, ...] -> [b, H, T, ...]
    y, final = _ssd(hm(x), hm(dtf), hm(la), hm(B.astype(x.dtype)), hm(C.astype(x.dtype)), s0, q,
                    pltpu.InterpretParams() if interpret else False)
    return hm(y)[:, :t].astype(jnp.float32), final
