"""Customizing the test bed to a held-out concept, and AlignIT's evaluation.

``customize(params, method, ...)`` teaches the trained test bed a concept it never saw (the star,
written ``<c0>``) from ``n_images`` renders, by one of three methods:

* ``textual_inversion``: only the concept token's embedding is trained;
* ``custom_diffusion``: the embedding and every cross-attention ``W_k``/``W_v``;
* ``dreambooth``: every parameter (without the paper's prior-preservation loss: no class word for
  the concept exists in the vocabulary).

``evaluate(...)`` then generates prompts that place the concept in new contexts (another colour,
size, position, background, a second object), each with the customized model's own K/V and with
AlignIT's (the concept token's K/V from the customized model on the concept-only prompt ``a
<c0>``, every other token's from the baseline), and scores each image with the attribute
classifier: **concept fidelity** (a star where the prompt puts the concept) and **prompt
alignment** (the share of the prompt's non-concept attributes the image shows: the concept's
colour and size, the background, the second object's shape and colour). It also measures the
drift AlignIT argues from: the relative distance of the non-concept tokens' K/V between the
customized and the baseline model on the same prompts.
"""

from __future__ import annotations

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

__all__ = ["METHODS", "concept_images", "customize", "context_prompts", "generate", "evaluate", "score",
           "plot_report", "format_table"]

METHODS = ("textual_inversion", "custom_diffusion", "dreambooth")
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


def generate(base: dict, custom: dict, scenes, config: tb.TestbedConfig, *, seed: int, alignit: bool,
             steps: int = 30) -> np.ndarray:
    """``uint8`` images of the scenes' captions (concept written ``<c0>``) from the customized
    model, with its own K/V or AlignIT's."""
    vocab = tb.Vocab()
    captions = [sc.caption(s).replace(CONCEPT, CONCEPT_TOKEN) for s in scenes]
    tokens = jnp.asarray(vocab.encode_batch(captions, length=config.max_words))
    if alignit:
        concept = jnp.asarray(vocab.encode_batch([f"a {CONCEPT_TOKEN}"] * len(scenes), length=4))
        _, base_states = _kv_and_states(base, tokens, config)
        concept_states = tb.encode_text(custom, concept, config)
        cmap = concept_positions(np.asarray(tokens), np.asarray(concept), [vocab.ids[CONCEPT_TOKEN]])
        kv = align_kv(tb.generator_kv(base), tb.generator_kv(custom), base_states, concept_states, cmap)
    else:
        kv, _ = _kv_and_states(custom, tokens, config)
    x = _sample(custom, kv, tb.text_mask(tokens), jax.random.key(seed), config=config, steps=steps)
    return np.asarray(jnp.round((x + 1) * 127.5)).astype(np.uint8)


_sample = jax.jit(tb.sample, static_argnames=("config", "steps"))


def score(predicted, wanted: sc.Scene) -> tuple[float, float]:
    """``(concept fidelity, prompt alignment)`` of one image's predicted scene against the prompt."""
    objs = predicted.objects if isinstance(predicted, sc.Scene) else predicted["objects"]
    bg = predicted.background if isinstance(predicted, sc.Scene) else predicted["background"]
    at = {o.position: o for o in objs}
    concept, *rest = wanted.objects
    got = at.get(concept.position)
    fidelity = float(got is not None and got.shape == CONCEPT)
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
            for alignit in (False, True):
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
        for alignit in (False, True):
            sel = [r for r in rows if r["method"] == method and r["alignit"] == alignit]
            table.append({"method": method, "alignit": alignit, "seeds": len(sel),
                          "fidelity": float(np.mean([r["fidelity"] for r in sel])),
                          "fidelity_spread": float(np.std([r["fidelity"] for r in sel])),
                          "alignment": float(np.mean([r["alignment"] for r in sel])),
                          "alignment_spread": float(np.std([r["alignment"] for r in sel]))})
    return {"prompts": captions, "rows": rows, "table": table, "drift": drift}, grids


def plot_report(report: dict, grids: dict, out) -> None:
    """``alignit_grids.png`` (rows: method x with/without AlignIT; columns: the first prompts) and
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
                ax.set_title(f"{k[0]}{' + AlignIT' if k[1] else ''}", fontsize=6, loc="left")
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
    lines = [f"{'method':<20} {'AlignIT':<8} {'concept fidelity':>18} {'prompt alignment':>18}"]
    for r in report["table"]:
        lines.append(f"{r['method']:<20} {'yes' if r['alignit'] else 'no':<8} "
                     f"{r['fidelity']:>10.1%} ± {r['fidelity_spread']:<5.1%} {r['alignment']:>10.1%} ± "
                     f"{r['alignment_spread']:.1%}")
    lines.append("non-concept K/V drift (mean over layers): " + ", ".join(
        f"{m} {np.mean(list(v.values())):.3f}" for m, v in report["drift"].items()))
    return "\n".join(lines)
