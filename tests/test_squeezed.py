"""Squeezed Attention: k-means (inertia, determinism), the centroid weight estimate against a
brute-force reference, the global threshold's kept share, the log-sum-exp merge, one index
serving several questions, and bad settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv.cache.squeezed as sq
from jaxkv.attention import attend_reference, attend_with_lse, merge_attention
from jaxkv.cache import SqueezedCache, init_cache
from jaxkv.errors import UserError
from jaxkv.models.llama import forward

from tests.test_policy_conformance import _sequence


def _blobs(seed=0, n=300, h=8, k=6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, h)) * 4
    x = centres[rng.integers(0, k, n)] + rng.normal(size=(n, h)) * 0.5
    return jnp.asarray(x, jnp.float32)


def test_kmeans_lowers_inertia_and_is_deterministic_by_seed():
    noise = jnp.asarray(np.random.default_rng(5).normal(size=(300, 8)), jnp.float32)
    valid = jnp.arange(300) < 280  # the last rows are padding
    key = jax.random.key(3)
    init_labels, init_c = sq.kmeans(noise, valid, 12, key, max_iters=0)  # k-means++ centres only
    labels, c = sq.kmeans(noise, valid, 12, key)
    assert float(sq.inertia(noise, valid, labels, c)) < 0.95 * float(sq.inertia(noise, valid, init_labels, init_c))
    x = _blobs()
    labels, c = sq.kmeans(x, valid, 6, key)
    again, c2 = sq.kmeans(x, valid, 6, key)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(labels))
    np.testing.assert_array_equal(np.asarray(c2), np.asarray(c))
    assert (np.asarray(labels)[280:] == -1).all() and (np.asarray(labels)[:280] >= 0).all()
    # converged: every valid row sits with its nearest centre
    d = ((np.asarray(x)[:280, None] - np.asarray(c)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(labels)[:280], d.argmin(1))
    # well-separated blobs: six clusters found, inertia close to the noise's
    assert len(set(np.asarray(labels)[:280].tolist())) == 6
    assert float(sq.inertia(x, valid, labels, c)) < 1.5 * 280 * 8 * 0.25


def test_kmeans_centres_are_their_rows_means_far_from_the_origin_and_padding_never_counts():
    """Stopped by max_iters, the centres are the means of the labels returned; rows far from the
    origin get their nearest centre (no cancellation in the distances); NaN in padding rows
    changes nothing."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(300, 8)), jnp.float32)
    valid = jnp.ones(300, bool)
    labels, c = sq.kmeans(x, valid, 12, jax.random.key(0), max_iters=2)
    for j in range(12):
        members = np.asarray(x)[np.asarray(labels) == j]
        if len(members):
            np.testing.assert_allclose(np.asarray(c)[j], members.mean(0), atol=1e-5)
    far = _blobs(1, n=200) * 0.1 + 1000.0  # well-separated blobs, far out
    labels, c = sq.kmeans(far, jnp.ones(200, bool), 6, jax.random.key(1))
    d = ((np.asarray(far, np.float64)[:, None] - np.asarray(c, np.float64)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(labels), d.argmin(1))
    x = _blobs(2, n=40)
    valid = jnp.arange(40) < 30
    clean, cc = sq.kmeans(x, valid, 4, jax.random.key(2))
    dirty, cd = sq.kmeans(x.at[30:].set(jnp.nan), valid, 4, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))
    np.testing.assert_allclose(np.asarray(cd), np.asarray(cc), atol=1e-6)


def test_a_prompt_clusters_alike_wherever_it_sits_in_a_batch(tiny_model):
    """The index's k-means seed is per layer and KV head, not per row: the same prompt as row 0
    or row 1 of a batch gives the same logits."""
    from jaxkv.models.llama import forward

    config, params = tiny_model
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.integers(3, config.vocab_size, (1, 40)), jnp.int32) for _ in range(2))
    pol = sq.SqueezedCache(keep=0.25, centroid_share=0.15, window=4).prepare(params, config)
    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    q_pos = jnp.broadcast_to(jnp.arange(40, 44), (2, 4))
    question = jnp.asarray(rng.integers(3, config.vocab_size, (1, 4)), jnp.int32)
    outs = []
    for rows in ((a, b), (b, a)):
        cache = init_cache(config, pol, batch=2, max_len=48, dtype=jnp.float32)
        _, cache = forward(params, jnp.concatenate(rows), pos, cache, config=config)
        lg, _ = forward(params, jnp.concatenate([question, question]), q_pos, cache, config=config)
        outs.append(np.asarray(lg))
    np.testing.assert_allclose(outs[0][0], outs[1][1], atol=1e-4)
    np.testing.assert_allclose(outs[0][1], outs[1][0], atol=1e-4)


