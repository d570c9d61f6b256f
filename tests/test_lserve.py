"""LServe: page bounds bound every q.k of their page, the selection is Quest's top pages within
the token budget (reused for ``reuse`` steps), attention over them matches a numpy reference,
streaming heads keep sinks + window in prefill and decode, bytes, and bad settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache import LayerSpec, LServeCache, Phase, init_cache, make_policy
from jaxkv.cache.lserve import LServeLayer, page_bounds, page_scores
from jaxkv.errors import UserError

from tests.test_policy_conformance import _run, _sequence


def _drive(config, pol, prompt_len, steps, batch=2, max_len=160, seed=0):
    """Prefill ``prompt_len`` random tokens, then ``steps`` decode steps, by hand through one layer.
    Returns the state, the outputs and the inputs of every decode step."""
    rng = np.random.default_rng(seed)
    kh, g, h = config.num_kv_heads, config.group_size, config.head_dim
    spec = LayerSpec(0, config)
    state = pol.init(batch=batch, max_len=max_len, dtype=jnp.float32, layer=spec)
    r = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    pos = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
    k, v = r(batch, prompt_len, kh, h), r(batch, prompt_len, kh, h)
    # jitted as the model runs them: one compile for the prefill and one for every decode step
    # (the steps have one shape), instead of one per eager operation
    prefill = jax.jit(lambda state, k, v, pos: pol.prefill(state, q=None, k=k, v=v, positions=pos, layer=spec))
    append = jax.jit(lambda state, q, k, v, p: pol.append(state, q=q, k=k, v=v, positions=p, phase=Phase.DECODE,
                                                          layer=spec))
    state = prefill(state, k, v, pos)
    keys, values, steps_out = [k], [v], []
    for i in range(steps):
        p = jnp.full((batch, 1), prompt_len + i)
        q, k, v = r(batch, 1, kh, g, h), r(batch, 1, kh, h), r(batch, 1, kh, h)
        before = state.selected
        out, state = append(state, q, k, v, p)
        keys.append(k)
        values.append(v)
        steps_out.append((q, out, before, state.selected, state.attended))
    return state, jnp.concatenate(keys, 1), jnp.concatenate(values, 1), steps_out


def test_page_bounds_bound_every_score_of_their_page(parity_models):
    config = parity_models["llama3"][0]
    pol = LServeLayer(dense_heads=(0, 1), token_budget=64, page=32, logical_page=8, reuse=1)
    state, keys, _, _ = _drive(config, pol, prompt_len=70, steps=5)
    n = keys.shape[1]
    k = np.asarray(keys.transpose(0, 2, 1, 3))  # [B, K, n, H]
    kmin, kmax = np.asarray(state.kmin), np.asarray(state.kmax)
    for page in range(n // 8 + 1):
        span = k[:, :, page * 8:(page + 1) * 8]
        np.testing.assert_array_equal(kmin[:, :, page], span.min(axis=2))  # kept current through decode
        np.testing.assert_array_equal(kmax[:, :, page], span.max(axis=2))
    assert np.isinf(kmin[:, :, n // 8 + 1:]).all()  # pages with no token yet
    rng = np.random.default_rng(1)
    for _ in range(20):
        q = rng.normal(size=(2, config.num_kv_heads, config.group_size, config.head_dim)).astype(np.float32) * 3
        bound = np.asarray(page_scores(jnp.asarray(q), state.kmin, state.kmax))  # [B, K, P]
        dots = np.einsum("bkgh,bksh->bkgs", q, k).max(axis=2)  # best query head per key
        for page in range(n // 8 + 1):
            top = dots[:, :, page * 8:(page + 1) * 8].max(axis=-1)
            assert (top <= bound[:, :, page] + 1e-4 * (1 + np.abs(top))).all()
    assert np.isneginf(np.asarray(page_scores(jnp.asarray(q), state.kmin, state.kmax))[:, :, -1]).all()


def test_page_bounds_of_a_padded_layout():
    k = jnp.arange(2 * 1 * 8 * 2, dtype=jnp.float32).reshape(2, 1, 8, 2)
    pos = jnp.array([[[0, 1, 2, 3, -1, -1, -1, -1]], [[0, 1, 2, 3, 4, 5, 6, 7]]])
    lo, hi = page_bounds(k, pos, 4)
    np.testing.assert_array_equal(np.asarray(lo[0, 0]), [[0, 1], [np.inf, np.inf]])
    np.testing.assert_array_equal(np.asarray(hi[1, 0]), [[22, 23], [30, 31]])


def _softmax_attend(q, k, v):
    s = k @ q / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max())
    return (p / p.sum()) @ v


def test_decode_attends_the_top_pages_and_the_newest(parity_models):
    """Budget of 2 pages of 16 tokens: each decode step's output is exact attention over the
    two pages of highest bound plus the newest token's page, and every page written since the
    selection (the step at 96 reuses the selection made at 95, and reads page 5 as well as its
    own page 6); the selection is recomputed every ``reuse`` = 2 steps and otherwise kept."""
    config = parity_models["llama3"][0]
    pol = LServeLayer(dense_heads=(0, 1), token_budget=32, page=16, logical_page=4, reuse=2)
    state, keys, values, steps = _drive(config, pol, prompt_len=95, steps=4, batch=1, seed=1)
    assert 5 not in np.asarray(steps[1][3]).ravel().tolist()  # page 5 is read only as a page written since
    k = np.asarray(keys[0].transpose(1, 0, 2))  # [K, n, H]
    v = np.asarray(values[0].transpose(1, 0, 2))
    for i, (q, out, before, after, counted) in enumerate(steps):
        t = 95 + i
        if i % 2 == 1:
            np.testing.assert_array_equal(np.asarray(after), np.asarray(before))  # reused
        else:
            anchor = t // 16  # the newest page when the selection was made
        attended = 0
        for head in range(config.num_kv_heads):
            pages = set(np.asarray(after[0, head]).tolist()) | set(range(anchor, t // 16 + 1))
            idx = np.array([j for j in range(t + 1) if j // 16 in pages])
            attended += len(idx)
            for gi in range(config.group_size):
                want = _softmax_attend(np.asarray(q[0, 0, head, gi]), k[head, idx], v[head, idx])
                np.testing.assert_allclose(np.asarray(out[0, 0, head, gi]), want, atol=2e-5)
        if i % 2 == 0:  # a fresh selection: the two physical pages of highest bound
            n = (t + 1 + 3) // 4 * 4  # whole logical pages; the slots past t are empty
            kk = jnp.pad(keys.transpose(0, 2, 1, 3)[:, :, :t + 1], ((0, 0), (0, 0), (0, n - t - 1), (0, 0)))
            pp = jnp.where(jnp.arange(n) <= t, jnp.arange(n), -1)
            lo, hi = page_bounds(kk, jnp.broadcast_to(pp, (1, config.num_kv_heads, n)), 4)
            sc = np.asarray(page_scores(q[:, 0], lo, hi))[0]  # [K, logical pages]
            sc = np.pad(sc, ((0, 0), (0, (-sc.shape[1]) % 4)), constant_values=-np.inf)
            phys = sc.reshape(sc.shape[0], -1, 4).max(-1)
            for head in range(config.num_kv_heads):
                assert set(np.asarray(after[0, head]).tolist()) == set(np.argsort(-phys[head])[:2].tolist())
        assert float(counted[0]) == attended < config.num_kv_heads * (t + 1)  # each key counted once


@pytest.mark.parametrize("kernel", [{"decode_kernel": "reference"},
                                    {"decode_kernel": "pallas_gpu", "kernel_interpret": True},
                                    {"decode_kernel": "pallas_tpu", "kernel_interpret": True}],
                         ids=["reference", "pallas_gpu", "pallas_tpu"])
def test_decode_through_the_sparse_kernel_equals_the_jnp_path(parity_models, kernel):
    """decode_kernel: the chosen pages attended in place by ``sparse_decode`` (the newest page
    among them or not, reused selections) give the jnp path's outputs, selections and counts."""
    config = parity_models["llama3"][0]
    settings = dict(dense_heads=(0, 1), token_budget=32, page=16, logical_page=4, reuse=2)
    # from 63: the step at 64 reuses the selection made at 63 across a page boundary
    _, _, _, want = _drive(config, LServeLayer(**settings), prompt_len=63, steps=6, seed=1)
    _, _, _, got = _drive(config, LServeLayer(**settings, **kernel), prompt_len=63, steps=6, seed=1)
    for (_, o1, _, sel1, n1), (_, o2, _, sel2, n2) in zip(want, got):
        np.testing.assert_array_equal(np.asarray(sel2), np.asarray(sel1))
        np.testing.assert_allclose(np.asarray(o2), np.asarray(o1), atol=2e-5)
        np.testing.assert_array_equal(np.asarray(n2), np.asarray(n1))
    assert float(want[-1][4][0]) < config.num_kv_heads * 69  # the budget really left pages out


