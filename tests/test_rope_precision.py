"""AnchorAttention's RoPE-precision measurement: shift invariance holds in fp32 and breaks in bf16."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.attention import attention_weights
from jaxkv.errors import UserError
from jaxkv.eval.rope_precision import analyze_rope_precision, rope_deviation
from jaxkv.models.layers import apply_rope, rope_angles, rope_inv_freq
from jaxkv.models.llama import attention_inputs


def _d_by_hand(params, config, tokens, shifts):
    """D from jaxkv's reference attention weights, summed in numpy (the module's formula)."""
    maps = []
    inv = rope_inv_freq(config.head_dim, config.rope_theta)
    for shift in shifts:
        pos = shift + jnp.arange(tokens.shape[1])[None]
        cos, sin = rope_angles(pos, inv)
        per_layer = []
        for i, x in enumerate(attention_inputs(params, tokens, pos, config=config, compute_dtype=jnp.float32)):
            p = params["layers"][i]["attn"]
            q = apply_rope((x @ p["q"]["kernel"].T).reshape(1, -1, config.num_heads, config.head_dim), cos, sin)
            k = apply_rope((x @ p["k"]["kernel"].T).reshape(1, -1, config.num_kv_heads, config.head_dim), cos, sin)
            q = q.reshape(1, -1, config.num_kv_heads, config.group_size, config.head_dim)
            per_layer.append(np.asarray(attention_weights(q, k.transpose(0, 2, 1, 3), pos, pos))[0].reshape(
                config.num_heads, tokens.shape[1], tokens.shape[1]))
        maps.append(per_layer)
    t = tokens.shape[1]
    n = 1.0 / (t - np.arange(t))
    return sum(float(np.sum(n[None, :, None] * np.abs(a - b))) for a, b in zip(*maps))


def test_the_deviation_is_the_formula_and_zero_for_equal_shifts(tiny_model):
    config, params = tiny_model
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (1, 48)), jnp.int32)
    got = rope_deviation(params, tokens, 0, 37, config=config, dtype=jnp.float32)
    assert float(got["D"]) == pytest.approx(_d_by_hand(params, config, tokens, (0, 37)), rel=1e-3, abs=1e-6)
    assert float(jnp.sum(got["column"])) == pytest.approx(float(got["D"]), rel=1e-5)
    same = rope_deviation(params, tokens, 5, 5, config=config, dtype=jnp.bfloat16)
    assert float(same["D"]) == 0.0


def test_bf16_breaks_shift_invariance_that_fp32_keeps(tiny_model):
    config, params = tiny_model
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, config.vocab_size, (1, 64)), jnp.int32)
    fp32 = float(rope_deviation(params, tokens, 0, 1000, config=config, dtype=jnp.float32)["D"])
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    bf16 = {r: float(rope_deviation(cast, tokens, 0, 1000, config=config, dtype=jnp.bfloat16, rounding=r)["D"])
            for r in ("jaxkv", "hf")}
    assert fp32 < 1e-3 and min(bf16.values()) > 100 * max(fp32, 1e-6)


def test_analyze_writes_json_and_png_and_refuses_bad_ranges(tiny_model, tmp_path):
    config, params = tiny_model
    stream = np.random.default_rng(2).integers(3, config.vocab_size, 200)
    rep = analyze_rope_precision(params, config, stream, tmp_path, lengths=(32,), shifts=(8,),
                                 dtypes=("float32", "bfloat16"))
    assert len(rep["rows"]) == 1 + 2  # fp32: one rounding; bf16: jaxkv and hf
    saved = json.loads((tmp_path / "rope_precision.json").read_text())
    assert saved["rows"] == rep["rows"] and (tmp_path / "rope_precision.png").stat().st_size > 0
    assert all(0 <= r["first_token_share"] <= 1 and 0 < r["first_token_weight"] <= 1 for r in rep["rows"])
    with pytest.raises(UserError, match="fewer than the longest"):
        analyze_rope_precision(params, config, stream[:20], tmp_path, lengths=(32,), shifts=(8,))
    with pytest.raises(UserError, match="context"):
        analyze_rope_precision(params, config, stream, tmp_path, lengths=(32,), shifts=(5000,))
