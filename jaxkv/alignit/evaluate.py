"""Customizing the test bed to a held-out concept, and AlignIT's evaluation.

``customize(params, method, ...)`` teaches the trained test bed a concept it never saw (the star,
written ``<c0>``) from ``n_images`` renders, by one of three methods:

* ``textual_inversion``: only the concept token's embedding is trained;
* ``custom_diffusion``: the embedding and every cross-attention ``W_k``/``W_v``;
* ``dreambooth``: every parameter (without the paper's prior-preservation loss: no class word for
  the concept exists in the vocabulary).

``evaluate(...)`` then generates prompts that place the concept in new contexts (another colour,
size, position, background, a second object), each with the customized model's own K/V and with
AlignIT's, every non-concept token's K/V from the baseline and the concept token's from the
customized model, computed two ways (``ALIGNIT_MODES``):

* ``concept_only`` (the paper's): on the concept-only prompt ``a <c0>``;
* ``in_context`` (jaxkv's variant, not in the paper): on the prompt itself, so the concept's
  state keeps what the causal encoder binds into it (its colour and size come before it in the
  grammar) and its place in the prompt;

and scores each image with the attribute classifier: **concept fidelity** (a star where the prompt puts the concept) and **prompt
alignment** (the share of the prompt's non-concept attributes the image shows: the concept's
colour and size, the background, the second object's shape and colour). It also measures the
drift AlignIT argues from: the relative distance of the non-concept tokens' K/V between the
customized and the baseline model on the same prompts. A control without any customization
(``context_control``) shows what the concept-only prompt costs by itself: the baseline model on
the same prompts with a training shape in the concept's place, that noun's K/V taken from ``a
{shape}`` instead of the prompt.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkv.alignit import scenes as sc
from jaxkv.alignit import testbed as tb
from jaxkv.alignit.kv import align_kv, concept_positions, kv_drift
from jaxkv.alignit.train import predict_attributes
from jaxkv.errors import UserError

__all__ = ["METHODS", "ALIGNIT_MODES", "concept_images", "customize", "context_prompts", "prompt_kv", "generate",
           "evaluate", "context_control", "score", "plot_report", "format_table"]

METHODS = ("textual_inversion", "custom_diffusion", "dreambooth")
ALIGNIT_MODES = ("concept_only", "in_context")
CONCEPT = "star"
CONCEPT_TOKEN = "<c0>"


def concept_images(n: int, *, px: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` renders of the concept (random colour, size, position, background, alone) and their
    captions with ``<c0>`` in place of its name."""
    rng = np.random.default_rng(seed)
    scenes = [sc.Scene((sc.SceneObject(CONCEPT, str(rng.choice(list(sc.COLOURS))), str(rng.choice(list(sc.SIZES))),
                                       str(rng.choice(list(sc.POSITIONS)))),), str(rng.choice(list(sc.BACKGROUNDS))))
              for _ in range(n)]
    return np.stack([sc.render(s, px) for s in scenes]), [sc.caption(s).replace(CONCEPT, CONCEPT_TOKEN) for s in scenes]


def _trainable(params: dict, method: str) -> dict:
    """A 0/1 mask of ``params``: what ``method`` trains."""
    mask = jax.tree.map(jnp.zeros_like, params)
    if method == "dreambooth":
        return jax.tree.map(jnp.ones_like, params)
    token = tb.Vocab().ids[CONCEPT_TOKEN]
    mask["text"]["embed"] = mask["text"]["embed"].at[token].set(1.0)
    if method == "custom_diffusion":
        for blk in mask["gen"]["blocks"]:
            blk["wk_x"] = jnp.ones_like(blk["wk_x"])
            blk["wv_x"] = jnp.ones_like(blk["wv_x"])
    return mask


_LR = {"textual_inversion": 5e-3, "custom_diffusion": 1e-3, "dreambooth": 2e-4}


