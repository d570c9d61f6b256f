"""Page selection, the reference (plain jnp).

For one decode query per row, the ``G`` query heads of each KV head share its pages (GQA):
``q [B, K, G, H]``; each logical page of the cache keeps the per-channel min and max of its keys,
``kmin, kmax [B, K, L, H]`` (a page with no key has min ``+inf`` and max ``-inf``); ``group``
logical pages make one physical page (``L`` a multiple of ``group``).

  1. bound[b, k, l] = max over g of sum_c max(q_c * kmin_c, q_c * kmax_c)  (Quest: no key of
     the page can score higher; an infinite bound counts 0, an empty page scores -inf)
  2. physical[b, k, p] = max of the bounds of its ``group`` logical pages (NaN counts as -inf)
  3. the ``count`` physical pages of highest score (ties to the lower index, pages scoring -inf
     never), **in ascending page order**, -1 after them where fewer pages have a finite score.

Ascending order is the memory order the sparse decode kernel reads the pages in.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def page_scores(q: Array, kmin: Array, kmax: Array) -> Array:
    """Step 1: ``[B, K, L]`` fp32, the bound of each logical page maxed over the query heads."""
    qf = q.astype(jnp.float32)[:, :, :, None, :]  # [B, K, G, 1, H]
    lo, hi = kmin.astype(jnp.float32)[:, :, None], kmax.astype(jnp.float32)[:, :, None]
    empty = jnp.all(kmin == jnp.inf, axis=-1)  # no key in the page
    bound = jnp.sum(jnp.maximum(qf * jnp.where(jnp.isinf(lo), 0, lo), qf * jnp.where(jnp.isinf(hi), 0, hi)), -1)
    return jnp.where(empty, -jnp.inf, jnp.max(bound, axis=2))


def physical_scores(q: Array, kmin: Array, kmax: Array, *, group: int) -> Array:
    """Steps 1-2: ``[B, K, L / group]`` fp32."""
    return group_scores(page_scores(q, kmin, kmax), group=group)


def group_scores(logical: Array, *, group: int) -> Array:
    """Step 2 from step 1's ``[B, K, L]``: each physical page's score ``[B, K, L / group]``."""
    b, kh, n = logical.shape
    s = jnp.max(logical.reshape(b, kh, n // group, group), axis=-1)
    return jnp.where(jnp.isnan(s), -jnp.inf, s)


def select_pages(physical: Array, *, count: int) -> Array:
    """Step 3 from step 2's ``[B, K, P]``: ``[B, K, count]`` int32, ascending, then -1."""
    n = min(count, physical.shape[-1])
    best, idx = jax.lax.top_k(physical, n)
    big = jnp.iinfo(jnp.int32).max
    idx = jnp.sort(jnp.where(best > -jnp.inf, idx, big), axis=-1)
    idx = jnp.where(idx == big, -1, idx).astype(jnp.int32)
    return jnp.pad(idx, ((0, 0), (0, 0), (0, count - n)), constant_values=-1) if count > n else idx


def page_select_reference(q: Array, kmin: Array, kmax: Array, *, group: int, count: int) -> Array:
    """``[B, K, count]`` int32: the chosen physical pages ascending, then -1 (module docstring)."""
    return select_pages(physical_scores(q, kmin, kmax, group=group), count=count)
