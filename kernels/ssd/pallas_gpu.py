"""The SSD scan on the GPU: Pallas with its Triton lowering, forward and backward.

One program per (batch row, head, block of ``block_p`` channels): the channels of a head are
independent (each owns a row of the ``[P, N]`` state), so the grid is ``(b, H, P / block_p)``
and each program walks its sequence chunk by chunk, keeping the state ``[block_p, N]`` in fp32
registers (the chunked form fused over chunks: stages 1-4 of ``reference.py`` with stage 3 as a
running carry instead of a pass over HBM). Per chunk of ``Q`` steps, with ``cum`` the running
sum of the log-decays ``la = dt * A`` inside the chunk and ``X = dt * x``::

    y     = ((C B^T) * L) X + exp(cum) * (C S^T)      L[i, j] = exp(cum_i - cum_j) for i >= j
    S_out = exp(cum_Q) S + X^T (exp(cum_Q - cum) * B)

Dots run on the input dtype with fp32 accumulation (bf16 inputs: the decay-weighted scores are
rounded to bf16 before the product with X, as Mamba's own Triton kernels do; fp32 inputs: no
TF32). ``cum`` is a difference of running sums inside a chunk only (bounded by ``Q`` steps; the
reference sums each segment directly), so the two agree to fp32 rounding.

With few (row, head) programs (long rows, small batches) the fused kernel leaves SMs idle; the
forward then splits the same way the backward does (``split``): a sequential pass computes only
each chunk's start state (one dot per chunk), then one program per chunk computes its outputs.

The backward (``jax.custom_vjp``) runs in two passes. (1) A sequential reverse walk over the
chunks carries only the state's gradient (one dot per chunk) and stores it at every chunk
boundary. (2) One program per (batch row, run of ``backward_heads`` heads of one group, chunk,
block of ``block_p`` channels), all in parallel, computes every gradient of its chunk from the
chunk's start state (stored by the forward, ``[b, H, chunks, P, N]`` fp32, kept only when
differentiating) and its end state's gradient. (A single sequential backward, ``b x H``
programs doing all the work in order, made forward + backward 2.22 ms at 8 x 2,048 tokens of
mamba2-130m's shapes on an H200; this form 1.64 ms.) Pass 2 returns ``dB, dC`` summed over the
program's heads (then over the group's runs of heads afterwards) and the gradients of ``x``,
``dt`` (through ``X``), the log-decays (``dt`` and ``A`` get theirs by the chain rule outside)
and the initial state. Hand-derived; tested against ``jax.vjp`` of the
reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array
SPLIT_BELOW = 128  # fewer (row, head) programs than this: the fused forward leaves SMs idle


def _tri(q: int, strict: bool = False) -> Array:
    i = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    return i > j if strict else i >= j


def _cumsum(v: Array, q: int) -> Array:
    """Inclusive running sum of ``v [q]`` as a masked row reduction (no scan primitive needed)."""
    return jnp.sum(jnp.where(_tri(q), v[None, :], 0.0), axis=1)


def _dot(a, b, *, exact, trans_a=False, trans_b=False):
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=False if exact else None).astype(jnp.float32)


def _load_chunk(refs, ci, q, dtype):
    x_ref, dt_ref, la_ref, b_ref, c_ref = refs
    sl = pl.ds(ci * q, q)
    x = x_ref[sl, :].astype(jnp.float32)  # [Q, bp]
    dt = dt_ref[sl].astype(jnp.float32)  # [Q]
    la = la_ref[sl].astype(jnp.float32)  # [Q]
    bm, cm = b_ref[sl, :].astype(dtype), c_ref[sl, :].astype(dtype)  # [Q, N]
    return x, dt, la, bm, cm


def _fwd_kernel(x_ref, dt_ref, la_ref, b_ref, c_ref, s0_ref, y_ref, sf_ref, *states_ref, q: int,
                chunks: int, exact: bool):
    dtype = x_ref.dtype if not exact else jnp.float32
    tri = _tri(q)

    def body(ci, s):
        x, dt, la, bm, cm = _load_chunk((x_ref, dt_ref, la_ref, b_ref, c_ref), ci, q, dtype)
        if states_ref:
            states_ref[0][ci, :, :] = s
        cum = _cumsum(la, q)
        tot = jnp.sum(la)
        xx = (x * dt[:, None]).astype(dtype)  # X = dt * x
        g = _dot(cm, bm, exact=exact, trans_b=True)  # C B^T [Q, Q]
        m = jnp.where(tri, g * jnp.exp(cum[:, None] - cum[None, :]), 0.0)
        y = _dot(m.astype(dtype), xx, exact=exact)  # [Q, bp]
        y = y + jnp.exp(cum)[:, None] * _dot(cm, s.astype(dtype), exact=exact, trans_b=True)
        y_ref[pl.ds(ci * q, q), :] = y.astype(y_ref.dtype)
        w = jnp.exp(tot - cum)  # [Q]
        return jnp.exp(tot) * s + _dot(xx, (bm.astype(jnp.float32) * w[:, None]).astype(dtype), exact=exact,
                                       trans_a=True)

    s = jax.lax.fori_loop(0, chunks, body, s0_ref[...].astype(jnp.float32))
    sf_ref[...] = s


def _states_kernel(x_ref, dt_ref, la_ref, b_ref, s0_ref, st_ref, sf_ref, *, q: int, chunks: int, exact: bool):
    """Split forward, pass 1 (sequential, cheap): each chunk's start state, one dot per chunk:
    S_out = exp(cum_Q) S + X^T (exp(cum_Q - cum) * B)."""
    dtype = x_ref.dtype if not exact else jnp.float32

    def body(ci, s):
        sl = pl.ds(ci * q, q)
        x, dt, la = x_ref[sl, :].astype(jnp.float32), dt_ref[sl].astype(jnp.float32), la_ref[sl].astype(jnp.float32)
        bm = b_ref[sl, :].astype(jnp.float32)
        st_ref[ci, :, :] = s
        cum = _cumsum(la, q)
        tot = jnp.sum(la)
        xx = (x * dt[:, None]).astype(dtype)
        return jnp.exp(tot) * s + _dot(xx, (bm * jnp.exp(tot - cum)[:, None]).astype(dtype), exact=exact, trans_a=True)

    sf_ref[...] = jax.lax.fori_loop(0, chunks, body, s0_ref[...].astype(jnp.float32))


def _output_kernel(x_ref, dt_ref, la_ref, b_ref, c_ref, s_ref, y_ref, *, q: int, exact: bool):
    """Split forward, pass 2 (one program per chunk, all in parallel): the chunk's outputs from
    its start state."""
    dtype = x_ref.dtype if not exact else jnp.float32
    x, dt, la = x_ref[...].astype(jnp.float32), dt_ref[...].astype(jnp.float32), la_ref[...].astype(jnp.float32)
    bm, cm, s = b_ref[...].astype(dtype), c_ref[...].astype(dtype), s_ref[...]
    cum = _cumsum(la, q)
    xx = (x * dt[:, None]).astype(dtype)
    g = _dot(cm, bm, exact=exact, trans_b=True)
    m = jnp.where(_tri(q), g * jnp.exp(cum[:, None] - cum[None, :]), 0.0)
    y = _dot(m.astype(dtype), xx, exact=exact) + jnp.exp(cum)[:, None] * _dot(cm, s.astype(dtype), exact=exact,
                                                                                trans_b=True)
    y_ref[...] = y.astype(y_ref.dtype)


def _dstates_kernel(la_ref, c_ref, dy_ref, dsf_ref, dso_ref, ds0_ref, *, q: int, chunks: int, exact: bool):
    """Backward pass 1 (sequential, cheap): the gradient of the state leaving each chunk, walking
    the chunks in reverse: dS_in = exp(cum_Q) dS_out + (exp(cum) * dy)^T C."""
    dtype = dy_ref.dtype if not exact else jnp.float32

    def body(it, ds):
        ci = chunks - 1 - it
        sl = pl.ds(ci * q, q)
        la = la_ref[sl].astype(jnp.float32)
        cm = c_ref[sl, :].astype(dtype)
        dy = dy_ref[sl, :].astype(jnp.float32)
        dso_ref[ci, :, :] = ds
        cum = _cumsum(la, q)
        return jnp.exp(jnp.sum(la)) * ds + _dot((jnp.exp(cum)[:, None] * dy).astype(dtype), cm, exact=exact,
                                                trans_a=True)

    ds0_ref[...] = jax.lax.fori_loop(0, chunks, body, dsf_ref[...].astype(jnp.float32))


def _chunk_grads(x, dt, la, bm, cm, s, ds, dy, *, q: int, exact: bool, dtype):
    """Every gradient of one chunk of one head for a block of channels, from its start state
    ``s`` and its end state's gradient ``ds``: ``(dx, ddt, dla, dB, dC)`` (the last four sums
    over the block's channels)."""
    tri = _tri(q)
    cum = _cumsum(la, q)
    tot = jnp.sum(la)
    e, w, et = jnp.exp(cum), jnp.exp(tot - cum), jnp.exp(tot)
    xx = x * dt[:, None]
    g = _dot(cm, bm, exact=exact, trans_b=True)  # [Q, Q]
    lmat = jnp.where(tri, jnp.exp(cum[:, None] - cum[None, :]), 0.0)
    m = g * lmat
    bw = bm.astype(jnp.float32) * w[:, None]  # [Q, N]
    dyc, xxc, dsc = dy.astype(dtype), xx.astype(dtype), ds.astype(dtype)
    dm = _dot(dyc, xxc, exact=exact, trans_b=True)  # dy X^T [Q, Q]
    # X: from the within-chunk product and from the state leaving the chunk
    dxx = _dot(m.astype(dtype), dyc, exact=exact, trans_a=True) + _dot(bw.astype(dtype), dsc, exact=exact,
                                                                        trans_b=True)
    dg = (dm * lmat).astype(dtype)
    ys = _dot(cm, s.astype(dtype), exact=exact, trans_b=True)  # C S^T [Q, P]
    dys = _dot(dyc, s.astype(dtype), exact=exact)  # dy S [Q, N]
    xds = _dot(xxc, dsc, exact=exact)  # X dS [Q, N]
    dc = _dot(dg, bm, exact=exact) + e[:, None] * dys
    db = _dot(dg, cm, exact=exact, trans_a=True) + w[:, None] * xds
    # the log-decays, through cum (inside L, exp(cum), exp(cum_Q - cum)) and tot = cum_Q
    r = dm * m
    dw = jnp.sum(bm.astype(jnp.float32) * xds, axis=1)  # [Q]
    dcum = jnp.sum(r, axis=1) - jnp.sum(r, axis=0) + e * jnp.sum(dy * ys, axis=1) - w * dw
    dtot = jnp.sum(w * dw) + et * jnp.sum(ds * s)
    dla = jnp.sum(jnp.where(tri, dcum[:, None], 0.0), axis=0) + dtot  # reverse running sum
    return dxx * dt[:, None], jnp.sum(dxx * x, axis=1), dla, db, dc


