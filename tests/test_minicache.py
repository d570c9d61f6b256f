"""MiniCache: SLERP against hand-worked cases, the pair's restore path against
``merge_pair_reference``, retention, bytes, and the model-level split into full layers and pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache import FullCache, LayerSpec, MiniCache, init_cache, make_policy
from jaxkv.cache.minicache import MiniCacheLayer, merge_pair_reference, slerp
from jaxkv.errors import UserError
from jaxkv.models.llama import forward

from tests.test_policy_conformance import _run, _sequence


def test_slerp_hand_worked():
    a = jnp.array([1.0, 0.0])
    b = jnp.array([0.0, 1.0])
    e, d = slerp(a, b, 0.5)  # 90 degrees apart: the bisector, distance 1/2
    np.testing.assert_allclose(np.asarray(e), [2 ** -0.5, 2 ** -0.5], atol=1e-6)
    assert float(d) == pytest.approx(0.5)
    e, _ = slerp(a, b, 0.6)  # t of the way along the arc: angle 0.6 * 90 = 54 degrees
    np.testing.assert_allclose(np.asarray(e), [np.cos(np.radians(54)), np.sin(np.radians(54))], atol=1e-6)
    e, d = slerp(a, a, 0.6)  # parallel: linear interpolation, the vector itself
    np.testing.assert_allclose(np.asarray(e), [1.0, 0.0], atol=1e-6)
    assert float(d) == pytest.approx(0.0, abs=1e-3)


def test_reference_keeps_norms_and_average_does_not():
    rng = np.random.default_rng(0)
    lo = rng.normal(size=(5, 8)).astype(np.float32)
    hi = 3 * rng.normal(size=(5, 8)).astype(np.float32)
    r_lo, r_hi, d = merge_pair_reference(jnp.asarray(lo), jnp.asarray(hi))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(r_lo), axis=-1), np.linalg.norm(lo, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(r_hi), axis=-1), np.linalg.norm(hi, axis=-1), rtol=1e-5)
    cos = np.sum(lo * hi, -1) / np.linalg.norm(lo, axis=-1) / np.linalg.norm(hi, axis=-1)
    np.testing.assert_allclose(np.asarray(d), np.arccos(np.clip(cos, -1, 1)) / np.pi, atol=1e-5)
    m_lo, m_hi, _ = merge_pair_reference(jnp.asarray(lo), jnp.asarray(hi), merge="average")
    np.testing.assert_allclose(np.asarray(m_lo), (lo + hi) / 2, atol=1e-6)


def test_split_into_full_layers_and_pairs(parity_models):
    config, _, _ = parity_models["llama3"]  # 2 layers
    for start, kinds in ((0.0, ["pair0", "pair1"]), (0.5, ["full", "full"]), (1.0, ["full", "full"])):
        m = MiniCache(start=start)
        got = []
        for i in range(config.num_layers):
            p = m.for_layer(LayerSpec(i, config))
            got.append("full" if isinstance(p, FullCache) else f"pair{p.role}")
        assert got == kinds, start
    cache = init_cache(config, MiniCache(start=0.0), batch=1, max_len=16, dtype=jnp.float32)
    assert cache.layers[1] is None and cache.policies[1].state_index(LayerSpec(1, config)) == 0


def _drive(config, policies, chunks, batch=2, max_len=24, seed=0):
    """Run one pair's two layer policies by hand over synthetic chunks (prefill, then appends):
    returns the final state and every layer's true keys/values ``[B, K, T, H]``."""
    rng = np.random.default_rng(seed)
    kh, h, g = config.num_kv_heads, config.head_dim, config.group_size
    spec = [LayerSpec(0, config), LayerSpec(1, config)]
    state = policies[0].init(batch=batch, max_len=max_len, dtype=jnp.float32, layer=spec[0])
    # jitted as the model runs them: one compile per (role, chunk shape) instead of one per eager op
    prefill = [jax.jit(lambda s, k, v, p, r=r: policies[r].prefill(s, q=None, k=k, v=v, positions=p, layer=spec[r]))
               for r in (0, 1)]
    append = [jax.jit(lambda s, q, k, v, p, r=r: policies[r].append(s, q=q, k=k, v=v, positions=p, phase=None,
                                                                    layer=spec[r])) for r in (0, 1)]
    true = {n: [[], []] for n in "kv"}
    start = 0
    for c, t in enumerate(chunks):
        positions = jnp.broadcast_to(jnp.arange(start, start + t), (batch, t))
        positions = positions.at[1].set(jnp.where(positions[1] < 3, positions[1], -1)) if c == 0 else positions
        for role in (0, 1):
            k = jnp.asarray(rng.normal(size=(batch, t, kh, h)), jnp.float32)
            v = jnp.asarray(rng.normal(size=(batch, t, kh, h)), jnp.float32)
            true["k"][role].append(k)
            true["v"][role].append(v)
            if c == 0:
                state = prefill[role](state, k, v, positions)
            else:
                q = jnp.asarray(rng.normal(size=(batch, t, kh, g, h)), jnp.float32)
                _, state = append[role](state, q, k, v, positions)
        start += t
    cat = {n: [jnp.concatenate(x, axis=1).transpose(0, 2, 1, 3) for x in true[n]] for n in "kv"}
    return state, cat


