"""Mamba-2: the chunked SSD against the recurrence, the model against transformers' logits and
greedy tokens (committed fixtures, tests/fixtures/make_mamba2_fixtures.py), prefill + recurrent
decode against one forward, padding, the gated norm both ways, the state's bytes, bad input."""
import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.checkpoints import CheckpointError, load_mamba2_checkpoint
from jaxkv.config import ConfigError
from jaxkv.kernels.ssd import segsum, ssd_chunked, ssd_recurrent, ssd_windowed
from jaxkv.models import mamba2
from jaxkv.models.mamba2 import Mamba2Config, forward, init_params, init_state

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "mamba2"
NAMES = ["groups1_chunk8", "groups2_chunk5_bias_tied", "groups4_chunk16"]
_STEP = jax.jit(forward, static_argnames=("config", "chunk_size"))  # every forward here: one compile per shape, not per op


def _ssd_inputs(rng, b, t, h, p, g, n):
    r = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return (r(b, t, h, p), jax.nn.softplus(r(b, t, h)), -jnp.exp(r(h)), r(b, t, g, n), r(b, t, g, n),
            r(b, h, p, n))


def test_segsum_hand_worked():
    out = np.asarray(segsum(jnp.asarray([1.0, 2.0, 4.0])))
    want = np.array([[0, -np.inf, -np.inf], [2, 0, -np.inf], [6, 4, 0]])
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("b,t,h,p,g,n", [(2, 37, 4, 8, 2, 16), (1, 64, 2, 4, 1, 8), (3, 9, 6, 2, 3, 4)])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_ssd_equals_the_recurrence(b, t, h, p, g, n, chunk):
    x, dt, a, bb, cc, s0 = _ssd_inputs(np.random.default_rng(t + chunk), b, t, h, p, g, n)
    recurrent, chunked = jax.jit(ssd_recurrent), jax.jit(ssd_chunked, static_argnames="chunk_size")  # not op by op
    for init in (None, s0):
        y1, f1 = recurrent(x, dt, a, bb, cc, init)
        y2, f2 = chunked(x, dt, a, bb, cc, init, chunk_size=chunk)
        scale = float(jnp.abs(y1).max())
        np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), atol=1e-5 * max(1.0, scale))
        np.testing.assert_allclose(np.asarray(f2), np.asarray(f1), atol=1e-5 * max(1.0, float(jnp.abs(f1).max())))


def test_the_recurrence_hand_worked():
    """One head, P = N = 1: h_t = exp(dt A) h_{t-1} + dt x B, y = C h."""
    x = jnp.asarray([1.0, 2.0]).reshape(1, 2, 1, 1)
    dt = jnp.asarray([0.5, 1.0]).reshape(1, 2, 1)
    a = jnp.asarray([-np.log(2.0)])
    b = jnp.ones((1, 2, 1, 1))
    c = jnp.asarray([3.0, 1.0]).reshape(1, 2, 1, 1)
    y, final = ssd_recurrent(x, dt, a, b, c)
    h1 = 0.5 * 1.0
    h2 = 2 ** -1.0 * h1 + 1.0 * 2.0
    np.testing.assert_allclose(np.asarray(y).ravel(), [3 * h1, h2], rtol=1e-6)
    np.testing.assert_allclose(float(final.ravel()[0]), h2, rtol=1e-6)


# ------------------------------------------------------------------ transformers parity
@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_tokens_match_transformers(name):
    config, params = load_mamba2_checkpoint(FIXTURES / name)
    e = np.load(FIXTURES / name / "expected.npz")
    prompt = jnp.asarray(e["prompt"])[None]
    logits, state = _STEP(params, prompt, config=config)
    np.testing.assert_allclose(np.asarray(logits[0]), e["logits"], atol=1e-4)
    # greedy: the chunked prefill, then recurrent steps (one compile), as transformers' generate
    tokens, lg = [], logits[:, -1:]
    for _ in range(len(e["greedy"])):
        nxt = jnp.argmax(lg[:, -1], axis=-1)[:, None]
        tokens.append(int(nxt[0, 0]))
        lg, state = _STEP(params, nxt, None, state, config=config)
    np.testing.assert_array_equal(tokens, e["greedy"])
    full, _ = _STEP(params, jnp.concatenate([prompt, jnp.asarray(e["greedy"])[None]], 1), config=config)
    np.testing.assert_allclose(np.asarray(full[0]), e["full_logits"], atol=1e-4)


