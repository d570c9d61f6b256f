"""Packed low-bit storage: hand-worked packing, round trips within a step, honest bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache.quant import codes_per_byte, dequantize, pack, packed_length, quantize, unpack
from jaxkv.errors import UserError


def test_pack_hand_worked():
    # 2-bit codes 1, 2, 3, 0 -> 1 | 2<<2 | 3<<4 | 0<<6 = 1 + 8 + 48 = 57; a 5th code starts a new byte
    codes = jnp.array([[1, 2, 3, 0, 2]], jnp.uint8)
    packed = pack(codes, 2)
    assert packed.dtype == jnp.uint8 and packed.tolist() == [[57, 2]]
    assert unpack(packed, 2, 5).tolist() == codes.tolist()
    assert pack(jnp.array([[5, 9]], jnp.uint8), 4).tolist() == [[5 + (9 << 4)]]
    assert [codes_per_byte(b) for b in (1, 2, 3, 4, 8)] == [8, 4, 2, 2, 1]
    assert packed_length(64, 3) == 32 and packed_length(65, 2) == 17


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (3, 4, 37), dtype=np.uint8)
    assert np.array_equal(np.asarray(unpack(pack(jnp.asarray(codes), bits), bits, 37)), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [-1, -2])
def test_quantize_round_trips_within_its_step(bits, axis):
    x = jax.random.normal(jax.random.key(bits), (2, 3, 16, 64)) * 3 + 1
    q = quantize(x, bits, axis=axis)
    err = np.abs(np.asarray(dequantize(q)) - np.asarray(x))
    step = np.asarray(q.scale, np.float32)
    assert (err <= step + 1e-6).all()
    assert (err.mean() < 0.5 * step.mean())  # rounding, not truncation: half a step on average
    # bytes held: packed codes + a scale and a zero per slice, nothing per value beyond the bits
    slices = x.size // x.shape[axis]
    assert q.nbytes == x.size // 64 * packed_length(64, bits) + 2 * slices * 2
    assert q.codes.shape == x.shape[:-1] + (packed_length(64, bits),)


def test_constant_slices_and_bad_bits():
    q = quantize(jnp.full((2, 8), 3.5), 2)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), 3.5)
    with pytest.raises(UserError, match="bits"):
        quantize(jnp.ones(4), 0)
    with pytest.raises(UserError, match="bits"):
        pack(jnp.ones(4, jnp.uint8), 9)


def test_quantize_is_jittable():
    f = jax.jit(lambda x: dequantize(quantize(x, 4)))
    x = jnp.linspace(-1, 1, 32).reshape(2, 16)
    assert np.abs(np.asarray(f(x)) - np.asarray(x)).max() <= 2 / 15 + 1e-6