@pytest.mark.parametrize("merge", ["slerp", "average"])
def test_the_pair_stores_what_the_reference_merges(parity_models, merge):
    """After a prefill, an extend chunk and decode steps, each layer's restored keys/values equal
    merge_pair_reference of both layers' true K/V, token by token (a padded row included)."""
    config = parity_models["llama3"][0]
    pols = [MiniCacheLayer(role=r, retain=0.0, merge=merge) for r in (0, 1)]
    state, true = _drive(config, pols, [12, 5, 1, 1, 1])
    assert state.pending is None
    n = 20
    for name in "kv":
        ref = merge_pair_reference(true[name][0], true[name][1], merge=merge)
        for role in (0, 1):
            got = getattr(pols[role].restore(state), name)[:, :, :n]
            np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[role][0]), atol=1e-5)
            np.testing.assert_allclose(np.asarray(got[1, :, :3]), np.asarray(ref[role][1, :, :3]), atol=1e-5)
    pos = np.asarray(state.dirs.positions)
    assert (pos[0, :, :n] == np.arange(n)).all() and (pos[0, :, n:] == -1).all()
    assert (pos[1, :, 3:12] == -1).all()  # the padded prompt slots stay empty


def test_retention_keeps_the_farthest_tokens(parity_models):
    """The buffer ends holding the R tokens of largest distance over prefill and decode, and
    their originals come back exactly."""
    config = parity_models["llama3"][0]
    pols = [MiniCacheLayer(role=r, retain=0.25, gamma=0.0) for r in (0, 1)]
    state, true = _drive(config, pols, [12, 5, 1, 1, 1])
    _, _, dk = merge_pair_reference(true["k"][0], true["k"][1])
    _, _, dv = merge_pair_reference(true["v"][0], true["v"][1])
    d = np.maximum(np.asarray(dk), np.asarray(dv))[0]  # row 0: [K, T]
    r = state.kept_pos.shape[-1]
    assert r == 6
    for h in range(config.num_kv_heads):
        want = np.sort(np.argsort(-d[h])[:r])
        np.testing.assert_array_equal(np.sort(np.asarray(state.kept_pos[0, h])), want)
        for role in (0, 1):
            got = pols[role].restore(state).k[0, h, want]
            np.testing.assert_allclose(np.asarray(got), np.asarray(true["k"][role][0, h, want]), atol=1e-6)


