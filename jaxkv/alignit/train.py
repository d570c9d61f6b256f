"""Training the test bed on the training spine, and its attribute classifier.

``train_testbed`` trains the text encoder and the generator together by rectified flow on a pool
of procedural scenes (``jaxkv.training``: the optax step, orbax checkpoints every
``save_every``, exact resume from the run folder, ``metrics.jsonl`` and its plot, a progress
bar); each step's batch, its noise and its times are a pure function of the step number.
``train_classifier`` fits a small CNN to the renderer's ground truth (every shape, the concept
shapes included): for each of the five positions, which shape is there (or none), its colour and
size, and the background. ``save_params``/``load_params`` keep a parameter tree as one ``.npz``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkv.alignit import scenes as sc
from jaxkv.alignit import testbed as tb
from jaxkv.errors import UserError
from jaxkv.fileio import atomic_path, write_text_atomic

__all__ = ["SceneBatches", "train_testbed", "save_params", "load_params", "init_classifier", "classify_logits",
           "train_classifier", "predict_attributes", "ALL_SHAPES", "POSITION_NAMES"]

ALL_SHAPES = sc.TRAIN_SHAPES + sc.CONCEPT_SHAPES
POSITION_NAMES = tuple(sc.POSITIONS)
_COLOURS, _SIZES, _BGS = tuple(sc.COLOURS), tuple(sc.SIZES), tuple(sc.BACKGROUNDS)


# ---------------------------------------------------------------------------------------------
# parameters on disk


def save_params(path: str | os.PathLike, params: dict, meta: dict | None = None) -> None:
    """The tree as one ``.npz`` (leaves keyed by their path) and ``meta`` beside it, atomically."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    arrays = {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    if meta is not None:
        write_text_atomic(Path(path).with_suffix(".json"), json.dumps(meta, indent=1))


def load_params(path: str | os.PathLike, like: dict) -> dict:
    """A tree shaped as ``like`` from ``save_params``'s file: every leaf checked for its name,
    shape, a floating dtype and finite values."""
    import zipfile

    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive")
        with data:
            stored = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read the parameters {os.fspath(path)!r}: not a complete .npz file ({e})") from None
    leaves, tree = jax.tree_util.tree_flatten_with_path(like)
    out = []
    for k, v in leaves:
        name = jax.tree_util.keystr(k)
        if name not in stored or stored[name].shape != np.shape(v):
            raise UserError(f"{os.fspath(path)!r} does not hold {name} of shape {np.shape(v)}: not this model's file")
        x = stored[name]
        if x.dtype.kind != "f" or not np.isfinite(x).all():
            what = "holds non-finite values" if x.dtype.kind == "f" else f"is stored as {x.dtype}, not floats"
            raise UserError(f"{os.fspath(path)!r}: {name} {what}; the file is damaged")
        out.append(jnp.asarray(x, dtype=jnp.asarray(v).dtype))
    return jax.tree_util.tree_unflatten(tree, out)


# ---------------------------------------------------------------------------------------------
# the generator