def test_cluster_weights_against_brute_force():
    rng = np.random.default_rng(0)
    b, t, k, g, h, c = 1, 3, 2, 2, 4, 5
    q = rng.normal(size=(b, t, k, g, h)).astype(np.float32)
    cent = rng.normal(size=(b, k, c, h)).astype(np.float32)
    counts = rng.integers(0, 4, size=(b, k, c)).astype(np.float32)
    real = np.array([[True, True, False]])
    got = np.asarray(sq.cluster_weights(jnp.asarray(q), jnp.asarray(cent), jnp.asarray(counts), jnp.asarray(real)))
    for kk in range(k):
        acc = np.zeros(c)
        for ti in range(2):
            for gi in range(g):
                s = cent[0, kk] @ q[0, ti, kk, gi] / np.sqrt(h)
                e = np.exp(s - s.max())
                acc += e / (counts[0, kk] * e).sum()
        np.testing.assert_allclose(got[0, kk][counts[0, kk] > 0], (acc / 4)[counts[0, kk] > 0], rtol=1e-5)


def test_lse_merge_equals_dense_attention_over_the_union():
    rng = np.random.default_rng(1)
    b, t, k, g, h, s = 2, 3, 2, 2, 8, 20
    q = jnp.asarray(rng.normal(size=(b, t, k, g, h)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(b, k, s, h)), jnp.float32)
    vals = jnp.asarray(rng.normal(size=(b, k, s, h)), jnp.float32)
    qpos = jnp.broadcast_to(jnp.arange(17, 20), (b, t))
    kpos = jnp.broadcast_to(jnp.arange(s), (b, k, s))
    part = jnp.asarray(rng.random(size=(b, k, s)) < 0.4)
    subset = part | (kpos > 15)  # the union attended: a random part of the context + the tail
    merged = merge_attention([attend_with_lse(q, keys, vals, qpos, kpos, visible=part & (kpos <= 15)),
                              attend_with_lse(q, keys, vals, qpos, kpos, visible=kpos > 15)])
    dense = attend_reference(q, keys, vals, qpos, jnp.where(subset, kpos, -1))
    np.testing.assert_allclose(np.asarray(merged), np.asarray(dense), atol=1e-5)
    # a part that sees nothing (lse -inf) contributes nothing
    empty = attend_with_lse(q, keys, vals, qpos, kpos, visible=jnp.zeros_like(part))
    only = merge_attention([empty, attend_with_lse(q, keys, vals, qpos, kpos)])
    np.testing.assert_allclose(np.asarray(only), np.asarray(attend_reference(q, keys, vals, qpos, kpos)), atol=1e-5)


def test_the_global_threshold_keeps_the_requested_share(tiny_model):
    config, params = tiny_model
    n = 200
    tokens = jax.random.randint(jax.random.key(0), (2, n), 3, config.vocab_size)
    run = jax.jit(lambda c: forward(params, tokens, jnp.broadcast_to(jnp.arange(n), (2, n)), c, config=config)[1])
    for keep in (0.3, 0.1):
        cache = run(init_cache(config, SqueezedCache(keep=keep, centroid_share=0.1), batch=2, max_len=n,
                               dtype=jnp.float32))
        est = np.stack([np.asarray(s.estimate) for s in cache.layers])  # [L, B, K, S]
        thr = np.asarray(cache.layers[0].threshold)
        assert all(np.array_equal(np.asarray(s.threshold), thr) for s in cache.layers)  # one per row
        for row in range(2):
            share = (est[:, row] >= thr[row]).mean()
            assert abs(share - keep) < 0.05, (keep, share)  # ties between a cluster's keys: coarse
        per_layer = [(est[i, 0] >= thr[0]).mean() for i in range(est.shape[0])]
        assert max(per_layer) - min(per_layer) > 0  # sparsity may differ per layer


