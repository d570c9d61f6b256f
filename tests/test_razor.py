"""RazorAttention: the calibration's masks and head selection by hand, one layer's cache against
a numpy reference (sinks + window + the compensation token), calibration files."""

import json

import jax

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache import LayerSpec, Phase, init_cache, make_policy
from jaxkv.cache.razor import RazorCache, RazorLayer, head_scores, score_masks, select_heads
from jaxkv.calibration import CalibrationError
from jaxkv.cli import main
from jaxkv.config import preset
from jaxkv.errors import UserError


def test_score_masks_hand_worked():
    # BOS then ids a b c a b c (n = 3): sequence index 0 is BOS, a at 1 and 4
    echo, induction, rows = score_masks(7, 3, 1)
    assert rows.tolist() == [False, False, False, False, True, True, True]
    assert np.flatnonzero(echo[4]).tolist() == [1]       # the second a sees the first a
    assert np.flatnonzero(induction[4]).tolist() == [2]  # ... and the b after it
    assert np.flatnonzero(echo[6]).tolist() == [3] and np.flatnonzero(induction[6]).tolist() == [4]
    assert not echo[:4].any() and not induction[:4].any()


def test_select_heads_hand_worked():
    induction = np.array([[0.1, 0.9], [0.5, 0.2], [0.0, 0.3]])
    echo = np.array([[0.0, 0.0], [0.0, 0.0], [0.8, 0.0]])
    # 6 heads: top 34% by induction -> ceil(2.04) = 3 heads (0.9, 0.5, 0.3); top 1% by echo -> 1 head
    heads = select_heads(echo, induction, induction_share=0.34, echo_share=0.01)
    assert heads == ((1,), (0,), (0, 1))
    assert select_heads(echo, induction, induction_share=0.0, echo_share=0.0) == ((), (), ())


def _softmax_attend(q, keys, values, bias=None):
    s = keys @ q / np.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    p = np.exp(s - s.max())
    p /= p.sum()
    return p @ values


@pytest.mark.parametrize("compensation", ["weighted", "mean", "none"])
def test_one_layer_against_a_numpy_reference(compensation):
    """Prefill 10 tokens, then decode 2: KV head 0 is a retrieval head (sees all), head 1 keeps
    sink 0, the last 3 tokens and the compensation token (dropped ones, with log n added when
    weighted). The second decode step evicts position 8 from the window into the token."""
    config = preset("tiny").replace(num_heads=4, num_kv_heads=2)
    layer = LayerSpec(0, config)
    policy = RazorLayer(retrieval=(0,), sinks=1, window=3, compensation=compensation)
    rng = np.random.default_rng(0)
    h, g, t = config.head_dim, config.group_size, 12
    k = rng.normal(size=(1, t, 2, h)).astype(np.float32)
    v = rng.normal(size=(1, t, 2, h)).astype(np.float32)
    q = rng.normal(size=(1, t, 2, g, h)).astype(np.float32)
    state = policy.init(batch=1, max_len=16, dtype=jnp.float32, layer=layer)
    pos = jnp.arange(10)[None]
    state = policy.prefill(state, q=q[:, :10], k=k[:, :10], v=v[:, :10], positions=pos, layer=layer)
    assert int(state.comp_n[0, 0]) == 6 and int(state.comp_pos[0, 0]) == 6  # positions 1..6 dropped
    for step in (10, 11):
        out, state = policy.append(state, q=q[:, step:step + 1], k=k[:, step:step + 1], v=v[:, step:step + 1],
                                   positions=jnp.array([[step]]), phase=Phase.DECODE, layer=layer)
        kept = [0] + list(range(step - 2, step + 1))
        dropped = [p for p in range(1, step + 1) if p not in kept]
        for gi in range(g):
            want0 = _softmax_attend(q[0, step, 0, gi], k[0, :step + 1, 0], v[0, :step + 1, 0])
            np.testing.assert_allclose(np.asarray(out[0, 0, 0, gi]), want0, atol=1e-5)
            keys, values, bias = k[0, kept, 1], v[0, kept, 1], np.zeros(len(kept))
            if compensation != "none":
                keys = np.vstack([keys, k[0, dropped, 1].mean(0)])
                values = np.vstack([values, v[0, dropped, 1].mean(0)])
                bias = np.append(bias, np.log(len(dropped)) if compensation == "weighted" else 0.0)
            want1 = _softmax_attend(q[0, step, 1, gi], keys, values, bias)
            np.testing.assert_allclose(np.asarray(out[0, 0, 1, gi]), want1, atol=1e-5, err_msg=f"step {step}")
    assert int(state.comp_n[0, 0]) == (8 if compensation != "none" else 6)


def test_bytes_shrink_with_the_head_split(tiny_model):
    config, params = tiny_model
    full = init_cache(config, "full", batch=1, max_len=1000, dtype=jnp.bfloat16)
    razor = RazorCache(heads=((0,), ()), window=60)
    cache = init_cache(config, razor, batch=1, max_len=1000, dtype=jnp.bfloat16)
    # layer 0: one head of two whole, one of 64 slots; layer 1: both heads 64 slots (+ compensation)
    per_slot = 2 * config.head_dim * 2 + 4
    comp = 2 * config.head_dim * 4 + 8
    assert cache.nbytes == per_slot * (1000 + 64 + 2 * 64) + 3 * comp
    assert cache.nbytes < 0.6 * full.nbytes


