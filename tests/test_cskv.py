"""CSKV: the low-rank factors (SVD's optimal error, ASVD's activation scaling), the bi-branch
cache (exact window, rebuilt old keys), bytes, calibration files and bad settings. The
conformance suite covers full density == full, nbytes, one decode compile and ragged batches."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache import CSKVCache, init_cache
from jaxkv.cache.cskv import activation_scales, init_factors, rank_for, svd_factors
from jaxkv.errors import UserError
from tests.test_policy_conformance import _run, _sequence


def test_svd_factors_reach_the_eckart_young_error_and_asvd_undoes_its_scale():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 20))
    sig = np.linalg.svd(w.T, compute_uv=False)
    for r in (3, 7, 12):
        down, up = svd_factors(w, r)
        assert down.shape == (20, r) and up.shape == (r, 12)
        err = np.linalg.norm(w.T - down.astype(np.float64) @ up)
        assert err == pytest.approx(np.sqrt(np.sum(sig[r:] ** 2)), abs=1e-4)
    scale = rng.uniform(0.1, 3.0, 20)
    down, up = svd_factors(w, 12, scale)  # full rank: exact whatever the scale
    np.testing.assert_allclose(down @ up, w.T, atol=1e-4)
    # at low rank, ASVD is the best rank-r fit of the *scaled* input: its error weighted by scale
    # beats plain SVD's
    d_a, u_a = svd_factors(w, 4, scale)
    d_s, u_s = svd_factors(w, 4)
    weighted = lambda d, u: np.linalg.norm(scale[:, None] * (w.T - d @ u))  # noqa: E731
    assert weighted(d_a, u_a) < weighted(d_s, u_s)
    with pytest.raises(UserError, match="scale"):
        svd_factors(w, 4, -scale)


def test_the_recent_window_is_exact_and_old_tokens_come_from_latents(parity_models):
    """A window that holds the whole sequence equals `full` at any density; a small window
    with random factors does not; at full density the rebuilt keys are the model's keys."""
    config, params, e = parity_models["llama3"]
    seq = _sequence(e)
    n = seq.shape[1]
    ref, full = _run(config, params, seq, "full")
    wide = CSKVCache(key_density=0.1, value_density=0.1, window=n, decomposition="random").prepare(params, config)
    got, _ = _run(config, params, seq, wide)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)
    narrow = dataclasses.replace(wide, window=2)
    got, _ = _run(config, params, seq, narrow)
    assert float(np.abs(np.asarray(got - ref))[0, 14:].max()) > 1e-2
    exact = CSKVCache(key_density=1.0, value_density=1.0, window=2).prepare(params, config)
    _, cache = _run(config, params, seq, exact)
    from jaxkv.cache import LayerSpec
    from jaxkv.cache.policy import LayerInput
    from jaxkv.models.layers import rope_inv_freq

    inputs = LayerInput(x=None, inv_freq=rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
    for i in range(config.num_layers):
        k, v = exact.rebuild(cache.layers[i], LayerSpec(i, config), inputs, cache.params[i])
        np.testing.assert_allclose(np.asarray(k), np.asarray(full.layers[i].k), atol=1e-4)
        np.testing.assert_allclose(np.asarray(v), np.asarray(full.layers[i].v), atol=1e-4)


def test_bytes_are_the_latents_and_the_window(tiny_model):
    config, params = tiny_model
    n = 1024
    full = init_cache(config, "full", batch=1, max_len=n, dtype=jnp.bfloat16).nbytes
    for kd, vd in ((0.25, 0.75), (0.5, 0.5), (0.25, 0.25)):
        pol = CSKVCache(key_density=kd, value_density=vd).prepare(params, config)
        got = init_cache(config, pol, batch=1, max_len=n, dtype=jnp.bfloat16).nbytes
        rk, rv = rank_for(kd, config), rank_for(vd, config)
        kh = config.num_kv_heads * config.head_dim
        per_layer = n * ((rk + rv) * 2 + 4) + config.num_kv_heads * 32 * (2 * config.head_dim * 2 + 4)
        assert got == config.num_layers * per_layer
        assert got / full == pytest.approx((rk + rv) / (2 * kh), abs=0.06)  # positions and window on top


def test_activation_scales_are_the_mean_absolute_attention_input(tiny_model):
    config, params = tiny_model
    chunks = np.asarray(jax.random.randint(jax.random.key(0), (2, 16), 3, config.vocab_size))
    got = activation_scales(params, config, chunks)
    from flax import nnx

    from jaxkv.models.llama import _graphdef

    model = nnx.merge(_graphdef(config), params)
    want = []
    for row in chunks:  # the attention input of layer i = attn_norm(residual stream before layer i)
        xs = []
        pos = jnp.arange(16)[None]
        from jaxkv.models.layers import rope_angles, rope_inv_freq

        cos, sin = rope_angles(pos, rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
        x = model.embed(jnp.asarray(row)[None], jnp.float32)
        for layer in model.layers:
            xs.append(np.abs(np.asarray(layer.attn_norm(x))).mean(axis=(0, 1)))
            x, _ = layer(x, pos, cos, sin, layer_cache=None, policy=None, phase=None, layer=None, params=None,
                         segment_ids=None)
        want.append(np.stack(xs))
    np.testing.assert_allclose(got, np.mean(want, axis=0), rtol=1e-5, atol=1e-6)


def test_calibration_files_feed_asvd_and_factors_are_checked(tiny_model, tmp_path):
    from jaxkv.calibration import model_fingerprint, save_calibration

    config, params = tiny_model
    scales = np.random.default_rng(0).uniform(0.5, 2.0, (config.num_layers, config.hidden_size)).astype(np.float32)
    stats = save_calibration(tmp_path / "s.safetensors", method="cskv", tensors={"scale": scales}, settings={},
                             fingerprint=model_fingerprint(config, params))
    pol = CSKVCache(key_density=0.25, value_density=0.5, calibration=str(stats)).prepare(params, config)
    want = init_factors(params, config, key_rank=rank_for(0.25, config), value_rank=rank_for(0.5, config),
                        decomposition="asvd", scales=scales)
    np.testing.assert_array_equal(pol.factors.layers[1]["k_down"], want[1]["k_down"])
    plain = CSKVCache(key_density=0.25, value_density=0.5).prepare(params, config)
    assert plain.factors != pol.factors and hash(plain) != hash(pol)
    # a factors file (as training writes) is used as it is, and must match the densities
    tensors = {f"layer{i}.{k}": v for i, layer in enumerate(want) for k, v in layer.items()}
    fac = save_calibration(tmp_path / "f.safetensors", method="cskv", tensors=tensors, settings={},
                           fingerprint=model_fingerprint(config, params))
    loaded = CSKVCache(key_density=0.25, value_density=0.5, calibration=str(fac)).prepare(params, config)
    assert loaded.factors == pol.factors
    with pytest.raises(UserError, match="ranks"):
        CSKVCache(key_density=0.5, value_density=0.5, calibration=str(fac)).prepare(params, config)
    with pytest.raises(UserError, match="asvd"):
        CSKVCache(decomposition="asvd").prepare(params, config)


def test_unprepared_policy_says_how(tiny_model):
    config, _ = tiny_model
    with pytest.raises(UserError, match="prepare"):
        init_cache(config, CSKVCache(), batch=1, max_len=8, dtype=jnp.float32)


@pytest.mark.parametrize("kwargs, field", [({"key_density": 0}, "key_density"), ({"value_density": 1.5}, "value_density"),
                                           ({"window": 0}, "window"), ({"decomposition": "pca"}, "decomposition"),
                                           ({"alpha": -1}, "alpha")])
def test_bad_settings_name_the_argument(kwargs, field):
    with pytest.raises(UserError, match=field):
        CSKVCache(**kwargs)


def test_the_cli_calibrates_cskv(tmp_path):
    from jaxkv.calibration import load_calibration
    from jaxkv.cli import main
    from jaxkv.tiny import create_tiny_checkpoint

    tiny_checkpoint = create_tiny_checkpoint(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200, encoding="utf-8")
    out = tmp_path / "c.safetensors"
    assert main(["calibrate", "cskv", "--model", str(tiny_checkpoint), "--out", str(out), "--n-tokens", "512",
                 "--text", str(text)]) == 0
    tensors, meta = load_calibration(out, method="cskv")
    assert tensors["scale"].shape[0] >= 1 and meta["settings"]["text"] == "user text"
    assert main(["calibrate", "razor", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "r.safetensors"),
                 "--text", str(text)]) == 2


def _train(tmp, steps, params, config, **kw):
    from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig
    from jaxkv.training.cskv import train_cskv
    from jaxkv.training.data import synthetic_documents

    docs = synthetic_documents("copy", vocab_size=config.vocab_size, seed=0, num_docs=60)
    return train_cskv(config, params, docs, key_density=0.25, value_density=0.25,
                      optim=OptimConfig(lr=3e-3, warmup_steps=1, total_steps=12, weight_decay=0.0),
                      data=DataConfig(seq_len=32),
                      train=TrainConfig(batch_size=4, steps=steps, save_every=3, compute_dtype="float32"),
                      out=tmp, **kw)


def test_training_lowers_the_loss_resumes_exactly_and_its_factors_load(tiny_model, tmp_path):
    """Only the factors train; the loss falls from the SVD start; a run stopped at step 6 and
    resumed ends where an uninterrupted one does; the policy loads the written factors."""
    from jaxkv.training.cskv import FACTORS_FILE, reconstruction_loss

    config, params = tiny_model
    whole = _train(tmp_path / "a", 12, params, config)
    losses = [h["loss"] for h in whole.history]
    assert losses[-1] < 0.97 * losses[0]  # deterministic: the same seeds and data every run
    _train(tmp_path / "b", 6, params, config)
    resumed = _train(tmp_path / "b", 12, params, config)
    assert [h["step"] for h in resumed.history] == list(range(7, 13))
    np.testing.assert_allclose([h["loss"] for h in resumed.history], losses[6:], rtol=1e-6)
    pol = CSKVCache(key_density=0.25, value_density=0.25, calibration=str(tmp_path / "a" / FACTORS_FILE))
    pol = pol.prepare(params, config)
    trained = jax.device_get(whole.state.params)["layers"]
    np.testing.assert_array_equal(pol.factors.layers[0]["k_up"], np.asarray(trained[0]["k_up"]))
    # the loss is the reconstruction error: zero at full rank
    full = CSKVCache(key_density=1.0, value_density=1.0).prepare(params, config).factors
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 60, (1, 2, 16)))
    batch = {"tokens": tokens[0], "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
             "segment_ids": jnp.zeros((2, 16), jnp.int32)}
    total, n = reconstruction_loss({"layers": full.layers}, params, batch, config=config, compute_dtype=jnp.float32)
    assert float(n) == 32 and float(total) < 1e-8


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_latents_hold_their_analytic_bytes(tiny_model, bits):
    from jaxkv.cache import LayerSpec

    config, params = tiny_model
    pol = CSKVCache(key_density=0.5, value_density=0.25, bits=bits, group=8, window=8).prepare(params, config)
    for max_len in (40, 37):
        cache = init_cache(config, pol, batch=2, max_len=max_len, dtype=jnp.bfloat16)
        expected = sum(pol.expected_nbytes(batch=2, max_len=max_len, dtype=jnp.bfloat16, layer=LayerSpec(i, config))
                       for i in range(config.num_layers))
        leaves = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.layers))
        assert cache.nbytes == expected == leaves
    plain = init_cache(config, dataclasses.replace(pol, bits=None), batch=2, max_len=40, dtype=jnp.bfloat16).nbytes
    assert init_cache(config, pol, batch=2, max_len=40, dtype=jnp.bfloat16).nbytes < plain


