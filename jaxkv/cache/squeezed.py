"""``squeezed``: Squeezed Attention — a k-means index of a fixed context's keys, and attention
over only the clusters a query needs.

1. **Index** (at prefill, per layer and KV head): k-means on the L2-normalised context keys
   (``kmeans``: k-means++ initialisation, Lloyd iterations until no label changes or
   ``max_iters``), ``round(centroid_share * slots)`` clusters; each cluster's centroid for
   scoring is the mean of its members' *unnormalised* keys, with its size ``N_j``.
2. **Threshold** (calibration, the after-prefill hook): the last ``calib_queries`` prompt queries
   estimate each key's softmax weight from its centroid,
   ``exp(q . c_j / sqrt(d)) / sum_i N_i exp(q . c_i / sqrt(d))``, averaged over those queries and
   the query heads of the KV head; one threshold per row, the ``1 - keep`` quantile over every
   layer and head (so per-head sparsity adapts), kept in each layer's state.
3. **Online** (extend: a question after the context; decode): the chunk's queries estimate the
   clusters' weights the same way (averaged over the chunk); context keys of clusters at or above
   the threshold (a decode step: the decode threshold, below) are attended exactly, plus the last ``window`` context tokens, and merged by
   log-sum-exp (``jaxkv.attention.merge_attention``) with dense causal attention over everything
   after the context (the question and the generated tokens).

The prefilled cache is an immutable value: the same prefilled cache answers any number of
questions (each ``forward`` of a question over it returns a new cache; the index is never
rebuilt). Nothing is evicted (bytes: the full cache plus the index); the method saves reads,
which ``attended_keys`` reports.

Option (not the paper's): ``decode_calibration="query"`` gives decode steps a second threshold,
calibrated on the same queries taken one at a time (``query_threshold``: a quantile over every
(query, key) pair rather than over the 100-query average), since a decode step scores one query,
not an average; which reads closer to ``keep`` depends on the model (default model: 14% vs 18%
of the keys at ``keep=0.1``; SmolLM2: 41% vs 22%). Deviations: the number of clusters follows the cache's slots (static shapes) rather than the
exact prompt length; calibration queries see the whole context's centroids (the paper's offline
calibration does the same); with ``levels=2`` the coarse level clusters the fine centroids and
its own threshold (``coarse_keep`` of the keys) prunes fine clusters before theirs is applied,
but every fine centroid is still scored, by the decode kernel too (the coarse level prunes,
it saves no centroid reads yet);
without a decode kernel, attention over the kept keys is a masked pure-jnp pass, so reads are
saved only in what ``attended_keys`` counts.

``decode_kernel="pallas_gpu"`` (or ``"pallas_tpu"``, ``"reference"``) scores a decode step's clusters (both levels)
and applies the threshold through ``jaxkv.kernels.centroid_scores``, and the decode step's
attention runs through ``jaxkv.kernels.sparse_decode`` (same backend) too: the
prefill lays each KV head's context out by cluster (the clusters in order of their calibration
weight, heaviest first, so the clusters a query keeps tend to share blocks; slots no longer
equal positions there, which attention never assumed), and a step reads only the blocks of
``decode_block`` slots that hold a kept cluster, the window or a token after the context, with
a slot mask for the dropped tokens inside them. The slots are rounded up to whole blocks. In
low-bit storage (``kv_bits``) the attention stays jnp.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxkv.attention import attend_with_lse, merge_attention
from jaxkv.cache.full import FullCache
from jaxkv.cache.kv import KVCache
from jaxkv.cache.policy import (CachePolicy, LayerSpec, Phase, check_decode_kernel, check_ints, check_shares,
                                kernel_options, register_policy)
from jaxkv.errors import UserError
from jaxkv.kmeans import inertia, kmeans  # noqa: F401  (part of this module's API, shared with jaxkv.icn)
from jaxkv.typing import Array

__all__ = ["SqueezedCache", "SqueezedLayer", "SqueezedState", "CoarseIndex", "kmeans", "inertia", "cluster_weights",
           "global_threshold", "query_threshold"]


def cluster_weights(q: Array, centroids: Array, counts: Array, q_real: Array, *, per_query: bool = False) -> Array:
    """Estimated softmax weight of one key of each cluster, ``exp(q.c_j/sqrt d) / sum_i N_i
    exp(q.c_i/sqrt d)``, averaged over the real queries (``q_real [B, T]``) and the query heads
    of each KV head: ``q [B, T, K, G, H]``, ``centroids [B, K, C, H]``, ``counts [B, K, C]`` ->
    ``[B, K, C]``; ``per_query``: averaged over the query heads only, ``[B, K, T, C]`` (0 for a
    query that is not real)."""
    s = jnp.einsum("BTKGH,BKCH->BKGTC", q.astype(jnp.float32), centroids.astype(jnp.float32),
                   precision="highest") * q.shape[-1] ** -0.5  # fp32, not TF32 on a GPU: small weights compared
    s = jnp.where(counts[:, :, None, None, :] > 0, s, -jnp.inf)
    log_z = jax.nn.logsumexp(s + jnp.log(jnp.maximum(counts, 1e-30))[:, :, None, None, :], axis=-1, keepdims=True)
    p = jnp.exp(s - log_z)  # [B, K, G, T, C]
    m = q_real.astype(jnp.float32)[:, None, None, :, None]
    if per_query:
        return jnp.mean(p, axis=2) * m[:, :, 0]
    return jnp.sum(p * m, axis=(2, 3)) / jnp.maximum(jnp.sum(m, axis=(2, 3)) * q.shape[3], 1.0)


def _cluster_means(keys: Array, labels: Array, n: int) -> tuple[Array, Array]:
    """Per (row, head): the mean of ``keys [B, K, S, H]`` in each of ``n`` clusters by ``labels
    [B, K, S]`` (-1: in none) and the cluster sizes, ``[B, K, n, H]`` and ``[B, K, n]`` (memory
    linear in S: segment sums, no one-hot)."""
    ids = jnp.where(labels >= 0, labels, n)  # an extra bucket for the unlabelled, dropped below

    def one(x, i):
        sums = jax.ops.segment_sum(x, i, n + 1)[:n]
        counts = jax.ops.segment_sum(jnp.ones(i.shape, jnp.float32), i, n + 1)[:n]
        return sums / jnp.maximum(counts, 1.0)[:, None], counts

    return jax.vmap(jax.vmap(one))(keys.astype(jnp.float32), ids)


def global_threshold(estimates: list[Array], valid: list[Array], keep: float) -> Array:
    """``[B]``: the ``1 - keep`` quantile of every layer's per-key estimates ``[B, K, S]`` (where
    ``valid``), per row: one threshold across all layers and heads."""
    est = jnp.concatenate([e.reshape(e.shape[0], -1) for e in estimates], -1).astype(jnp.float32)
    ok = jnp.concatenate([v.reshape(v.shape[0], -1) for v in valid], -1)
    if keep >= 1:  # keep everything, whatever a later query's estimates
        return jnp.full(est.shape[:1], -jnp.inf)
    # numpy's linear quantile over the valid entries, without NaN in a sort: invalid entries
    # sort last as +inf and the index runs over the valid count only
    ordered = jnp.sort(jnp.where(ok, est, jnp.inf), axis=-1)
    n = jnp.sum(ok, axis=-1)
    at = (1.0 - keep) * jnp.maximum(n - 1, 0).astype(jnp.float32)
    lo = jnp.floor(at).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    v_lo = jnp.take_along_axis(ordered, lo[:, None], -1)[:, 0]
    v_hi = jnp.take_along_axis(ordered, hi[:, None], -1)[:, 0]
    return v_lo + (v_hi - v_lo) * (at - lo)


def query_threshold(weights: list[Array], counts: list[Array], q_real: Array, keep: float) -> Array:
    """``[B]``: the threshold at which, pooled over every calibration query (``q_real [B, Q]``)
    and every layer's clusters, ``keep`` of the (query, key) pairs pass: ``weights`` per layer
    ``[B, K, Q, C]`` (``cluster_weights(..., per_query=True)``), ``counts [B, K, C]`` each cluster's
    keys. A weighted quantile: clusters sorted by weight, the first at which the keys counted
    so far reach ``keep`` of all."""
    if keep >= 1:
        return jnp.full(q_real.shape[:1], -jnp.inf)
    m = q_real.astype(jnp.float32)[:, None, :, None]
    w = jnp.concatenate([x.reshape(x.shape[0], -1) for x in weights], -1)
    n = jnp.concatenate([(jnp.broadcast_to(c[:, :, None, :], x.shape) * m).reshape(x.shape[0], -1)
                         for x, c in zip(weights, counts)], -1)
    n = jnp.where(n > 0, n, 0.0)
    order = jnp.argsort(-jnp.where(n > 0, w, -jnp.inf), axis=-1)
    w_sorted = jnp.take_along_axis(w, order, -1)
    cum = jnp.cumsum(jnp.take_along_axis(n, order, -1), -1)
    first = jnp.argmax(cum >= keep * cum[:, -1:], axis=-1)
    return jnp.take_along_axis(w_sorted, first[:, None], -1)[:, 0]


# ------------------------------------------------------------------ the cache
@struct.dataclass
class SqueezedState:
    """One layer: ``kv`` every token at slot = position; the index of the context's keys:
    ``labels [B, K, S]`` (-1: not indexed), ``centroids [B, K, C, H]`` (fp32 means of the
    unnormalised keys), ``counts [B, K, C]``, ``estimate [B, K, S]`` (calibration weights);
    ``threshold [B]`` (extend chunks; decode steps too unless ``decode_calibration="query"``, whose
    own ``decode_threshold [B]`` is held only then), ``context_len
    [B]``, ``attended [B]`` (last step's attended keys); ``calibration [B, K, Q, C]`` the
    calibration queries' own cluster weights, only between a layer's prefill and the
    after-prefill hook, which consumes them (None otherwise: never held)."""

    kv: KVCache
    labels: Array
    centroids: Array
    counts: Array
    estimate: Array
    threshold: Array
    context_len: Array
    attended: Array
    decode_threshold: "Array | None" = None  # decode_calibration="query" only
    coarse: "CoarseIndex | None" = None  # levels=2 only
    calibration: "tuple[Array, Array] | None" = None  # (weights, q_real), transient


@struct.dataclass
class CoarseIndex:
    """The second level (``levels=2``): k-means of the normalised fine centroids. ``parent
    [B, K, C]`` each fine cluster's coarse one, ``centroids [B, K, Cc, H]`` the means of the
    unnormalised keys under each, ``counts [B, K, Cc]``, ``estimate [B, K, S]`` each key's coarse
    calibration weight and ``threshold [B]`` the coarse quantile."""

    parent: Array
    centroids: Array
    counts: Array
    estimate: Array
    threshold: Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class _IndexSettings(CachePolicy):
    """The knobs ``squeezed`` and each of its layers share, validated once here."""

    keep: float = 0.3          # share of the context's keys the calibration queries would attend
    centroid_share: float = 0.05  # clusters per slot
    max_iters: int = 300       # Lloyd iterations at most
    calib_queries: int = 100   # the last prompt queries that calibrate the threshold
    window: int = 64           # the context's last tokens, always attended
    seed: int = 0
    levels: int = 1            # 2: a coarse k-means of the fine centroids prunes first
    coarse_share: float = 0.1  # levels=2: coarse clusters per fine cluster
    coarse_keep: float = 0.3   # levels=2: share of keys the coarse level lets through (paper: 0.7 quantile)
    decode_calibration: str = "mean"  # decode steps' threshold: the paper's one ("mean"), or per calibration query
    decode_kernel: str | None = None  # pallas_gpu | pallas_tpu | reference: decode steps' scores via centroid_scores
    kernel_interpret: bool = False    # run that kernel in Pallas interpret mode (a CPU check; slow)
    decode_block: int = 32            # decode_kernel: slots a block of the clustered layout

    def __post_init__(self):
        super().__post_init__()
        check_decode_kernel("squeezed", self.decode_kernel, self.kernel_interpret)
        check_shares("squeezed", self, ("keep", "centroid_share", "coarse_share", "coarse_keep"), zero_ok=False)
        check_ints("squeezed", self, {"max_iters": 1, "calib_queries": 1, "window": 0, "seed": 0, "decode_block": 16})
        if self.decode_block & (self.decode_block - 1):
            raise UserError(f"squeezed: decode_block must be a power of two >= 16 (the GPU kernel's blocks), "
                            f"got {self.decode_block}")
        if self.levels not in (1, 2) or isinstance(self.levels, bool):
            raise UserError(f"squeezed: levels must be 1 or 2, got {self.levels!r}")
        if self.decode_calibration not in ("query", "mean"):
            raise UserError(f"squeezed: decode_calibration must be 'query' or 'mean', got {self.decode_calibration!r}")

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(_IndexSettings)}

    @property
    def clustered(self) -> bool:
        """Whether decode steps attend through ``sparse_decode`` over a cluster-ordered layout."""
        return self.decode_kernel is not None and self.kv_bits is None

    def capacity(self, max_len):
        return math.ceil(max_len / self.decode_block) * self.decode_block if self.clustered else max_len


@dataclasses.dataclass(frozen=True, kw_only=True)
class SqueezedLayer(_IndexSettings):
    name = "_squeezed_layer"

    def clusters(self, slots: int) -> int:
        return max(1, round(self.centroid_share * slots))

    def coarse_clusters(self, slots: int) -> int:
        return max(1, round(self.coarse_share * self.clusters(slots)))

    def init(self, *, batch, max_len, dtype, layer):
        k, h, c = layer.num_kv_heads, layer.head_dim, self.clusters(max_len)
        slots = self.capacity(max_len)
        return SqueezedState(
            kv=self.new_kv(batch=batch, num_kv_heads=k, slots=slots, head_dim=h, dtype=dtype),
            labels=jnp.full((batch, k, slots), -1, jnp.int32), centroids=jnp.zeros((batch, k, c, h), jnp.float32),
            counts=jnp.zeros((batch, k, c), jnp.float32), estimate=jnp.zeros((batch, k, slots), jnp.float32),
            threshold=jnp.zeros((batch,), jnp.float32), context_len=jnp.zeros((batch,), jnp.int32),
            attended=jnp.zeros((batch,), jnp.float32),
            # held only when it differs from `threshold`: one value in two leaves of a donated cache
            # came back from the jitted prefill as zeros on the GPU (XLA 0.11.2)
            decode_threshold=jnp.zeros((batch,), jnp.float32) if self.decode_calibration == "query" else None,
            coarse=None if self.levels == 1 else CoarseIndex(
                parent=jnp.zeros((batch, k, c), jnp.int32),
                centroids=jnp.zeros((batch, k, self.coarse_clusters(max_len), h), jnp.float32),
                counts=jnp.zeros((batch, k, self.coarse_clusters(max_len)), jnp.float32),
                estimate=jnp.zeros((batch, k, slots), jnp.float32), threshold=jnp.zeros((batch,), jnp.float32)))

    def expected_nbytes(self, *, batch, max_len, dtype, layer):
        k, h, c, slots = layer.num_kv_heads, layer.head_dim, self.clusters(max_len), self.capacity(max_len)
        kv = batch * k * slots * self.kv_slot_bytes(h, dtype)
        index = batch * k * (slots * (4 + 4) + c * (h * 4 + 4))
        if self.levels == 2:
            cc = self.coarse_clusters(max_len)
            index += batch * k * (c * 4 + cc * (h * 4 + 4) + slots * 4) + batch * 4
        return kv + index + batch * (16 if self.decode_calibration == "query" else 12)

    def prefill(self, state, *, q, k, v, positions, layer, params=None):
        FullCache._check_fits(state.kv, k.shape[1])
        kv = state.kv.write(k, v, positions, state.kv.slot_or_drop(positions))
        kv = kv.poison(FullCache._overflow(kv, positions))
        keys = kv.k.astype(jnp.float32)  # [B, K, S, H] as stored
        valid = kv.positions >= 0
        unit = keys / jnp.maximum(jnp.linalg.norm(keys, axis=-1, keepdims=True), 1e-12)
        n_c = state.centroids.shape[2]
        b, kh = keys.shape[:2]
        # one seed per KV head, the same for every row: a prompt clusters alike wherever it sits in a batch
        seeds = jnp.broadcast_to(jax.random.split(jax.random.key(self.seed + 7919 * layer.index), kh)[None], (b, kh))
        run = jax.vmap(jax.vmap(lambda x, m, s: kmeans(x, m, n_c, s, max_iters=self.max_iters)))
        labels, _ = run(unit, valid, seeds)
        centroids, counts = _cluster_means(keys, labels, n_c)
        # calibration: the last calib_queries real prompt queries
        latest = jax.lax.top_k(positions, min(self.calib_queries, positions.shape[1]))[1]
        q_obs = jnp.take_along_axis(q, latest[:, :, None, None, None], axis=1)
        real = jnp.take_along_axis(positions, latest, axis=1) >= 0
        weights = cluster_weights(q_obs, centroids, counts, real)  # [B, K, C]
        estimate = jnp.where(valid, jnp.take_along_axis(weights, jnp.maximum(labels, 0), axis=2), 0.0)
        context_len = jnp.max(positions, axis=1) + 1
        threshold = global_threshold([estimate], [valid], self.keep)  # this layer's; the hook makes it global
        calibration, decode_threshold = None, None
        if self.decode_calibration == "query":
            per_query = cluster_weights(q_obs, centroids, counts, real, per_query=True)  # [B, K, Q, C]
            decode_threshold = query_threshold([per_query], [counts], real, self.keep)
            calibration = (per_query, real)
        coarse = None
        if self.levels == 2:
            coarse = self._coarse(state.coarse, centroids, counts, labels, keys, valid, q_obs, real, seeds)
        state = SqueezedState(kv=kv, labels=labels, centroids=centroids, counts=counts, estimate=estimate,
                              threshold=threshold, context_len=context_len, attended=state.attended,
                              decode_threshold=decode_threshold, coarse=coarse, calibration=calibration)
        return self._cluster_layout(state, weights) if self.clustered else state

    def _cluster_layout(self, state: SqueezedState, weights: Array) -> SqueezedState:
        """The context's slots reordered per (row, KV head): the window's tokens first, then each
        cluster's members together, the clusters heaviest first by calibration weight
        (``weights [B, K, C]``), then the empty slots. The context's n tokens stay in slots
        ``[0, n)``, so later tokens still go to slot = position."""
        kv, labels = state.kv, state.labels
        rank = jnp.argsort(jnp.argsort(-weights, axis=-1), axis=-1)  # [B, K, C]: 0 the heaviest
        ctx = state.context_len[:, None, None]
        group = jnp.where(labels >= 0, 1 + jnp.take_along_axis(rank, jnp.maximum(labels, 0), axis=2),
                          weights.shape[-1] + 1)
        group = jnp.where((labels >= 0) & (kv.positions >= ctx - self.window), 0, group)
        order = jnp.argsort(group, axis=-1, stable=True)  # [B, K, S]; slot order kept within a group
        take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 3)), axis=2)  # noqa: E731
        kv = KVCache(k=take(kv.k), v=take(kv.v), positions=take(kv.positions))
        coarse = state.coarse.replace(estimate=take(state.coarse.estimate)) if state.coarse is not None else None
        return state.replace(kv=kv, labels=take(labels), estimate=take(state.estimate), coarse=coarse)

    def _kernel_decode(self, state: SqueezedState, q: Array, visible: Array) -> Array:
        """A decode step's attention through ``sparse_decode``: the blocks of ``decode_block``
        slots holding a visible slot (``visible [B, K, S]``), in memory order, with ``visible`` as
        the slot mask inside them; ``q [B, 1, K, G, H]`` -> ``[B, 1, K, G, H]``."""
        from jaxkv.kernels.sparse_decode import sparse_decode

        kv = state.kv
        b, kh, s = visible.shape
        bs = self.decode_block
        n = s // bs
        used = jnp.any(visible.reshape(b, kh, n, bs), axis=-1)  # [B, K, n]

        def listed(u):  # the used blocks first, in memory order (a scatter by running count: no sort)
            at = jnp.where(u, jnp.cumsum(u) - 1, n)
            return jnp.zeros((n,), jnp.int32).at[at].set(jnp.arange(n, dtype=jnp.int32), mode="drop")

        idx = jax.vmap(jax.vmap(listed))(used)
        counts = jnp.sum(used, axis=-1).astype(jnp.int32)
        lengths = jnp.full((b,), s, jnp.int32)  # the mask says which slots hold a token
        options = kernel_options(self.decode_kernel, self.kernel_interpret)
        out, _ = sparse_decode(q[:, 0], kv.k, kv.v, lengths, idx, counts, block_size=bs, kv_mask=visible,
                               implementation=self.decode_kernel, **options)
        return out[:, None]

    def _coarse(self, old, centroids, counts, labels, keys, valid, q_obs, real, seeds):
        """Cluster the fine centroids (normalised, only those with members) into coarse ones."""
        n_cc = old.centroids.shape[2]
        unit = centroids / jnp.maximum(jnp.linalg.norm(centroids, axis=-1, keepdims=True), 1e-12)
        run = jax.vmap(jax.vmap(lambda x, m, s: kmeans(x, m, n_cc, jax.random.fold_in(s, 1), max_iters=self.max_iters)))
        parent, _ = run(unit, counts > 0, seeds)
        parent = jnp.maximum(parent, 0)
        key_parent = jnp.where(valid, jnp.take_along_axis(parent, jnp.maximum(labels, 0), axis=2), -1)
        c_cent, c_counts = _cluster_means(keys, key_parent, n_cc)
        weights = cluster_weights(q_obs, c_cent, c_counts, real)
        estimate = jnp.where(valid, jnp.take_along_axis(weights, jnp.maximum(key_parent, 0), axis=2), 0.0)
        return CoarseIndex(parent=parent, centroids=c_cent, counts=c_counts, estimate=estimate,
                           threshold=global_threshold([estimate], [valid], self.coarse_keep))

    def visible_context(self, state: SqueezedState, q: Array, positions: Array, *, decode: bool = False) -> Array:
        """``[B, K, S]``: the context slots the chunk ``q`` attends (clusters at or above the
        threshold, the decode threshold for a decode step, plus the context's last ``window``
        tokens)."""
        threshold = state.decode_threshold if decode and state.decode_threshold is not None else state.threshold
        kept = self._kept(q, state.centroids, state.counts, threshold, positions, decode)  # [B, K, C]
        if state.coarse is not None:  # only fine clusters under a coarse cluster that passes
            c = state.coarse
            coarse_kept = self._kept(q, c.centroids, c.counts, c.threshold, positions, decode)
            kept &= jnp.take_along_axis(coarse_kept, c.parent, axis=2)
        pos = state.kv.positions
        ctx = state.context_len[:, None, None]
        by_cluster = jnp.take_along_axis(kept, jnp.maximum(state.labels, 0), axis=2) & (state.labels >= 0)
        return (pos >= 0) & (pos < ctx) & (by_cluster | (pos >= ctx - self.window))

    def _kept(self, q, centroids, counts, threshold, positions, decode):
        """``[B, K, C]`` the clusters whose estimated weight reaches ``threshold [B]``: through
        the ``centroid_scores`` dispatch for a decode step when ``decode_kernel`` is set (a row at
        position -1 weighs every cluster 0, as ``cluster_weights`` does), else ``cluster_weights``."""
        real = positions >= 0
        if decode and self.decode_kernel is not None:
            from jaxkv.kernels.centroid_scores import centroid_scores

            options = kernel_options(self.decode_kernel, self.kernel_interpret)
            weights, _ = centroid_scores(q[:, 0], centroids, counts, threshold, implementation=self.decode_kernel,
                                         **options)
            weights = jnp.where(real[:, :1, None], weights, 0.0)
        else:
            weights = cluster_weights(q, centroids, counts, real)
        return weights >= threshold[:, None, None]

    def append(self, state, *, q, k, v, positions, phase, layer, params=None):
        FullCache._check_fits(state.kv, k.shape[1])
        kv = state.kv.write(k, v, positions, state.kv.slot_or_drop(positions))
        state = state.replace(kv=kv)
        context = self.visible_context(state, q, positions, decode=phase is Phase.DECODE)
        after = kv.positions >= state.context_len[:, None, None]
        w = layer.sliding_window
        newest = jnp.max(positions, axis=1)[:, None, None]
        seen = (context | after) & (kv.positions <= newest)  # what the step attends (a row at -1: nothing)
        if phase is Phase.DECODE and self.clustered and w is None and isinstance(kv, KVCache):
            out = self._kernel_decode(state, q, seen)
        else:
            parts = [attend_with_lse(q, kv.k, kv.v, positions, kv.positions, window=w, visible=context),
                     attend_with_lse(q, kv.k, kv.v, positions, kv.positions, window=w, visible=after)]
            out = merge_attention(parts)
        lost = FullCache._overflow(kv, positions).reshape((-1,) + (1,) * (out.ndim - 1))
        out = jnp.where(lost, jnp.nan, out).astype(out.dtype)
        return out, state.replace(attended=jnp.sum(seen, axis=(1, 2)).astype(jnp.float32))

    def attended_keys(self, state):
        return state.attended


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class SqueezedCache(_IndexSettings):
    """Squeezed Attention (see the module docstring); ``keep`` is the share of the context's keys
    the calibration queries would attend (the paper's quantiles 0.5/0.7/0.8/0.9 keep 50/30/20/10%)."""

    name = "squeezed"

    @classmethod
    def from_budget(cls, budget: float, context_len: int, **named) -> "SqueezedCache":
        return cls(**{"keep": float(budget), **named})

    def for_layer(self, layer: LayerSpec) -> SqueezedLayer:
        return SqueezedLayer(**self.settings())

    def after_prefill(self, cache):
        """One threshold per row across every layer and head (the paper's global quantile)."""
        layers = cache.layers
        valid = [s.labels >= 0 for s in layers]
        t = global_threshold([s.estimate for s in layers], valid, self.keep)
        layers = tuple(s.replace(threshold=t) for s in layers)
        if self.decode_calibration == "query":
            td = query_threshold([s.calibration[0] for s in layers], [s.counts for s in layers],
                                 layers[0].calibration[1], self.keep)
            layers = tuple(s.replace(decode_threshold=td, calibration=None) for s in layers)
        if self.levels == 2:
            tc = global_threshold([s.coarse.estimate for s in layers], valid, self.coarse_keep)
            layers = tuple(s.replace(coarse=s.coarse.replace(threshold=tc)) for s in layers)
        return cache.replace(layers=layers)