def test_prefill_then_decode_equals_one_forward_with_a_dt_limit():
    """Any split of the sequence (chunked extend, then recurrent steps) gives the logits and the
    state of one forward; here with a finite time_step_limit, so the clamp runs in both forms."""
    import dataclasses

    base, p = load_mamba2_checkpoint(FIXTURES / NAMES[1])  # two groups, chunk 5, biases
    c = dataclasses.replace(base, time_step_limit=(0.0, 0.05))
    tok = jax.random.randint(jax.random.key(1), (2, 21), 0, c.vocab_size)
    full, st = _STEP(p, tok, config=c)
    lg, s = _STEP(p, tok[:, :7], config=c)
    outs = [lg]
    lg, s = _STEP(p, tok[:, 7:12], None, s, config=c, chunk_size=3)
    outs.append(lg)
    for t in range(12, 21):
        lg, s = _STEP(p, tok[:, t:t + 1], None, s, config=c)
        outs.append(lg)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-5)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(st)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert float(jnp.abs(_STEP(p, tok, config=base)[0] - full).max()) > 1e-2  # the limit bites


def test_left_padding_is_exact():
    config, params = load_mamba2_checkpoint(FIXTURES / NAMES[1])
    e = np.load(FIXTURES / NAMES[1] / "expected.npz")
    prompt = jnp.asarray(e["prompt"])
    t = prompt.shape[0]
    padded = jnp.concatenate([jnp.full((4,), 99), prompt])[None]
    pos = jnp.concatenate([jnp.full((4,), -1), jnp.arange(t)])[None]
    logits, _ = _STEP(params, padded, pos, config=config)
    np.testing.assert_allclose(np.asarray(logits[0, 4:]), e["logits"], atol=1e-4)


def test_right_padding_leaves_the_state_as_it_was():
    """Right padding (a batch of prompts of different lengths) and a padded step (a finished row
    in a decode loop): the real tokens' logits and the final state (conv and SSM) equal the
    unpadded run's; logits_at picks those rows of the head."""
    config, params = load_mamba2_checkpoint(FIXTURES / NAMES[1])
    e = np.load(FIXTURES / NAMES[1] / "expected.npz")
    prompt = jnp.asarray(e["prompt"])
    t = prompt.shape[0]
    ref_logits, ref_state = _STEP(params, prompt[None], config=config)
    tokens = jnp.concatenate([prompt, jnp.full((5,), 99)])[None]
    pos = jnp.concatenate([jnp.arange(t), jnp.full((5,), -1)])[None]
    logits, state = _STEP(params, tokens, pos, config=config)
    np.testing.assert_allclose(np.asarray(logits[0, :t]), np.asarray(ref_logits[0]), atol=1e-4)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    _, after = _STEP(params, jnp.full((1, 1), 5), jnp.full((1, 1), -1), state, config=config)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    last, _ = _STEP(params, tokens, pos, config=config, logits_at=jnp.array([t - 1]))
    np.testing.assert_allclose(np.asarray(last[0, 0]), np.asarray(ref_logits[0, -1]), atol=1e-4)