def test_quantized_latents_round_trip_within_half_a_step(parity_models):
    """Prefill 12, extend 5, decode the rest (groups of 4 sealed in all three phases): every
    sealed key group and every value of layer 0 (whose input both runs share) decodes within
    half its step of the unquantized latents; 8-bit codes change the logits far less than 2-bit."""
    config, params, e = parity_models["llama3"]
    seq = _sequence(e)
    base = CSKVCache(key_density=0.5, value_density=0.5, window=4, group=4).prepare(params, config)
    ref, fp = _run(config, params, seq, base)
    n = seq.shape[1]
    from jaxkv.cache import LayerSpec

    errs = {}
    for bits in (8, 2):
        pol = dataclasses.replace(base, bits=bits)
        got, cache = _run(config, params, seq, pol)
        for i in range(1):  # layer 0's input is the embedding: the same in both runs
            spec = LayerSpec(i, config)
            k, v = pol.latents(cache.layers[i], spec)
            want_k, want_v = np.asarray(fp.layers[i].k_latent), np.asarray(fp.layers[i].v_latent)
            kc, vc = cache.layers[i].k_latent, cache.layers[i].v_latent
            sealed = (n // 4) * 4
            k_step = np.repeat(np.asarray(kc.scale, np.float32), 4, axis=1)[:, :sealed]
            assert np.all(np.abs(np.asarray(k)[:, :sealed] - want_k[:, :sealed]) <= k_step / 2 + 1e-3)
            v_step = np.asarray(vc.scale, np.float32)[:, :n]
            assert np.all(np.abs(np.asarray(v)[:, :n] - want_v[:, :n]) <= v_step / 2 + 1e-3)
        errs[bits] = float(np.abs(np.asarray(got - ref))[0, 12:].max())
    assert 0 < errs[8] < 0.1 * errs[2]  # 8-bit codes: 64x finer steps than 2-bit


@pytest.mark.parametrize("kwargs, field", [({"bits": 5}, "bits"), ({"bits": 4.0}, "bits"),
                                           ({"bits": 4, "group": 64}, "group")])
def test_bad_quantization_settings_name_the_argument(kwargs, field):
    with pytest.raises(UserError, match=field):
        CSKVCache(**kwargs)


def test_a_calibration_serves_the_model_at_either_dtype(tiny_model):
    from jaxkv.calibration import model_fingerprint

    config, params = tiny_model
    bf16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    assert model_fingerprint(config, params) == model_fingerprint(config, bf16)
    other = jax.tree.map(lambda a: a, params)
    other["embed"]["embedding"] = params["embed"]["embedding"] * 1.01
    assert model_fingerprint(config, other) != model_fingerprint(config, params)


def test_a_row_whose_layout_the_key_groups_cannot_cut_is_lost_alone(parity_models):
    """Quantized latents cut a prompt's key groups by index, so a left-padded row comes back
    NaN (loudly); the other rows of its batch keep what they give alone."""
    from jaxkv.models.llama import forward

    config, params, e = parity_models["llama3"]
    seq = _sequence(e)[:1, :12]
    seq = jnp.concatenate([seq, seq], axis=0)
    pos = jnp.asarray(np.stack([np.arange(12), np.r_[[-1] * 3, np.arange(9)]]), jnp.int32)
    pol = CSKVCache(key_density=0.5, value_density=0.5, window=4, group=4, bits=4).prepare(params, config)
    lg, cache = forward(params, seq, pos, init_cache(config, pol, batch=2, max_len=16, dtype=jnp.float32),
                        config=config)
    alone, alone_cache = forward(params, seq[:1], pos[:1], init_cache(config, pol, batch=1, max_len=16,
                                                                     dtype=jnp.float32), config=config)
    step = jnp.asarray([[5], [5]], jnp.int32)
    nxt, _ = forward(params, step, jnp.asarray([[12], [9]], jnp.int32), cache, config=config)
    nxt_alone, _ = forward(params, step[:1], jnp.asarray([[12]], jnp.int32), alone_cache, config=config)
    np.testing.assert_allclose(np.asarray(lg[0]), np.asarray(alone[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(nxt[0]), np.asarray(nxt_alone[0]), atol=1e-5)
    assert np.isnan(np.asarray(nxt[1])).all()