def test_decode_kernel_refuses_low_bit_pages():
    with pytest.raises(UserError, match="decode_kernel"):
        make_policy("lserve+mikv", heads=((0,),), decode_kernel="reference")
    with pytest.raises(UserError, match="decode_kernel"):
        make_policy("lserve", decode_kernel="triton")


def test_streaming_heads_keep_sinks_and_window(parity_models):
    """Head 1 streaming: it stores sinks + window slots only; in prefill (prefill_window smaller
    than the prompt) and decode it attends exactly the sinks and the local window."""
    config = parity_models["llama3"][0]
    pol = LServeLayer(dense_heads=(0,), sinks=2, window=5, prefill_window=6, token_budget=64, page=16,
                      logical_page=4)
    spec = LayerSpec(0, config)
    state = pol.init(batch=1, max_len=40, dtype=jnp.float32, layer=spec)
    assert state.local.k.shape[2] == 7 and state.dense.k.shape[1] == 1
    rng = np.random.default_rng(0)
    t, kh, g, h = 12, config.num_kv_heads, config.group_size, config.head_dim
    q = jnp.asarray(rng.normal(size=(1, t, kh, g, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, t, kh, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, t, kh, h)), jnp.float32)
    pos = jnp.arange(t)[None]
    out = pol.prefill_attend(q, k, v, pos, layer=spec)
    for i in range(t):
        idx = np.array([j for j in range(i + 1) if j < 2 or i - j < 6])
        want = _softmax_attend(np.asarray(q[0, i, 1, 0]), np.asarray(k[0, idx, 1]), np.asarray(v[0, idx, 1]))
        np.testing.assert_allclose(np.asarray(out[0, i, 1, 0]), want, atol=2e-5)
        dense = _softmax_attend(np.asarray(q[0, i, 0, 0]), np.asarray(k[0, :i + 1, 0]), np.asarray(v[0, :i + 1, 0]))
        np.testing.assert_allclose(np.asarray(out[0, i, 0, 0]), dense, atol=2e-5)
    state = pol.prefill(state, q=q, k=k, v=v, positions=pos, layer=spec)
    assert sorted(np.asarray(state.local.positions[0, 0]).tolist()) == [0, 1, 7, 8, 9, 10, 11]