def test_the_gated_norm_both_ways():
    """norm_before_gate=False (transformers): norm(y * silu(z)) per group; True (mamba_ssm's
    option, which transformers ignores): norm(y) * silu(z)."""
    rng = np.random.default_rng(0)
    y, z = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 3, 8))
    w = rng.normal(size=8)
    silu = z / (1 + np.exp(-z))

    def norm(v):  # two groups of 4
        g = v.reshape(2, 3, 2, 4)
        return (g / np.sqrt((g ** 2).mean(-1, keepdims=True) + 1e-5)).reshape(2, 3, 8)

    for before, want in ((False, w * norm(y * silu)), (True, w * norm(y) * silu)):
        c = Mamba2Config(vocab_size=8, hidden_size=4, num_layers=1, num_heads=2, head_dim=4, n_groups=2,
                         norm_before_gate=before)
        got = mamba2._gated_norm(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32),
                                 jnp.asarray(w, jnp.float32), c)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_the_state_is_its_analytic_size_whatever_the_context():
    c = Mamba2Config(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, head_dim=16, state_size=8, n_groups=2)
    p = init_params(c, jax.random.key(0))
    run = jax.jit(lambda p, x: forward(p, x, config=c)[1])
    sizes = {run(p, jnp.zeros((2, t), jnp.int32)).nbytes for t in (5, 40)}
    assert sizes == {init_state(c, batch=2).nbytes}
    assert sizes.pop() == 3 * 2 * ((c.conv_kernel - 1) * c.conv_dim * 4 + 4 * 16 * 8 * 4)
    assert c.state_elements == 3 * 4 * 16 * 8


# ------------------------------------------------------------------ bad input
def test_config_errors_name_the_field():
    base = dict(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, head_dim=16)
    for kwargs, field in [({"head_dim": 8}, "head_dim"), ({"n_groups": 3}, "n_groups"),
                          ({"time_step_limit": (1.0, 0.5)}, "time_step_limit"), ({"state_size": 0}, "state_size")]:
        with pytest.raises(ConfigError, match=field):
            Mamba2Config(**{**base, **kwargs})
    hf = json.loads((FIXTURES / NAMES[0] / "config.json").read_text())
    assert Mamba2Config.from_hf(hf).time_step_limit == (0.0, float("inf"))  # transformers' {"__float__": ...}
    with pytest.raises(ConfigError, match="num_heads"):
        Mamba2Config.from_hf({k: v for k, v in hf.items() if k != "num_heads"})