def _grads_kernel(x_ref, dt_ref, la_ref, b_ref, c_ref, s_ref, dy_ref, ds_ref,
                  dx_ref, ddt_ref, dla_ref, db_ref, dc_ref, *, q: int, heads: int, exact: bool):
    """Backward pass 2 (one program per chunk, channel block and run of ``heads`` heads of one
    group, all in parallel): every gradient of one chunk from each head's start state ``s``
    (stored by the forward) and the gradient ``ds`` of its end state (pass 1), for the block's
    channels: ``dx`` whole, ``ddt`` and ``dla`` as this block's part, ``dB`` and ``dC`` as this
    block's part summed over the program's heads (they share the group's B and C)."""
    dtype = x_ref.dtype if not exact else jnp.float32
    bm, cm = b_ref[...].astype(dtype), c_ref[...].astype(dtype)

    def head(i, acc):
        dx, ddt, dla, db, dc = _chunk_grads(
            x_ref[:, i, :].astype(jnp.float32), dt_ref[:, i].astype(jnp.float32), la_ref[:, i].astype(jnp.float32),
            bm, cm, s_ref[i, :, :], ds_ref[i, :, :], dy_ref[:, i, :].astype(jnp.float32), q=q, exact=exact,
            dtype=dtype)
        dx_ref[:, i, :] = dx.astype(dx_ref.dtype)
        ddt_ref[:, i] = ddt
        dla_ref[:, i] = dla
        return acc[0] + db, acc[1] + dc

    zero = jnp.zeros(b_ref.shape, jnp.float32)
    db, dc = jax.lax.fori_loop(0, heads, head, (zero, zero)) if heads > 1 else head(0, (zero, zero))
    db_ref[...] = db
    dc_ref[...] = dc


