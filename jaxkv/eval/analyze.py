"""``jaxkv analyze``: the measurements two cache papers argue from, on any model.

* **Adjacent-layer KV similarity** (MiniCache): the model reads one prompt (a harness sample);
  for every layer ``l >= 1`` the cosine similarity between the key (and value) vectors of
  layers ``l`` and ``l - 1``, per token and KV head, averaged over both. MiniCache merges the
  top half of the layers because this is high there.
* **Retrieval-head scores** (RazorAttention): the data-free echo and induction scores ``[L, K]``
  of ``jaxkv.cache.razor.head_scores`` and the heads ``razor`` would keep whole.

``analyze(params, config, tokenizer, out)`` writes ``analysis.json`` and ``analysis.png`` into
``out`` and returns the JSON dict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxkv.fileio import save_figure, write_text_atomic

__all__ = ["adjacent_layer_similarity", "analyze"]


def adjacent_layer_similarity(xs: list[np.ndarray], valid: np.ndarray) -> np.ndarray:
    """``xs``: one ``[K, S, H]`` array per layer; ``valid [S]`` marks filled slots. Returns
    ``[L - 1]``: mean over valid tokens and heads of cos(x_l, x_{l-1}), for l = 1..L-1."""
    out = []
    for prev, cur in zip(xs[:-1], xs[1:]):
        a, b = np.asarray(prev, np.float64), np.asarray(cur, np.float64)
        cos = np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
        out.append(float(cos[:, valid].mean()))
    return np.array(out)


def analyze(params, config, tokenizer, out: str | os.PathLike, *, task: str = "niah_single", length: int = 2048,
            seed: int = 0, n_tokens: int = 512) -> dict:
    from jaxkv.cache import init_cache
    from jaxkv.cache.razor import RazorCache, head_scores, select_heads
    from jaxkv.eval.tasks import make_sample
    from jaxkv.generate import pad_prompts
    from jaxkv.models.llama import forward

    out = Path(out)
    sample = make_sample(task, tokenizer, length=length, depth=0.5, seed=seed)
    tokens, positions, _ = pad_prompts([sample.prompt_ids])
    cache = init_cache(config, "full", batch=1, max_len=tokens.shape[1], dtype=params["embed"]["embedding"].dtype)
    _, cache = forward(params, jnp.asarray(tokens), jnp.asarray(positions), cache, config=config)
    valid = np.asarray(cache.layers[0].positions[0, 0]) >= 0
    keys = [np.asarray(layer.k[0], np.float32) for layer in cache.layers]
    values = [np.asarray(layer.v[0], np.float32) for layer in cache.layers]
    k_sim = adjacent_layer_similarity(keys, valid)
    v_sim = adjacent_layer_similarity(values, valid)
    echo, induction = head_scores(params, config, n_tokens=n_tokens, seed=seed)
    defaults = RazorCache()
    heads = select_heads(echo, induction, induction_share=defaults.induction_share, echo_share=defaults.echo_share)
    report = {
        "prompt": {"task": task, "length": len(sample.prompt_ids), "seed": seed},
        "adjacent_layer_similarity": {"layers": list(range(1, config.num_layers)),
                                      "key": k_sim.round(6).tolist(), "value": v_sim.round(6).tolist()},
        "retrieval_heads": {"echo": echo.round(6).tolist(), "induction": induction.round(6).tolist(),
                            "selected": [list(h) for h in heads],
                            "share": sum(map(len, heads)) / (config.num_layers * config.num_kv_heads),
                            "n_tokens": n_tokens},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "analysis.json", json.dumps(report, indent=1) + "\n")
    _plot(report, config, out / "analysis.png")
    return report


def _plot(report: dict, config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    sim = report["adjacent_layer_similarity"]
    heads = report["retrieval_heads"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(sim["layers"], sim["key"], marker="o", label="keys")
    axes[0].plot(sim["layers"], sim["value"], marker="o", label="values")
    axes[0].axvline(config.num_layers / 2, color="grey", ls="--", lw=0.8, label="MiniCache start (L/2)")
    axes[0].set(title="cos(layer l, layer l-1)", xlabel="layer l", ylabel="mean cosine similarity")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    for ax, key in zip(axes[1:], ("induction", "echo")):
        scores = np.array(heads[key])
        im = ax.imshow(scores.T, aspect="auto", origin="lower", cmap="viridis")
        for layer, chosen in enumerate(heads["selected"]):
            for h in chosen:
                ax.scatter(layer, h, marker="s", facecolors="none", edgecolors="red", s=40)
        ax.set(title=f"{key} score (red: retrieval heads)", xlabel="layer", ylabel="KV head")
        fig.colorbar(im, ax=ax)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1:]:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    save_figure(fig, path)