def test_eviction_at_a_small_budget_differs_from_full(parity_models):
    config, params, e = parity_models["llama3"]
    seq = _sequence(e)
    ref, _ = _run(config, params, seq, "full", jit_all=True)
    pol = LServeCache(heads=((0,), (1,)), sinks=1, window=6, token_budget=8, page=8, logical_page=4,
                      prefill_window=4)
    got, cache = _run(config, params, seq, pol, jit_all=True)
    assert float(np.abs(np.asarray(got - ref)).max()) > 1e-3
    assert np.isfinite(np.asarray(got)).all()


def test_bytes_shrink_with_streaming_heads(parity_models):
    config, params, _ = parity_models["llama3"]
    full = init_cache(config, "full", batch=1, max_len=1024, dtype=jnp.bfloat16).nbytes
    half = init_cache(config, LServeCache(heads=((0,), (1,)), window=64, sinks=16), batch=1, max_len=1024,
                      dtype=jnp.bfloat16).nbytes
    assert 0.5 < half / full < 0.65  # dense heads whole (+ page bounds), streaming heads 80 slots
    q = init_cache(config, make_policy("lserve+mikv", heads=((0,), (1,)), window=64, sinks=16), batch=1,
                   max_len=1024, dtype=jnp.bfloat16).nbytes
    assert q < 0.3 * full


def test_from_budget_is_a_token_budget_in_pages():
    assert LServeCache.from_budget(0.25, 2048).token_budget == 512
    assert LServeCache.from_budget(0.001, 2048).token_budget == 64


def test_prepare_splits_half_the_heads(tiny_model):
    config, params = tiny_model
    pol = LServeCache().prepare(params, config)
    dense = sum(map(len, pol.heads))
    assert dense == round(0.5 * config.num_layers * config.num_kv_heads)


@pytest.mark.parametrize("kwargs, field", [
    ({"streaming_share": 1.5}, "streaming_share"), ({"page": 40}, "logical_page"), ({"token_budget": 16}, "token_budget"),
    ({"reuse": 0}, "reuse"), ({"window": "x"}, "window"), ({"heads": [["a"]]}, "heads")])
def test_bad_settings_name_the_argument(kwargs, field):
    with pytest.raises(UserError, match=field):
        LServeCache(**kwargs)


def test_unprepared_policy_says_how(parity_models):
    config = parity_models["llama3"][0]
    with pytest.raises(UserError, match="prepare"):
        init_cache(config, LServeCache(), batch=1, max_len=8, dtype=jnp.float32)


def test_the_harness_counts_the_pages_attended(parity_models):
    from jaxkv.eval.harness import attended_fraction

    config, params, e = parity_models["llama3"]
    seq = _sequence(e)
    n = seq.shape[1]
    # jit_all: the programs test_eviction_at_a_small_budget_differs_from_full compiles (same policy)
    _, full = _run(config, params, seq, "full", jit_all=True)
    assert attended_fraction(full, n, config) == 1.0
    pol = LServeCache(heads=((0,), (1,)), sinks=1, window=6, token_budget=8, page=8, logical_page=4, prefill_window=4)
    _, cache = _run(config, params, seq, pol, jit_all=True)
    # per layer: one dense head sees at most its budget page + the newest page, one streaming head 7 slots
    got = attended_fraction(cache, n, config)
    assert 7 / (2 * n) < got <= (16 + 7) / (2 * n) < 1