def test_a_broken_checkpoint_is_refused_by_name(tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "m"
    shutil.copytree(FIXTURES / NAMES[0], bad)
    tensors = load_file(bad / "model.safetensors")
    short = dict(tensors)
    del short["backbone.layers.1.mixer.A_log"]
    save_file(short, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="A_log"):
        load_mamba2_checkpoint(bad)
    wrong = dict(tensors)
    wrong["backbone.layers.0.mixer.conv1d.weight"] = wrong["backbone.layers.0.mixer.conv1d.weight"][:, :, :3]
    save_file(wrong, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="conv1d.weight"):
        load_mamba2_checkpoint(bad)


def test_config_flags_and_a_tied_head_are_checked(tmp_path):
    """A flag written as a string is refused (the string "false" would read as true), and a
    config that ties the LM head refuses a stored head that differs from the embeddings, as
    the transformer loader does, instead of silently using the embeddings."""
    from jaxkv.checkpoints import save_checkpoint

    config = mamba2.Mamba2Config(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, head_dim=16, state_size=8)
    params = mamba2.init_params(config, jax.random.key(0))
    untied = save_checkpoint(tmp_path / "untied", config, params)
    for name, value, match in (("string", "false", "tie_word_embeddings must be true or false"),
                               ("tied", True, "stores a different lm_head.weight"),
                               ("bias", "no", "use_bias must be true or false"),
                               ("eos", 50, "outside the vocabulary")):
        folder = tmp_path / name
        shutil.copytree(untied, folder)
        hf = json.loads((folder / "config.json").read_text())
        hf[{"string": "tie_word_embeddings", "tied": "tie_word_embeddings", "bias": "use_bias",
            "eos": "eos_token_id"}[name]] = value
        (folder / "config.json").write_text(json.dumps(hf))
        with pytest.raises(CheckpointError, match=match):
            load_mamba2_checkpoint(folder)
    tied = dataclasses.replace(config, tie_word_embeddings=True)
    kept = {k: v for k, v in params.items() if k != "lm_head"}
    folder = save_checkpoint(tmp_path / "tied-ok", tied, kept)
    assert load_mamba2_checkpoint(folder)[0].tie_word_embeddings


@pytest.mark.parametrize("window", [1, 6])
def test_the_windowed_state_equals_a_fresh_scan_over_the_last_tokens(window):
    """Mitigation 3: the state difference gives, at every step, what a scan started afresh
    ``window`` tokens back gives."""
    x, dt, a, bb, cc, _ = _ssd_inputs(np.random.default_rng(window), 2, 18, 3, 4, 1, 8)
    y = np.asarray(jax.jit(ssd_windowed, static_argnames="window")(x, dt, a, bb, cc, window=window))
    recurrent = jax.jit(ssd_recurrent)  # one compile per slice length (``window`` of them), not per op
    for t in range(18):
        lo = max(0, t - window + 1)
        fresh, _ = recurrent(x[:, lo:t + 1], dt[:, lo:t + 1], a, bb[:, lo:t + 1], cc[:, lo:t + 1])
        np.testing.assert_allclose(y[:, t], np.asarray(fresh)[:, -1], atol=2e-5, err_msg=f"t={t}")


@pytest.mark.parametrize("window,keep", [(1, 1), (6, 1), (5, 3)])
def test_the_window_keeping_the_first_tokens_equals_a_scan_over_them_and_the_last(window, keep):
    """``keep_first``: once the window has left the first k inputs, each output is a fresh scan
    over those k followed by the last ``window``; before, the whole prefix's."""
    x, dt, a, bb, cc, _ = _ssd_inputs(np.random.default_rng(10 + window), 2, 18, 3, 4, 1, 8)
    y = np.asarray(jax.jit(ssd_windowed, static_argnames=("window", "keep_first"))(
        x, dt, a, bb, cc, window=window, keep_first=keep))
    recurrent = jax.jit(ssd_recurrent)
    for t in range(18):
        idx = np.arange(t + 1) if t - window < keep - 1 else np.r_[np.arange(keep), np.arange(t - window + 1, t + 1)]
        fresh, _ = recurrent(x[:, idx], dt[:, idx], a, bb[:, idx], cc[:, idx])
        np.testing.assert_allclose(y[:, t], np.asarray(fresh)[:, -1], atol=2e-5, err_msg=f"t={t}")
    with pytest.raises(ValueError, match="keep_first must be an int >= 0"):
        ssd_windowed(x, dt, a, bb, cc, window=window, keep_first=-1)


def test_the_norm_cap_bounds_every_state_and_per_step_decay_matches():
    x, dt, a, bb, cc, _ = _ssd_inputs(np.random.default_rng(5), 1, 25, 2, 4, 1, 8)
    recurrent = jax.jit(ssd_recurrent)  # one compile per shape, not one per eager operation
    _, free = recurrent(x, dt, a, bb, cc)
    cap = 0.5 * jnp.sqrt(jnp.sum(free * free, axis=(2, 3)))[0]  # [H], below the uncapped norms
    states = [recurrent(x[:, :t], dt[:, :t], a, bb[:, :t], cc[:, :t], norm_cap=cap)[1] for t in (5, 15, 25)]
    for s in states:
        assert (np.sqrt((np.asarray(s) ** 2).sum(axis=(2, 3)))[0] <= np.asarray(cap) * (1 + 1e-5)).all()
    # A per step [b, T, H]: the chunked and recurrent forms still agree
    a_t = a[None, None] + 0.1 * jnp.asarray(np.random.default_rng(6).normal(size=dt.shape), jnp.float32)
    y1, f1 = recurrent(x, dt, a_t, bb, cc)
    y2, f2 = jax.jit(ssd_chunked, static_argnames="chunk_size")(x, dt, a_t, bb, cc, chunk_size=7)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), atol=1e-4)


