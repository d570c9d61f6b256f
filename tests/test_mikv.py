"""MiKV: one layer against a numpy reference: the important tokens (the recent ones and the most
attended by the observation window) in full precision, every other token dequantized from its
packed codes, the balancer leaving q.k unchanged; importance updated during decode."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache import LayerSpec, Phase
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
    with pytest.raises(UserError, match="bits"):
        MiKVCache(bits=5)
    with pytest.raises(UserError, match="important"):
        MiKVCache(important=2)
    with pytest.raises(UserError, match="recent"):
        MiKVCache(recent=0)