def customize(params: dict, method: str, config: tb.TestbedConfig, *, n_images: int = 8, steps: int = 400,
              batch_size: int = 32, seed: int = 0, lr: float | None = None) -> dict:
    """The test bed taught the concept by ``method`` (``METHODS``) from ``n_images`` renders."""
    if method not in METHODS:
        raise UserError(f"unknown customization method {method!r}; one of {', '.join(METHODS)}")
    images, captions = concept_images(n_images, px=config.px, seed=seed)
    tokens = tb.Vocab().encode_batch(captions, length=config.max_words)
    mask = _trainable(params, method)
    tx, step = _customize_step(config, float(lr or _LR[method]))

    rng = np.random.default_rng([seed, 11])
    p, opt = params, tx.init(params)
    for _ in range(steps):
        idx = rng.integers(0, n_images, batch_size)
        x0 = images[idx].astype(np.float32) / 127.5 - 1.0
        batch = {"images": jnp.asarray(x0), "tokens": jnp.asarray(tokens[idx]),
                 "noise": jnp.asarray(rng.standard_normal(x0.shape, dtype=np.float32)),
                 "t": jnp.asarray(1 / (1 + np.exp(-rng.standard_normal(batch_size))), jnp.float32)}
        p, opt, _ = step(p, opt, batch, mask)
    return p


@functools.lru_cache(maxsize=None)
def _customize_step(config: tb.TestbedConfig, lr: float):
    """The optimizer and the jitted masked step, once per (config, lr): every seed of a method
    (and methods sharing a rate) reuses one compile."""
    tx = optax.adam(lr)

    @jax.jit
    def step(p, opt, batch, mask):
        (l, n), g = jax.value_and_grad(lambda q: tb.flow_loss(q, batch, config), has_aux=True)(p)
        g = jax.tree.map(lambda a, m: a * m, g, mask)
        u, opt = tx.update(g, opt, p)
        u = jax.tree.map(lambda a, m: a * m, u, mask)
        return optax.apply_updates(p, u), opt, l / n

    return tx, step


def context_prompts(n: int, *, seed: int) -> list[sc.Scene]:
    """``n`` scenes with the concept in a context: any colour, size, position and background, and
    half of them with a second (training) object opposite it."""
    rng = np.random.default_rng([seed, 13])
    out = []
    for i in range(n):
        two = i % 2 == 1
        pos = str(rng.choice(list(sc._OPPOSITE) if two else list(sc.POSITIONS)))
        first = sc.SceneObject(CONCEPT, str(rng.choice(list(sc.COLOURS))), str(rng.choice(list(sc.SIZES))), pos)
        objs = (first,)
        if two:
            objs = (first, sc.SceneObject(str(rng.choice(sc.TRAIN_SHAPES)), str(rng.choice(list(sc.COLOURS))),
                                          str(rng.choice(list(sc.SIZES))), sc._OPPOSITE[pos]))
        out.append(sc.Scene(objs, str(rng.choice(list(sc.BACKGROUNDS)))))
    return out


def _kv_and_states(params, tokens, config):
    states = tb.encode_text(params, tokens, config)
    prov = tb.generator_kv(params)
    return {layer: prov.project(layer, states) for layer in prov.layers()}, states


def prompt_kv(base: dict, custom: dict, tokens, config: tb.TestbedConfig, *, alignit: str | None,
              concept_token: str = CONCEPT_TOKEN) -> dict:
    """The generator's cross-attention K/V for ``tokens [B, T]``: the customized model's own
    (``alignit=None``) or AlignIT's (``'concept_only'`` or ``'in_context'``, ``ALIGNIT_MODES``)."""
    if alignit is None:
        return _kv_and_states(custom, tokens, config)[0]
    if alignit not in ALIGNIT_MODES:
        raise UserError(f"alignit must be None or one of {', '.join(ALIGNIT_MODES)}, got {alignit!r}")
    vocab = tb.Vocab()
    ids = np.asarray(tokens)
    base_states = tb.encode_text(base, tokens, config)
    if alignit == "concept_only":
        concept = jnp.asarray(vocab.encode_batch([f"a {concept_token}"] * ids.shape[0], length=4))
        cmap = concept_positions(ids, np.asarray(concept), [vocab.ids[concept_token]])
        concept_states = tb.encode_text(custom, concept, config)
    else:  # the customized model on the prompt itself, read at the concept's own positions
        cmap = np.where(ids == vocab.ids[concept_token], np.arange(ids.shape[1])[None], -1).astype(np.int32)
        concept_states = tb.encode_text(custom, tokens, config)
    return align_kv(tb.generator_kv(base), tb.generator_kv(custom), base_states, concept_states, cmap)


def _images(params, kv, tokens, config, seed, steps):
    x = _sample(params, kv, tb.text_mask(tokens), jax.random.key(seed), config=config, steps=steps)
    return np.asarray(jnp.round((x + 1) * 127.5)).astype(np.uint8)