def test_mitigations_in_the_model():
    """Through ``forward``: λ = γ = 1 changes nothing; λ < 1 equals a hand-scaled A in the SSD;
    a window as long as the row equals no window; a shorter one changes the late outputs only;
    caps at the calibrated norms leave the calibration prompt unchanged, tighter caps do not."""
    from jaxkv.models.mamba2 import StateMitigation, calibrate_norm_cap
    from jaxkv.errors import UserError

    config, params = load_mamba2_checkpoint(FIXTURES / NAMES[0])
    tok = jax.random.randint(jax.random.key(3), (1, 24), 3, config.vocab_size)
    base, _ = forward(params, tok, config=config)
    same, _ = forward(params, tok, config=config, mitigation=StateMitigation())
    np.testing.assert_allclose(np.asarray(same), np.asarray(base), atol=1e-6)
    lam, _ = forward(params, tok, config=config, mitigation=StateMitigation(decay_scale=0.9, input_scale=0.75))
    assert float(jnp.abs(lam - base).max()) > 1e-3
    whole, _ = forward(params, tok, config=config, mitigation=StateMitigation(window=24))
    np.testing.assert_allclose(np.asarray(whole), np.asarray(base), atol=1e-4)
    short, after = forward(params, tok, config=config, mitigation=StateMitigation(window=6))
    np.testing.assert_allclose(np.asarray(short[:, :6]), np.asarray(base[:, :6]), atol=1e-4)
    # the state after the row is the whole row's (not the zero state it started from): in the
    # first layer, whose input the window does not change, and in every layer of a whole-row window
    _, full_state = forward(params, tok, None, mamba2.init_state(config, batch=1), config=config)
    _, whole_state = forward(params, tok, config=config, mitigation=StateMitigation(window=24))
    for got, want in [(after.layers[0], full_state.layers[0]), *zip(whole_state.layers, full_state.layers)]:
        np.testing.assert_allclose(np.asarray(got.ssm), np.asarray(want.ssm), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.conv), np.asarray(want.conv), rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(short[:, 12:] - base[:, 12:]).max()) > 1e-3
    # keeping the first token: the same as the plain window until it leaves, different after
    sink, _ = forward(params, tok, config=config, mitigation=StateMitigation(window=6, keep_first=1))
    np.testing.assert_allclose(np.asarray(sink[:, :7]), np.asarray(base[:, :7]), atol=1e-4)
    assert float(jnp.abs(sink[:, 12:] - short[:, 12:]).max()) > 1e-4
    for bad, match in (({"keep_first": 1}, "give window too"), ({"window": 4, "keep_first": -1}, "keep_first must")):
        with pytest.raises(UserError, match=match):
            StateMitigation(**bad)
    caps = calibrate_norm_cap(params, tok, config=config)
    assert caps.shape == (config.num_layers, config.num_heads)
    # the running norm can exceed the final one mid-row, so cap at the row's largest: nothing changes
    loose, _ = forward(params, tok, config=config, mitigation=StateMitigation(norm_cap=caps * 1e3))
    np.testing.assert_allclose(np.asarray(loose), np.asarray(base), atol=1e-4)
    tight, _ = forward(params, tok, config=config, mitigation=StateMitigation(norm_cap=caps * 0.1))
    assert float(jnp.abs(tight - base).max()) > 1e-3
    with pytest.raises(UserError, match="decay_scale"):
        StateMitigation(decay_scale=1.5)
    with pytest.raises(UserError, match="norm_cap"):
        forward(params, tok, config=config, mitigation=StateMitigation(norm_cap=caps[:1]))
    with pytest.raises(UserError, match="positive finite caps"):
        StateMitigation(norm_cap=-caps)
    with pytest.raises(UserError, match="window and norm_cap"):
        StateMitigation(window=6, norm_cap=caps)


def test_save_and_load_round_trip(tmp_path):
    """save_checkpoint writes the HF names and layouts back: the tensors equal the fixture's
    file byte for byte, and the reloaded model gives the same logits."""
    from safetensors.numpy import load_file

    from jaxkv.checkpoints import save_checkpoint

    config, params = load_mamba2_checkpoint(FIXTURES / NAMES[1])
    out = save_checkpoint(tmp_path / "m", config, params)
    again, params2 = load_mamba2_checkpoint(out)
    assert again == config
    want, got = load_file(FIXTURES / NAMES[1] / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(got) == set(want) - {"lm_head.weight"}  # tied: the head is the embedding
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    e = np.load(FIXTURES / NAMES[1] / "expected.npz")
    logits, _ = _STEP(params2, jnp.asarray(e["prompt"])[None], config=again)
    np.testing.assert_allclose(np.asarray(logits[0]), e["logits"], atol=1e-4)


# ------------------------------------------------------------------ length training
TINY_MAMBA = Mamba2Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, head_dim=16, state_size=8,
                          n_groups=1, chunk_size=16)


