"""AlignIT's test bed: a caption tokenizer, a text encoder with causal self-attention (as CLIP's:
a learned token changes every later token's state), and a small DiT image generator whose blocks
read the text through cross-attention, trained by rectified flow on the procedural scenes.

Everything is a pure function of a parameter pytree (plain dicts of arrays), so the training
spine (``jaxkv.training``: optax step, orbax checkpoints, resume, metrics) trains it as it trains
the language models, and customization methods fine-tune subsets of it.

* ``Vocab``: the caption grammar's words, ``<pad>``, and concept slots ``<c0>``, ``<c1>`` (their
  embeddings exist from the start but no training caption uses them: textual inversion learns
  one).
* ``encode_text(params, tokens)``: ``[B, T] -> [B, T, D_text]`` states (pre-LN blocks, causal).
* ``generator_kv(params)``: the generator's ``jaxkv.alignit.LinearKV`` (one ``W_k``/``W_v`` per
  block), the provider AlignIT splices with.
* ``denoise(params, x_t, t, kv)``: the velocity ``[B, H, W, 3]`` of rectified flow at noisy images
  ``x_t`` and times ``t`` given per-block cross-attention ``kv`` (from ``generator_kv(...)
  .project`` or ``align_kv``), with the padding of the text masked out (``text_mask``).
* ``flow_loss`` and ``sample`` (Euler steps from noise at t = 1 to an image at t = 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.alignit.kv import LinearKV
from jaxkv.alignit.scenes import BACKGROUNDS, COLOURS, POSITIONS, SIZES, TRAIN_SHAPES
from jaxkv.errors import UserError

__all__ = ["TestbedConfig", "Vocab", "init_testbed", "encode_text", "generator_kv", "denoise", "flow_loss",
           "sample", "text_mask"]

PAD = "<pad>"
CONCEPTS = ("<c0>", "<c1>")


@dataclasses.dataclass(frozen=True)
class TestbedConfig:
    """Sizes of the test bed: images ``px`` square, patches ``patch`` square; a text encoder of
    ``text_layers`` blocks of width ``text_width``; a DiT of ``layers`` blocks of width ``width``."""

    px: int = 32
    patch: int = 4
    width: int = 192
    layers: int = 4
    heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_words: int = 24

    def __post_init__(self):
        if self.px % self.patch:
            raise UserError(f"px ({self.px}) must be a multiple of patch ({self.patch})")
        if self.width % self.heads or self.text_width % self.text_heads:
            raise UserError("width and text_width must be multiples of their head counts")


class Vocab:
    """Word-level vocabulary of the caption grammar (every word of every caption), plus the pad
    and the concept slots."""

    def __init__(self):
        words = {"a", "and", "on", "background", "the", "at", "in", "middle", "left", "right", "top", "bottom"}
        for group in (SIZES, COLOURS, TRAIN_SHAPES, BACKGROUNDS):
            words |= set(group)
        for p in POSITIONS:
            words |= set(p.split())
        self.words = (PAD, *CONCEPTS, *sorted(words))
        self.ids = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, *, length: int) -> np.ndarray:
        """``int32 [length]``: the words' ids, padded with ``<pad>`` (0)."""
        ids = []
        for w in text.split():
            if w not in self.ids:
                raise UserError(f"{w!r} is not a word of the test bed's vocabulary (a new concept is written "
                                f"{' or '.join(CONCEPTS)})")
            ids.append(self.ids[w])
        if len(ids) > length:
            raise UserError(f"the caption has {len(ids)} words, more than {length}: {text!r}")
        return np.array(ids + [0] * (length - len(ids)), np.int32)

    def encode_batch(self, texts: Sequence[str], *, length: int) -> np.ndarray:
        return np.stack([self.encode(t, length=length) for t in texts])


def _dense(key, d_in, d_out, scale=1.0):
    return jax.random.normal(key, (d_in, d_out), jnp.float32) * (scale / math.sqrt(d_in))


def _block(key, d, d_ctx=None):
    k = jax.random.split(key, 8)
    p = {"ln1": jnp.ones((d,)), "wqkv": _dense(k[0], d, 3 * d), "wo": _dense(k[1], d, d, 0.5),
         "ln2": jnp.ones((d,)), "w1": _dense(k[2], d, 4 * d), "w2": _dense(k[3], 4 * d, d, 0.5)}
    if d_ctx is not None:  # a DiT block: cross-attention and the time modulation
        p.update({"lnx": jnp.ones((d,)), "wq_x": _dense(k[4], d, d), "wk_x": _dense(k[5], d_ctx, d),
                  "wv_x": _dense(k[6], d_ctx, d), "wo_x": _dense(k[7], d, d, 0.5),
                  "mod": jnp.zeros((d, 6 * d))})
    return p


