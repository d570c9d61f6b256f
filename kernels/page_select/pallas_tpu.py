"""Page selection on the TPU: the bounds' pass in Pallas with its Mosaic lowering, the pick in XLA.

Grid ``(B, K, L / block_l)``, every step parallel: a step loads ``block_l`` logical pages'
key min/max ``[block_l, H]`` and the KV head's query heads ``[G, H]``, and writes those pages'
scores as a lane row ``[1, block_l]``. Quest's bound is two matrix products on the MXU, since
for ``lo <= hi``

    max(q_c lo_c, q_c hi_c) = max(q_c, 0) hi_c + min(q_c, 0) lo_c,

so ``bound = max(q, 0) @ hi^T + min(q, 0) @ lo^T`` (``[G, block_l]``, fp32 at HIGHEST
precision), maxed over the query heads; an empty page (every channel's min ``+inf``, counted by
one more product) scores -inf. The scores are 1/(2H) of the bounds' bytes; the max over each
physical page's logical pages, ``top_k`` and the ascending sort run in XLA on them
(``reference.group_scores`` and ``select_pages``), where the TPU's own top-k serves.

Tested in the TPU interpreter (``pltpu.InterpretParams``) on the CPU against the reference, and
lowered for the TPU (``jax.export`` with ``platforms=["tpu"]``). It has not been compiled or
timed on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxkv.kernels.page_select.reference import group_scores, select_pages

Array = jax.Array
__all__ = ["page_select_pallas_tpu", "page_scores_pallas_tpu"]
_NT = (((1,), (1,)), ((), ()))  # contract the channels of both: [G, H] x [rows, H] -> [G, rows]


def _kernel(q_ref, lo_ref, hi_ref, o_ref):
    q = q_ref[...].astype(jnp.float32)  # [G, H]
    lo = lo_ref[...].astype(jnp.float32)  # [bl, H]
    hi = hi_ref[...].astype(jnp.float32)
    dot = functools.partial(jax.lax.dot_general, dimension_numbers=_NT, precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
    finite = lambda x: jnp.where(jnp.abs(x) == jnp.inf, 0.0, x)  # noqa: E731  an infinite bound counts 0
    s = dot(jnp.maximum(q, 0.0), finite(hi)) + dot(jnp.minimum(q, 0.0), finite(lo))  # [G, bl]
    bound = jnp.max(s, axis=0, keepdims=True)  # [1, bl]
    ones = jnp.ones((8, lo.shape[1]), jnp.float32)
    n_inf = jnp.max(dot(ones, (lo == jnp.inf).astype(jnp.float32)), axis=0, keepdims=True)  # [1, bl]
    o_ref[...] = jnp.where(n_inf >= lo.shape[1], -jnp.inf, bound)


def _block(logical: int, block_l: int | None) -> int:
    if block_l is not None:
        if isinstance(block_l, bool) or not isinstance(block_l, int) or block_l < 8 or block_l % 8:
            raise ValueError(f"block_l must be a positive multiple of 8, got {block_l!r}")
        return block_l
    for b in (1024, 512, 256, 128):  # whole lane tiles that divide the pages: no padding copy
        if logical % b == 0:
            return b
    return 128


@functools.partial(jax.jit, static_argnames=("block_l", "interpret"))
def page_scores_pallas_tpu(q: Array, kmin: Array, kmax: Array, *, block_l: int | None = None,
                           interpret: bool = False) -> Array:
    """``reference.page_scores`` on the TPU: ``[B, K, L]`` fp32. ``block_l`` (logical pages a
    step) is a multiple of 8, and of 128 to lower for a TPU; by default the largest of 1,024 /
    512 / 256 / 128 dividing L, else L is padded with empty pages (a copy of the bounds)."""
    b, kh, g, h = q.shape
    logical = kmin.shape[2]
    bl = _block(logical, block_l)
    pad = -logical % bl
    if pad:
        kmin = jnp.pad(kmin, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=jnp.inf)
        kmax = jnp.pad(kmax, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=-jnp.inf)
    out = pl.pallas_call(
        _kernel,
        grid=(b, kh, (logical + pad) // bl),
        in_specs=[pl.BlockSpec((None, None, g, h), lambda i, j, c: (i, j, 0, 0)),
                  pl.BlockSpec((None, None, bl, h), lambda i, j, c: (i, j, c, 0)),
                  pl.BlockSpec((None, None, bl, h), lambda i, j, c: (i, j, c, 0))],
        out_specs=pl.BlockSpec((None, None, 1, bl), lambda i, j, c: (i, j, 0, c)),
        out_shape=jax.ShapeDtypeStruct((b, kh, 1, logical + pad), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxkv_page_scores_tpu",
    )(q, kmin, kmax)
    return out[:, :, 0, :logical]


@functools.partial(jax.jit, static_argnames=("group", "count", "block_l", "interpret"))
def page_select_pallas_tpu(q: Array, kmin: Array, kmax: Array, *, group: int, count: int,
                           block_l: int | None = None, interpret: bool = False) -> Array:
    """``[B, K, count]`` int32: see ``reference.page_select_reference``."""
    logical = page_scores_pallas_tpu(q, kmin, kmax, block_l=block_l, interpret=interpret)
    return select_pages(group_scores(logical, group=group), count=count)