def _batch(rows, t):
    from jaxkv.training.config import DataConfig
    from jaxkv.training.data import pack_documents, synthetic_documents

    docs = synthetic_documents("count", vocab_size=TINY_MAMBA.vocab_size, seed=0, num_docs=40)
    packed = pack_documents(docs, DataConfig(seq_len=t))
    return {k: jnp.asarray(getattr(packed, k)[:rows]) for k in ("tokens", "positions", "segment_ids")}


def test_state_passing_keeps_the_loss_and_truncates_the_gradient():
    """Segments with the state passed give the whole row's loss (the forward is exact across
    segments); the gradient differs from full backpropagation (cut at each boundary), and with
    one segment it is the full one."""
    from jaxkv.training.mamba import mamba_loss

    params = init_params(TINY_MAMBA, jax.random.key(0))
    batch = _batch(3, 48)

    @jax.jit  # one compile for the whole check instead of one per eager op
    def run(params, batch):
        def loss(p, L):
            return mamba_loss(p, batch, config=TINY_MAMBA, segment_len=L, compute_dtype=jnp.float32)

        (whole, n1), g_whole = jax.value_and_grad(lambda p: loss(p, 48), has_aux=True)(params)
        (split, n2), g_split = jax.value_and_grad(lambda p: loss(p, 16), has_aux=True)(params)
        logits, _ = forward(params, batch["tokens"], batch["positions"], config=TINY_MAMBA)
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
        ok = (batch["positions"][:, 1:] >= 0) & (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1])
        ref = jnp.sum(jnp.where(ok, nll, 0))
        diff = jnp.max(jnp.stack([jnp.abs(a - b).max() for a, b in zip(jax.tree.leaves(g_split),
                                                                        jax.tree.leaves(g_whole))]))
        return whole, n1, split, n2, ref, diff

    whole, n1, split, n2, ref, diff = run(params, batch)
    assert float(n1) == float(n2) > 0
    np.testing.assert_allclose(float(split), float(whole), rtol=1e-5)
    np.testing.assert_allclose(float(whole), float(ref), rtol=1e-5)
    assert float(diff) > 1e-6


def test_train_mamba_learns_and_resumes(tmp_path):
    import dataclasses

    from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig
    from jaxkv.training.data import synthetic_documents
    from jaxkv.training.mamba import train_mamba

    model = dataclasses.replace(TINY_MAMBA, num_layers=1)  # one layer: a cheaper train step to compile
    docs = synthetic_documents("count", vocab_size=model.vocab_size, seed=0, num_docs=200)
    cfg = lambda steps: dict(optim=OptimConfig(lr=1e-2, warmup_steps=3, total_steps=20, weight_decay=0.0),  # noqa: E731
                             data=DataConfig(seq_len=64),
                             train=TrainConfig(batch_size=8, steps=steps, save_every=10, compute_dtype="float32"))
    full = train_mamba(model, docs, segment_len=32, out=tmp_path / "a", **cfg(20))
    losses = [h["loss"] for h in full.history]
    assert losses[-1] < 0.7 * losses[0]
    train_mamba(model, docs, segment_len=32, out=tmp_path / "b", **cfg(10))
    resumed = train_mamba(model, docs, segment_len=32, out=tmp_path / "b", **cfg(20))
    np.testing.assert_allclose([h["loss"] for h in resumed.history], losses[10:], rtol=1e-5)
    config, params = load_mamba2_checkpoint(tmp_path / "a" / "hf")
    assert config == model


