"""k-means in JAX: k-means++ seeding, then Lloyd iterations until no label changes.

Shared by Squeezed Attention's key index (``jaxkv.cache.squeezed``: per layer and KV head, under
``vmap``, with a validity mask over cache slots) and ICN's clusters of the vocabulary keys
(``jaxkv.icn``: the unembedding rows). Pure functions of their inputs and a PRNG key; traceable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkv.typing import Array

__all__ = ["kmeans", "inertia"]


def _sq_dist(x: Array, c: Array) -> Array:
    """``[N, C]`` squared distances of ``x [N, H]`` to ``c [C, H]``."""
    return jnp.sum(x * x, -1)[:, None] + jnp.sum(c * c, -1)[None, :] - 2 * x @ c.T


def kmeans(x: Array, valid: Array, n_clusters: int, key: Array, *, max_iters: int = 300
           ) -> tuple[Array, Array]:
    """k-means of the rows ``x [N, H]`` where ``valid [N]``: k-means++ initialisation (each new
    centre drawn with probability proportional to the squared distance to the nearest one), then
    Lloyd iterations until no label changes or ``max_iters``. Returns ``labels [N]`` (-1 where not
    valid) and ``centres [C, H]``, each the mean of its rows (a cluster with none keeps its last
    centre). Rows are clustered about their mean, so distances stay exact far from the origin.
    Deterministic for a given ``key``."""
    x = jnp.where(valid[:, None], x.astype(jnp.float32), 0.0)  # what padding holds (NaN too) never counts
    n = x.shape[0]
    w = valid.astype(jnp.float32)
    # distances as |x|^2 + |c|^2 - 2 x.c cancel for rows far from the origin: cluster about the mean
    shift = jnp.sum(x * w[:, None], 0) / jnp.maximum(jnp.sum(w), 1.0)
    x = jnp.where(valid[:, None], x - shift, 0.0)

    def pick(d2, k):
        total = jnp.sum(d2)
        p = jnp.where(total > 0, d2 / jnp.where(total > 0, total, 1.0), w / jnp.maximum(jnp.sum(w), 1.0))
        return jax.random.choice(k, n, p=p)

    k0, key = jax.random.split(key)
    first = x[pick(jnp.zeros(n), k0)]
    centres = jnp.zeros((n_clusters, x.shape[1]), jnp.float32).at[0].set(first)
    d2 = jnp.sum((x - first) ** 2, -1) * w

    def init_step(i, carry):
        centres, d2, key = carry
        key, k = jax.random.split(key)
        c = x[pick(d2, k)]
        return centres.at[i].set(c), jnp.minimum(d2, jnp.sum((x - c) ** 2, -1) * w), key

    centres, _, _ = jax.lax.fori_loop(1, n_clusters, init_step, (centres, d2, key))

    def assign(centres):
        return jnp.argmin(_sq_dist(x, centres), axis=-1).astype(jnp.int32)

    def means(labels, centres):  # each cluster's mean; one with no row keeps its centre
        sums = jax.ops.segment_sum(x * w[:, None], labels, n_clusters)
        counts = jax.ops.segment_sum(w, labels, n_clusters)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centres)

    def body(carry):
        centres, labels, it, _ = carry
        centres = means(labels, centres)
        new = assign(centres)
        return centres, new, it + 1, jnp.any((new != labels) & valid)

    def cond(carry):
        return (carry[2] < max_iters) & carry[3]

    centres, labels, _, _ = jax.lax.while_loop(cond, body, (centres, assign(centres), 0, True))
    centres = means(labels, centres)  # stopped by max_iters, they were the labels-before's means
    return jnp.where(valid, labels, -1), centres + shift


def inertia(x: Array, valid: Array, labels: Array, centres: Array) -> Array:
    """Sum of squared distances of the valid rows to their centres."""
    d = jnp.sum((x.astype(jnp.float32) - centres[jnp.maximum(labels, 0)]) ** 2, -1)
    return jnp.sum(jnp.where(valid, d, 0.0))
