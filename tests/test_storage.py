"""Storage, the second concern: packed low-bit slots (QuantizedKV) against a numpy reference,
compositions by name, honest bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache import LayerSpec, Phase, init_cache, make_policy
from jaxkv.cache.quant import dequantize, packed_length, quantize
from jaxkv.cache.storage import QuantizedKV
from jaxkv.config import preset
from jaxkv.errors import UserError


def test_compositions_by_name():
    p = make_policy("razor+mikv", window=64, bits=3)
    assert p.name == "razor" and p.kv_bits == 3 and p.window == 64 and p.quantized
    assert make_policy("streaming+mikv").kv_bits == 4
    with pytest.raises(UserError, match="unknown cache policy 'mikv\\+razor'"):
        make_policy("mikv+razor")
    with pytest.raises(UserError, match="bits"):
        make_policy("full+mikv", bits=5)
    with pytest.raises(UserError, match="no kv_bits"):
        make_policy("mikv", kv_bits=4)


@pytest.mark.parametrize("bits", [2, 4])
def test_full_in_packed_storage_against_numpy(bits):
    """A full cache storing 4-bit codes: prefill 9 tokens, decode 1; each head attends to the
    dequantized keys and values of every token."""
    config = preset("tiny")
    layer = LayerSpec(0, config)
    policy = make_policy("full+mikv", bits=bits)
    rng = np.random.default_rng(bits)
    kh, g, h, t = config.num_kv_heads, config.group_size, config.head_dim, 10
    k, v = (rng.normal(size=(1, t, kh, h)).astype(np.float32) for _ in range(2))
    q = rng.normal(size=(1, t, kh, g, h)).astype(np.float32)
    state = policy.init(batch=1, max_len=12, dtype=jnp.float32, layer=layer)
    assert isinstance(state, QuantizedKV)
    state = policy.prefill(state, q=q[:, :9], k=k[:, :9], v=v[:, :9], positions=jnp.arange(9)[None], layer=layer)
    out, state = policy.append(state, q=q[:, 9:], k=k[:, 9:], v=v[:, 9:], positions=jnp.array([[9]]),
                               phase=Phase.DECODE, layer=layer)
    for head in range(kh):
        dk = np.asarray(dequantize(quantize(jnp.asarray(k[0, :, head]), bits)))  # per token
        dv = np.asarray(dequantize(quantize(jnp.asarray(v[0, :, head]), bits)))
        for gi in range(g):
            s = dk @ q[0, 9, head, gi] / np.sqrt(h)
            p = np.exp(s - s.max()); p /= p.sum()
            np.testing.assert_allclose(np.asarray(out[0, 0, head, gi]), p @ dv, atol=1e-5)


def test_packed_storage_holds_fewer_bytes(tiny_model):
    config, _ = tiny_model
    dense = init_cache(config, "full", batch=2, max_len=100, dtype=jnp.bfloat16)
    packed = init_cache(config, make_policy("full+mikv", bits=2), batch=2, max_len=100, dtype=jnp.bfloat16)
    per_slot = 2 * (packed_length(config.head_dim, 2) + 4) + 4  # codes + fp16 scale and zero, K and V; position
    assert packed.nbytes == 2 * config.num_layers * config.num_kv_heads * 100 * per_slot
    assert packed.nbytes == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(packed.layers))
    # head_dim 16: 4 bytes of codes + 4 of scale/zero per K (or V) against 32 in bf16
    assert packed.nbytes / dense.nbytes == per_slot / (2 * config.head_dim * 2 + 4)
