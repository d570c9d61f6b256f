"""``jaxkv analyze mamba-states``: Stuffed Mamba's state-collapse measurements on a Mamba-2.

One long token stream, or several of one length read side by side as a batch (``tokens [R, T]``:
each starts from the zero state, and every per-position quantity is their mean, so that what a
position costs is not what the text there happens to be), is read in chunks of ``chunk`` tokens,
the state carried from chunk to chunk (memory bounded by the chunk, not the stream), and the
analysis reports:

* **per-position loss**: each token's next-token NLL (the mean over the streams), averaged over
  bins of ``train_len`` tokens
  (T_train, the length the model was trained at), and the mean over the bins ending at 1x, 4x
  and 16x T_train, without and with each mitigation (``StateMitigation``: the window form runs
  the stream in one forward, since each output reads only its last ``window`` tokens);
* **per-head state norms** after every chunk (``[chunks, L, H]``, the mean over the streams):
  the collapse shows as a few heads whose norm keeps growing;
* **cumulative decay** per head over the whole stream, ``prod_t a_t`` (the geometric mean over
  the streams): heads near 1 never forget the first token.

``analyze_mamba_states(params, config, tokens, out, ...)`` writes ``mamba_states.json`` and
``mamba_states.png`` into ``out`` and returns the JSON dict.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.errors import UserError
from jaxkv.fileio import json_text, save_figure, write_text_atomic

__all__ = ["analyze_mamba_states", "stream_nll"]


def stream_nll(params, config, tokens: np.ndarray, *, chunk: int, mitigation=None, with_states: bool = False):
    """``nll [T - 1]`` of one stream (``tokens [T]``), or ``[R, T - 1]`` of streams read side by
    side (``tokens [R, T]``), in chunks of ``chunk`` with the state carried; with ``with_states``
    also ``(norms [chunks, L, H], log_decay [L, H])``, each the mean over the streams."""
    from jaxkv.models.mamba2 import forward

    tokens = np.asarray(tokens)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise UserError(f"chunk must be a positive int, got {chunk!r}")
    if with_states and mitigation is not None and mitigation.window is not None:
        raise UserError("with_states: the window mitigation reads the stream in one forward, with no state "
                        "after each chunk to report; ask for the states without it")
    single = tokens.ndim == 1
    ids = jnp.asarray(np.atleast_2d(tokens), jnp.int32)
    t = ids.shape[1]
    step = jax.jit(lambda p, x, s: forward(p, x, None, s, config=config, mitigation=mitigation,
                                           return_log_decay=True))
    if mitigation is not None and mitigation.window is not None:  # each output reads its last tokens: one pass
        logits, _, _ = jax.jit(lambda p, x: forward(p, x, config=config, mitigation=mitigation,
                                                    return_log_decay=True))(params, ids)
        logps = [jax.nn.log_softmax(logits, -1)]
        norms, decay = [], None
    else:
        state, logps, norms, decay = None, [], [], 0.0
        for start in range(0, t, chunk):
            logits, state, d = step(params, ids[:, start:start + chunk], state)
            logps.append(jax.nn.log_softmax(logits, -1))
            decay = decay + jnp.mean(d, axis=1)  # [L, B, H] -> [L, H]: the log of the geometric mean
            if with_states:
                norms.append(np.stack([np.asarray(jnp.mean(jnp.sqrt(jnp.sum(s.ssm ** 2, axis=(2, 3))), axis=0))
                                       for s in state.layers]))
    logp = jnp.concatenate(logps, axis=1)[:, :-1]
    nll = -np.asarray(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0])
    nll = nll[0] if single else nll
    if with_states:
        return nll, np.stack(norms), np.asarray(decay)
    return nll


def _at(nll: np.ndarray, train_len: int, k: int) -> float | None:
    """Mean NLL over the bin of T_train positions ending at k x T_train, ``loss_by_bin[k - 1]``
    (None past the stream)."""
    lo, hi = (k - 1) * train_len, k * train_len
    return float(nll[lo:hi].mean()) if hi <= len(nll) else None


def analyze_mamba_states(params, config, tokens: np.ndarray, out: str | os.PathLike, *, train_len: int,
                         chunk: int = 512, mitigations: dict | None = None) -> dict:
    """See the module docstring; ``tokens``: ``[T]`` or ``[R, T]``; ``mitigations`` maps a name
    to a ``StateMitigation``."""
    tokens = np.asarray(tokens)
    for name, v in (("train_len", train_len), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise UserError(f"{name} must be a positive int, got {v!r}")
    if tokens.ndim not in (1, 2) or tokens.shape[-1] < 2 * train_len or tokens.size == 0:
        raise UserError(f"tokens must be one stream [T] or streams [R, T] of at least 2 x train_len "
                        f"({2 * train_len}) tokens, got shape {tokens.shape}")
    rows = np.atleast_2d(tokens)
    nll, norms, decay = stream_nll(params, config, rows, chunk=chunk, with_states=True)
    runs = {"none": nll.mean(0)}
    for name, m in (mitigations or {}).items():
        runs[name] = stream_nll(params, config, rows, chunk=chunk, mitigation=m).mean(0)
    nll = runs["none"]
    bins = len(nll) // train_len
    report = {
        "stream": {"tokens": int(rows.shape[1]), "streams": int(rows.shape[0]), "train_len": train_len,
                   "chunk": chunk, "state_elements": config.state_elements},
        "loss_by_bin": {name: [float(v[i * train_len:(i + 1) * train_len].mean()) for i in range(bins)]
                        for name, v in runs.items()},
        "loss_at": {name: {f"{k}x": _at(v, train_len, k) for k in (1, 4, 16)} for name, v in runs.items()},
        "state_norms": {"after_tokens": [min(rows.shape[1], (i + 1) * chunk) for i in range(len(norms))],
                        "norms": norms.round(5).tolist()},
        "cumulative_decay": np.exp(decay).tolist(),
        "heads_retaining_the_first_token": int(np.sum(np.exp(decay) > 0.997)),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "mamba_states.json", json_text(report, indent=1) + "\n")
    _plot(report, out / "mamba_states.png")
    return report


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report["stream"]["train_len"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, losses in report["loss_by_bin"].items():
        axes[0].plot(np.arange(1, len(losses) + 1) * tl, losses, marker=".", label=name)
    axes[0].axvline(tl, color="grey", ls="--", lw=0.8, label="T_train")
    axes[0].set(title="next-token loss by position", xlabel="position (end of a T_train bin)", ylabel="NLL",
                xscale="log")
    axes[0].legend()
    norms = np.array(report["state_norms"]["norms"])  # [chunks, L, H]
    x = report["state_norms"]["after_tokens"]
    for li in range(norms.shape[1]):
        for h in range(norms.shape[2]):
            axes[1].plot(x, norms[:, li, h], lw=0.8)
    axes[1].set(title="state norm per head", xlabel="tokens read", ylabel="||h||", xscale="log", yscale="log")
    decay = np.array(report["cumulative_decay"])
    im = axes[2].imshow(decay.T, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1)
    axes[2].set(title="cumulative decay over the stream", xlabel="layer", ylabel="head")
    fig.colorbar(im, ax=axes[2])
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
