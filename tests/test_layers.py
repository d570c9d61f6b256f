import math

import jax.numpy as jnp
import numpy as np

from jaxkv.config import RopeScaling
from jaxkv.models.layers import RMSNorm, apply_rope, rope_angles, rope_inv_freq


def test_llama3_rope_scaling_hand_worked():
    # head_dim 16, theta 1e4: wavelengths 2*pi*1e4**(i/8) = 6.28, 19.9, 62.8, ...
    # orig 32: below 32/4 = 8 untouched, above 32/1 = 32 divided by 8, 19.9 smoothed.
    base = rope_inv_freq(16, 1e4)
    np.testing.assert_allclose(base, [1e4 ** (-i / 8) for i in range(8)], rtol=1e-6)
    scaled = rope_inv_freq(16, 1e4, RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=32))
    ratio = base / scaled
    assert ratio[0] == 1.0
    np.testing.assert_allclose(ratio[2:], 8.0, rtol=1e-6)
    a = (32 / (2 * math.pi / base[1]) - 1.0) / (4.0 - 1.0)  # smooth factor
    np.testing.assert_allclose(scaled[1], (1 - a) * base[1] / 8 + a * base[1], rtol=1e-6)
    assert 3.2 < ratio[1] < 3.4


def test_rope_rotates_pairs_and_keeps_relative_angles():
    inv = rope_inv_freq(8, 100.0)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

    def rot(x, p):
        cos, sin = rope_angles(jnp.array([[p]]), inv)
        return apply_rope(x, cos, sin)

    # norm preserved; q.k depends only on the position difference
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 7)), jnp.linalg.norm(q), rtol=1e-6)
    d1 = jnp.sum(rot(q, 10) * rot(k, 3))
    d2 = jnp.sum(rot(q, 107) * rot(k, 100))
    np.testing.assert_allclose(d1, d2, rtol=1e-4)
    # position 1, first pair: (x0, x4) rotated by inv[0] = 1 radian
    x = jnp.zeros((1, 1, 1, 8)).at[..., 0].set(1.0)
    y = rot(x, 1)
    np.testing.assert_allclose([y[0, 0, 0, 0], y[0, 0, 0, 4]], [math.cos(1), math.sin(1)], rtol=1e-6)


def test_rmsnorm_hand_worked():
    norm = RMSNorm(2, eps=0.0)
    y = norm(jnp.array([[3.0, 4.0]]))  # rms = sqrt(12.5)
    np.testing.assert_allclose(y, [[3 / math.sqrt(12.5), 4 / math.sqrt(12.5)]], rtol=1e-6)