def test_one_index_answers_several_questions(parity_models, monkeypatch):
    """Prefill the context once; three questions each extend that same cache. k-means runs once
    per layer, and each answer equals a run that prefilled the context just for it."""
    config, params, e = parity_models["llama3"]
    seq = _sequence(e)
    context, n = seq[:, :14], seq.shape[1]
    builds = []
    real = sq.kmeans
    monkeypatch.setattr(sq, "kmeans", lambda *a, **k: (builds.append(1), real(*a, **k))[1])
    policy = SqueezedCache(keep=0.5, centroid_share=0.3, window=2)
    pos = jnp.arange(n)[None]
    step = jax.jit(lambda t, p, c: forward(params, t, p, c, config=config))  # k-means runs when traced
    cache = init_cache(config, policy, batch=1, max_len=n, dtype=jnp.float32)
    _, prefilled = step(context, pos[:, :14], cache)
    assert len(builds) == config.num_layers
    questions = [seq[:, 14:18], seq[:, 15:19] + 1, jnp.flip(seq[:, 14:18], axis=1)]
    answers = [step(qn, pos[:, 14:14 + qn.shape[1]], prefilled)[0] for qn in questions]
    assert len(builds) == config.num_layers  # no rebuild (nor a retrace of anything that builds)
    for qn, got in zip(questions, answers):  # references: the context prefilled for each alone
        _, fresh = step(context, pos[:, :14], init_cache(config, policy, batch=1, max_len=n, dtype=jnp.float32))
        want, _ = step(qn, pos[:, 14:14 + qn.shape[1]], fresh)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.allclose(np.asarray(answers[0][:, :3]), np.asarray(answers[1][:, :3]))


def test_a_tight_share_attends_fewer_keys_and_differs_from_full(parity_models):
    from jaxkv.eval.harness import attended_fraction
    from tests.test_policy_conformance import _run

    config, params, e = parity_models["llama3"]
    seq = _sequence(e)
    ref, _ = _run(config, params, seq, "full")
    got, cache = _run(config, params, seq, SqueezedCache(keep=0.2, centroid_share=0.3, window=1))
    assert float(np.abs(np.asarray(got - ref))[0, 12:].max()) > 1e-4
    frac = attended_fraction(cache, seq.shape[1], config)
    assert 0 < frac < 1


@pytest.mark.parametrize("kwargs, field", [({"keep": 0}, "keep"), ({"centroid_share": 2}, "centroid_share"),
                                           ({"max_iters": 0}, "max_iters"), ({"window": -1}, "window"),
                                           ({"levels": 3}, "levels"), ({"coarse_keep": 0}, "coarse_keep"),
                                           ({"decode_block": 24}, "decode_block"), ({"decode_block": 8}, "decode_block")])
def test_bad_settings_name_the_argument(kwargs, field):
    with pytest.raises(UserError, match=field):
        SqueezedCache(**kwargs)


def test_the_coarse_level_prunes_within_the_fine_selection(parity_models):
    """levels=2: with a coarse level that lets everything through it equals levels=1; a tight
    one attends a subset of levels=1's keys; the index's bytes are the analytic count."""
    from jaxkv.cache import LayerSpec
    from jaxkv.eval.harness import attended_fraction
    from tests.test_policy_conformance import _run

    config, params, e = parity_models["llama3"]
    seq = _sequence(e)
    base = dict(keep=0.5, centroid_share=0.4, window=1)
    one, c1 = _run(config, params, seq, SqueezedCache(**base))
    loose, _ = _run(config, params, seq, SqueezedCache(levels=2, coarse_keep=1.0, coarse_share=0.3, **base))
    np.testing.assert_allclose(np.asarray(loose), np.asarray(one), atol=1e-6)
    tight, c2 = _run(config, params, seq, SqueezedCache(levels=2, coarse_keep=0.2, coarse_share=0.3, **base))
    n = seq.shape[1]
    assert attended_fraction(c2, n, config) <= attended_fraction(c1, n, config)
    assert c2.nbytes == sum(p.expected_nbytes(batch=1, max_len=n, dtype=jnp.float32, layer=LayerSpec(i, config))
                            for i, p in enumerate(c2.policies))
    assert c2.layers[0].coarse.centroids.shape[2] == max(1, round(0.3 * round(0.4 * n)))