def generate(base: dict, custom: dict, scenes, config: tb.TestbedConfig, *, seed: int, alignit: str | None,
             steps: int = 30) -> np.ndarray:
    """``uint8`` images of the scenes' captions (concept written ``<c0>``) from the customized
    model, with its own K/V (``alignit=None``) or AlignIT's (``ALIGNIT_MODES``)."""
    captions = [sc.caption(s).replace(CONCEPT, CONCEPT_TOKEN) for s in scenes]
    tokens = jnp.asarray(tb.Vocab().encode_batch(captions, length=config.max_words))
    return _images(custom, prompt_kv(base, custom, tokens, config, alignit=alignit), tokens, config, seed, steps)


def context_control(base: dict, classifier: dict, scenes, config: tb.TestbedConfig, *, shape: str = "square",
                    seed: int = 0, steps: int = 30) -> dict:
    """No customization: the baseline on ``scenes`` with the training ``shape`` in the concept's
    place, scored for that shape, with the prompt's own K/V and with that noun's K/V taken from
    ``a {shape}`` (what the concept-only prompt does to a word the model knows)."""
    if shape not in sc.TRAIN_SHAPES:
        raise UserError(f"shape must be a training shape ({', '.join(sc.TRAIN_SHAPES)}), got {shape!r}")
    vocab = tb.Vocab()
    swapped = [sc.Scene((dataclasses.replace(s.objects[0], shape=shape),) + s.objects[1:], s.background)
               for s in scenes]
    tokens = jnp.asarray(vocab.encode_batch([sc.caption(s) for s in swapped], length=config.max_words))
    ids = np.asarray(tokens)
    first = np.zeros_like(ids, bool)  # the first object's noun only (a second object may be the same shape)
    first[np.arange(len(ids)), np.argmax(ids == vocab.ids[shape], axis=1)] = True
    concept = jnp.asarray(vocab.encode_batch([f"a {shape}"] * len(ids), length=4))
    cmap = np.where(first, 1, -1).astype(np.int32)  # "a {shape}": the noun at index 1
    states = tb.encode_text(base, tokens, config)
    prov = tb.generator_kv(base)
    out = {}
    for name, kv in (("prompt", {layer: prov.project(layer, states) for layer in prov.layers()}),
                     ("concept_only", align_kv(prov, prov, states, tb.encode_text(base, concept, config), cmap))):
        preds = predict_attributes(classifier, _images(base, kv, tokens, config, seed, steps))
        fid, ali = zip(*(score(p, s, concept_shape=shape) for p, s in zip(preds, swapped)))
        out[name] = {"fidelity": float(np.mean(fid)), "alignment": float(np.mean(ali))}
    return {"shape": shape, **out}


_sample = jax.jit(tb.sample, static_argnames=("config", "steps"))


def score(predicted, wanted: sc.Scene, *, concept_shape: str = CONCEPT) -> tuple[float, float]:
    """``(concept fidelity, prompt alignment)`` of one image's predicted scene against the prompt
    (its first object is the concept, ``concept_shape`` the shape it should be)."""
    objs = predicted.objects if isinstance(predicted, sc.Scene) else predicted["objects"]
    bg = predicted.background if isinstance(predicted, sc.Scene) else predicted["background"]
    at = {o.position: o for o in objs}
    concept, *rest = wanted.objects
    got = at.get(concept.position)
    fidelity = float(got is not None and got.shape == concept_shape)
    checks = [got is not None and got.colour == concept.colour, got is not None and got.size == concept.size,
              bg == wanted.background]
    for o in rest:
        g = at.get(o.position)
        checks += [g is not None and g.shape == o.shape, g is not None and g.colour == o.colour]
    return fidelity, float(np.mean(checks))