def test_bad_parameters_name_themselves(tiny_model):
    config, params = tiny_model
    with pytest.raises(UserError, match="compensation"):
        RazorCache(compensation="sum")
    with pytest.raises(UserError, match="window"):
        RazorCache(window=0)
    with pytest.raises(UserError, match="induction_share"):
        RazorCache(induction_share=1.5)
    with pytest.raises(UserError, match="each of 2 layers"):
        RazorCache(heads=((0,),)).prepare(params, config)
    with pytest.raises(UserError, match="needs its retrieval heads"):
        init_cache(config, RazorCache(), batch=1, max_len=8, dtype=jnp.float32)


def test_calibration_file_round_trip_and_refusals(tmp_path, capsys):
    from jaxkv.checkpoints import load_checkpoint
    from jaxkv.tiny import create_tiny_checkpoint

    a = create_tiny_checkpoint(tmp_path / "a", seed=1)
    b = create_tiny_checkpoint(tmp_path / "b", seed=2)
    out = tmp_path / "razor.safetensors"
    assert main(["calibrate", "razor", "--model", str(a), "--out", str(out), "--n-tokens", "64"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    config, params = load_checkpoint(a)
    echo, induction = head_scores(params, config, n_tokens=64)
    got = make_policy("razor", calibration=str(out)).prepare(params, config)
    assert got.heads == select_heads(echo, induction, induction_share=0.14, echo_share=0.01)
    _, other = load_checkpoint(b)
    with pytest.raises(CalibrationError, match="another model"):
        make_policy("razor", calibration=str(out)).prepare(other, config)
    # the CLI takes it through --cache-arg, and refuses it for the other model in one line
    assert main(["generate", "--model", str(a), "--prompt", "hi", "--max-new-tokens", "2", "--cache", "razor",
                 "--cache-arg", f"calibration={out}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cache"] == "razor"
    assert main(["generate", "--model", str(b), "--prompt", "hi", "--cache", "razor",
                 "--cache-arg", f"calibration={out}"]) == 2
    assert "calibrated on another model" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CalibrationError, match="not a readable calibration file"):
        make_policy("razor", calibration=str(tmp_path / "junk.safetensors")).prepare(params, config)


def test_calibration_files_name_what_is_wrong_and_never_replace_an_input(tmp_path, capsys):
    """A model with the same config and embeddings but other layer weights has another
    fingerprint; a file from a newer format, from the embeddings-only fingerprint, missing a
    tensor or holding NaN is refused by name; ``--out`` naming a file of the model folder or
    the ``--text`` file is refused and the file kept."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from jaxkv.calibration import META_KEY, model_fingerprint
    from jaxkv.checkpoints import load_checkpoint
    from jaxkv.tiny import create_tiny_checkpoint

    a = create_tiny_checkpoint(tmp_path / "a", seed=1)
    config, params = load_checkpoint(a)
    leaves, tree = jax.tree.flatten(params)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    last = max(i for i, n in enumerate(names) if "layers" in n and "embed" not in n)  # one layer tensor
    edited = jax.tree.unflatten(tree, [x * 1.01 if i == last else x for i, x in enumerate(leaves)])
    assert model_fingerprint(config, edited) != model_fingerprint(config, params)
    out = tmp_path / "razor.safetensors"
    assert main(["calibrate", "razor", "--model", str(a), "--out", str(out), "--n-tokens", "64"]) == 0
    with pytest.raises(CalibrationError, match="another model"):
        make_policy("razor", calibration=str(out)).prepare(edited, config)
    with safe_open(str(out), framework="numpy") as f:
        meta, tensors = json.loads(f.metadata()[META_KEY]), {k: f.get_tensor(k) for k in f.keys()}

    def variant(name, meta_update=None, drop=None, nan=None):
        m, t = {**meta, **(meta_update or {})}, dict(tensors)
        if drop:
            t.pop(drop)
        if nan:
            t[nan] = np.full_like(t[nan], np.nan)
        save_file(t, str(tmp_path / name), metadata={META_KEY: json.dumps(m)})
        return make_policy("razor", calibration=str(tmp_path / name))

    for policy, match in [(variant("new.safetensors", {"format": 99}), "format 99, made by a newer jaxkv"),
                          (variant("old.safetensors", {"format": 1}), "covered the embeddings only"),
                          (variant("noecho.safetensors", drop="echo"), "lacks the tensor 'echo'"),
                          (variant("nan.safetensors", nan="induction"), "'induction' holds NaN")]:
        with pytest.raises(CalibrationError, match=match):
            policy.prepare(params, config)
    weights = sorted(a.glob("*.safetensors"))[0]
    before = weights.read_bytes()
    assert main(["calibrate", "razor", "--model", str(a), "--out", str(weights), "--n-tokens", "16"]) == 2
    assert "a file of the --model input" in capsys.readouterr().err and weights.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("some text " * 50)
    assert main(["calibrate", "cskv", "--model", str(a), "--text", str(notes), "--out", str(notes)]) == 2
    assert "the --text input" in capsys.readouterr().err and notes.read_text() == "some text " * 50
