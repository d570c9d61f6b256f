"""Page selection on the GPU: two Pallas kernels with the Triton lowering.

1. **Scores** (grid ``(B, K, P / chunk)``, many programs: this pass reads the page bounds, the
   bytes that matter): each program loads ``chunk`` physical pages' logical-page min/max tiles
   (strided by ``group``), takes Quest's bound for every query head of the KV head in fp32,
   and writes the physical pages' scores (``4 x P`` bytes a row, a small fraction of the
   bounds it read).
2. **Select** (grid ``(B, K)``): a program holds its row's scores in registers, finds the
   ``count``-th largest by bisection on the scores' order-preserving int32 keys (32 counting
   passes), keeps the pages above it and the lowest-indexed ties, and writes them ascending by
   a prefix sum and a scatter; -1 fills the slots after them. No sort, no ``top_k``.

Measured on the H200 and kept because they were faster: this one-shot scoring program beat a
pipelined loop over smaller tiles (13.3 against 14.4 us at 2,048 pages of 64 tokens, 4 x 8
rows), and 32 single-threshold passes beat 8 passes of 16 thresholds (8.1 against 15.4 us: the
sixteen-fold counting is four times the work, and the work, not the passes' latency, bounds it).

Same result as ``reference.page_select_reference``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array
_I32_MAX = 2**31 - 1
_I32_MIN = -(2**31)


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def default_chunk(pages: int, group: int) -> int:
    """Physical pages per scoring program: the largest power of two dividing ``pages``, at most
    ``64 / group`` (about 64 logical pages a program)."""
    cap = max(1, 64 // group)
    chunk = 1
    while chunk * 2 <= cap and pages % (chunk * 2) == 0:
        chunk *= 2
    return chunk


def _score_kernel(q_ref, lo_ref, hi_ref, o_ref, *, group: int, chunk: int, heads: int):
    first = pl.program_id(2) * chunk * group  # the chunk's first logical page
    qs = [q_ref[g, :].astype(jnp.float32) for g in range(heads)]  # [H] each
    best = jnp.full((chunk,), -jnp.inf, jnp.float32)
    for r in range(group):  # logical page r of each physical page: rows first + r, + group, ...
        rows = pl.ds(first + r, chunk, stride=group)
        lo = lo_ref[rows, :].astype(jnp.float32)  # [chunk, H]
        hi = hi_ref[rows, :].astype(jnp.float32)
        empty = jnp.min(lo, axis=1) == jnp.inf  # no key in the page
        lo = jnp.where(jnp.abs(lo) == jnp.inf, 0.0, lo)
        hi = jnp.where(jnp.abs(hi) == jnp.inf, 0.0, hi)
        bound = jnp.full((chunk,), -jnp.inf, jnp.float32)
        for qg in qs:
            bound = jnp.maximum(bound, jnp.sum(jnp.maximum(qg[None, :] * lo, qg[None, :] * hi), axis=1))
        best = jnp.maximum(best, jnp.where(empty, -jnp.inf, bound))
    o_ref[...] = jnp.where(best != best, -jnp.inf, best)  # NaN is never chosen


def _score_kernel_dots(qp_ref, qn_ref, lo_ref, hi_ref, o_ref, *, group: int, chunk: int, heads: int,
                       exact: bool):
    """``_score_kernel`` on the tensor cores: for ``lo <= hi``, ``max(q lo, q hi) = max(q, 0) hi +
    min(q, 0) lo``, so each tile's bounds are two ``dot``s of the padded query heads ``[16, H]``
    with the tile ``[chunk, H]`` (``chunk >= 16``), maxed over the real heads."""
    first = pl.program_id(2) * chunk * group
    qp, qn = qp_ref[...], qn_ref[...]  # [R, H]: max(q, 0), min(q, 0), rows past ``heads`` zero
    real = (jnp.arange(qp.shape[0]) < heads)[:, None]
    allow_tf32 = False if exact else None
    best = jnp.full((chunk,), -jnp.inf, jnp.float32)
    for r in range(group):
        rows = pl.ds(first + r, chunk, stride=group)
        lo, hi = lo_ref[rows, :], hi_ref[rows, :]  # [chunk, H] as stored
        empty = jnp.min(lo.astype(jnp.float32), axis=1) == jnp.inf
        lo = jnp.where(jnp.abs(lo) == jnp.inf, 0.0, lo).astype(qp.dtype)
        hi = jnp.where(jnp.abs(hi) == jnp.inf, 0.0, hi).astype(qp.dtype)
        s = (plgpu.dot(qp, hi, trans_b=True, allow_tf32=allow_tf32).astype(jnp.float32)
             + plgpu.dot(qn, lo, trans_b=True, allow_tf32=allow_tf32).astype(jnp.float32))  # [R, chunk]
        bound = jnp.max(jnp.where(real, s, -jnp.inf), axis=0)
        best = jnp.maximum(best, jnp.where(empty, -jnp.inf, bound))
    o_ref[...] = jnp.where(best != best, -jnp.inf, best)


def _select_kernel(s_ref, o_ref, *, pages: int, count: int, slots: int):
    s = s_ref[...]  # [P2] fp32; past ``pages`` unwritten
    size = s.shape[0]
    iota = jnp.arange(size, dtype=jnp.int32)
    valid = (iota < pages) & (s > -jnp.inf)
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    key = jnp.where(bits >= 0, bits, bits ^ _I32_MAX)  # int order = float order
    n = jnp.minimum(jnp.sum(valid.astype(jnp.int32)), count)
    lo = jnp.min(jnp.where(valid, key, _I32_MAX))
    hi = jnp.max(jnp.where(valid, key, _I32_MIN))

    def halve(_, bounds):  # the largest t with at least n valid keys >= t lies in [lo, hi]
        lo, hi = bounds
        x = lo ^ hi
        mid = (lo & hi) + (x >> 1) + (x & 1)  # ceil((lo + hi) / 2) without overflow
        enough = jnp.sum(jnp.where(valid & (key >= mid), 1, 0)) >= n
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    t, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    above = valid & (key > t)
    need = n - jnp.sum(above.astype(jnp.int32))
    tie = valid & (key == t)
    sel = (above | (tie & (jnp.cumsum(tie.astype(jnp.int32)) <= need))) & (n > 0)
    rank = jnp.cumsum(sel.astype(jnp.int32)) - 1
    total = jnp.sum(sel.astype(jnp.int32))
    # unselected pages aim past the slots, each at its own place (masked: never stored on a GPU)
    plgpu.store(o_ref.at[jnp.where(sel, rank, slots + iota)], iota, mask=sel)
    j = jnp.arange(slots, dtype=jnp.int32)
    plgpu.store(o_ref.at[pl.ds(0, slots)], jnp.full((slots,), -1, jnp.int32), mask=j >= total)


@functools.partial(jax.jit, static_argnames=("group", "count", "chunk", "scoring", "num_warps", "select_warps",
                                             "interpret"))
def page_select_pallas_gpu(q: Array, kmin: Array, kmax: Array, *, group: int, count: int, chunk: int | None = None,
                           scoring: str = "elementwise", num_warps: int = 8, select_warps: int = 8,
                           interpret: bool = False) -> Array:
    """``[B, K, count]`` int32: see ``reference.page_select_reference``. ``chunk``: physical
    pages per scoring program (a power of two dividing the page count; default
    ``default_chunk``). ``scoring``: ``"elementwise"`` (the measured default) or ``"dots"``
    (``_score_kernel_dots``, on the tensor cores; needs ``chunk >= 16``; not yet timed on a GPU;
    in 16 bits the query is rounded to the bounds' dtype, so scores can differ from the
    reference's in the last bits)."""
    if scoring not in ("elementwise", "dots"):
        raise ValueError(f"scoring must be 'elementwise' or 'dots', got {scoring!r}")
    b, kh, g, h = q.shape
    logical = kmin.shape[2]
    pages = logical // group
    chunk = chunk or default_chunk(pages, group)
    if pages % chunk or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two dividing the {pages} physical pages, got {chunk}")
    if scoring == "dots" and chunk < 16:
        raise ValueError(f"scoring='dots' needs chunk >= 16 (a dot's smallest side), got {chunk} for {pages} pages")
    p2, slots = _pow2_at_least(pages), _pow2_at_least(count)
    bounds = [pl.BlockSpec((None, None, logical, h), lambda i, j, c: (i, j, 0, 0))] * 2
    if scoring == "dots":
        exact = jnp.float32 in (q.dtype, kmin.dtype)
        dt = jnp.float32 if exact else kmin.dtype
        rows = max(16, _pow2_at_least(g))
        qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, 0), (0, rows - g), (0, 0)))
        q_args = (jnp.maximum(qf, 0.0).astype(dt), jnp.minimum(qf, 0.0).astype(dt))
        kernel = functools.partial(_score_kernel_dots, group=group, chunk=chunk, heads=g, exact=exact)
        q_specs = [pl.BlockSpec((None, None, rows, h), lambda i, j, c: (i, j, 0, 0))] * 2
    else:
        q_args = (q,)
        kernel = functools.partial(_score_kernel, group=group, chunk=chunk, heads=g)
        q_specs = [pl.BlockSpec((None, None, g, h), lambda i, j, c: (i, j, 0, 0))]
    scores = pl.pallas_call(
        kernel,
        grid=(b, kh, pages // chunk),
        in_specs=q_specs + bounds,
        out_specs=pl.BlockSpec((None, None, chunk), lambda i, j, c: (i, j, c)),
        out_shape=jax.ShapeDtypeStruct((b, kh, p2), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="jaxkv_page_scores",
    )(*q_args, kmin, kmax)
    chosen = pl.pallas_call(
        functools.partial(_select_kernel, pages=pages, count=count, slots=slots),
        grid=(b, kh),
        in_specs=[pl.BlockSpec((None, None, p2), lambda i, j: (i, j, 0))],
        out_specs=pl.BlockSpec((None, None, slots + p2), lambda i, j: (i, j, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kh, slots + p2), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=select_warps, num_stages=1),
        interpret=interpret,
        name="jaxkv_page_select",
    )(scores)
    return chosen[:, :, :count]