def init_testbed(config: TestbedConfig, vocab_size: int, key) -> dict:
    """Random parameters of the text encoder and the generator."""
    kt, kg = jax.random.split(key)
    kt = jax.random.split(kt, config.text_layers + 2)
    kg = jax.random.split(kg, config.layers + 4)
    n_patch = (config.px // config.patch) ** 2
    patch_dim = config.patch * config.patch * 3
    text = {"embed": jax.random.normal(kt[0], (vocab_size, config.text_width)) * 0.02,
            "pos": jax.random.normal(kt[1], (config.max_words, config.text_width)) * 0.02,
            "blocks": [_block(kt[2 + i], config.text_width) for i in range(config.text_layers)],
            "ln_f": jnp.ones((config.text_width,))}
    gen = {"patch_in": _dense(kg[0], patch_dim, config.width),
           "pos": jax.random.normal(kg[1], (n_patch, config.width)) * 0.02,
           "time1": _dense(kg[2], 64, config.width), "time2": _dense(kg[3], config.width, config.width),
           "blocks": [_block(kg[4 + i], config.width, config.text_width) for i in range(config.layers)],
           "ln_f": jnp.ones((config.width,)), "patch_out": jnp.zeros((config.width, patch_dim))}
    return {"text": text, "gen": gen}


def _rms(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w


def _attend(q, k, v, heads, mask=None):
    b, tq, d = q.shape
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d // heads)  # noqa: E731
    s = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(d // heads)
    if mask is not None:
        s = jnp.where(mask, s, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), split(v)).reshape(b, tq, d)


def text_mask(tokens) -> jax.Array:
    """``[B, T]`` True at real words (not ``<pad>``)."""
    return tokens != 0


def encode_text(params: dict, tokens, config: TestbedConfig) -> jax.Array:
    """The text encoder's states ``[B, T, text_width]`` (causal self-attention)."""
    p = params["text"]
    t = tokens.shape[1]
    x = p["embed"][tokens] + p["pos"][:t]
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    for blk in p["blocks"]:
        h = _rms(x, blk["ln1"])
        q, k, v = jnp.split(h @ blk["wqkv"], 3, axis=-1)
        x = x + _attend(q, k, v, config.text_heads, causal) @ blk["wo"]
        x = x + jax.nn.gelu(_rms(x, blk["ln2"]) @ blk["w1"]) @ blk["w2"]
    return _rms(x, p["ln_f"])


def generator_kv(params: dict) -> LinearKV:
    """The generator's cross-attention K/V provider: block ``i``'s ``(W_k, W_v)`` as layer ``"block{i}"``."""
    return LinearKV({f"block{i}": (blk["wk_x"], blk["wv_x"]) for i, blk in enumerate(params["gen"]["blocks"])})


def _time_features(t):
    freqs = jnp.exp(-math.log(1000.0) * jnp.arange(32) / 32)
    a = t[:, None] * 1000.0 * freqs[None]
    return jnp.concatenate([jnp.sin(a), jnp.cos(a)], axis=-1)


def _patchify(x, p):
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def _unpatchify(x, p, px):
    b, n, _ = x.shape
    g = px // p
    return x.reshape(b, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, px, px, 3)


def denoise(params: dict, x_t, t, kv: dict, mask, config: TestbedConfig) -> jax.Array:
    """Rectified flow's velocity ``[B, px, px, 3]`` at ``x_t`` and times ``t [B]``, the text read
    through the per-block cross-attention ``kv`` (``{"block{i}": (k, v)}``, ``[B, T, width]``)
    with ``mask [B, T]`` (True: a real word)."""
    g = params["gen"]
    x = _patchify(x_t, config.patch) @ g["patch_in"] + g["pos"]
    temb = jax.nn.silu(_time_features(t) @ g["time1"]) @ g["time2"]
    cross_mask = mask[:, None, None, :]
    for i, blk in enumerate(g["blocks"]):
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(jax.nn.silu(temb) @ blk["mod"], 6, axis=-1)
        h = _rms(x, blk["ln1"]) * (1 + scale1[:, None]) + shift1[:, None]
        q, k, v = jnp.split(h @ blk["wqkv"], 3, axis=-1)
        x = x + gate1[:, None] * (_attend(q, k, v, config.heads) @ blk["wo"])
        kx, vx = kv[f"block{i}"]
        x = x + _attend(_rms(x, blk["lnx"]) @ blk["wq_x"], kx, vx, config.heads, cross_mask) @ blk["wo_x"]
        h = _rms(x, blk["ln2"]) * (1 + scale2[:, None]) + shift2[:, None]
        x = x + gate2[:, None] * (jax.nn.gelu(h @ blk["w1"]) @ blk["w2"])
    return _unpatchify(_rms(x, g["ln_f"]) @ g["patch_out"], config.patch, config.px)


def _kv_of(params, tokens, config):
    states = encode_text(params, tokens, config)
    provider = generator_kv(params)
    return {layer: provider.project(layer, states) for layer in provider.layers()}


def flow_loss(params: dict, batch: dict, config: TestbedConfig) -> tuple[jax.Array, jax.Array]:
    """``(sum of squared velocity errors, count)`` for ``batch`` = images ``[b, px, px, 3]`` in
    [-1, 1], ``tokens [b, T]``, ``noise`` like the images and ``t [b]`` (or ``[b, 1]``) in (0, 1):
    ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``."""
    x0, noise, t = batch["images"], batch["noise"], batch["t"].reshape(-1)
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
    pred = denoise(params, x_t, t, _kv_of(params, batch["tokens"], config), text_mask(batch["tokens"]), config)
    err = jnp.square(pred - (noise - x0))
    return jnp.sum(err), jnp.float32(err.size)


def sample(params: dict, kv: dict, mask, key, config: TestbedConfig, *, steps: int = 30) -> jax.Array:
    """Images ``[B, px, px, 3]`` in [-1, 1]: Euler steps of the learned flow from noise at t = 1
    to t = 0, the text given as per-block cross-attention ``kv`` (AlignIT's or the model's own)."""
    b = mask.shape[0]
    x = jax.random.normal(key, (b, config.px, config.px, 3))
    ts = jnp.linspace(1.0, 0.0, steps + 1)

    def step(x, i):
        t0, t1 = ts[i], ts[i + 1]
        v = denoise(params, x, jnp.full((b,), t0), kv, mask, config)
        return x + (t1 - t0) * v, None

    x, _ = jax.lax.scan(step, x, jnp.arange(steps))
    return jnp.clip(x, -1.0, 1.0)