def test_retaining_every_token_equals_full(parity_models):
    """A buffer that holds every token (retain 1, gamma 0) scatters every original back: the
    merged path then equals a full cache in prefill, extend and decode."""
    for fam in ("llama3", "mistral"):
        config, params, e = parity_models[fam]
        seq = _sequence(e)
        ref, _ = _run(config, params, seq, "full")
        got, cache = _run(config, params, seq, MiniCache(start=0.0, retain=1.0, gamma=0.0))
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, err_msg=fam)
        assert int((cache.layers[0].kept_pos >= 0).sum()) == seq.shape[1] * config.num_kv_heads


def test_merging_loses_something_and_retention_gives_part_back(parity_models):
    config, params, e = parity_models["llama3"]
    seq = _sequence(e)
    ref, _ = _run(config, params, seq, "full")
    merged, _ = _run(config, params, seq, MiniCache(start=0.0, retain=0.0))
    kept, _ = _run(config, params, seq, MiniCache(start=0.0, retain=0.25, gamma=0.0))
    err = lambda x: float(np.abs(np.asarray(x - ref))[0, 12:].max())  # noqa: E731  after the dense prefill
    assert np.array_equal(np.asarray(merged[:, :12]), np.asarray(ref[:, :12]))  # the prompt's own pass is dense
    assert err(merged) > 1e-3  # merging is lossy on a random-weight model
    assert err(kept) < err(merged)  # retention restores part of it


def test_bytes_halve_per_pair_and_quantized_dirs_shrink_them(tiny_model):
    config, params = tiny_model
    n, b = 64, 2
    full = init_cache(config, "full", batch=b, max_len=n, dtype=jnp.bfloat16).nbytes
    merged = init_cache(config, MiniCache(start=0.0, retain=0.0), batch=b, max_len=n, dtype=jnp.bfloat16).nbytes
    # one direction array + 4 norms per token-head instead of two layers' K and V
    assert 0.5 < merged / full < 0.6
    avg = init_cache(config, MiniCache(start=0.0, retain=0.0, merge="average"), batch=b, max_len=n,
                     dtype=jnp.bfloat16).nbytes
    assert avg < merged
    q = init_cache(config, make_policy("minicache+mikv", start=0.0, retain=0.0), batch=b, max_len=n,
                   dtype=jnp.bfloat16).nbytes
    assert q < 0.3 * full


def test_from_budget_merges_more_for_less():
    assert MiniCache.from_budget(1.0, 100).start == 1.0
    assert MiniCache.from_budget(0.75, 100).start == pytest.approx(0.5)
    assert MiniCache.from_budget(0.25, 100).start == 0.0


@pytest.mark.parametrize("kwargs, field", [({"start": 1.5}, "start"), ({"t": -0.1}, "t"), ({"gamma": "x"}, "gamma"),
                                           ({"retain": float("nan")}, "retain"), ({"merge": "mean"}, "merge")])
def test_bad_settings_name_the_argument(kwargs, field):
    with pytest.raises(UserError, match=field):
        MiniCache(**kwargs)


def test_a_prompt_beyond_the_cache_is_refused(parity_models):
    config, params, e = parity_models["llama3"]
    cache = init_cache(config, MiniCache(start=0.0), batch=1, max_len=4, dtype=jnp.float32)
    tokens = jnp.ones((1, 6), jnp.int32)
    with pytest.raises(UserError, match="does not fit"):
        forward(params, tokens, jnp.arange(6)[None], cache, config=config)


def test_the_upper_layer_alone_is_refused(parity_models):
    config, params, e = parity_models["llama3"]
    pol = MiniCacheLayer(role=1)
    state = MiniCacheLayer(role=0).init(batch=1, max_len=8, dtype=jnp.float32, layer=LayerSpec(0, config))
    x = jnp.zeros((1, 2, config.num_kv_heads, config.head_dim))
    with pytest.raises(UserError, match="lower one"):
        pol.prefill(state, q=None, k=x, v=x, positions=jnp.arange(2)[None], layer=LayerSpec(1, config))
