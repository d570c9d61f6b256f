"""``jaxkv analyze long-context``: AnchorAttention's experiment, scored.

The experiment continues one model to a longer context under each way packed documents attend
(``jaxkv train lm --attention full|intra|reset|anchor``, the same data, seed and steps), then
scores every run on the RULER-style tasks (``jaxkv.eval.tasks``, the full cache, greedy, string
match), **averaged over each run's last checkpoints** as the paper does, so that one lucky or
unlucky checkpoint does not decide the ordering. The paper's numbers (RULER at 64k, LLaMA-2-7B
continued to 64k) are printed beside: full 66.40, intra 69.97, reset 70.03, anchor 73.25.

Per run (a ``jaxkv train lm`` folder): its attention mode, rope theta, row length and step time
(the median of ``metrics.jsonl``'s tokens/s, the compile and checkpoint steps falling out), and
per checkpoint the accuracy of every (task, length). The checkpoints are read from the run's
orbax folder read-only and verified against their recorded checksums (``read_checkpoint``);
only the weights are used. Each checkpoint's scores are written to ``out/evals/<run>/<step>.json``
with the settings and the checkpoint's checksums, and reused when both match: a sweep can be
scored in pieces (several processes, several calls) and combined at the end; reports of runs
scored on different machines combine with ``merge_long_context``. ``base`` adds the
runs' starting model (their ``init``, scored at its own rope theta), the row every mode started
from.

Scores are percentages (the mean string-match accuracy over tasks and lengths, x 100), as RULER
reports them. The runs compared must share their starting model and data (``init`` and
``data_fingerprint`` in ``run.json``): anything else would compare data, not attention.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxkv.errors import UserError
from jaxkv.fileio import json_text, read_json_object, save_figure, write_text_atomic

__all__ = ["PAPER_RULER_64K", "run_info", "checkpoint_params", "score_model", "load_or_score", "long_context",
           "merge_long_context", "write_long_context", "long_context_markdown"]

PAPER_RULER_64K = {"full": 66.40, "intra": 69.97, "reset": 70.03, "anchor": 73.25}
MODE_ORDER = ("full", "intra", "reset", "anchor", "anchor-bos")
_WARM_ROWS = 3  # metrics rows dropped before the step-time median (compile, first steps)


def _meta(run: Path) -> dict:
    f = run / "run.json"
    if not f.is_file():
        raise UserError(f"--runs {run}: not a `jaxkv train lm` folder (no run.json)")
    meta = read_json_object(f, UserError)
    for key in ("model", "data", "train", "optim", "steps", "data_fingerprint"):
        if key not in meta:
            raise UserError(f"--runs {run}: run.json lacks {key!r}; it is not a `jaxkv train lm` run")
    return meta


def run_info(run: str | os.PathLike) -> dict:
    """What ``run.json`` and ``metrics.jsonl`` say of a run: name, mode, init, row length, rope
    theta, steps, the checkpoints it holds, and its step time and tokens/s."""
    from jaxkv.training.checkpoint import saved_steps

    run = Path(run)
    meta = _meta(run)
    rows = []
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][_WARM_ROWS:]
    seq_len, batch = int(meta["data"]["seq_len"]), int(meta["train"]["batch_size"])
    tokens_per_s = statistics.median(tps) if tps else None
    return {"run": run.resolve().name, "path": str(run), "mode": meta["data"]["attention"],
            "init": meta.get("init"), "data_fingerprint": meta["data_fingerprint"], "seq_len": seq_len,
            "batch_size": batch, "rope_theta": float(meta["model"].get("rope_theta", 10000.0)),
            "steps": int(meta["steps"]), "checkpoints": saved_steps(run), "tokens_per_s": tokens_per_s,
            "step_s": batch * seq_len / tokens_per_s if tokens_per_s else None,
            "final_loss": rows[-1]["loss"] if rows and "loss" in rows[-1] else None}


def checkpoint_params(run: str | os.PathLike, step: int):
    """``(config, params)`` of checkpoint ``step`` of the run folder ``run``: its fp32 weights,
    read without writing anything (the run may still be training) and verified."""
    import jax

    from jaxkv.config import LlamaConfig
    from jaxkv.models.llama import init_params
    from jaxkv.training.checkpoint import read_checkpoint
    from jaxkv.training.config import OptimConfig
    from jaxkv.training.optim import make_optimizer
    from jaxkv.training.state import init_state

    run = Path(run)
    meta = _meta(run)
    config = LlamaConfig.from_hf(meta["model"])
    tx = make_optimizer(OptimConfig(**{"total_steps": meta["steps"], **meta["optim"]}))  # the recorded schedule
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(lambda: init_state(init_params(config, jax.random.key(0)), tx, 0))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    return config, read_checkpoint(run, step, abstract).params


def score_model(params, config, tokenizer, *, tasks: Sequence[str], lengths: Sequence[int], samples: int,
                seed: int = 0) -> dict:
    """Accuracy of the full cache on every (task, length): ``{"task@length": accuracy}``."""
    from jaxkv.eval.harness import EvalConfig, evaluate

    rows = evaluate(params, config, tokenizer, EvalConfig(methods=("full",), tasks=tuple(tasks),
                                                          lengths=tuple(int(n) for n in lengths),
                                                          samples=samples, seed=seed))
    return {f"{r.task}@{r.length}": float(r.accuracy) for r in rows}


def _checkpoint_signature(run: Path, step: int) -> str:
    from jaxkv.training.checkpoint import CHECKSUM_FILE

    sums = read_json_object(run / CHECKSUM_FILE, UserError).get(str(step), {})
    return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()


def _settings(tasks, lengths, samples, seed) -> dict:
    return {"tasks": list(tasks), "lengths": [int(n) for n in lengths], "samples": int(samples), "seed": int(seed)}


def _cached(path: Path, want: dict) -> dict | None:
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if isinstance(old, dict) and old.get("settings") == want:
            return old
    return None


def load_or_score(run: str | os.PathLike | None, step: int | None, out: str | os.PathLike, *, tokenizer,
                  tasks: Sequence[str], lengths: Sequence[int], samples: int, seed: int = 0,
                  base: str | os.PathLike | None = None) -> dict:
    """The scores of checkpoint ``step`` of ``run`` (or, with ``base``, of that model folder),
    from ``out/evals`` when scored with the same settings and the same weights, else scored and
    written there (atomically)."""
    want = _settings(tasks, lengths, samples, seed)
    if base is not None:
        from jaxkv.checkpoints import load_checkpoint

        folder = Path(base)
        weights = sorted(folder.glob("*.safetensors"))
        want["weights"] = hashlib.sha256(b"".join(f.read_bytes() for f in weights)).hexdigest()
        path = Path(out) / "evals" / "base.json"
        if (old := _cached(path, want)) is not None:
            return old
        config, params = load_checkpoint(folder)
        label = {"run": "base", "step": 0}
    else:
        run = Path(run)
        want["weights"] = _checkpoint_signature(run, step)
        path = Path(out) / "evals" / run.resolve().name / f"{step}.json"
        if (old := _cached(path, want)) is not None:
            return old
        config, params = checkpoint_params(run, step)
        label = {"run": run.resolve().name, "step": int(step)}
    scores = score_model(params, config, tokenizer, tasks=tasks, lengths=lengths, samples=samples, seed=seed)
    result = {**label, "settings": want, "scores": scores, "mean": 100 * statistics.fmean(scores.values())}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    return result


def check_comparable(infos: Sequence[dict]) -> None:
    """Refuse runs that started from different models or trained on different data."""
    first = infos[0]
    for info in infos[1:]:
        for key, what in (("init", "starting model"), ("data_fingerprint", "data"), ("seq_len", "row length"),
                          ("steps", "number of steps")):
            if info[key] != first[key]:
                raise UserError(f"--runs {info['path']}: its {what} ({key} {info[key]!r}) differs from "
                                f"{first['path']}'s ({first[key]!r}); the comparison is of attention modes, so "
                                "compare runs that differ only in --attention")
    named = {}  # scores are kept and reported by the folder's name: two folders of one name collide
    for i in infos:
        named.setdefault(i["run"], {}).setdefault(os.path.realpath(i["path"]), i["path"])
    same = next((n for n, folders in named.items() if len(folders) > 1), None)
    if same is not None:
        paths = list(named[same].values())
        raise UserError(f"--runs: {' and '.join(paths)} share the folder name {same!r}, by which their scores are "
                        "stored and reported; rename one")
    modes = [i["mode"] for i in infos]
    twice = next((m for k, m in enumerate(modes) if m in modes[:k]), None)
    if twice is not None:
        raise UserError(f"--runs: two runs train with --attention {twice}; give one run per mode")


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def long_context(infos: Sequence[dict], scored: dict[str, list[dict]], base: dict | None = None) -> dict:
    """The table: per run (``infos``, with ``scored[run]`` the scores of the checkpoints used),
    the mean score over those checkpoints overall and per length and task, their spread, and the
    step time; with ``base`` the starting model's row."""
    def summarise(results: list[dict]) -> dict:
        keys = sorted(results[0]["scores"])
        lengths = sorted({int(k.split("@")[1]) for k in keys})
        tasks = sorted({k.split("@")[0] for k in keys})
        per = {k: _mean([r["scores"][k] for r in results]) for k in keys}
        return {"score": 100 * _mean(list(per.values())),
                "per_checkpoint": [round(r["mean"], 4) for r in results],
                "by_length": {str(n): 100 * _mean([v for k, v in per.items() if k.endswith(f"@{n}")])
                              for n in lengths},
                "by_task": {t: 100 * _mean([v for k, v in per.items() if k.startswith(f"{t}@")]) for t in tasks}}

    rows = []
    for info in sorted(infos, key=lambda i: MODE_ORDER.index(i["mode"]) if i["mode"] in MODE_ORDER else 99):
        results = scored[info["run"]]
        rows.append({**{k: info[k] for k in ("run", "mode", "rope_theta", "seq_len", "steps", "tokens_per_s",
                                             "step_s", "final_loss")},
                     "checkpoints": [r["step"] for r in results], **summarise(results),
                     "paper": PAPER_RULER_64K.get(info["mode"])})
    report = {"rows": rows,
              "settings": {k: v for k, v in next(iter(scored.values()))[0]["settings"].items() if k != "weights"}}
    if base is not None:
        report["base"] = {"run": "base", **summarise([base])}
    return _ranked(report)


