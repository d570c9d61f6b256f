"""Evaluation output: a terminal table, a JSON list of rows, a PNG of accuracy against KV bytes."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Sequence

from jaxkv.eval.harness import Row
from jaxkv.fileio import json_text, save_figure, write_text_atomic

__all__ = ["format_table", "write_json", "plot_accuracy_vs_bytes"]

JSON_KEYS = ("method", "budget", "task", "length", "accuracy", "kl", "top1_agreement", "kv_bytes",
             "full_kv_bytes", "attended_fraction", "prefill_ms", "decode_tokens_per_s")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(rows: Sequence[Row]) -> str:
    head = ("method", "budget", "task", "length", "acc", "KL", "top1", "KV held", "of full", "attended",
            "prefill ms", "dec tok/s")
    body = [(r.method, f"{r.budget:g}", r.task, str(r.length), f"{r.accuracy:.1%}", f"{r.kl:.4f}",
             f"{r.top1_agreement:.1%}", _bytes(r.kv_bytes), f"{r.kv_bytes / r.full_kv_bytes:.1%}",
             "-" if r.attended_fraction is None else f"{r.attended_fraction:.1%}", f"{r.prefill_ms:.1f}", f"{r.decode_tokens_per_s:.1f}") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def write_json(rows: Sequence[Row], path: str | os.PathLike) -> None:
    data = [{k: r.asdict()[k] for k in JSON_KEYS} | {"samples": r.samples} for r in rows]
    write_text_atomic(path, json_text(data, indent=2) + "\n")


def plot_accuracy_vs_bytes(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Mean accuracy over tasks and lengths against KV bytes held, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        points[r.method][r.budget].append((r.kv_bytes, r.accuracy))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_budget in sorted(points.items()):
        xs, ys = [], []
        for budget in sorted(by_budget):
            pts = by_budget[budget]
            xs.append(sum(p[0] for p in pts) / len(pts))
            ys.append(sum(p[1] for p in pts) / len(pts))
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("KV cache bytes held")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
