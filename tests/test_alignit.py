"""AlignIT (jaxkv.alignit): the K/V infusion transform (identity customization is the baseline
exactly; only concept positions change; jit equals eager), the concept map, the drift measure, and
the procedural scenes of the test bed (caption grammar round trip, rendering by hand)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.alignit import LinearKV, align_kv, align_kv_jit, concept_positions, kv_drift
from jaxkv.alignit import scenes as sc
from jaxkv.errors import UserError


def _provider(seed, d=12, dk=8, layers=("down.0", "mid", "up.1")):
    keys = jax.random.split(jax.random.key(seed), 2 * len(layers))
    return LinearKV({name: (jax.random.normal(keys[2 * i], (d, dk)), jax.random.normal(keys[2 * i + 1], (d, dk + 2)))
                     for i, name in enumerate(layers)})


def test_identity_customization_reproduces_the_baseline_exactly():
    base = _provider(0)
    states = jax.random.normal(jax.random.key(1), (2, 7, 12))
    # the concept-only prompt is the prompt itself and the customized model is the baseline
    cmap = np.array([[-1, 1, -1, -1, -1, -1, -1], [-1, -1, -1, 3, 4, -1, -1]])  # each concept token is itself
    got = align_kv(base, base, states, states, cmap)
    for layer in base.layers():
        k, v = base.project(layer, states)
        assert np.array_equal(np.asarray(got[layer][0]), np.asarray(k))
        assert np.array_equal(np.asarray(got[layer][1]), np.asarray(v))


def test_alignit_changes_kv_only_at_the_concept_positions():
    base, custom = _provider(0), _provider(5)
    states = jax.random.normal(jax.random.key(1), (2, 7, 12))
    concept_states = jax.random.normal(jax.random.key(2), (2, 4, 12))
    cmap = np.array([[-1, 2, -1, -1, -1, -1, -1], [-1, -1, -1, 0, 1, -1, -1]])
    got = align_kv(base, custom, states, concept_states, cmap)
    for layer in base.layers():
        for j, (b, c) in enumerate(zip(base.project(layer, states), custom.project(layer, concept_states))):
            out = np.asarray(got[layer][j])
            for r, i in itertools.product(range(2), range(7)):
                want = c[r, cmap[r, i]] if cmap[r, i] >= 0 else b[r, i]
                assert np.array_equal(out[r, i], np.asarray(want)), (layer, j, r, i)
    jitted = align_kv_jit(base, custom, states, concept_states, cmap)
    for layer in base.layers():
        for a, b in zip(got[layer], jitted[layer]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_the_concept_map_from_token_ids():
    # prompt "a <c> on the left" vs concept-only "a photo of <c>"; <c> = 99, padded rows
    got = concept_positions([[1, 99, 5, 6, 7], [1, 2, 99, 99]], [[1, 8, 9, 99], [99, 99]], [99])
    assert got.tolist() == [[-1, 3, -1, -1, -1], [-1, -1, 0, 1, -1]]
    with pytest.raises(UserError, match="not in its concept-only prompt"):
        concept_positions([[1, 99]], [[1, 2]], [99])
    with pytest.raises(UserError, match="one concept-only prompt per prompt"):
        concept_positions([[1, 99]], [], [99])
    with pytest.raises(UserError, match="at least one"):
        concept_positions([[1]], [[1]], [])


def test_the_drift_is_zero_for_identity_and_masked_elsewhere():
    base, custom = _provider(0), _provider(3)
    states = jax.random.normal(jax.random.key(1), (1, 5, 12))
    moved = states + 0.1 * jax.random.normal(jax.random.key(4), states.shape)
    assert all(float(jnp.abs(d).max()) == 0 for d in kv_drift(base, base, states, states).values())
    mask = np.array([[True, True, False, True, True]])
    d = kv_drift(base, custom, states, moved, mask)
    for layer, v in d.items():
        kb, vb = base.project(layer, states)
        kc, vc = custom.project(layer, moved)
        want = np.linalg.norm(np.concatenate([kc - kb, vc - vb], -1), axis=-1) / \
            np.linalg.norm(np.concatenate([kb, vb], -1), axis=-1)
        np.testing.assert_allclose(np.asarray(v), np.where(mask, want, 0), rtol=1e-5)
        assert float(v[0, 2]) == 0 and float(v.min(initial=1, where=mask)) > 0


def test_bad_input_names_what_is_wrong():
    base = _provider(0)
    states = jnp.zeros((1, 4, 12))
    with pytest.raises(UserError, match="layers"):
        align_kv(base, _provider(0, layers=("mid",)), states, states, -np.ones((1, 4), int))
    with pytest.raises(UserError, match=r"concept_map must be \[B, T\]"):
        align_kv(base, base, states, states, -np.ones((1, 5), int))
    with pytest.raises(UserError, match="share the batch"):
        align_kv(base, base, states, jnp.zeros((2, 4, 12)), -np.ones((1, 4), int))


# --- scenes -------------------------------------------------------------------------------------

def test_captions_round_trip_through_the_grammar():
    _, captions, scenes = sc.sample_scenes(200, seed=3, two_objects=0.5)
    assert all(sc.parse_caption(c) == s for c, s in zip(captions, scenes))
    assert any(len(s.objects) == 2 for s in scenes) and any(len(s.objects) == 1 for s in scenes)
    assert not {o.shape for s in scenes for o in s.objects} & set(sc.CONCEPT_SHAPES)
    assert sc.caption(sc.parse_caption("a small red star on the left on a teal background")) == \
        "a small red star on the left on a teal background"
    with pytest.raises(UserError, match="not a caption"):
        sc.parse_caption("a huge red circle on the left on a teal background")


def test_rendering_by_hand():
    scene = sc.Scene((sc.SceneObject("square", "red", "large", "on the left"),
                      sc.SceneObject("circle", "blue", "small", "on the right")), "gray")
    img = sc.render(scene, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img, sc.render(scene, 32))
    assert tuple(img[16, int(0.28 * 32)]) == sc.COLOURS["red"]  # the centres take the objects' colours
    assert tuple(img[16, int(0.72 * 32)]) == sc.COLOURS["blue"]
    assert tuple(img[1, 1]) == sc.BACKGROUNDS["gray"] and tuple(img[30, 16]) == sc.BACKGROUNDS["gray"]
    # the large square covers (2 * 0.75 * 0.21)^2 of the image
    # (each pixel's red coverage read from its blend of red and gray, left of the blue circle)
    assert all({o.position for o in s.objects} in ({"on the left", "on the right"}, {"at the top", "at the bottom"})
               for s in sc.sample_scenes(50, seed=0, two_objects=1.0)[2])
    red, gray = np.array(sc.COLOURS["red"], float), np.array(sc.BACKGROUNDS["gray"], float)
    alpha = (img[:, :17].astype(float) - gray) @ (red - gray) / ((red - gray) @ (red - gray))
    assert abs(alpha.sum() / 32 ** 2 - (2 * 0.75 * 0.21) ** 2) < 0.005
    # every shape is a different mask
    g = (np.arange(64) + 0.5) / 32 - 1
    dx, dy = np.meshgrid(g, g)
    masks = {s: sc.shape_mask(s, dx, dy) for s in sc.TRAIN_SHAPES + sc.CONCEPT_SHAPES}
    for a, b in itertools.combinations(masks, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.8, (a, b, iou)


def test_scene_bad_input():
    with pytest.raises(UserError, match="unknown colour 'pink'"):
        sc.SceneObject("circle", "pink", "small", "on the left")
    with pytest.raises(UserError, match="opposite positions"):
        sc.Scene((sc.SceneObject("circle", "red", "small", "on the left"),
                  sc.SceneObject("circle", "red", "small", "in the middle")), "gray")
    with pytest.raises(UserError, match="px"):
        sc.render(sc.Scene((sc.SceneObject("circle", "red", "small", "on the left"),), "gray"), 4)