def _ranked(report: dict) -> dict:
    ranked = [r["mode"] for r in sorted(report["rows"], key=lambda r: -r["score"])]
    paper_ranked = [m for m in sorted(PAPER_RULER_64K, key=lambda m: -PAPER_RULER_64K[m]) if m in ranked]
    return {**report, "ranking": ranked, "paper_ranking": paper_ranked}


def merge_long_context(reports: Sequence[dict]) -> dict:
    """One table from reports of ``long_context`` made separately (runs scored in several
    processes or machines whose checkpoints are not all in one place): every row is computed from
    its own run's checkpoints alone, so the merge equals one ``long_context`` over all the runs.
    The reports must share their settings, hold each mode once and at most one ``base`` (equal
    where several hold it)."""
    if not reports:
        raise UserError("merge_long_context: no reports to merge")
    settings = reports[0]["settings"]
    rows, base = [], None
    for k, report in enumerate(reports):
        if report["settings"] != settings:
            raise UserError(f"report {k} was scored with other settings ({report['settings']}) than report 0 "
                            f"({settings}); scores of different tasks, lengths or samples do not compare")
        for row in report["rows"]:
            if any(r["mode"] == row["mode"] for r in rows):
                raise UserError(f"report {k}: --attention {row['mode']} is already in an earlier report")
            rows.append(row)
        if "base" in report:
            if base is not None and report["base"] != base:
                raise UserError(f"report {k}: its starting model's row differs from an earlier report's")
            base = report["base"]
    rows.sort(key=lambda r: MODE_ORDER.index(r["mode"]) if r["mode"] in MODE_ORDER else 99)
    return _ranked({"rows": rows, "settings": settings, **({"base": base} if base is not None else {})})


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def long_context_markdown(report: dict) -> str:
    lengths = list(report["rows"][0]["by_length"])
    head = "| mode | rope theta | checkpoints | score | " + " | ".join(f"{n} tokens" for n in lengths) + \
        " | spread over checkpoints | step | tokens/s | the paper (RULER 64k) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    if "base" in report:
        b = report["base"]
        lines.append(f"| starting model | - | - | {b['score']:.1f} | " +
                     " | ".join(f"{b['by_length'][n]:.1f}" for n in lengths) + " | - | - | - | - |")
    for r in report["rows"]:
        spread = f"{min(r['per_checkpoint']):.1f}-{max(r['per_checkpoint']):.1f}"
        steps = ",".join(str(s) for s in r["checkpoints"])
        lines.append(f"| {r['mode']} | {r['rope_theta']:g} | {steps} | **{r['score']:.1f}** | " +
                     " | ".join(f"{r['by_length'][n]:.1f}" for n in lengths) +
                     f" | {spread} | {_fmt(r['step_s'] and 1e3 * r['step_s'], '.0f')} ms | "
                     f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['paper'], '.2f')} |")
    tasks = list(report["rows"][0]["by_task"])
    lines += ["", "| mode | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for r in ([{"mode": "starting model", **report["base"]}] if "base" in report else []) + report["rows"]:
        lines.append(f"| {r['mode']} | " + " | ".join(f"{r['by_task'][t]:.1f}" for t in tasks) + " |")
    s = report["settings"]
    lines += ["", f"Ranking: {' > '.join(report['ranking'])} (the paper: {' > '.join(report['paper_ranking'])}). "
              f"Scores: mean string-match accuracy x 100 over {len(s['tasks'])} tasks x {len(s['lengths'])} lengths, "
              f"{s['samples']} samples each, averaged over each run's checkpoints listed.", ""]
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ([{"mode": "start", **report["base"]}] if "base" in report else []) + report["rows"]
    lengths = list(report["rows"][0]["by_length"])
    fig, ax = plt.subplots(figsize=(8.5, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        x = np.arange(len(lengths)) + (i - (len(rows) - 1) / 2) * width
        ax.bar(x, [r["by_length"][n] for n in lengths], width, label=f"{r['mode']} ({r['score']:.1f})")
    ax.set_xticks(np.arange(len(lengths)), [f"{int(n):,}" for n in lengths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("RULER-style score (%)")
    ax.set_title("continued pretraining per attention mode (mean over the last checkpoints)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def write_long_context(report: dict, out: str | os.PathLike) -> None:
    """``report`` as ``out/long_context.json``, ``.md`` and ``.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "long_context.json", json_text(report, indent=1) + "\n")
    write_text_atomic(out / "long_context.md", long_context_markdown(report))
    _plot(report, out / "long_context.png")


def default_lengths(seq_len: int) -> tuple[int, ...]:
    """A quarter, half and all of the trained row (less 64 tokens for the answer)."""
    return tuple(sorted({max(64, seq_len // 4), max(64, seq_len // 2), max(64, seq_len - 64)}))


def checkpoints_to_score(info: dict, last: int) -> list[int]:
    steps = info["checkpoints"]
    if not steps:
        raise UserError(f"--runs {info['path']}: it holds no checkpoint with recorded checksums")
    return steps[-last:]