def evaluate(base: dict, classifier: dict, config: tb.TestbedConfig, *, methods=METHODS, seeds=(0, 1, 2),
             prompts: int = 64, customize_steps: int = 400, progress=None) -> dict:
    """The alignment table (per method and seed, with and without AlignIT), the drift per method,
    and a few images per cell for the grids. Returns the JSON-ready report (images apart)."""
    vocab = tb.Vocab()
    rows, drift, grids = [], {}, {}
    scenes = context_prompts(prompts, seed=0)
    captions = [sc.caption(s).replace(CONCEPT, CONCEPT_TOKEN) for s in scenes]
    tokens = jnp.asarray(vocab.encode_batch(captions, length=config.max_words))
    non_concept = (np.asarray(tokens) != vocab.ids[CONCEPT_TOKEN]) & (np.asarray(tokens) != 0)
    for method in methods:
        for seed in seeds:
            custom = customize(base, method, config, steps=customize_steps, seed=seed)
            if seed == seeds[0]:
                _, bs = _kv_and_states(base, tokens, config)
                _, cs = _kv_and_states(custom, tokens, config)
                d = kv_drift(tb.generator_kv(base), tb.generator_kv(custom), bs, cs, non_concept)
                drift[method] = {layer: float(np.asarray(v)[non_concept].mean()) for layer, v in d.items()}
            for alignit in (None,) + ALIGNIT_MODES:
                imgs = generate(base, custom, scenes, config, seed=seed, alignit=alignit)
                preds = predict_attributes(classifier, imgs)
                fid, ali = zip(*(score(p, s) for p, s in zip(preds, scenes)))
                rows.append({"method": method, "seed": seed, "alignit": alignit, "fidelity": float(np.mean(fid)),
                             "alignment": float(np.mean(ali))})
                if seed == seeds[0]:
                    grids[(method, alignit)] = imgs[:8]
                if progress is not None:
                    progress(f"{method} seed {seed} alignit={alignit}: fidelity {np.mean(fid):.2f}, "
                             f"alignment {np.mean(ali):.2f}")
    table = []
    for method in methods:
        for alignit in (None,) + ALIGNIT_MODES:
            sel = [r for r in rows if r["method"] == method and r["alignit"] == alignit]
            table.append({"method": method, "alignit": alignit, "seeds": len(sel),
                          "fidelity": float(np.mean([r["fidelity"] for r in sel])),
                          "fidelity_spread": float(np.std([r["fidelity"] for r in sel])),
                          "alignment": float(np.mean([r["alignment"] for r in sel])),
                          "alignment_spread": float(np.std([r["alignment"] for r in sel]))})
    control = context_control(base, classifier, scenes, config, seed=seeds[0])
    if progress is not None:
        progress(f"control (no customization, a {control['shape']}): prompt K/V {control['prompt']}, "
                 f"K/V from 'a {control['shape']}' {control['concept_only']}")
    return {"prompts": captions, "rows": rows, "table": table, "drift": drift, "context_control": control}, grids


def plot_report(report: dict, grids: dict, out) -> None:
    """``alignit_grids.png`` (rows: method x without / with each AlignIT mode; columns: the first prompts) and
    ``alignit_drift.png`` (non-concept K/V drift per layer and method)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxkv.fileio import save_figure

    out = Path(out)
    keys = list(grids)
    cols = max(len(v) for v in grids.values())
    fig, axes = plt.subplots(len(keys), cols, figsize=(1.3 * cols, 1.4 * len(keys)), squeeze=False)
    for r, k in enumerate(keys):
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(grids[k]):
                ax.imshow(grids[k][c], interpolation="nearest")
            if c == 0:
                ax.set_title(f"{k[0]}{'' if k[1] is None else ' + AlignIT (' + k[1] + ')'}", fontsize=6, loc="left")
    for c in range(cols):
        axes[0, c].set_title((axes[0, c].get_title() + "\n" if c == 0 else "") + report["prompts"][c][:38], fontsize=4)
    fig.tight_layout()
    save_figure(fig, out / "alignit_grids.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, per_layer in report["drift"].items():
        ax.plot(list(per_layer), list(per_layer.values()), "o-", label=method)
    ax.set(ylabel="relative K/V distance, non-concept tokens", xlabel="cross-attention layer",
           title="drift of the customized model from the baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "alignit_drift.png")


def format_table(report: dict) -> str:
    lines = [f"{'method':<20} {'AlignIT':<13} {'concept fidelity':>18} {'prompt alignment':>18}"]
    for r in report["table"]:
        lines.append(f"{r['method']:<20} {r['alignit'] or 'no':<13} "
                     f"{r['fidelity']:>10.1%} ± {r['fidelity_spread']:<5.1%} {r['alignment']:>10.1%} ± "
                     f"{r['alignment_spread']:.1%}")
    c = report.get("context_control")
    if c is not None:
        lines.append(f"control, no customization (a {c['shape']} in the concept's place): prompt K/V fidelity "
                     f"{c['prompt']['fidelity']:.1%}, alignment {c['prompt']['alignment']:.1%}; its K/V from "
                     f"'a {c['shape']}' fidelity {c['concept_only']['fidelity']:.1%}, alignment "
                     f"{c['concept_only']['alignment']:.1%}")
    lines.append("non-concept K/V drift (mean over layers): " + ", ".join(
        f"{m} {np.mean(list(v.values())):.3f}" for m, v in report["drift"].items()))
    return "\n".join(lines)