class SceneBatches:
    """``get(step)``: a batch of the pool (images in [-1, 1], caption ids) with its noise and
    times, ``[grad_accum, b, ...]``; the pool is rendered once from ``seed``."""

    def __init__(self, *, pool: int, px: int, batch_size: int, grad_accum: int, seed: int, max_words: int,
                 captions=None, images=None):
        if images is None:
            images, captions, _ = sc.sample_scenes(pool, seed=seed, px=px)
        self.images = images
        self.tokens = tb.Vocab().encode_batch(captions, length=max_words)
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        if batch_size > len(self.images):
            raise UserError(f"batch_size ({batch_size}) exceeds the pool of {len(self.images)} scenes")

    def get(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, 7, step])
        idx = rng.choice(len(self.images), self.batch_size, replace=False)
        shape = (self.grad_accum, self.batch_size // self.grad_accum)
        imgs = self.images[idx].astype(np.float32) / 127.5 - 1.0
        return {"images": imgs.reshape(shape + imgs.shape[1:]),
                "tokens": self.tokens[idx].reshape(shape + self.tokens.shape[1:]),
                "noise": rng.standard_normal(imgs.shape, dtype=np.float32).reshape(shape + imgs.shape[1:]),
                # logit-normal times, as rectified-flow image models sample them
                "t": (1 / (1 + np.exp(-rng.standard_normal(self.batch_size)))).astype(np.float32).reshape(shape + (1,))}


def train_testbed(config: tb.TestbedConfig, *, out: str | os.PathLike | None, optim, train, pool: int = 20_000,
                  callbacks=()):
    """Train the text encoder and generator (``optim``: ``jaxkv.training.OptimConfig``, ``train``:
    ``TrainConfig``); resumes from ``out``; writes ``out/testbed.npz`` (+ ``.json``) at the end."""
    from jaxkv.training.loop import TrainResult, open_run, run_steps
    from jaxkv.training.metrics import plot_metrics
    from jaxkv.training.optim import make_optimizer, make_schedule
    from jaxkv.training.sharding import batch_sharding, make_mesh
    from jaxkv.training.state import init_state
    from jaxkv.training.step import make_train_step

    vocab = tb.Vocab()
    mesh = make_mesh(*train.mesh)
    tx, schedule = make_optimizer(optim), make_schedule(optim)
    batches = SceneBatches(pool=pool, px=config.px, batch_size=train.batch_size, grad_accum=train.grad_accum,
                           seed=train.seed, max_words=config.max_words)

    def make_state():
        return init_state(tb.init_testbed(config, len(vocab), jax.random.key(train.seed)), tx, train.seed)

    meta = None
    if out is not None:
        meta = {"testbed": dataclasses.asdict(config), "pool": pool, "optim": dataclasses.asdict(optim),
                "train": {**dataclasses.asdict(train), "mesh": list(train.mesh)}}
        meta["steps"] = meta["train"].pop("steps")
        meta["train"].pop("remat")  # the language model's option, not the test bed's: runs resume as before
        meta["optim"].pop("total_steps")
    state, start, run, shardings = open_run(make_state, tx=tx, mesh=mesh, out=out, meta=meta, train=train)
    if start < train.steps:
        bsharding = batch_sharding(mesh)
        step_fn = jax.jit(make_train_step(config, tx, schedule, loss=lambda p, mb: tb.flow_loss(p, mb, config)),
                          in_shardings=(shardings, bsharding), out_shardings=(shardings, None), donate_argnums=0)
        state, history = run_steps(step_fn, state, start=start, batches=batches, bsharding=bsharding, mesh=mesh,
                                   train=train, run=run, out=out, tokens_per_row=1, callbacks=callbacks)
    else:
        history = []
    if out is not None and jax.process_index() == 0:
        if history:
            plot_metrics(Path(out) / "metrics.jsonl", Path(out) / "metrics.png")
        save_params(Path(out) / "testbed.npz", jax.device_get(state.params),
                    {"testbed": dataclasses.asdict(config), "vocab": list(vocab.words), "steps": train.steps})
    return TrainResult(state=state, history=history, out=Path(out) if out is not None else None, step=train.steps)


# ---------------------------------------------------------------------------------------------
# the attribute classifier


def _conv(key, k, c_in, c_out):
    return jax.random.normal(key, (k, k, c_in, c_out)) * (2.0 / (k * k * c_in)) ** 0.5


def init_classifier(px: int, key) -> dict:
    ks = jax.random.split(key, 6)
    n = (px // 4) ** 2 * 96
    heads = len(POSITION_NAMES) * (1 + len(ALL_SHAPES) + len(_COLOURS) + len(_SIZES)) + len(_BGS)
    return {"c1": _conv(ks[0], 3, 3, 32), "c2": _conv(ks[1], 3, 32, 64), "c3": _conv(ks[2], 3, 64, 96),
            "d1": jax.random.normal(ks[3], (n, 256)) * (2.0 / n) ** 0.5, "b1": jnp.zeros((256,)),
            "d2": jax.random.normal(ks[4], (256, heads)) * 0.01, "b2": jnp.zeros((heads,))}


def classify_logits(params: dict, images) -> dict:
    """Logits per head: ``shape [B, 5, 1 + shapes]`` (index 0: nothing there), ``colour [B, 5, 7]``,
    ``size [B, 5, 2]``, ``background [B, 4]``; ``images`` in [-1, 1]."""
    conv = lambda x, w, s: jax.lax.conv_general_dilated(x, w, (s, s), "SAME",  # noqa: E731
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(conv(images, params["c1"], 1))
    x = jax.nn.relu(conv(x, params["c2"], 2))
    x = jax.nn.relu(conv(x, params["c3"], 2))
    x = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["d1"] + params["b1"])
    y = x @ params["d2"] + params["b2"]
    p, ns, nc, nz = len(POSITION_NAMES), 1 + len(ALL_SHAPES), len(_COLOURS), len(_SIZES)
    per = y[:, : p * (ns + nc + nz)].reshape(-1, p, ns + nc + nz)
    return {"shape": per[..., :ns], "colour": per[..., ns: ns + nc], "size": per[..., ns + nc:],
            "background": y[:, p * (ns + nc + nz):]}


def _targets(scenes) -> dict:
    b, p = len(scenes), len(POSITION_NAMES)
    shape = np.zeros((b, p), np.int32)
    colour = np.zeros((b, p), np.int32)
    size = np.zeros((b, p), np.int32)
    bg = np.zeros((b,), np.int32)
    for i, s in enumerate(scenes):
        bg[i] = _BGS.index(s.background)
        for o in s.objects:
            j = POSITION_NAMES.index(o.position)
            shape[i, j] = 1 + ALL_SHAPES.index(o.shape)
            colour[i, j] = _COLOURS.index(o.colour)
            size[i, j] = _SIZES.index(o.size)
    return {"shape": shape, "colour": colour, "size": size, "background": bg}


def _classifier_loss(params, images, t):
    lg = classify_logits(params, images)
    ce = optax.softmax_cross_entropy_with_integer_labels
    present = (t["shape"] > 0).astype(jnp.float32)
    loss = ce(lg["shape"], t["shape"]).mean() + ce(lg["background"], t["background"]).mean()
    for k in ("colour", "size"):
        loss = loss + jnp.sum(ce(lg[k], t[k]) * present) / jnp.maximum(present.sum(), 1.0)
    return loss


def train_classifier(px: int, *, steps: int = 1500, batch_size: int = 128, seed: int = 0, pool: int = 20_000,
                     lr: float = 2e-3, progress=None) -> tuple[dict, float]:
    """Fit the classifier to rendered scenes of every shape (concepts included); returns the
    parameters and their exact-scene accuracy on 2,000 fresh renders."""
    images, _, scenes = sc.sample_scenes(pool, seed=seed + 1000, px=px, shapes=ALL_SHAPES, two_objects=0.5)
    targets = _targets(scenes)
    params = init_classifier(px, jax.random.key(seed))
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, t):
        loss, g = jax.value_and_grad(_classifier_loss)(params, x, t)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.choice(pool, batch_size, replace=False)
        x = jnp.asarray(images[idx].astype(np.float32) / 127.5 - 1.0)
        params, opt, loss = step(params, opt, x, {k: jnp.asarray(v[idx]) for k, v in targets.items()})
        if progress is not None:
            progress(i + 1, float(loss) if (i + 1) % 100 == 0 else None)
    test_imgs, _, test_scenes = sc.sample_scenes(2000, seed=seed + 2000, px=px, shapes=ALL_SHAPES, two_objects=0.5)
    pred = predict_attributes(params, test_imgs)
    acc = float(np.mean([p == s for p, s in zip(pred, test_scenes)]))
    return params, acc


def predict_attributes(params: dict, images: np.ndarray, batch: int = 500) -> list:
    """The scene each image shows, by the classifier (``uint8`` images, or floats in [-1, 1]);
    a predicted scene that breaks the grammar (two objects not opposite) is returned as a
    ``dict`` of its parts rather than a ``Scene``."""
    out = []
    fn = jax.jit(classify_logits)
    for i in range(0, len(images), batch):
        x = images[i: i + batch]
        x = jnp.asarray(x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x)
        lg = jax.device_get(fn(params, x))
        for b in range(x.shape[0]):
            objs = []
            for j, pos in enumerate(POSITION_NAMES):
                s = int(np.argmax(lg["shape"][b, j]))
                if s:
                    objs.append(sc.SceneObject(ALL_SHAPES[s - 1], _COLOURS[int(np.argmax(lg["colour"][b, j]))],
                                               _SIZES[int(np.argmax(lg["size"][b, j]))], pos))
            bg = _BGS[int(np.argmax(lg["background"][b]))]
            try:
                out.append(sc.Scene(tuple(objs), bg))
            except UserError:
                out.append({"objects": tuple(objs), "background": bg})
    return out