def test_query_threshold_hand_worked_and_its_share():
    """The decode threshold is a quantile over (query, key) pairs: clusters weighted by their
    keys, queries that are not real left out."""
    w = jnp.asarray([[[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [9.0, 9.0, 9.0]]]])  # [B=1, K=1, Q=3, C=3]
    n = jnp.asarray([[[1.0, 2.0, 3.0]]])
    real = jnp.asarray([[True, True, False]])
    # pairs by weight: .6 x2, .5 x1, .3 x(2+3), .2 x3, .1 x1 = 12 keys
    for keep, want in ((0.1, 0.6), (0.25, 0.5), (0.5, 0.3), (0.95, 0.1)):
        assert float(sq.query_threshold([w], [n], real, keep)[0]) == pytest.approx(want)
    assert float(sq.query_threshold([w], [n], real, 1.0)[0]) == -np.inf
    rng = np.random.default_rng(0)
    layers = [jnp.asarray(rng.random((2, 3, 5, 40)), jnp.float32) for _ in range(4)]
    counts = [jnp.asarray(rng.integers(0, 4, (2, 3, 40)), jnp.float32) for _ in range(4)]
    real = jnp.ones((2, 5), bool)
    for keep in (0.1, 0.3):
        t = np.asarray(sq.query_threshold(layers, counts, real, keep))
        for row in range(2):
            passed = sum(float(((x[row] >= t[row]) * c[row][:, None, :]).sum()) for x, c in zip(layers, counts))
            total = sum(float(c[row].sum()) * 5 for c in counts)
            assert abs(passed / total - keep) < 0.01, (keep, passed / total)


def test_global_threshold_is_numpys_quantile_over_the_valid_keys():
    rng = np.random.default_rng(1)
    est = [jnp.asarray(rng.random((2, 3, 17)), jnp.float32), jnp.asarray(rng.random((2, 3, 17)), jnp.float32)]
    valid = [jnp.asarray(rng.random((2, 3, 17)) > 0.3), jnp.asarray(rng.random((2, 3, 17)) > 0.6)]
    for keep in (0.1, 0.3, 0.5):
        got = np.asarray(sq.global_threshold(est, valid, keep))
        for row in range(2):
            vals = np.concatenate([np.asarray(e[row])[np.asarray(v[row])] for e, v in zip(est, valid)])
            assert got[row] == pytest.approx(np.quantile(vals, 1 - keep), rel=1e-6)


def test_decode_steps_use_the_per_query_threshold(tiny_model):
    """decode_calibration='query' sets a decode threshold of its own; 'mean' (the default, the
    paper's) reuses the extend threshold and holds no second one; the transient calibration weights are gone after the prefill."""
    config, params = tiny_model
    n = 200
    tokens = jax.random.randint(jax.random.key(1), (1, n), 3, config.vocab_size)
    pos = jnp.arange(n)[None]
    run = jax.jit(lambda c: forward(params, tokens, pos, c, config=config)[1])
    caches = {m: run(init_cache(config, SqueezedCache(keep=0.1, decode_calibration=m), batch=1, max_len=n + 4,
                                dtype=jnp.float32)) for m in ("query", "mean")}
    q, m = caches["query"].layers[0], caches["mean"].layers[0]
    assert q.calibration is None and m.calibration is None
    np.testing.assert_array_equal(np.asarray(q.threshold), np.asarray(m.threshold))
    assert m.decode_threshold is None  # decode steps read `threshold`: nothing held twice
    assert float(q.decode_threshold[0]) != float(q.threshold[0])
    with pytest.raises(UserError, match="decode_calibration"):
        SqueezedCache(decode_calibration="median")


def test_decode_scores_through_the_centroid_kernel_as_without_it(parity_models):
    """decode_kernel: each decode step's clusters (fine and coarse) scored and thresholded by
    ``centroid_scores`` give the jnp path's logits and attended keys, at a share that prunes."""
    from jaxkv.eval.harness import attended_fraction
    from tests.test_policy_conformance import _run

    config, params, e = parity_models["llama3"]
    seq = _sequence(e)
    n = seq.shape[1]
    for base in (dict(keep=0.5, centroid_share=0.4, window=1, levels=2, coarse_keep=0.3, coarse_share=0.3),):
        want, c1 = _run(config, params, seq, SqueezedCache(**base))
        for kernel in ("pallas_gpu", "pallas_tpu"):
            got, c2 = _run(config, params, seq, SqueezedCache(**base, decode_kernel=kernel, kernel_interpret=True))
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, err_msg=kernel)
            assert attended_fraction(c2, n, config) == attended_fraction(c1, n, config) < 1
    with pytest.raises(UserError, match="decode_kernel"):
        SqueezedCache(decode_kernel="cuda")


