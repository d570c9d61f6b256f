"""``jaxkv analyze rope-precision``: AnchorAttention's measurement of how bf16 breaks RoPE's
relative-position property, on any Llama-family model.

RoPE makes attention depend on position differences only, so shifting every position of a
sequence by ``Δ`` should leave the attention maps unchanged. In low precision it does not. For
attention weights ``A^{l,h}(Δ)`` ``[T, T]`` of the sequence placed at positions ``Δ, Δ+1, ...``:

    D(Δ1, Δ2) = Σ_{l,h} Σ_i n_i Σ_j |A_ij(Δ1) - A_ij(Δ2)|,   n = (1/T, 1/(T-1), ..., 1)

(the paper's weights: row ``i`` sees ``i + 1`` keys). Reported per compute dtype and length:

* ``D`` for ``Δ1 = 0`` against each shift ``Δ2`` (fp32 should give ≈ 0);
* the **per-column share** of D: how much of the deviation falls on key ``j`` (the first token,
  the attention sink, carries most of it in the paper);
* the **first-token logit difference**: the mean over layers, heads and queries of
  ``|S_i0(Δ1) - S_i0(Δ2)|``, the pre-softmax score of the first key, beside the same mean over
  the other keys; it grows with length in the paper.

Two RoPE roundings are measured in 16-bit: ``jaxkv`` (the rotation computed in fp32 and rounded
once, as jaxkv's models do) and ``hf`` (cos and sin rounded to the compute dtype and the rotation
done there, as transformers does, which is what the paper measured). Only the analysed maps use
the ``hf`` rounding; the residual stream feeding each layer is jaxkv's forward at that dtype.

``analyze_rope_precision(params, config, tokens, out, ...)`` writes ``rope_precision.json`` and
``rope_precision.png`` into ``out`` and returns the JSON dict.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkv.attention import attention_scores
from jaxkv.errors import UserError
from jaxkv.fileio import save_figure, write_text_atomic
from jaxkv.models.layers import apply_rope, rope_angles, rope_inv_freq
from jaxkv.models.llama import _graphdef, attention_inputs

__all__ = ["rope_deviation", "analyze_rope_precision", "ROPE_ROUNDINGS"]

ROPE_ROUNDINGS = ("jaxkv", "hf")


def _rope(x, cos, sin, rounding):
    if rounding == "jaxkv":
        return apply_rope(x, cos, sin)
    c, s = cos.astype(x.dtype)[:, :, None], sin.astype(x.dtype)[:, :, None]  # transformers' rounding
    half = x.shape[-1] // 2
    return x * c + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * s


def _maps(model, params, config, tokens, shift, dtype, rounding):
    """Per layer: (scores, weights) ``[N, T, T]`` fp32 of row 0 at positions ``shift + arange(T)``."""
    t = tokens.shape[1]
    positions = shift + jnp.arange(t, dtype=jnp.int32)[None]
    xs = attention_inputs(params, tokens, positions, config=config, compute_dtype=dtype)
    cos, sin = rope_angles(positions, rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
    kh, g, h = config.num_kv_heads, config.group_size, config.head_dim
    for layer, x in zip(model.layers, xs):
        attn = layer.attn
        q = _rope(attn.q(x).reshape(1, t, kh * g, h), cos, sin, rounding).reshape(1, t, kh, g, h)
        k = _rope(attn.k(x).reshape(1, t, kh, h), cos, sin, rounding).transpose(0, 2, 1, 3)
        s = attention_scores(q, k, positions, positions)[0].reshape(kh * g, t, t)
        yield s, jax.nn.softmax(s, axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "rounding"))
def rope_deviation(params, tokens, shift1, shift2, *, config, dtype, rounding: str = "jaxkv") -> dict:
    """The module doc's measurements for one ``[1, T]`` token row and one pair of shifts:
    ``D``, ``column [T]`` (D split by key), ``first_logit`` and ``other_logit`` (mean absolute
    score differences at the first key and at the others), ``first_weight`` (mean attention
    weight of the first key at ``shift1``)."""
    model = nnx.merge(_graphdef(config), params)
    t = tokens.shape[1]
    n = 1.0 / (t - jnp.arange(t, dtype=jnp.float32))  # (1/T, 1/(T-1), ..., 1)
    causal = jnp.tril(jnp.ones((t, t), bool))
    others = causal & (jnp.arange(t) > 0)[None]
    col = jnp.zeros((t,), jnp.float32)
    first = other = weight = 0.0
    for (s1, a1), (s2, a2) in zip(_maps(model, params, config, tokens, shift1, dtype, rounding),
                                  _maps(model, params, config, tokens, shift2, dtype, rounding)):
        col = col + jnp.sum(n[None, :, None] * jnp.abs(a1 - a2), axis=(0, 1))
        ds = jnp.abs(jnp.where(causal, s1 - s2, 0.0))
        first = first + jnp.mean(ds[:, :, 0])
        other = other + jnp.sum(jnp.where(others, ds, 0.0)) / (jnp.sum(others) * ds.shape[0])
        weight = weight + jnp.mean(a1[:, :, 0])
    layers = config.num_layers
    return {"D": jnp.sum(col), "column": col, "first_logit": first / layers, "other_logit": other / layers,
            "first_weight": weight / layers}


def analyze_rope_precision(params, config, tokens: np.ndarray, out: str | os.PathLike, *,
                           lengths=(256, 512, 1024), shifts=(1, 16, 256, 1024),
                           dtypes=("float32", "bfloat16")) -> dict:
    """Measure ``tokens`` (one long 1-D id stream; its first ``length`` tokens per length) at every
    length x shift x dtype (x RoPE rounding in 16-bit); write JSON + PNG into ``out``."""
    tokens = np.asarray(tokens, np.int32)
    lengths, shifts = sorted(set(int(x) for x in lengths)), sorted(set(int(x) for x in shifts))
    if not lengths or min(lengths) < 2 or not shifts or min(shifts) < 1:
        raise UserError("lengths must be >= 2 tokens and shifts >= 1 position")
    if max(lengths) > len(tokens):
        raise UserError(f"the text has {len(tokens)} tokens, fewer than the longest length ({max(lengths)})")
    if max(lengths) + max(shifts) > config.max_position_embeddings:
        raise UserError(f"length {max(lengths)} + shift {max(shifts)} exceeds the model's context of "
                        f"{config.max_position_embeddings} positions")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dtype in dtypes:
        cast = jax.tree.map(lambda x: x.astype(dtype), params)
        for rounding in ("jaxkv",) if jnp.dtype(dtype) == jnp.float32 else ROPE_ROUNDINGS:
            for length in lengths:
                row_tokens = jnp.asarray(tokens[None, :length])
                for shift in shifts:
                    r = jax.device_get(rope_deviation(cast, row_tokens, 0, shift, config=config,
                                                      dtype=jnp.dtype(dtype), rounding=rounding))
                    col = np.asarray(r["column"], np.float64)
                    rows.append({"dtype": dtype, "rope_rounding": rounding, "length": length, "shift": shift,
                                 "D": float(r["D"]), "first_token_share": float(col[0] / max(col.sum(), 1e-30)),
                                 "first_logit_diff": float(r["first_logit"]),
                                 "other_logit_diff": float(r["other_logit"]),
                                 "first_token_weight": float(r["first_weight"]),
                                 "column_share_head": (col[:32] / max(col.sum(), 1e-30)).tolist()})
    report = {"model": {"layers": config.num_layers, "heads": config.num_heads, "rope_theta": config.rope_theta},
              "metric": "D(0, shift) = sum_{l,h} sum_i n_i sum_j |A_ij(0) - A_ij(shift)|, n = (1/T, ..., 1)",
              "rows": rows}
    write_text_atomic(out / "rope_precision.json", json.dumps(report, indent=2))
    _plot(report, out / "rope_precision.png")
    return report


def _plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    longest = max(r["length"] for r in rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key in sorted({(r["dtype"], r["rope_rounding"]) for r in rows}):
        sel = [r for r in rows if (r["dtype"], r["rope_rounding"]) == key and r["length"] == longest]
        axes[0].plot([r["shift"] for r in sel], [max(r["D"], 1e-12) for r in sel], "o-", label=f"{key[0]} ({key[1]} RoPE)")
        by_len = {}
        for r in rows:
            if (r["dtype"], r["rope_rounding"]) == key:
                by_len.setdefault(r["length"], []).append(max(r["first_logit_diff"], 1e-12))
        axes[2].plot(sorted(by_len), [np.mean(by_len[n]) for n in sorted(by_len)], "o-", label=f"{key[0]} ({key[1]})")
    axes[0].set(xscale="log", yscale="log", xlabel="shift Δ", ylabel="D(0, Δ)", title=f"deviation, T = {longest}")
    axes[0].legend(fontsize=8)
    worst = max((r for r in rows if r["dtype"] != "float32"), key=lambda r: r["D"], default=rows[-1])
    axes[1].bar(range(len(worst["column_share_head"])), worst["column_share_head"])
    axes[1].set(xlabel="key position j", ylabel="share of D",
                title=f"where D falls ({worst['dtype']}, T {worst['length']}, Δ {worst['shift']})")
    axes[2].set(xlabel="length T", ylabel="mean |ΔS_i0|", xscale="log", yscale="log",
                title="first-token logit difference")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