def test_train_mamba_command(tmp_path, capsys):
    from jaxkv.cli import main

    out = tmp_path / "run"
    argv = ["train", "mamba", "--data", "synthetic:count", "--seq-len", "64", "--segment-len", "32", "--steps", "1",
            "--warmup", "1", "--hidden-size", "32", "--head-dim", "16", "--state-size", "8", "--dtype", "float32",
            "--batch-size", "2", "--layers", "1", "--out", str(out)]
    assert main(argv) == 0
    assert "state elements" in capsys.readouterr().out
    config, _ = load_mamba2_checkpoint(out / "hf")
    assert (config.hidden_size, config.num_heads, config.state_size) == (32, 4, 8)
    assert main(argv[:5] + ["60"] + argv[6:]) == 2  # a row that is not whole segments
    assert "multiple of --segment-len" in capsys.readouterr().err
    assert main(argv[:-1] + [str(tmp_path / "odd"), "--hidden-size", "36"]) == 2  # 72 channels: no whole heads
    assert "--head-dim (16) must divide 2 x --hidden-size (72)" in capsys.readouterr().err


def test_analyze_mamba_states(tmp_path):
    """The chunked stream's losses equal one forward's; the report holds every run at 1x/4x
    T_train (16x past the stream: None), one norm per chunk, layer and head, and the decays."""
    from jaxkv.cli import main
    from jaxkv.errors import UserError
    from jaxkv.eval.mamba_states import analyze_mamba_states, stream_nll
    from jaxkv.models.mamba2 import StateMitigation

    config, params = load_mamba2_checkpoint(FIXTURES / NAMES[0])
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (100,), 3, config.vocab_size))
    nll = stream_nll(params, config, tokens, chunk=32)

    @jax.jit  # one compile, not one per eager op
    def one_forward_nll(params, ids):
        logits, _ = forward(params, ids[None], config=config)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits[0, :-1], -1), ids[1:, None], -1)[:, 0]

    want = np.asarray(one_forward_nll(params, jnp.asarray(tokens)))
    np.testing.assert_allclose(nll, want, atol=1e-4)
    report = analyze_mamba_states(params, config, tokens, tmp_path, train_len=20, chunk=32,
                                  mitigations={"window": StateMitigation(window=20)})
    assert set(report["loss_at"]) == {"none", "window"}
    assert report["loss_at"]["none"]["4x"] == pytest.approx(float(nll[60:80].mean()), rel=1e-5)
    assert report["loss_at"]["none"]["16x"] is None
    for k in (1, 4):  # each "kx" is the bin of T_train positions ending there
        assert report["loss_at"]["none"][f"{k}x"] == pytest.approx(report["loss_by_bin"]["none"][k - 1], rel=1e-6)
    for bad in ({"train_len": 0}, {"train_len": -3}, {"chunk": 0}):
        with pytest.raises(UserError, match=next(iter(bad))):
            analyze_mamba_states(params, config, tokens, tmp_path / "bad", **{"train_len": 20, "chunk": 32, **bad})
    with pytest.raises(UserError, match="with_states"):
        stream_nll(params, config, tokens, chunk=32, mitigation=StateMitigation(window=4), with_states=True)
    assert np.array(report["state_norms"]["norms"]).shape == (4, config.num_layers, config.num_heads)
    decay = np.array(report["cumulative_decay"])
    assert decay.shape == (config.num_layers, config.num_heads) and ((0 <= decay) & (decay <= 1)).all()
    assert (tmp_path / "mamba_states.png").stat().st_size > 0
    assert main(["analyze", "mamba-states", "--model", str(FIXTURES / NAMES[0]), "--out", str(tmp_path / "x")]) == 2
    # streams side by side: each row's losses are its own, alone; the report averages them per position
    other = np.asarray(jax.random.randint(jax.random.key(1), (100,), 3, config.vocab_size))
    both = stream_nll(params, config, np.stack([tokens, other]), chunk=32)
    np.testing.assert_allclose(both[0], nll, atol=1e-4)
    np.testing.assert_allclose(both[1], stream_nll(params, config, other, chunk=32), atol=1e-4)
    two = analyze_mamba_states(params, config, np.stack([tokens, other]), tmp_path / "two", train_len=20, chunk=32)
    assert two["stream"]["streams"] == 2
    assert two["loss_at"]["none"]["4x"] == pytest.approx(float(both[:, 60:80].mean()), rel=1e-5)
    cli = ["analyze", "mamba-states", "--model", str(FIXTURES / NAMES[0]), "--train-len", "20", "--length", "64",
           "--data", "synthetic:count", "--chunk", "32"]
    assert main(cli + ["--streams", "2", "--out", str(tmp_path / "y")]) == 0
    assert json.loads((tmp_path / "y" / "mamba_states.json").read_text())["stream"]["streams"] == 2
    assert main(cli + ["--streams", "5000", "--out", str(tmp_path / "z")]) == 2  # 80k synthetic tokens: too few


