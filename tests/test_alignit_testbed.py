"""AlignIT's test bed (jaxkv.alignit.testbed): the vocabulary, the causal text encoder (a learned
token moves only the states after it), identity customization through the generator, AlignIT
restoring the baseline K/V of non-concept tokens after a textual-inversion change, and the flow
loss learning a tiny batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkv.alignit import align_kv, concept_positions, kv_drift
from jaxkv.alignit import scenes as sc
from jaxkv.alignit import testbed as tb
from jaxkv.errors import UserError

CFG = tb.TestbedConfig(px=16, patch=4, width=32, layers=2, heads=2, text_width=32, text_layers=2, text_heads=2,
                       max_words=20)
VOCAB = tb.Vocab()


@pytest.fixture(scope="module")
def params():
    p = tb.init_testbed(CFG, len(VOCAB), jax.random.key(0))
    # the adaLN gates start at zero; give them weight so every path of the block is exercised
    for blk in p["gen"]["blocks"]:
        blk["mod"] = jax.random.normal(jax.random.key(1), blk["mod"].shape) * 0.05
    p["gen"]["patch_out"] = jax.random.normal(jax.random.key(2), p["gen"]["patch_out"].shape) * 0.05
    return p


def test_the_vocabulary_encodes_every_caption_and_names_a_stranger():
    _, captions, _ = sc.sample_scenes(50, seed=0, two_objects=0.5)
    ids = VOCAB.encode_batch(captions, length=CFG.max_words)
    assert ids.shape == (50, 20) and (ids[:, 0] == VOCAB.ids["a"]).all()
    assert VOCAB.encode("a small <c0> on the left", length=8).tolist()[:3] == [VOCAB.ids["a"], VOCAB.ids["small"], 1]
    with pytest.raises(UserError, match="'star' is not a word"):
        VOCAB.encode("a small star on the left", length=8)
    with pytest.raises(UserError, match="more than 3"):
        VOCAB.encode("a small red circle", length=3)


def test_a_changed_token_moves_only_the_states_after_it(params):
    a = VOCAB.encode_batch(["a small red <c0> on the left on a gray background"], length=CFG.max_words)
    states = tb.encode_text(params, jnp.asarray(a), CFG)
    moved = jax.tree.map(lambda x: x, params)
    moved["text"]["embed"] = params["text"]["embed"].at[1].add(1.0)  # textual inversion's change: <c0>
    states2 = tb.encode_text(moved, jnp.asarray(a), CFG)
    diff = np.abs(np.asarray(states2 - states)).max(-1)[0]
    assert (diff[:3] == 0).all() and (diff[3:] > 1e-4).all()  # <c0> is word 3


def _kv(params, tokens):
    states = tb.encode_text(params, tokens, CFG)
    prov = tb.generator_kv(params)
    return {layer: prov.project(layer, states) for layer in prov.layers()}, states


def test_identity_customization_reproduces_the_generator_exactly(params):
    tokens = jnp.asarray(VOCAB.encode_batch(["a large blue <c0> at the top and a small white ring at the bottom "
                                             "on a teal background"], length=CFG.max_words))
    concept = jnp.asarray(VOCAB.encode_batch(["a <c0>"], length=4))
    cmap = concept_positions(np.asarray(tokens), np.asarray(concept), [1])
    own, states = _kv(params, tokens)
    prov = tb.generator_kv(params)
    # the customized model is the baseline: the concept's K/V from the concept-only prompt differ
    # (its state saw other words), so identity here is the concept-only prompt being the prompt
    aligned = align_kv(prov, prov, states, states, np.where(cmap >= 0, np.arange(tokens.shape[1])[None], -1))
    x = jax.random.normal(jax.random.key(3), (1, CFG.px, CFG.px, 3))
    t = jnp.array([0.7])
    a = tb.denoise(params, x, t, own, tb.text_mask(tokens), CFG)
    b = tb.denoise(params, x, t, aligned, tb.text_mask(tokens), CFG)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_alignit_restores_the_baseline_kv_that_textual_inversion_moved(params):
    tokens = jnp.asarray(VOCAB.encode_batch(["a small <c0> on the left on a beige background"], length=CFG.max_words))
    concept = jnp.asarray(VOCAB.encode_batch(["a <c0>"], length=4))
    custom = jax.tree.map(lambda x: x, params)
    custom["text"]["embed"] = params["text"]["embed"].at[1].set(jax.random.normal(jax.random.key(5), (32,)))
    base_kv, base_states = _kv(params, tokens)
    _, custom_states = _kv(custom, tokens)
    prov_b, prov_c = tb.generator_kv(params), tb.generator_kv(custom)
    non_concept = (np.asarray(tokens) != 1) & (np.asarray(tokens) != 0)
    drift = kv_drift(prov_b, prov_c, base_states, custom_states, non_concept)
    after = np.arange(tokens.shape[1]) > 2  # the words after <c0> drift, those before do not
    for d in drift.values():
        d = np.asarray(d)[0]
        assert (d[non_concept[0] & after] > 1e-4).all() and (d[non_concept[0] & ~after] == 0).all()
    concept_states = tb.encode_text(custom, concept, CFG)
    cmap = concept_positions(np.asarray(tokens), np.asarray(concept), [1])
    aligned = align_kv(prov_b, prov_c, base_states, concept_states, cmap)
    for layer, (k, v) in aligned.items():
        kb, vb = base_kv[layer]
        assert np.array_equal(np.asarray(k)[non_concept], np.asarray(kb)[non_concept])
        assert np.array_equal(np.asarray(v)[non_concept], np.asarray(vb)[non_concept])
        kc, _ = prov_c.project(layer, concept_states)
        assert np.array_equal(np.asarray(k)[0, 2], np.asarray(kc)[0, 1])


def test_the_flow_loss_learns_a_tiny_batch_and_sampling_is_deterministic(params):
    imgs, captions, _ = sc.sample_scenes(8, seed=1, px=CFG.px)
    rng = np.random.default_rng(0)
    batch = {"images": jnp.asarray(imgs / 127.5 - 1, jnp.float32),
             "tokens": jnp.asarray(VOCAB.encode_batch(captions, length=CFG.max_words)),
             "noise": jnp.asarray(rng.normal(size=imgs.shape), jnp.float32),
             "t": jnp.asarray(rng.uniform(0.05, 0.95, size=8), jnp.float32)}
    tx = optax.adam(3e-3)

    @jax.jit
    def step(p, opt):
        (l, n), g = jax.value_and_grad(lambda q: tb.flow_loss(q, batch, CFG), has_aux=True)(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt, l / n

    p, opt = params, tx.init(params)
    losses = []
    for _ in range(40):
        p, opt, l = step(p, opt)
        losses.append(float(l))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    kv, _ = _kv(p, batch["tokens"])
    a = tb.sample(p, kv, tb.text_mask(batch["tokens"]), jax.random.key(0), CFG, steps=4)
    b = tb.sample(p, kv, tb.text_mask(batch["tokens"]), jax.random.key(0), CFG, steps=4)
    assert a.shape == (8, CFG.px, CFG.px, 3) and np.array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(a).max()) <= 1.0
