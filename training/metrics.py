"""Run observability: ``metrics.jsonl`` (one object per step), a PNG of the curves, a progress
line on stderr."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from jaxkv.fileio import save_figure, write_text_atomic

__all__ = ["MetricsLog", "Progress", "plot_metrics"]


class MetricsLog:
    """Append-only JSONL; on resume, lines past the restored step are dropped first."""

    def __init__(self, path: str | os.PathLike, *, resume_step: int):
        self.path = Path(path)
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a crash: drop it and everything after
                if row.get("step", math.inf) <= resume_step:
                    kept.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))
        self._f = open(self.path, "a")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()


class Progress:
    """``step 120/1000 | loss 2.314 | 41,200 tok/s | eta 3m12s`` rewritten in place."""

    def __init__(self, total: int, start: int, *, enabled: bool = True):
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.enabled = enabled and (sys.stderr.isatty() or bool(os.environ.get("JAXKV_PROGRESS")))

    def update(self, step: int, loss: float, tokens_per_s: float):
        if not self.enabled:
            return
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0
        width = 24
        filled = int(width * step / self.total)
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r[{bar}] step {step}/{self.total} | loss {loss:.4f} | "
                         f"{tokens_per_s:,.0f} tok/s | eta {int(eta // 60)}m{int(eta % 60):02d}s")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


def plot_metrics(jsonl: str | os.PathLike, png: str | os.PathLike) -> None:
    """Loss, learning rate and tokens/s against step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("loss", "lr", "tokens_per_s"), ("loss", "learning rate", "tokens/s")):
        ax.plot(steps, [r[key] for r in rows], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, png)