def test_decode_attends_a_cluster_ordered_layout_through_sparse_decode(tiny_model):
    """decode_kernel (each backend; interpret mode): the prefill lays each KV head's context out as the
    window, then whole clusters (heaviest first), then the empty slots, the context in slots
    [0, n); decode steps attend through ``sparse_decode`` over the blocks holding a kept slot
    (fewer than all) and give the jnp path's logits and attended keys, on a ragged batch."""
    _check_clustered_decode(tiny_model, (("reference", True), ("pallas_gpu", True), ("pallas_tpu", True)))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_clustered_decode_through_the_compiled_gpu_kernel(tiny_model):
    # fp32 at full precision on both sides: the kernel's fp32 dots are exact, XLA's default would be TF32
    with jax.default_matmul_precision("highest"):
        _check_clustered_decode(tiny_model, (("pallas_gpu", False),))


def _check_clustered_decode(tiny_model, kernels):
    from unittest import mock

    import jaxkv.kernels.sparse_decode as sd
    from jaxkv.cache.policy import LayerSpec

    config, params = tiny_model
    n, steps, window = 150, 3, 8
    lengths = np.array([150, 97])
    tokens = jax.random.randint(jax.random.key(2), (2, n + steps), 3, config.vocab_size)
    pos = np.where(np.arange(n)[None] < lengths[:, None], np.arange(n)[None], -1)
    base = dict(keep=0.15, centroid_share=0.1, window=window)

    def run(policy):
        cache = init_cache(config, policy, batch=2, max_len=n + steps, dtype=jnp.float32)
        logits, cache = jax.jit(lambda c: forward(params, tokens[:, :n], jnp.asarray(pos), c, config=config))(cache)
        prefilled, out = cache, []
        step = jax.jit(lambda t, p, c: forward(params, t, p, c, config=config))
        for i in range(steps):
            p = jnp.asarray(lengths + i)[:, None]
            lg, cache = step(jnp.take_along_axis(tokens, p, axis=1), p, cache)
            out.append(lg)
        return jnp.concatenate(out, 1), prefilled, cache

    want, _, plain = run(SqueezedCache(**base))
    blocks = []
    real = sd.sparse_decode

    def spy(*a, **k):  # (counts [B, K], blocks a head) of each traced step, as it runs
        jax.debug.callback(lambda c, per=a[4].shape[-1]: blocks.append((np.asarray(c), per)), a[5])
        return real(*a, **k)

    for kernel, interpret in kernels:
        policy = SqueezedCache(**base, decode_kernel=kernel, kernel_interpret=interpret, decode_block=16)
        with mock.patch.object(sd, "sparse_decode", spy):
            got, prefilled, cache = run(policy)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, err_msg=kernel)
        np.testing.assert_array_equal(np.asarray(cache.layers[0].attended), np.asarray(plain.layers[0].attended))
        counts, per_head = blocks[-1]
        assert per_head == 160 // 16 and 0 < counts.max() < per_head, kernel  # slots rounded up to blocks
        assert prefilled.nbytes == sum(policy.for_layer(LayerSpec(i, config)).expected_nbytes(
            batch=2, max_len=n + steps, dtype=jnp.float32, layer=LayerSpec(i, config)) for i in range(config.num_layers))
        layer = prefilled.layers[0]
        kpos, labels = np.asarray(layer.kv.positions), np.asarray(layer.labels)
        for b in range(2):
            for h in range(kpos.shape[1]):
                m = lengths[b]
                assert sorted(kpos[b, h, :m]) == list(range(m)) and np.all(kpos[b, h, m:] == -1)
                in_window = kpos[b, h, :m] >= m - window
                assert np.all(in_window[:window]) and not np.any(in_window[window:])
                rest = labels[b, h, window:m]  # each cluster's members side by side
                runs = rest[np.r_[True, rest[1:] != rest[:-1]]]
                assert len(runs) == len(set(runs.tolist())), (b, h)