def _specs(b, t, h, p, g, n, bp):
    hpg = h // g
    return [
        pl.BlockSpec((None, t, None, bp), lambda i, j, k: (i, 0, j, k)),  # x [b, T, H, P]
        pl.BlockSpec((None, t, None), lambda i, j, k: (i, 0, j)),  # dt [b, T, H]
        pl.BlockSpec((None, t, None), lambda i, j, k: (i, 0, j)),  # log-decay [b, T, H]
        pl.BlockSpec((None, t, None, n), lambda i, j, k: (i, 0, j // hpg, 0)),  # B [b, T, G, N]
        pl.BlockSpec((None, t, None, n), lambda i, j, k: (i, 0, j // hpg, 0)),  # C
    ]


def _state_spec(bp, n, chunks=None):
    if chunks is None:
        return pl.BlockSpec((None, None, bp, n), lambda i, j, k: (i, j, k, 0))
    return pl.BlockSpec((None, None, chunks, bp, n), lambda i, j, k: (i, j, 0, k, 0))


def _forward(x, dt, la, bm, cm, s0, *, q, bp, num_warps, num_stages, interpret, keep_states):
    b, t, h, p = x.shape
    g, n = bm.shape[2], bm.shape[3]
    chunks = t // q
    exact = x.dtype == jnp.float32
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)]
    out_specs = [pl.BlockSpec((None, t, None, bp), lambda i, j, k: (i, 0, j, k)), _state_spec(bp, n)]
    if keep_states:
        out_shape.append(jax.ShapeDtypeStruct((b, h, chunks, p, n), jnp.float32))
        out_specs.append(_state_spec(bp, n, chunks))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, q=q, chunks=chunks, exact=exact),
        grid=(b, h, p // bp),
        in_specs=_specs(b, t, h, p, g, n, bp) + [_state_spec(bp, n)],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxkv_ssd_fwd",
    )(x, dt, la, bm, cm, s0)


def _forward_split(x, dt, la, bm, cm, s0, *, q, bp, num_warps, num_stages, interpret):
    """The forward as a sequential state pass and a chunk-parallel output pass (more programs
    than the fused kernel's ``b x H x P / block_p`` when that is fewer than the GPU's SMs)."""
    b, t, h, p = x.shape
    g, n = bm.shape[2], bm.shape[3]
    chunks = t // q
    exact = x.dtype == jnp.float32
    hpg = h // g
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    specs = _specs(b, t, h, p, g, n, bp)
    states, final = pl.pallas_call(
        functools.partial(_states_kernel, q=q, chunks=chunks, exact=exact),
        grid=(b, h, p // bp),
        in_specs=specs[:4] + [_state_spec(bp, n)],
        out_specs=[_state_spec(bp, n, chunks), _state_spec(bp, n)],
        out_shape=[jax.ShapeDtypeStruct((b, h, chunks, p, n), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)],
        compiler_params=params, interpret=interpret, name="jaxkv_ssd_fwd_states",
    )(x, dt, la, bm, s0)
    tok = lambda last: pl.BlockSpec((None, q, None) + last, lambda i, j, c: (i, c, j) + (0,) * len(last))  # noqa: E731
    grp = pl.BlockSpec((None, q, None, n), lambda i, j, c: (i, c, j // hpg, 0))
    y = pl.pallas_call(
        functools.partial(_output_kernel, q=q, exact=exact),
        grid=(b, h, chunks),
        in_specs=[tok((p,)), tok(()), tok(()), grp, grp,
                  pl.BlockSpec((None, None, None, p, n), lambda i, j, c: (i, j, c, 0, 0))],
        out_specs=tok((p,)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=params, interpret=interpret, name="jaxkv_ssd_fwd_output",
    )(x, dt, la, bm, cm, states)
    return y, final, states


def _backward(x, dt, la, bm, cm, states, dy, dsf, *, q, bp, bwd_heads, num_warps, num_stages, interpret):
    b, t, h, p = x.shape
    g, n = bm.shape[2], bm.shape[3]
    chunks = t // q
    exact = x.dtype == jnp.float32
    hpg = h // g
    f32 = jnp.float32
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    per_head = _specs(b, t, h, p, g, n, bp)
    dso, ds0 = pl.pallas_call(
        functools.partial(_dstates_kernel, q=q, chunks=chunks, exact=exact),
        grid=(b, h, p // bp),
        in_specs=[per_head[2], per_head[4], pl.BlockSpec((None, t, None, bp), lambda i, j, k: (i, 0, j, k)),
                  _state_spec(bp, n)],
        out_specs=[_state_spec(bp, n, chunks), _state_spec(bp, n)],
        out_shape=[jax.ShapeDtypeStruct((b, h, chunks, p, n), f32), jax.ShapeDtypeStruct((b, h, p, n), f32)],
        compiler_params=params, interpret=interpret, name="jaxkv_ssd_bwd_states",
    )(la, cm, dy, dsf)
    # pass 2: one program per (row, run of ``hb`` heads of one group, chunk, channel block), the
    # grid's last axis holding chunk x channel block; dx is whole, the other gradients are sums
    # over channels (and dB, dC over the heads of a group), so each program writes its part and
    # the parts are summed here
    npb = p // bp
    hb = bwd_heads
    tok = lambda last: pl.BlockSpec((None, q, hb) + last,  # noqa: E731
                                    lambda i, j, c: (i, c // npb, j) + (0,) * len(last))
    chan = pl.BlockSpec((None, q, hb, bp), lambda i, j, c: (i, c // npb, j, c % npb))
    part = lambda last: pl.BlockSpec((None, q, hb, None) + last,  # noqa: E731
                                     lambda i, j, c: (i, c // npb, j, c % npb) + (0,) * len(last))
    grp_part = pl.BlockSpec((None, q, None, None, n), lambda i, j, c: (i, c // npb, j, c % npb, 0))
    grp = pl.BlockSpec((None, q, None, n), lambda i, j, c: (i, c // npb, (j * hb) // hpg, 0))
    st = pl.BlockSpec((None, hb, None, bp, n), lambda i, j, c: (i, j, c // npb, c % npb, 0))
    dx, ddt, dla, db, dc = pl.pallas_call(
        functools.partial(_grads_kernel, q=q, heads=hb, exact=exact),
        grid=(b, h // hb, chunks * npb),
        in_specs=[chan, tok(()), tok(()), grp, grp, st, chan, st],
        out_specs=[chan, part(()), part(()), grp_part, grp_part],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, t, h, npb), f32),
                   jax.ShapeDtypeStruct((b, t, h, npb), f32), jax.ShapeDtypeStruct((b, t, h // hb, npb, n), f32),
                   jax.ShapeDtypeStruct((b, t, h // hb, npb, n), f32)],
        compiler_params=params, interpret=interpret, name="jaxkv_ssd_bwd_grads",
    )(x, dt, la, bm, cm, states, dy, dso)
    group = lambda a: a.sum(axis=3).reshape(b, t, g, hpg // hb, n).sum(axis=3)  # noqa: E731  parts -> group
    return dx, ddt.sum(-1), dla.sum(-1), group(db), group(dc), ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ssd(x, dt, la, bm, cm, s0, opts):
    opts = dict(opts)
    opts.pop("backward_heads")
    if opts.pop("split"):
        y, sf, _ = _forward_split(x, dt, la, bm, cm, s0, **opts)
    else:
        y, sf = _forward(x, dt, la, bm, cm, s0, keep_states=False, **opts)
    return y, sf


def _ssd_fwd(x, dt, la, bm, cm, s0, opts):
    opts = dict(opts)
    opts.pop("backward_heads")
    if opts.pop("split"):
        y, sf, states = _forward_split(x, dt, la, bm, cm, s0, **opts)
    else:
        y, sf, states = _forward(x, dt, la, bm, cm, s0, keep_states=True, **opts)
    return (y, sf), (x, dt, la, bm, cm, states)


def _ssd_bwd(opts, res, cts):
    x, dt, la, bm, cm, states = res
    dy, dsf = cts
    opts = dict(opts)
    opts.pop("split")
    opts["bwd_heads"] = opts.pop("backward_heads")
    dx, ddt, dla, db, dc, ds0 = _backward(x, dt, la, bm, cm, states, dy.astype(x.dtype), dsf.astype(jnp.float32),
                                          **opts)
    return dx, ddt.astype(dt.dtype), dla.astype(la.dtype), db.astype(bm.dtype), dc.astype(cm.dtype), ds0


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


@functools.partial(jax.jit, static_argnames=("block_t", "block_p", "split", "backward_heads", "num_warps",
                                             "num_stages", "interpret"))
def ssd_pallas_gpu(x: Array, dt: Array, A: Array, B: Array, C: Array, initial_state: Array | None = None, *,
                   block_t: int = 64, block_p: int = 64, split: bool | None = None,
                   backward_heads: int = 1, num_warps: int = 4, num_stages: int = 1,
                   interpret: bool = False) -> tuple[Array, Array]:
    """``(y [b, T, H, P] fp32, final_state [b, H, P, N] fp32)``, the reference's contract.
    ``block_t`` (the kernel's chunk: any chunk gives the same result, so the model's
    ``chunk_size`` is not this) and ``block_p`` are powers of two >= 16 (``block_p`` is capped at
    P); T is padded to a ``block_t`` multiple with dt = 0 (no decay, no input) when it is not one.
    ``split``: the forward as a state pass plus a chunk-parallel output pass instead of one
    kernel fused over chunks; None picks it when ``b x H`` is below ``SPLIT_BELOW`` programs.
    ``backward_heads``: the heads one program of the backward's gradient pass walks, summing their
    dB and dC in registers (a divisor of the heads per group of B and C); more heads, fewer
    fp32 partial sums written to HBM and read back."""
    b, t, h, p = x.shape
    n = B.shape[-1]
    for name, v in (("block_t", block_t), ("block_p", block_p)):
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v!r}")
    q, bp = int(block_t), min(int(block_p), p)
    if p % bp or n & (n - 1) or n < 16:  # the grid walks whole channel blocks; the dots need N a power of two
        raise ValueError(f"ssd_pallas_gpu: head_dim P ({p}) must be a multiple of block_p ({bp}) and state size N "
                         f"({n}) a power of two >= 16 (ssd() falls back to the reference for other sizes)")
    hpg = h // B.shape[2]
    if isinstance(backward_heads, bool) or not isinstance(backward_heads, int) or backward_heads < 1 \
            or hpg % backward_heads:
        raise ValueError(f"backward_heads must be a positive divisor of the heads per group ({hpg}), "
                         f"got {backward_heads!r}")
    pad = -t % q
    la = (dt.astype(jnp.float32) * jnp.broadcast_to(A.astype(jnp.float32), dt.shape))  # log-decay [b, T, H]
    dt = dt.astype(jnp.float32)
    if pad:
        tp = lambda a: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))  # noqa: E731
        x, dt, la, B, C = tp(x), tp(dt), tp(la), tp(B), tp(C)
    s0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    split = b * h < SPLIT_BELOW if split is None else bool(split)
    opts = (("q", q), ("bp", bp), ("split", split), ("backward_heads", backward_heads), ("num_warps", num_warps),
            ("num_stages", num_stages), ("interpret", interpret))
    y, final = _ssd(x, dt, la, B.astype(x.dtype), C.astype(x.dtype), s0, opts)
    return y[:, :t].astype(jnp.float32), final
