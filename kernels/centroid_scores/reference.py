"""Centroid scores, the reference (plain jnp): Squeezed Attention's estimate of each cluster's
attention weight for a decode query, and the clusters that pass a threshold.

The context's keys of each (row, KV head) are clustered; cluster ``c`` has ``counts[b, k, c]``
keys and centroid ``centroids[b, k, c]``. For the ``G`` query heads of a KV head
(``q [B, K, G, H]``):

  1. s[g, c] = q[g] . centroid[c] / sqrt(H) (or ``scale``); clusters with no keys left out
  2. weight[c] = mean over g of exp(s[g, c]) / sum_c' counts[c'] exp(s[g, c'])
     (the softmax weight one key of the cluster would get if every key sat on its centroid)
  3. kept[c] = weight[c] >= threshold[b]

Step 2 is ``jaxkv.cache.squeezed.cluster_weights`` for one query token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def centroid_scores_reference(q: Array, centroids: Array, counts: Array, threshold: Array, *,
                              scale: float | None = None) -> tuple[Array, Array]:
    """``(weights [B, K, C] fp32, kept [B, K, C] bool)``; see the module docstring."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.einsum("BKGH,BKCH->BKGC", q.astype(jnp.float32), centroids.astype(jnp.float32), precision="highest") * scale
    return weights_from_scores(s, counts, threshold)


def weights_from_scores(s: Array, counts: Array, threshold: Array) -> tuple[Array, Array]:
    """Steps 2-3 from step 1's scaled scores ``s [B, K, G, C]`` (fp32)."""
    has = counts[:, :, None, :] > 0
    s = jnp.where(has, s, -jnp.inf)
    log_z = jax.nn.logsumexp(s + jnp.log(jnp.maximum(counts, 1e-30))[:, :, None, :], axis=-1, keepdims=True)
    weights = jnp.mean(jnp.where(has, jnp.exp(s - log_z), 0.0), axis=2)
    return weights, weights >= threshold[:, None, None]
