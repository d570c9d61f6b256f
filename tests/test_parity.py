"""jaxkv against transformers: logits and greedy tokens of the committed fixtures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache import init_cache
from jaxkv.generate import generate
from jaxkv.models.llama import forward
from conftest import FAMILIES

# every forward here jitted: one compile per (family, shape) instead of one per eager operation
_FORWARD = jax.jit(forward, static_argnames=("config",))


def _positions(n, b=1):
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))


@pytest.mark.parametrize("fam", FAMILIES)
def test_full_forward_logits_match_transformers(parity_models, fam):
    config, params, e = parity_models[fam]
    for s in "ab":
        for prompt, want in ((e[f"prompt_{s}"], e[f"logits_{s}"]),
                             (np.concatenate([e[f"prompt_{s}"], e[f"greedy_{s}"]]), e[f"full_logits_{s}"])):
            logits, _ = _FORWARD(params, jnp.asarray(prompt)[None], _positions(len(prompt)), config=config)
            np.testing.assert_allclose(np.asarray(logits[0]), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fam", FAMILIES)
def test_greedy_tokens_match_transformers_in_a_ragged_batch(parity_models, fam):
    config, params, e = parity_models[fam]
    out = generate(params, config, [e["prompt_a"], e["prompt_b"]], max_new_tokens=8, stop_tokens=())
    assert out.tokens == [e["greedy_a"].tolist(), e["greedy_b"].tolist()]


@pytest.mark.parametrize("fam", FAMILIES)
def test_cached_prefill_then_decode_equals_full_forward(parity_models, fam):
    """Prefill 11 tokens, then decode one at a time; every step's logits equal the full
    forward's at that position (mistral's window of 8 is crossed by both parts)."""
    config, params, e = parity_models[fam]
    seq = jnp.asarray(np.concatenate([e["prompt_a"], e["greedy_a"]]))[None]
    n, split = seq.shape[1], 11
    full, _ = _FORWARD(params, seq, _positions(n), config=config)
    cache = init_cache(config, "full", batch=1, max_len=n, dtype=jnp.float32)
    logits, cache = _FORWARD(params, seq[:, :split], _positions(split), cache, config=config)
    got = [logits[0]]
    for t in range(split, n):
        step, cache = _FORWARD(params, seq[:, t:t + 1], jnp.array([[t]]), cache, config=config)
        got.append(step[0])
    got = np.concatenate([np.asarray(g) for g in got])
    np.testing.assert_allclose(got, np.asarray(full[0]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, e["full_logits_a"], atol=1e-4, rtol=0)


def test_packed_segments_equal_separate_rows(parity_models):
    """Two prompts packed in one row with segment ids and per-document positions give the
    logits of each prompt run alone."""
    config, params, e = parity_models["llama3"]
    a, b = e["prompt_a"], e["prompt_b"]
    tokens = jnp.asarray(np.concatenate([a, b]))[None]
    positions = jnp.asarray(np.concatenate([np.arange(len(a)), np.arange(len(b))]))[None]
    segments = jnp.asarray(np.repeat([0, 1], [len(a), len(b)]))[None]
    packed, _ = _FORWARD(params, tokens, positions, config=config, segment_ids=segments)
    np.testing.assert_allclose(np.asarray(packed[0, :len(a)]), e["logits_a"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(packed[0, len(a):]), e["logits_b"], atol=1e-4, rtol=0)


def test_forward_rejects_bad_shapes(parity_models):
    config, params, _ = parity_models["llama3"]
    with pytest.raises(ValueError, match="positions"):
        forward(params, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 3), jnp.int32), config=config)
    with pytest.raises(ValueError, match="segment_ids"):
        forward(params, jnp.zeros((1, 4), jnp.int32), _positions(4), config=config,
                segment_ids=jnp.zeros((1, 5), jnp.int32))
    cache = init_cache(config, "full", batch=1, max_len=8, dtype=jnp.float32)
    with pytest.raises(ValueError, match="segment_ids"):
        forward(params, jnp.zeros((1, 4), jnp.int32), _positions(4), cache, config=config,
                segment_ids=jnp.zeros((1, 4), jnp.int32))
