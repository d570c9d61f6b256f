"""Page selection on the GPU: two Pallas kernels with the Triton lowering.

1. **Scores** (grid ``(B, K, P / (step * steps))``, many programs: this pass reads the page
   bounds, the bytes that matter): each program walks ``steps`` tiles of ``step`` physical
   pages (a pipelined loop), loads each tile's logical-page min/max rows (strided by
   ``group``), takes Quest's bound for every query head of the KV head in fp32, and writes the
   physical pages' scores (``4 x P`` bytes a row, a small fraction of the bounds it read).
2. **Select** (grid ``(B, K)``): a program holds its row's scores in registers and finds the
   ``count``-th largest by narrowing a range of the scores' order-preserving uint32 keys
   sixteen-fold a pass (8 passes, each counting the keys at or above 16 thresholds at once). It
   keeps the pages above it and the lowest-indexed ties, and writes them ascending by a prefix
   sum and a scatter; -1 fills the slots after them. No sort, no ``top_k``.

Same result as ``reference.page_select_reference``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def default_tiling(pages: int, rows: int) -> tuple[int, int]:
    """``(step, steps)`` for the scoring kernel: ``step`` physical pages a loop iteration (the
    largest power of two dividing ``pages``, at most 16: small tiles keep many programs resident),
    ``steps`` iterations a program (a power of two, at most 8, leaving at least 512 programs for
    ``rows`` (row, KV head) pairs)."""
    step = 1
    while step < 16 and pages % (step * 2) == 0:
        step *= 2
    steps = 1
    while steps < 8 and pages % (step * steps * 2) == 0 and rows * pages // (step * steps * 2) >= 512:
        steps *= 2
    return step, steps


def _score_kernel(q_ref, lo_ref, hi_ref, o_ref, *, group: int, step: int, steps: int, heads: int):
    base = pl.program_id(2) * steps * step  # the program's first physical page
    qs = [q_ref[g, :].astype(jnp.float32) for g in range(heads)]  # [H] each

    def body(t, carry):
        first = (base + t * step) * group  # the iteration's first logical page
        best = jnp.full((step,), -jnp.inf, jnp.float32)
        for r in range(group):  # logical page r of each physical page: rows first + r, + group, ...
            rows = pl.ds(first + r, step, stride=group)
            lo = lo_ref[rows, :].astype(jnp.float32)  # [step, H]
            hi = hi_ref[rows, :].astype(jnp.float32)
            empty = jnp.min(lo, axis=1) == jnp.inf  # no key in the page
            lo = jnp.where(jnp.abs(lo) == jnp.inf, 0.0, lo)
            hi = jnp.where(jnp.abs(hi) == jnp.inf, 0.0, hi)
            bound = jnp.full((step,), -jnp.inf, jnp.float32)
            for qg in qs:
                bound = jnp.maximum(bound, jnp.sum(jnp.maximum(qg[None, :] * lo, qg[None, :] * hi), axis=1))
            best = jnp.maximum(best, jnp.where(empty, -jnp.inf, bound))
        out = pl.ds(pl.multiple_of(t * step, step), step)
        o_ref[out] = jnp.where(best != best, -jnp.inf, best)  # NaN is never chosen
        return carry

    jax.lax.fori_loop(0, steps, body, 0)


_FANOUT = 16  # thresholds tried per pass: 8 passes of 4 bits instead of 32 of one


def _select_kernel(s_ref, o_ref, *, pages: int, count: int, slots: int):
    s = s_ref[...]  # [P2] fp32; past ``pages`` unwritten
    size = s.shape[0]
    iota = jnp.arange(size, dtype=jnp.int32)
    valid = (iota < pages) & (s > -jnp.inf)
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    # uint32 keys in the scores' order: negative floats flipped whole, positive ones above them
    sign = jnp.uint32(0x80000000)
    key = jnp.where(bits >= sign, ~bits, bits | sign)
    n = jnp.minimum(jnp.sum(valid.astype(jnp.int32)), count)
    lo = jnp.min(jnp.where(valid, key, jnp.uint32(0xFFFFFFFF)))
    hi = jnp.max(jnp.where(valid, key, jnp.uint32(0)))
    m = jnp.arange(_FANOUT, dtype=jnp.uint32)

    def narrow(_, bounds):  # the largest t with at least n valid keys >= t lies in [lo, hi]
        lo, hi = bounds
        step = (hi - lo) // jnp.uint32(_FANOUT) + jnp.uint32(1)  # the _FANOUT thresholds lo + m * step cover [lo, hi]
        t = lo + jnp.minimum(m * step, hi - lo)  # [_FANOUT], ascending, t[0] = lo
        enough = jnp.sum(jnp.where(valid[None, :] & (key[None, :] >= t[:, None]), 1, 0), axis=1) >= n
        best = jnp.max(jnp.where(enough, t, lo))  # the highest threshold still holding n keys
        top = jnp.min(jnp.where(enough, hi, t - jnp.uint32(1)))  # below the lowest one that does not
        return best, jnp.maximum(top, best)

    t, _ = jax.lax.fori_loop(0, 8, narrow, (lo, hi))  # 16^8 = 2^32: one key left
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


@functools.partial(jax.jit, static_argnames=("group", "count", "step", "steps", "num_warps", "num_stages",
                                             "select_warps", "interpret"))
def page_select_pallas_gpu(q: Array, kmin: Array, kmax: Array, *, group: int, count: int, step: int | None = None,
                           steps: int | None = None, num_warps: int = 4, num_stages: int = 3, select_warps: int = 8,
                           interpret: bool = False) -> Array:
    """``[B, K, count]`` int32: see ``reference.page_select_reference``. The scoring kernel's
    tiling: ``step`` physical pages a loop iteration, ``steps`` iterations a program (powers of
    two whose product divides the page count; defaults from ``default_tiling``)."""
    b, kh, g, h = q.shape
    logical = kmin.shape[2]
    pages = logical // group
    d_step, d_steps = default_tiling(pages, b * kh)
    step, steps = step or d_step, steps or (d_steps if step is None else 1)
    span = step * steps
    if pages % span or step & (step - 1) or steps & (steps - 1):
        raise ValueError(f"step ({step}) and steps ({steps}) must be powers of two whose product divides the "
                         f"{pages} physical pages")
    p2, slots = _pow2_at_least(pages), _pow2_at_least(count)
    scores = pl.pallas_call(
        functools.partial(_score_kernel, group=group, step=step, steps=steps, heads=g),
        grid=(b, kh, pages // span),
        in_specs=[pl.BlockSpec((None, None, g, h), lambda i, j, c: (i, j, 0, 0)),
                  pl.BlockSpec((None, None, logical, h), lambda i, j, c: (i, j, 0, 0)),
                  pl.BlockSpec((None, None, logical, h), lambda i, j, c: (i, j, 0, 0))],
        out_specs=pl.BlockSpec((None, None, span), lambda i, j, c: (i, j, c)),
        out_shape=jax.ShapeDtypeStruct((b, kh, p2), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxkv_page_scores",
    )(q, kmin, kmax)
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
