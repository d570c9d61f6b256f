"""AlignIT's pipeline (jaxkv.alignit.train, .evaluate): parameters on disk, the scene batches,
training on the spine with exact resume, the classifier's targets, what each customization
method trains, and the scoring of a generated image against its prompt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.alignit import evaluate as ev
from jaxkv.alignit import scenes as sc
from jaxkv.alignit import testbed as tb
from jaxkv.alignit import train as tr
from jaxkv.errors import UserError

TINY = tb.TestbedConfig(px=8, patch=4, width=16, layers=1, heads=2, text_width=16, text_layers=1, text_heads=2,
                        max_words=20)


def test_parameters_round_trip_and_a_foreign_file_is_refused(tmp_path):
    p = tb.init_testbed(TINY, len(tb.Vocab()), jax.random.key(0))
    tr.save_params(tmp_path / "p.npz", p, {"note": 1})
    q = tr.load_params(tmp_path / "p.npz", p)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)))
    other = tb.init_testbed(dataclasses_replace(TINY, width=32), len(tb.Vocab()), jax.random.key(0))
    with pytest.raises(UserError, match="not this model's file"):
        tr.load_params(tmp_path / "p.npz", other)
    raw = (tmp_path / "p.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:len(raw) // 2])  # an interrupted copy
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    for name in ("cut.npz", "junk.npz"):
        with pytest.raises(UserError, match="not a complete .npz file"):
            tr.load_params(tmp_path / name, p)
    leaves = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(p)[0]}
    first = next(iter(leaves))
    for bad, match in ((np.full_like(leaves[first], np.nan), "non-finite"),
                       (leaves[first].astype(np.int64), "stored as int64")):
        np.savez(tmp_path / "bad.npz", **{**leaves, first: bad})
        with pytest.raises(UserError, match=match):
            tr.load_params(tmp_path / "bad.npz", p)


def test_eval_refuses_a_damaged_run_folder(tmp_path, capsys):
    from jaxkv.cli import main

    (tmp_path / "testbed.json").write_text('{"testbed": {"px"')
    assert main(["alignit", "eval", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "testbed.json is damaged" in capsys.readouterr().err
    (tmp_path / "testbed.json").write_text('{"testbed": {"px": 8, "nonsense": 1}}')
    assert main(["alignit", "eval", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "testbed.json is damaged" in capsys.readouterr().err


def dataclasses_replace(c, **kw):
    import dataclasses

    return dataclasses.replace(c, **kw)


def test_scene_batches_are_a_function_of_the_step():
    b = tr.SceneBatches(pool=50, px=8, batch_size=4, grad_accum=2, seed=0, max_words=20)
    x, y = b.get(3), b.get(3)
    assert all(np.array_equal(x[k], y[k]) for k in x)
    assert x["images"].shape == (2, 2, 8, 8, 3) and x["tokens"].shape == (2, 2, 20) and x["t"].shape == (2, 2, 1)
    assert -1 <= x["images"].min() and x["images"].max() <= 1 and 0 < x["t"].min() and x["t"].max() < 1
    assert not np.array_equal(b.get(4)["noise"], x["noise"])


def test_training_on_the_spine_resumes_exactly(tmp_path):
    from jaxkv.training.config import OptimConfig, TrainConfig

    optim = OptimConfig(lr=1e-3, warmup_steps=1, total_steps=6, weight_decay=0.0)
    cfg = lambda steps: TrainConfig(batch_size=4, steps=steps, save_every=3, compute_dtype="float32")  # noqa: E731
    full = tr.train_testbed(TINY, out=tmp_path / "a", optim=optim, train=cfg(6), pool=40)
    tr.train_testbed(TINY, out=tmp_path / "b", optim=optim, train=cfg(3), pool=40)
    resumed = tr.train_testbed(TINY, out=tmp_path / "b", optim=optim, train=cfg(6), pool=40)
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in full.history][3:], rtol=1e-5)
    assert (tmp_path / "a" / "testbed.npz").exists() and (tmp_path / "a" / "metrics.png").exists()


def test_the_classifier_targets_and_its_reading_of_a_scene():
    s = sc.Scene((sc.SceneObject("star", "red", "large", "on the left"),
                  sc.SceneObject("ring", "white", "small", "on the right")), "teal")
    t = tr._targets([s])
    left, right = tr.POSITION_NAMES.index("on the left"), tr.POSITION_NAMES.index("on the right")
    assert t["shape"][0, left] == 1 + tr.ALL_SHAPES.index("star") and t["shape"][0, right] == 1 + tr.ALL_SHAPES.index("ring")
    assert (np.delete(t["shape"][0], [left, right]) == 0).all() and t["background"][0] == list(sc.BACKGROUNDS).index("teal")
    lg = tr.classify_logits(tr.init_classifier(16, jax.random.key(0)), jnp.zeros((2, 16, 16, 3)))
    assert lg["shape"].shape == (2, 5, 8) and lg["colour"].shape == (2, 5, 7) and lg["background"].shape == (2, 4)


def test_each_method_trains_what_it_should():
    base = tb.init_testbed(TINY, len(tb.Vocab()), jax.random.key(0))
    # a trained model's output head and gates are not zero (at init they are: no gradient would
    # reach the embedding)
    base["gen"]["patch_out"] = jax.random.normal(jax.random.key(1), base["gen"]["patch_out"].shape) * 0.1
    for blk in base["gen"]["blocks"]:
        blk["mod"] = jax.random.normal(jax.random.key(2), blk["mod"].shape) * 0.1
    token = tb.Vocab().ids["<c0>"]
    changed = {}
    for method in ev.METHODS:
        p = ev.customize(base, method, TINY, n_images=2, steps=2, batch_size=2)
        diff = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), base, p)
        changed[method] = diff
        rows = np.flatnonzero(np.any(np.asarray(p["text"]["embed"]) != np.asarray(base["text"]["embed"]), -1))
        assert rows.tolist() == ([token] if method != "dreambooth" else rows.tolist()) and token in rows
    ti, cd, db = (changed[m] for m in ev.METHODS)
    assert not any(jax.tree.leaves(ti["gen"])) and not any(jax.tree.leaves(cd["text"]["blocks"]))
    assert all(b["wk_x"] and b["wv_x"] and not b["wqkv"] for b in cd["gen"]["blocks"])
    assert all(jax.tree.leaves(db))  # every parameter moved
    with pytest.raises(UserError, match="unknown customization method"):
        ev.customize(base, "lora", TINY)


def test_scoring_on_hand_worked_readings():
    want = sc.Scene((sc.SceneObject("star", "red", "large", "on the left"),
                     sc.SceneObject("ring", "white", "small", "on the right")), "teal")
    assert ev.score(want, want) == (1.0, 1.0)
    wrong_bg = sc.Scene(want.objects, "gray")
    assert ev.score(wrong_bg, want) == (1.0, 4 / 5)
    circle = sc.Scene((sc.SceneObject("circle", "red", "large", "on the left"), want.objects[1]), "teal")
    assert ev.score(circle, want) == (0.0, 1.0)  # colour and size still read at the concept's place
    nothing = {"objects": (), "background": "teal"}
    assert ev.score(nothing, want) == (0.0, 1 / 5)
    prompts = ev.context_prompts(10, seed=0)
    assert all(p.objects[0].shape == "star" for p in prompts) and sum(len(p.objects) == 2 for p in prompts) == 5


def test_prompt_kv_in_each_alignit_mode():
    """None: the customized model's own K/V; 'in_context': the customized model's K/V of the prompt
    at the concept's positions, the baseline's elsewhere; 'concept_only': at the concept's
    positions the customized model's K/V of 'a <c0>' (index 1). A customized embedding (textual
    inversion) moves the tokens after the concept and not before."""
    vocab = tb.Vocab()
    base = tb.init_testbed(TINY, len(vocab), jax.random.key(0))
    custom = jax.tree.map(lambda x: x, base)
    token = vocab.ids["<c0>"]
    custom["text"]["embed"] = custom["text"]["embed"].at[token].set(jax.random.normal(jax.random.key(3), (16,)))
    custom["gen"]["blocks"][0]["wk_x"] = custom["gen"]["blocks"][0]["wk_x"] * 1.5  # as custom diffusion tunes
    tokens = jnp.asarray(vocab.encode_batch(["a small red <c0> on the left on a teal background",
                                             "a large blue circle at the top and a small white <c0> at the bottom "
                                             "on a black background"], length=TINY.max_words))
    ids = np.asarray(tokens)
    at = ids == token

    def own(params, toks):
        states = tb.encode_text(params, toks, TINY)
        prov = tb.generator_kv(params)
        return {layer: prov.project(layer, states) for layer in prov.layers()}

    kb, kc = own(base, tokens), own(custom, tokens)
    alone = own(custom, jnp.asarray(vocab.encode_batch(["a <c0>"] * 2, length=4)))
    got = {m: ev.prompt_kv(base, custom, tokens, TINY, alignit=m) for m in (None,) + ev.ALIGNIT_MODES}
    for layer in kb:
        for i in range(2):  # k and v
            np.testing.assert_array_equal(np.asarray(got[None][layer][i]), np.asarray(kc[layer][i]))
            for mode, src in (("in_context", np.asarray(kc[layer][i])),
                              ("concept_only", np.broadcast_to(np.asarray(alone[layer][i])[:, 1:2],
                                                               kc[layer][i].shape))):
                g = np.asarray(got[mode][layer][i])
                np.testing.assert_array_equal(g[~at], np.asarray(kb[layer][i])[~at])
                np.testing.assert_allclose(g[at], src[at], rtol=1e-6)
    # the customized states move after the concept only (causal encoder)
    sb, sc_ = tb.encode_text(base, tokens, TINY), tb.encode_text(custom, tokens, TINY)
    first = int(np.argmax(at[0]))
    assert np.array_equal(np.asarray(sb[0, :first]), np.asarray(sc_[0, :first]))
    assert not np.allclose(np.asarray(sb[0, first + 1]), np.asarray(sc_[0, first + 1]))
    # identity customization: every mode gives the baseline's K/V exactly
    for mode in ev.ALIGNIT_MODES[1:]:
        same = ev.prompt_kv(base, base, tokens, TINY, alignit=mode)
        for layer in kb:
            np.testing.assert_array_equal(np.asarray(same[layer][0]), np.asarray(kb[layer][0]))
    with pytest.raises(UserError, match="alignit must be"):
        ev.prompt_kv(base, custom, tokens, TINY, alignit="yes")


def test_the_context_control_scores_a_training_shape():
    vocab = tb.Vocab()
    base = tb.init_testbed(TINY, len(vocab), jax.random.key(0))
    classifier = tr.init_classifier(TINY.px, jax.random.key(1))
    out = ev.context_control(base, classifier, ev.context_prompts(4, seed=0), TINY, steps=2)
    assert out["shape"] == "square" and set(out) == {"shape", "prompt", "concept_only"}
    assert all(0 <= out[k][m] <= 1 for k in ("prompt", "concept_only") for m in ("fidelity", "alignment"))
    with pytest.raises(UserError, match="training shape"):
        ev.context_control(base, classifier, [], TINY, shape="star")
