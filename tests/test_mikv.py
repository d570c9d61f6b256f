"""MiKV: one layer against a numpy reference: the important tokens (the recent ones and the most
attended by the observation window) in full precision, every other token dequantized from its
packed codes, the balancer leaving q.k unchanged; importance updated during decode."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache import make_policy, LayerSpec, Phase
from jaxkv.cache.mikv import MiKVCache
from jaxkv.cache.quant import dequantize, quantize
from jaxkv.config import preset
from jaxkv.errors import UserError


def _attend(q, keys, values):
    s = keys @ q / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max())
    p /= p.sum()
    return p @ values, p


@pytest.mark.parametrize("balancer", [True, False])
def test_one_layer_against_a_numpy_reference(balancer):
    config = preset("tiny")
    layer = LayerSpec(0, config)
    t, max_len = 20, 24
    policy = MiKVCache(important=0.25, recent=2, bits=3, balancer=balancer, obs_window=4)
    sh = policy.hi_slots(max_len)
    assert sh == 6
    rng = np.random.default_rng(1)
    kh, g, h = config.num_kv_heads, config.group_size, config.head_dim
    k = rng.normal(size=(1, t + 1, kh, h)).astype(np.float32)
    k[..., 3] *= 20  # an outlier channel, what the balancer is for
    v = rng.normal(size=(1, t + 1, kh, h)).astype(np.float32)
    q = rng.normal(size=(1, t + 1, kh, g, h)).astype(np.float32)
    state = policy.init(batch=1, max_len=max_len, dtype=jnp.float32, layer=layer)
    state = policy.prefill(state, q=q[:, :t], k=k[:, :t], v=v[:, :t], positions=jnp.arange(t)[None], layer=layer)
    # the balancer, by hand
    want_b = np.sqrt(np.abs(q[0, :t]).max(axis=(0, 2)) / np.abs(k[0, :t]).max(axis=0)) if balancer else np.ones((kh, h))
    np.testing.assert_allclose(np.asarray(state.balance[0]), want_b, rtol=1e-5)
    # importance by hand: the last 4 queries' attention summed over them and the group
    for head in range(kh):
        imp = np.zeros(t)
        for i in range(t - 4, t):
            for gi in range(g):
                imp[: i + 1] += _attend(q[0, i, head, gi], k[0, : i + 1, head], v[0, : i + 1, head])[1]
        imp[t - 2:] = np.inf
        want = set(np.argsort(-imp, kind="stable")[:sh].tolist())
        assert set(np.asarray(state.hi.positions[0, head]).tolist()) == want, head
    # one decode step: the new token replaces the least important non-recent hi token
    out, state = policy.append(state, q=q[:, t:], k=k[:, t:], v=v[:, t:], positions=jnp.array([[t]]),
                               phase=Phase.DECODE, layer=layer)
    for head in range(kh):
        hi_pos = np.asarray(state.hi.positions[0, head])
        assert t in hi_pos and (t - 1) in hi_pos
        b = want_b[head]
        lo_k = np.asarray(dequantize(quantize(jnp.asarray(k[0, : t + 1, head] * b), 3)))  # balanced, per token
        lo_v = np.asarray(dequantize(quantize(jnp.asarray(v[0, : t + 1, head]), 3)))
        keys = np.where(np.isin(np.arange(t + 1), hi_pos)[:, None], k[0, : t + 1, head] * b, lo_k)
        values = np.where(np.isin(np.arange(t + 1), hi_pos)[:, None], v[0, : t + 1, head], lo_v)
        for gi in range(g):
            want, _ = _attend(q[0, t, head, gi] / b, keys, values)
            np.testing.assert_allclose(np.asarray(out[0, 0, head, gi]), want, atol=2e-5, err_msg=f"head {head}")


def test_bad_parameters_name_themselves():
    for bits in (5, 4.0):  # 4.0 == 4, but codes are packed by an integer width
        with pytest.raises(UserError, match="bits"):
            MiKVCache(bits=bits)
    with pytest.raises(UserError, match="storage's bits"):
        make_policy("streaming+mikv", kv_bits=4.0)
    with pytest.raises(UserError, match="important"):
        MiKVCache(important=2)
    with pytest.raises(UserError, match="recent"):
        MiKVCache(recent=0)


def test_bits_zero_evicts_the_rest(parity_models):
    """``bits=0`` (the paper's "drop" arm): no low tier. With every token important it equals
    ``full``; at a share it holds only the high tier's bytes and differs from keeping the rest."""
    from tests.test_policy_conformance import _run, _sequence

    config, params, e = parity_models["llama3"]
    seq = _sequence(e)
    ref, _ = _run(config, params, seq, "full", jit_all=True)
    got, cache = _run(config, params, seq, MiKVCache(important=1.0, bits=0), jit_all=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    assert all(layer.lo is None for layer in cache.layers)
    drop, dcache = _run(config, params, seq, MiKVCache(important=0.3, recent=2, bits=0), jit_all=True)
    keep, kcache = _run(config, params, seq, MiKVCache(important=0.3, recent=2, bits=8), jit_all=True)
    n = seq.shape[1]
    sh = round(0.3 * n)
    per_layer = config.num_kv_heads * sh * (2 * config.head_dim * 4 + 4 + 4) + config.num_kv_heads * config.head_dim * 4
    assert dcache.nbytes == config.num_layers * per_layer < kcache.nbytes
    err = lambda x: float(np.abs(np.asarray(x - ref))[0, 12:].max())  # noqa: E731
    assert err(keep) < err(drop)  # keeping the rest at 8 bits beats evicting it


def test_a_variant_by_name():
    from jaxkv.cache import make_policy
    from jaxkv.eval.harness import policy_for

    assert make_policy("mikv[bits=0,recent=4]") == MiKVCache(bits=0, recent=4)
    sized = policy_for("mikv[bits=2]", 0.25, 1000)
    assert sized.bits == 2 and sized.budget == 0.25
    with pytest.raises(UserError, match="given twice"):
        make_policy("mikv[bits=2,bits=3]")
    with pytest.raises(UserError, match="both in the name"):
        make_policy("mikv[bits=2]", bits=3)
