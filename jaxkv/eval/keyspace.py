"""``jaxkv analyze keyspace`` and ``jaxkv analyze icn``: ICN's measurements on any Llama-family model.

**keyspace** (the paper's spurious key correlation). The unembedding rows are clustered with
k-means (``default_cluster_count``: the paper's 1,024 clusters for 128k tokens, scaled to the
vocabulary). For each knowledge probe the top-``top`` first tokens of its list prompt are each
completed greedily and judged against the probe's answer set. The clusters of the ``head`` (10)
best-ranked tokens are the probe's *head clusters*; the precision of ranks ``head+1 .. top``
(11-100) is compared inside the head clusters vs outside them. The paper finds the out-of-cluster
mid-rank tokens at least as often correct: the in-cluster ones are ranked high for looking like
the top tokens, not for leading anywhere. Written: ``keyspace.json`` (every probe's ranked tokens,
clusters, answers, verdicts; per-probe and pooled precisions) and ``keyspace.png`` (precision by
rank, in-cluster vs out-of-cluster).

**icn** (navigation against the baselines at one budget). For budgets N (5, 10, 20): distinct
correct answers per probe found by ICN (N rounds), rank enumeration (top-N first tokens, greedy
completions) and temperature sampling (T = 1 with top-p 1 and 0.9; over several seeds). One run at
the largest budget serves every smaller one exactly: ICN's round r does not depend on the budget,
rank enumeration's top-N is a prefix of its top-N', and the first N of N' independent samples are N
independent samples. With ``problems > 0`` the self-consistency table follows: accuracy of the
majority vote over k chain-of-thought paths found by ICN vs k sampled ones (k = 4, 8), and the
mean accuracy of a single path. Written: ``icn.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxkv.errors import UserError
from jaxkv.fileio import save_figure, write_text_atomic
from jaxkv.icn import (Explorer, Probe, arithmetic_problems, cluster_keys, default_cluster_count, distinct_correct,
                       icn_explore, knowledge_probes, majority_vote, normalize_answer, rank_enumerate,
                       sample_answers, self_consistency, ways_format)

__all__ = ["unembedding", "analyze_keyspace", "analyze_icn", "format_keyspace", "format_icn"]


def unembedding(params: dict, config) -> np.ndarray:
    """The vocabulary keys ``[V, D]`` (fp32): the LM head's rows, or the embedding when tied."""
    w = params["embed"]["embedding"] if config.tie_word_embeddings else params["lm_head"]["kernel"]
    w = np.asarray(w, np.float32)
    if w.shape != (config.vocab_size, config.hidden_size):
        raise UserError(f"the model's vocabulary keys have shape {w.shape}, expected "
                        f"({config.vocab_size}, {config.hidden_size})")
    return w


