import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.attention import attend_reference, visibility_mask


def test_mask_causal_padding_window_segments_hand_worked():
    q = jnp.array([[0, 1, 2, -1]])
    m = np.asarray(visibility_mask(q, q))[0, 0]
    assert m.tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [0, 0, 0, 0],  # padding query sees nothing
    ]
    m = np.asarray(visibility_mask(q, q, window=2))[0, 0]
    assert m[2].tolist() == [0, 1, 1, 0]
    seg = jnp.array([[0, 0, 1, 1]])
    m = np.asarray(visibility_mask(jnp.array([[0, 1, 0, 1]]), jnp.array([[0, 1, 0, 1]]),
                                   q_segments=seg, k_segments=seg))[0, 0]
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    with pytest.raises(ValueError, match="together"):
        visibility_mask(q, q, q_segments=seg)


def test_attend_matches_naive_loop_with_slots_out_of_order():
    rng = np.random.default_rng(0)
    b, t, k, g, h, s = 2, 3, 2, 2, 4, 5
    q = rng.normal(size=(b, t, k, g, h)).astype(np.float32)
    kk = rng.normal(size=(b, k, s, h)).astype(np.float32)
    vv = rng.normal(size=(b, k, s, h)).astype(np.float32)
    qpos = np.array([[5, 6, 7], [2, 3, -1]])
    kpos = np.array([[[3, 0, 7, 6, -1], [4, 1, 2, 7, 5]], [[0, 1, 2, 3, 4], [-1, -1, 0, 2, 3]]])
    out = np.asarray(attend_reference(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(vv),
                                      jnp.asarray(qpos), jnp.asarray(kpos)))
    for bi in range(b):
        for ti in range(t):
            if qpos[bi, ti] < 0:
                continue
            for ki in range(k):
                ok = (kpos[bi, ki] >= 0) & (kpos[bi, ki] <= qpos[bi, ti])
                for gi in range(g):
                    sc = kk[bi, ki, ok] @ q[bi, ti, ki, gi] / np.sqrt(h)
                    p = np.exp(sc - sc.max())
                    p /= p.sum()
                    np.testing.assert_allclose(out[bi, ti, ki, gi], p @ vv[bi, ki, ok], rtol=1e-5, atol=1e-6)