def test_the_length_training_loss_counts_only_the_targets_a_loss_mask_marks():
    """``(tokens, loss_mask)`` documents: the loss is the NLL of the marked targets alone, as the
    language-model loss counts them."""
    from jaxkv.training.mamba import mamba_loss

    params = init_params(TINY_MAMBA, jax.random.key(0))
    batch = _batch(2, 32)
    mask = np.zeros((2, 32), bool)
    mask[:, 20:] = True  # the last twelve tokens of each row are targets
    masked = {**batch, "loss_mask": jnp.asarray(mask)}
    run = jax.jit(lambda b: mamba_loss(params, b, config=TINY_MAMBA, segment_len=16, compute_dtype=jnp.float32))
    total, n = run(masked)
    logits, _ = forward(params, batch["tokens"], batch["positions"], config=TINY_MAMBA)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1), batch["tokens"][:, 1:, None], -1)[..., 0]
    ok = (batch["positions"][:, 1:] >= 0) & (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]) \
        & mask[:, 1:]
    assert float(n) == float(np.sum(ok)) < float(run(batch)[1])
    np.testing.assert_allclose(float(total), float(jnp.sum(jnp.where(ok, nll, 0))), rtol=1e-5)


def test_train_and_analyze_on_recall_documents(tmp_path, capsys):
    """`train mamba` and `analyze mamba-states` read synthetic:recall-anywhere (a vocabulary of 64:
    the source's ids 1-58 fit), the analysis one document of --length per stream; the losses it
    reports are those of the documents read directly."""
    from jaxkv.cli import main
    from jaxkv.eval.mamba_states import stream_nll
    from jaxkv.training.data import recall_documents

    out = tmp_path / "run"
    assert main(["train", "mamba", "--data", "synthetic:recall-anywhere:16", "--vocab-size", "64", "--seq-len", "32",
                 "--steps", "2", "--warmup", "1", "--hidden-size", "32", "--head-dim", "16", "--state-size", "8",
                 "--dtype", "float32", "--batch-size", "4", "--layers", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["analyze", "mamba-states", "--model", str(out / "hf"), "--data", "synthetic:recall-anywhere:3",
                 "--streams", "3", "--length", "64", "--train-len", "16", "--chunk", "16", "--seed", "5",
                 "--out", str(tmp_path / "states")]) == 0
    report = json.loads((tmp_path / "states" / "mamba_states.json").read_text())
    assert report["stream"]["streams"] == 3 and report["stream"]["tokens"] == 64
    config, params = load_mamba2_checkpoint(out / "hf")
    docs = np.stack(recall_documents(vocab_size=64, length=64, count=3, seed=5, anywhere=True))
    nll = stream_nll(params, config, docs, chunk=16).mean(0)
    np.testing.assert_allclose(report["loss_by_bin"]["none"], [nll[i * 16:(i + 1) * 16].mean() for i in range(3)],
                               rtol=1e-5)
    assert main(["train", "mamba", "--data", "synthetic:recall:4", "--vocab-size", "32", "--seq-len", "32",
                 "--steps", "1", "--out", str(tmp_path / "small")]) == 2
    assert "vocabulary of at least 59" in capsys.readouterr().err and not (tmp_path / "small").exists()
