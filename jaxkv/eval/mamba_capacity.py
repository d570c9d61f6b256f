"""``jaxkv analyze mamba-capacity``: Stuffed Mamba's state-capacity sweep, measured and fitted.

The sweep is a set of Mamba-2 runs (``jaxkv train mamba`` folders) of several state sizes N_S
(``Mamba2Config.state_elements``: layers x heads x head_dim x state_size) and training lengths
T_train (the run's ``segment_len``). Each run is measured once (``measure_run``) and the
measurements are combined (``capacity``):

* **T_forget** of a state size: the smallest T_train among its runs whose per-position loss stays
  flat beyond T_train. "Flat" is measured against the same tokens read with a context the model
  was trained on (``windowed_nll``: windows of T_train tokens, each from the zero state, every
  token scored with between T_train / 2 and T_train tokens before it), so that what the text at
  a position costs cancels: ``forgets`` when no log2-spaced bin of positions past T_train is
  worse read with the whole stream than read that way by more than ``tolerance`` nats. The
  paper's reading: a model trained on contexts too short for its state never learns to forget,
  and its loss explodes past T_train; one trained long enough does not. (The paper plots the
  loss against the position; the windowed reference is jaxkv's, since a few streams of text
  are not enough to average the content out of a position curve.)
* **T_recall** of a state size: the longest passkey context (``jaxkv.eval.tasks``' ``passkey``,
  greedy, 5 digits) that one of its runs answers at >= 95%, counted over consecutive lengths from
  the shortest (a model that fails at 256 and passes at 512 by chance recalls 128).
* **Fits**, in the paper's units (thousands of tokens against millions of state elements):
  ``T_forget = a N_S + b`` by least squares, and ``T_recall = a (b^N_S - 1) + c`` by a search over
  ``b`` with ``a, c`` by least squares at each; printed beside the paper's reported fits
  (``PAPER_FITS``, which it reports for far larger states than a small sweep reaches).

Each run's measurement is written to ``out/runs/<run>-<digest of its path>.json`` and reused when the
settings, the weights and the streams match,
so a sweep can be measured in pieces (one GPU call per few runs) and combined at the end.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from jaxkv.errors import UserError
from jaxkv.fileio import json_text, save_figure, write_text_atomic

__all__ = ["PAPER_FITS", "capacity", "fit_exponential", "fit_linear", "forgets", "loss_bins", "measure_run",
           "recall_length", "windowed_nll", "write_capacity"]

# Stuffed Mamba's reported fits (thousands of tokens vs millions of state elements).
PAPER_FITS = {"t_forget": {"form": "a*N + b", "a": 5.172, "b": -4.469},
              "t_recall": {"form": "a*(b**N - 1) + c", "a": 4.756, "b": 1.365, "c": -0.742}}
RECALL_THRESHOLD = 0.95


def windowed_nll(params, config, tokens: np.ndarray, *, train_len: int, rows_per_call: int = 256) -> np.ndarray:
    """``nll [R, T - 1]`` of ``tokens [R, T]`` as the model reads them within its training length:
    windows of ``train_len`` tokens every ``train_len / 2``, each from the zero state; position i
    (the loss of token i + 1) is scored in the window where it has between ``train_len / 2`` and
    ``train_len - 1`` tokens of context. NaN where no window reaches (the first ``train_len / 2 - 1``
    positions and the tail past the last whole window)."""
    import jax
    import jax.numpy as jnp

    from jaxkv.models.mamba2 import forward

    tokens = np.atleast_2d(np.asarray(tokens, np.int32))
    r, t = tokens.shape
    w = int(train_len)
    if w < 2 or w % 2:
        raise UserError(f"train_len must be an even number >= 2, got {train_len}")
    h = w // 2
    starts = np.arange(0, t - w + 1, h)
    if len(starts) == 0:
        raise UserError(f"streams of {t} tokens are shorter than one window of {w}")
    windows = np.stack([tokens[:, s:s + w] for s in starts], axis=1).reshape(-1, w)  # [R * n, W]

    @jax.jit
    def nll_of(p, x):
        logp = jax.nn.log_softmax(forward(p, x, config=config)[0].astype(jnp.float32), axis=-1)[:, :-1]
        return -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1)[..., 0]

    out = []
    for lo in range(0, len(windows), rows_per_call):
        part = windows[lo:lo + rows_per_call]
        pad = rows_per_call - len(part) if len(windows) > rows_per_call else 0  # one shape: one compile
        got = np.asarray(nll_of(params, jnp.asarray(np.pad(part, ((0, pad), (0, 0))))))
        out.append(got[:len(part)])
    win = np.concatenate(out).reshape(r, len(starts), w - 1)
    nll = np.full((r, t - 1), np.nan)
    for k, s in enumerate(starts):
        nll[:, s + h - 1:s + w - 1] = win[:, k, h - 1:]
    return nll


def loss_bins(nll: np.ndarray, train_len: int, reference: np.ndarray | None = None) -> list[dict]:
    """The mean of the per-position loss ``nll [T]`` (the loss of predicting token i + 1) over
    the last half of the training window, ``[T_train / 2, T_train)``, then over log2-spaced bins
    ``[T_train 2^k, T_train 2^(k+1))`` as far as the stream reaches (a last partial bin is
    kept when it holds at least a quarter of its width); with ``reference [T]`` (the same
    positions read another way, e.g. ``windowed_nll``) each bin also carries its mean there
    (``reference``) and the mean difference over the positions both have (``excess``)."""
    nll = np.asarray(nll, np.float64)
    if nll.ndim != 1 or len(nll) < 2 * train_len:
        raise UserError(f"the loss curve must cover at least 2 x T_train ({2 * train_len}) positions, "
                        f"got {nll.shape}")

    def one(lo, hi):
        b = {"start": int(lo), "end": int(hi), "loss": float(nll[lo:hi].mean())}
        if reference is not None:
            ref = np.asarray(reference, np.float64)[lo:hi]
            ok = np.isfinite(ref)
            b["reference"] = float(ref[ok].mean()) if ok.any() else None
            b["excess"] = float((nll[lo:hi][ok] - ref[ok]).mean()) if ok.any() else None
        return b

    bins = [one(train_len // 2, train_len)]
    lo = train_len
    while lo < len(nll):
        hi = min(2 * lo, len(nll))
        if hi - lo < lo // 4:
            break
        bins.append(one(lo, hi))
        lo = 2 * lo
    return bins


def forgets(bins: list[dict], tolerance: float) -> tuple[bool, float]:
    """``(flat, excess)``: ``excess`` is how much worse the worst bin past T_train is (nats) than
    the same positions read within the training length (the bins' ``excess``), or, for bins
    without a reference, than the training window's last half; flat when it is at most
    ``tolerance``."""
    past = [b for b in bins[1:] if b.get("excess") is not None]
    if past:
        excess = max(b["excess"] for b in past)
    else:
        excess = max(b["loss"] for b in bins[1:]) - bins[0]["loss"]
    return bool(excess <= tolerance), float(excess)


def recall_length(accuracy: dict[int, float], threshold: float = RECALL_THRESHOLD) -> int:
    """The longest of the measured lengths up to which every length's accuracy is >= threshold
    (0 when the shortest already fails)."""
    best = 0
    for length in sorted(accuracy):
        if accuracy[length] < threshold:
            break
        best = length
    return best


def fit_linear(x, y) -> dict | None:
    """Least-squares ``y = a x + b``; None with fewer than two distinct x."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(np.unique(x)) < 2:
        return None
    a, b = np.polyfit(x, y, 1)
    return {"form": "a*N + b", "a": float(a), "b": float(b), "rmse": float(np.sqrt(np.mean((a * x + b - y) ** 2)))}


def fit_exponential(x, y, bases=None) -> dict | None:
    """Least-squares ``y = a (b^x - 1) + c``: for each ``b`` of a log-spaced grid (1.001 ... 1e6)
    the linear fit of ``a, c``, keeping the ``b`` of the smallest squared error; None with fewer
    than three distinct x."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(np.unique(x)) < 3:
        return None
    bases = np.exp(np.linspace(math.log(1.001), math.log(1e6), 4000)) if bases is None else np.asarray(bases)
    best = None
    for b in bases:
        with np.errstate(over="ignore", invalid="ignore"):
            f = np.power(b, x) - 1.0
        if not np.all(np.isfinite(f)):
            continue
        design = np.stack([f, np.ones_like(f)], axis=1)
        (a, c), *_ = np.linalg.lstsq(design, y, rcond=None)
        err = float(np.sum((design @ np.array([a, c]) - y) ** 2))
        if best is None or err < best[0] - 1e-12:
            best = (err, float(a), float(b), float(c))
    if best is None:
        return None
    err, a, b, c = best
    return {"form": "a*(b**N - 1) + c", "a": a, "b": b, "c": c, "rmse": math.sqrt(err / len(x))}


def _run_name(run: Path) -> str:
    return run.resolve().name


def _run_file(run: Path) -> str:
    """The measurement's file name: the folder's name and a digest of its whole path, so that two
    sweeps' ``t512`` folders measured into one ``out`` do not replace each other."""
    import hashlib

    return f"{_run_name(run)}-{hashlib.sha1(os.fspath(run.resolve()).encode()).hexdigest()[:8]}.json"


def _stream_digest(stream: np.ndarray) -> str:
    """The held-out streams' content: a measurement on other data (another --data of the same
    length) is not reused."""
    from jaxkv.training.data import data_fingerprint

    return data_fingerprint(list(np.atleast_2d(stream).astype(np.int64)))[:16]


def _weights_signature(run: Path) -> str:
    """Size and modification time of the run's weight files: a measurement of other weights
    (the run trained further, or replaced) is not reused."""
    files = sorted((Path(run) / "hf").glob("*.safetensors"))
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def measure_run(run: str | os.PathLike, stream: np.ndarray, *, passkey_lengths, samples: int, chunk: int = 512,
                tolerance: float = 0.05, seed: int = 0) -> dict:
    """One sweep run measured: its T_train and state size (from ``run.json`` and ``hf/``), the
    per-position loss of ``stream`` (``[R, T]`` held-out streams read side by side, each from
    the zero state) in ``loss_bins`` beside ``windowed_nll``'s, whether it forgets, and its passkey accuracy at each of
    ``passkey_lengths`` (``samples`` prompts each, depths spread evenly) and recall length."""
    from jaxkv.checkpoints import load_mamba2_checkpoint, load_tokenizer
    from jaxkv.eval.harness import EvalConfig, evaluate
    from jaxkv.eval.mamba_states import stream_nll

    run = Path(run)
    meta_path, hf = run / "run.json", run / "hf"
    if not meta_path.is_file() or not (hf / "config.json").is_file():
        raise UserError(f"--runs {run}: not a finished `jaxkv train mamba` folder (needs run.json and hf/)")
    meta = json.loads(meta_path.read_text())
    train_len = int(meta.get("segment_len") or meta["data"]["seq_len"])
    if train_len < 2 or train_len % 2:
        raise UserError(f"--runs {run}: trained at T_train {train_len} (--segment-len); the within-T_train "
                        "reading windows it in halves, so the sweep needs an even T_train >= 2")
    config, params = load_mamba2_checkpoint(hf)
    stream = np.atleast_2d(np.asarray(stream, np.int32))
    if int(stream.max()) >= config.vocab_size:
        raise UserError(f"--runs {run}: the data holds token id {int(stream.max())}, outside the model's "
                        f"vocabulary of {config.vocab_size}")
    if stream.shape[1] < 4 * train_len:
        raise UserError(f"--runs {run}: T_train {train_len} needs streams of >= 4 x T_train ({4 * train_len}) "
                        f"tokens to see past it; --length is {stream.shape[1]}")
    nll = stream_nll(params, config, stream, chunk=chunk).mean(0)
    windowed = windowed_nll(params, config, stream, train_len=train_len)
    seen = np.isfinite(windowed).sum(0)
    reference = np.where(seen > 0, np.nansum(windowed, axis=0) / np.maximum(seen, 1), np.nan)
    bins = loss_bins(nll, train_len, reference)
    flat, excess = forgets(bins, tolerance)
    rows = evaluate(params, config, load_tokenizer(hf),
                    EvalConfig(methods=("full",), tasks=("passkey",), lengths=tuple(passkey_lengths),
                               samples=samples, seed=seed))
    accuracy = {r.length: r.accuracy for r in rows}
    return {"run": _run_name(run), "train_len": train_len, "state_elements": config.state_elements,
            "layers": config.num_layers, "heads": config.num_heads, "head_dim": config.head_dim,
            "state_size": config.state_size, "steps": meta.get("steps"),
            "settings": {"tokens": int(stream.shape[1]), "streams": int(stream.shape[0]), "tolerance": tolerance,
                         "passkey_lengths": sorted(int(n) for n in passkey_lengths), "samples": samples,
                         "seed": seed, "weights": _weights_signature(run), "data": _stream_digest(stream)},
            "loss_bins": bins, "forgets": flat, "excess_loss": excess,
            "passkey": {str(k): float(v) for k, v in sorted(accuracy.items())},
            "recall_length": recall_length(accuracy)}


def capacity(measurements: list[dict]) -> dict:
    """Per state size (ascending): its runs' T_train, T_forget (None when no run forgets: it is
    then beyond the longest T_train tried) and T_recall; and the fits over the state sizes where
    each is known, in thousands of tokens against millions of state elements."""
    if not measurements:
        raise UserError("no runs measured")
    by_state: dict[int, list[dict]] = {}
    for m in measurements:
        by_state.setdefault(int(m["state_elements"]), []).append(m)
    table = []
    for n_s, ms in sorted(by_state.items()):
        ms = sorted(ms, key=lambda m: m["train_len"])
        flat = [m["train_len"] for m in ms if m["forgets"]]
        table.append({"state_elements": n_s, "train_lens": [m["train_len"] for m in ms],
                      "forgets": [m["forgets"] for m in ms], "excess_loss": [m["excess_loss"] for m in ms],
                      "t_forget": min(flat) if flat else None,
                      "t_forget_above": None if flat else max(m["train_len"] for m in ms),
                      "t_recall": max(m["recall_length"] for m in ms)})
    known = [r for r in table if r["t_forget"] is not None]
    fits = {"t_forget": fit_linear([r["state_elements"] / 1e6 for r in known], [r["t_forget"] / 1e3 for r in known]),
            "t_recall": fit_exponential([r["state_elements"] / 1e6 for r in table],
                                        [r["t_recall"] / 1e3 for r in table])}
    return {"table": table, "fits": fits, "paper_fits": PAPER_FITS}


def write_capacity(measurements: list[dict], out: str | os.PathLike) -> dict:
    """``capacity(measurements)`` written as ``out/capacity.json``, ``capacity.md`` and
    ``capacity.png``; returns the dict."""
    report = capacity(measurements)
    report["runs"] = sorted(measurements, key=lambda m: (m["state_elements"], m["train_len"]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "capacity.json", json_text(report, indent=1) + "\n")
    write_text_atomic(out / "capacity.md", capacity_markdown(report))
    _plot(report, out / "capacity.png")
    return report


def _fit_text(fit: dict | None) -> str:
    if fit is None:
        return "too few points"
    fit = {k: (0.0 if isinstance(v, float) and abs(v) < 1e-9 else v) for k, v in fit.items()}  # lstsq noise
    if fit["form"] == "a*N + b":
        return f"{fit['a']:.4g} N_S {fit['b']:+.4g}"
    return f"{fit['a']:.4g} ({fit['b']:.4g}^N_S - 1) {fit['c']:+.4g}"


def capacity_markdown(report: dict) -> str:
    """The sweep as Markdown: one row per run, then per state size, then the fits."""
    lines = ["| state elements | T_train | loss past T_train (worst bin, vs read within T_train) | forgets | passkey accuracy by "
             "length | recall length |", "|---|---|---|---|---|---|"]
    for m in report["runs"]:
        acc = ", ".join(f"{k}: {v:.2f}" for k, v in m["passkey"].items())
        lines.append(f"| {m['state_elements']:,} | {m['train_len']} | {m['excess_loss']:+.3f} | "
                     f"{'yes' if m['forgets'] else 'no'} | {acc} | {m['recall_length']} |")
    lines += ["", "| state elements | T_forget | T_recall |", "|---|---|---|"]
    for r in report["table"]:
        tf = r["t_forget"] if r["t_forget"] is not None else f"> {r['t_forget_above']}"
        lines.append(f"| {r['state_elements']:,} | {tf} | {r['t_recall']} |")
    fits, paper = report["fits"], report["paper_fits"]
    lines += ["", "Fits (thousands of tokens against millions of state elements N_S):", "",
              f"- T_forget = {_fit_text(fits['t_forget'])} (the paper: {_fit_text(paper['t_forget'])})",
              f"- T_recall = {_fit_text(fits['t_recall'])} (the paper: {_fit_text(paper['t_recall'])})", ""]
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for m in report["runs"]:
        b = [x for x in m["loss_bins"][1:] if x.get("excess") is not None]
        axes[0].plot([x["end"] / m["train_len"] for x in b], [x["excess"] for x in b], marker=".",
                     label=f"N_S {m['state_elements'] / 1e6:.3g}M, T_train {m['train_len']}")
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set(title="loss past T_train minus the same tokens read within it", xlabel="position / T_train (bin end)",
                ylabel="nats", xscale="log", xlim=(1, None))
    axes[0].legend(fontsize=6)
    table = report["table"]
    xs = np.array([r["state_elements"] / 1e6 for r in table])
    grid = np.linspace(0, max(xs.max(), 1e-6) * 1.1, 100)
    for ax, key, title in ((axes[1], "t_forget", "T_forget"), (axes[2], "t_recall", "T_recall")):
        pts = [(r["state_elements"] / 1e6, r[key] / 1e3) for r in table if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), "o", label="measured")
        if key == "t_forget":
            above = [(r["state_elements"] / 1e6, r["t_forget_above"] / 1e3) for r in table if r["t_forget"] is None]
            if above:
                ax.plot(*zip(*above), "^", label="> longest T_train tried")
        fit = report["fits"][key]
        if fit is not None:
            y = fit["a"] * grid + fit["b"] if key == "t_forget" else fit["a"] * (fit["b"] ** grid - 1) + fit["c"]
            ax.plot(grid, y, "-", label="fit: " + _fit_text(fit))
        ax.set(title=title, xlabel="state elements (millions)", ylabel="thousands of tokens")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def load_or_measure(run: str | os.PathLike, stream: np.ndarray, out: str | os.PathLike, **settings) -> dict:
    """``out/runs/<run>-<path digest>.json`` when it was measured with the same settings, the same
    weights and the same streams, else ``measure_run`` written there (atomically)."""
    path = Path(out) / "runs" / _run_file(Path(run))
    want = {"tokens": int(np.atleast_2d(stream).shape[1]), "streams": int(np.atleast_2d(stream).shape[0]),
            "tolerance": settings.get("tolerance", 0.05),
            "passkey_lengths": sorted(int(n) for n in settings["passkey_lengths"]),
            "samples": settings["samples"], "seed": settings.get("seed", 0), "weights": _weights_signature(Path(run)),
            "data": _stream_digest(stream)}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("settings") == want:
            return old
    m = measure_run(run, stream, **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json_text(m, indent=1) + "\n")
    return m