def _precision(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


def analyze_keyspace(params, config, tokenizer, out: str | os.PathLike, *, probes: Sequence[Probe] | None = None,
                     template=None, top: int = 100, head: int = 10, clusters: int | None = None, seed: int = 0,
                     max_iters: int = 100, max_answer_tokens: int = 16, max_rows: int = 128) -> dict:
    """The in- vs out-of-cluster precision of mid-rank first tokens; writes JSON + PNG to ``out``."""
    if not isinstance(top, int) or not isinstance(head, int) or not 1 <= head < top:
        raise UserError(f"need 1 <= head < top (integers), got head={head!r}, top={top!r}")
    if top > config.vocab_size:
        raise UserError(f"top={top} exceeds the vocabulary of {config.vocab_size} tokens")
    probes = knowledge_probes() if probes is None else list(probes)
    k = default_cluster_count(config.vocab_size) if clusters is None else clusters
    keys = unembedding(params, config)
    km = cluster_keys(keys, k, seed=seed, max_iters=max_iters)
    explorer = Explorer(params, config, tokenizer, template=template, max_rows=max_rows,
                        max_answer_tokens=max_answer_tokens)
    found = rank_enumerate(explorer, [p.instruction for p in probes], top, probes=probes)
    rows, pooled_in, pooled_out = [], [], []
    bins = list(range(head, top, 10))
    by_bin = {"in": [[] for _ in bins], "out": [[] for _ in bins]}
    for p, f in zip(probes, found):
        labels = [int(km.labels[e.first_token]) for e in f]
        heads = set(labels[:head])
        inside, outside, ranks_in, ranks_out = [], [], [], []
        for r, (e, c) in enumerate(zip(f, labels), 1):
            if r <= head:
                continue
            ok = e.correct is not None
            side = "in" if c in heads else "out"
            (inside if side == "in" else outside).append(ok)
            (ranks_in if side == "in" else ranks_out).append(r)
            by_bin[side][(r - head - 1) // 10].append(ok)
        pooled_in += inside
        pooled_out += outside
        rows.append({
            "probe": p.name, "instruction": p.instruction, "answers": len(p.answers),
            "head_precision": _precision([e.correct is not None for e in f[:head]]),
            "in_precision": _precision(inside), "out_precision": _precision(outside),
            "in_count": len(inside), "out_count": len(outside),
            "in_mean_rank": float(np.mean(ranks_in)) if ranks_in else None,
            "out_mean_rank": float(np.mean(ranks_out)) if ranks_out else None,
            "distinct_correct": distinct_correct(p, [e.answer for e in f]),
            "tokens": [{"rank": r, "token": e.first_token, "text": e.first_text, "cluster": c, "answer": e.answer,
                        "correct": e.correct} for r, (e, c) in enumerate(zip(f, labels), 1)],
        })
    both = [r for r in rows if r["in_precision"] is not None and r["out_precision"] is not None]
    report = {
        "model": {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "layers": config.num_layers},
        "prompt": "chat template" if template is not None else "plain text",
        "kmeans": {"clusters": k, "seed": seed, "max_iters": max_iters, "inertia": km.inertia,
                   "seed_inertia": km.seed_inertia, "sizes": np.bincount(km.labels, minlength=k).tolist()},
        "top": top, "head": head,
        "pooled": {"in_precision": _precision(pooled_in), "out_precision": _precision(pooled_out),
                   "in_count": len(pooled_in), "out_count": len(pooled_out)},
        "macro": {"probes": len(both),
                  "in_precision": float(np.mean([r["in_precision"] for r in both])) if both else None,
                  "out_precision": float(np.mean([r["out_precision"] for r in both])) if both else None},
        "by_rank": {"bins": [f"{b + 1}-{min(b + 10, top)}" for b in bins],
                    "in_precision": [_precision(x) for x in by_bin["in"]],
                    "out_precision": [_precision(x) for x in by_bin["out"]],
                    "in_count": [len(x) for x in by_bin["in"]], "out_count": [len(x) for x in by_bin["out"]]},
        "probes": rows,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "keyspace.json", json.dumps(report, indent=1, ensure_ascii=False))
    _plot_keyspace(report, out / "keyspace.png")
    return report


def _fmt(x, pct=True) -> str:
    return "—" if x is None else (f"{x:.1%}" if pct else f"{x:.1f}")


def format_keyspace(report: dict) -> str:
    lines = [f"{'probe':<15} {'answers':>7} {'top-10':>7} {'in-cluster':>16} {'out-of-cluster':>16} {'distinct':>8}"]
    for r in report["probes"]:
        lines.append(f"{r['probe']:<15} {r['answers']:>7} {_fmt(r['head_precision']):>7} "
                     f"{_fmt(r['in_precision']):>8} ({r['in_count']:>3}) "
                     f"{_fmt(r['out_precision']):>8} ({r['out_count']:>3}) "
                     f"{r['distinct_correct']:>8}")
    p, m = report["pooled"], report["macro"]
    lines.append(f"{'pooled':<15} {'':>7} {'':>7} {_fmt(p['in_precision']):>8} ({p['in_count']:>3}) "
                 f"{_fmt(p['out_precision']):>8} ({p['out_count']:>3})")
    lines.append(f"{'mean of probes':<15} {'':>7} {'':>7} {_fmt(m['in_precision']):>14} {_fmt(m['out_precision']):>16}"
                 f"   ({m['probes']} probes with both)")
    return "\n".join(lines)


def _plot_keyspace(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    br = report["by_rank"]
    x = np.arange(len(br["bins"]))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for side, off, label in (("in", -0.2, "in the top-10's clusters"), ("out", 0.2, "outside them")):
        ys = [np.nan if v is None else v for v in br[f"{side}_precision"]]
        ax.bar(x + off, ys, width=0.4, label=label)
    ax.set_xticks(x, br["bins"])
    ax.set(xlabel="rank of the first token", ylabel="precision of its greedy completion", ylim=(0, 1),
           title=f"first-token precision by rank ({report['kmeans']['clusters']} key clusters, "
                 f"{len(report['probes'])} probes)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def analyze_icn(params, config, tokenizer, out: str | os.PathLike, *, probes: Sequence[Probe] | None = None,
                template=None, budgets: Sequence[int] = (5, 10, 20), seeds: Sequence[int] = (0, 1, 2),
                top_ps: Sequence[float] = (1.0, 0.9), problems: int = 0, ks: Sequence[int] = (4, 8),
                complete_from: str = "original", max_answer_tokens: int = 16, max_path_tokens: int = 96,
                max_rows: int = 128) -> dict:
    """Distinct correct answers per probe for ICN, rank enumeration and sampling at ``budgets``
    (and, with ``problems > 0``, the self-consistency table); writes ``icn.json`` to ``out``."""
    budgets = sorted(set(int(b) for b in budgets))
    if not budgets or budgets[0] < 1:
        raise UserError(f"budgets must be positive integers, got {budgets}")
    if not seeds:
        raise UserError("seeds must name at least one seed")
    probes = knowledge_probes() if probes is None else list(probes)
    n = budgets[-1]
    explorer = Explorer(params, config, tokenizer, template=template, max_rows=max_rows,
                        max_answer_tokens=max_answer_tokens)
    instructions = [p.instruction for p in probes]
    runs = {"icn": [icn_explore(explorer, instructions, n, probes=probes, complete_from=complete_from)],
            "rank": [rank_enumerate(explorer, instructions, n, probes=probes)]}
    for top_p in top_ps:
        runs[f"sample T=1 top-p {top_p:g}"] = [
            sample_answers(explorer, instructions, n, temperature=1.0, top_p=top_p, seed=s, probes=probes)
            for s in seeds]
    table = []
    for method, per_seed in runs.items():
        for b in budgets:
            counts = np.array([[distinct_correct(p, [e.answer for e in f[:b]]) for p, f in zip(probes, found)]
                               for found in per_seed], np.float64)  # [seeds, probes]
            means = counts.mean(axis=1)  # per seed: mean over probes
            table.append({"method": method, "budget": b, "distinct_correct": float(means.mean()),
                          "spread": float(means.std()), "seeds": len(per_seed),
                          "per_probe": counts.mean(axis=0).tolist()})
    # whether the model follows "give a different one": the rounds (after the first) in which the
    # navigated prompt's own top first token was one already explored (ICN then takes a lower
    # one), and the rounds whose answer repeats one already listed
    icn = runs["icn"][0]
    repeats = [sum(1 for i, e in enumerate(f) if normalize_answer(e.answer) in
                   {normalize_answer(x.answer) for x in f[:i]}) for f in icn]
    top_explored = [sum(1 for e in f[1:] if e.rank) for f in icn]
    report = {
        "model": {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "layers": config.num_layers},
        "prompt": "chat template" if template is not None else "plain text", "complete_from": complete_from,
        "probes": [p.name for p in probes], "budgets": budgets, "table": table,
        "icn_repeated_answers": {"total": int(sum(repeats)), "of": len(probes) * n},
        "icn_top_token_already_explored": {"total": int(sum(top_explored)), "of": len(probes) * (n - 1),
                                           "per_probe": top_explored},
        "explorations": {m: [[[e.first_text, e.answer, e.correct, e.rank] for e in f] for f in per_seed[0]]
                         for m, per_seed in runs.items()},
    }
    if problems:
        report["self_consistency"] = _self_consistency_table(params, config, tokenizer, template, problems, ks,
                                                             seeds, max_path_tokens, max_rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "icn.json", json.dumps(report, indent=1, ensure_ascii=False))
    return report


def _self_consistency_table(params, config, tokenizer, template, problems, ks, seeds, max_path_tokens, max_rows):
    """Votes over the first k of max(ks) paths: ICN's round r and the r-th sample do not depend on k."""
    ks = sorted(set(int(k) for k in ks))
    probs = arithmetic_problems(problems, seed=0)
    explorer = Explorer(params, config, tokenizer, template=template, fmt=ways_format(), max_rows=max_rows,
                        max_answer_tokens=max_path_tokens)
    runs = {"icn": [self_consistency(explorer, probs, ks[-1], method="icn")["votes"]],
            "sample T=1": [self_consistency(explorer, probs, ks[-1], method="sample", temperature=1.0, top_p=1.0,
                                            seed=s)["votes"] for s in seeds]}
    rows = []
    for method, per_seed in runs.items():
        for k in ks:
            acc = [np.mean([majority_vote(v[:k]) == p.answer for v, p in zip(votes, probs)]) for votes in per_seed]
            path = [np.mean([np.mean([a == p.answer for a in v[:k]]) for v, p in zip(votes, probs)])
                    for votes in per_seed]
            rows.append({"method": method, "k": k, "accuracy": float(np.mean(acc)), "spread": float(np.std(acc)),
                         "path_accuracy": float(np.mean(path)), "seeds": len(per_seed)})
    return {"problems": problems, "rows": rows,
            "votes": {m: per_seed[0] for m, per_seed in runs.items()},
            "answers": [p.answer for p in probs]}


def format_icn(report: dict) -> str:
    budgets = report["budgets"]
    methods = list(dict.fromkeys(r["method"] for r in report["table"]))
    cell = {(r["method"], r["budget"]): r for r in report["table"]}
    lines = [f"distinct correct answers per probe ({len(report['probes'])} probes)",
             f"{'method':<22}" + "".join(f"{'N = ' + str(b):>14}" for b in budgets)]
    for m in methods:
        lines.append(f"{m:<22}" + "".join(
            f"{cell[m, b]['distinct_correct']:>8.2f} ± {cell[m, b]['spread']:<3.2f}" for b in budgets))
    rep = report["icn_repeated_answers"]
    lines.append(f"ICN rounds that repeated a listed answer: {rep['total']} of {rep['of']}")
    top = report["icn_top_token_already_explored"]
    lines.append(f"ICN rounds whose navigated top first token was already explored: {top['total']} of {top['of']}")
    sc = report.get("self_consistency")
    if sc:
        lines.append(f"self-consistency on {sc['problems']} arithmetic problems: vote accuracy (mean path accuracy)")
        for r in sc["rows"]:
            lines.append(f"  {r['method']:<12} k = {r['k']:<3} {r['accuracy']:.1%} ± {r['spread']:.1%} "
                         f"({r['path_accuracy']:.1%})")
    return "\n".join(lines)
