"""The recipe of the embedded default model: ``jaxkv train default-model --out DIR``.

What it does, in order (every random draw seeded by ``--seed``):

1. **Tokenizer.** A byte-level BPE of ``vocab_size`` ids trained with ``tokenizers`` on ordinary
   text and rendered task prompts; digits are always single tokens, so numbers are copied digit
   by digit. Ids 0, 1, 2 are ``<pad>``, ``<s>`` (prepended to every encoding) and ``</s>``.
2. **Data.** Task documents: prompts of the RULER-style tasks of ``jaxkv.eval.tasks`` (``render``)
   at random lengths and needle depths, followed by the reference answer (``answer_text``) and
   ``</s>``; the loss counts every token (``task_loss='full'``) or the answer and ``</s>`` only
   (``'answer'``). Copy documents (``copy_share`` of the tokens): a line of random keys and
   numbers, then the line again, the loss on the copy; they teach look-up-and-copy with a dense
   signal (without them the default budget learned no retrieval at all). Ordinary text: Python's
   own reference documentation (``pydoc_data.topics``, shipped with every CPython), the loss on
   every token. No download: everything is generated or read from the installed Python.
3. **Curriculum.** Phases of growing document length; each phase is one ``train_lm`` run in
   ``DIR/phase-N`` (resumable: rerunning the command continues where it stopped), started from
   the previous phase's weights with a fresh optimizer. Documents are packed whole
   (``split_documents=False``) so every answer has its needle in view.
4. **Export.** The final weights in bfloat16 with ``config.json`` and ``tokenizer.json`` in
   ``DIR/model``, its scores from the evaluation harness in ``DIR/model/scores.json`` and a model
   card ``DIR/model/README.md``. Copy ``DIR/model`` to ``jaxkv/assets/default_model`` to ship it.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxkv.config import LlamaConfig
from jaxkv.fileio import atomic_path, read_json_object, replace_folder, write_text_atomic
from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig, TrainConfigError, positive_ints

__all__ = ["Phase", "Recipe", "DEFAULT_RECIPE", "train_tokenizer", "ordinary_text", "task_documents", "copy_documents",
           "text_documents", "train_default_model"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
EVAL_TASKS = ("niah_single", "niah_single_words", "niah_multikey", "niah_multivalue", "niah_multiquery",
              "passkey", "vt", "cwe", "fwe")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phase:
    """One run of the curriculum: task documents of ``min_len``..``max_len`` tokens packed into
    rows of ``seq_len``; ``steps`` optimizer steps of ``batch_size`` rows at peak ``lr``."""

    seq_len: int
    min_len: int
    max_len: int
    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    epochs: float = 1.0  # documents are generated for steps / epochs worth of rows

    def __post_init__(self):
        positive_ints(self, "seq_len", "min_len", "max_len", "steps", "batch_size")
        if not self.min_len <= self.max_len <= self.seq_len:
            raise TrainConfigError(f"phase lengths need min_len <= max_len <= seq_len, got "
                                   f"{self.min_len}, {self.max_len}, {self.seq_len}")
        if not self.lr > 0 or not self.epochs >= 1:
            raise TrainConfigError(f"phase lr must be > 0 and epochs >= 1, got {self.lr}, {self.epochs}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    model: LlamaConfig
    vocab_size: int
    phases: tuple[Phase, ...]
    mix: tuple[tuple[str, float], ...]  # task name -> share of task documents
    text_share: float = 0.05            # share of each phase's tokens that is ordinary text
    text_chunk: int = 512               # ordinary text is cut into documents of this many tokens
    copy_share: float = 0.0             # share of each phase's tokens that is copy documents
    task_loss: str = "answer"           # 'answer': loss on the answer only; 'full': every token

    def __post_init__(self):
        from jaxkv.eval.tasks import TASKS

        if self.model.vocab_size != self.vocab_size:
            raise TrainConfigError(f"model vocab_size {self.model.vocab_size} != tokenizer vocab_size {self.vocab_size}")
        if not self.phases:
            raise TrainConfigError("a recipe needs at least one phase")
        for name, w in self.mix:
            if name not in TASKS:
                raise TrainConfigError(f"mix names unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
            if not w > 0:
                raise TrainConfigError(f"mix weight of {name} must be > 0, got {w}")
        if not (0 <= self.text_share and 0 <= self.copy_share and self.text_share + self.copy_share < 1):
            raise TrainConfigError(f"text_share and copy_share must be >= 0 and sum to < 1, got "
                                   f"{self.text_share} and {self.copy_share}")
        if self.task_loss not in ("answer", "full"):
            raise TrainConfigError(f"task_loss must be 'answer' or 'full', got {self.task_loss!r}")

    def scaled(self, scale: float) -> "Recipe":
        """The same recipe with every phase's steps (and warmup) multiplied by ``scale``."""
        if not scale > 0:
            raise TrainConfigError(f"scale must be > 0, got {scale}")
        phases = tuple(dataclasses.replace(p, steps=max(1, round(p.steps * scale)),
                                           warmup=min(p.warmup, max(1, round(p.steps * scale) // 10)))
                       for p in self.phases)
        return dataclasses.replace(self, phases=phases)


# Llama-family, GQA (8 query heads over 2 KV heads), RoPE; 3.3 M parameters, 6.6 MB in bfloat16.
DEFAULT_MODEL = LlamaConfig(
    family="llama", vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=4,
    num_heads=8, num_kv_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=4096,
    tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
)

DEFAULT_RECIPE = Recipe(
    model=DEFAULT_MODEL,
    vocab_size=1024,
    mix=(("niah_single", 3.0), ("niah_single_words", 2.0), ("niah_multikey", 2.0), ("niah_multivalue", 1.0),
         ("niah_multiquery", 1.0), ("passkey", 1.0), ("vt", 1.0), ("cwe", 0.5), ("fwe", 0.5)),
    copy_share=0.25,
    task_loss="full",
    phases=(
        Phase(seq_len=2048, min_len=96, max_len=512, steps=2000, batch_size=32, lr=2e-3, warmup=150, epochs=2.0),
        Phase(seq_len=2048, min_len=256, max_len=2048, steps=2000, batch_size=32, lr=1e-3, warmup=100, epochs=2.0),
        Phase(seq_len=4096, min_len=1024, max_len=3072, steps=600, batch_size=16, lr=5e-4, warmup=50, epochs=1.0),
    ),
)


# ---------------------------------------------------------------------------------------------
# tokenizer and text


def ordinary_text() -> list[str]:
    """Python's reference documentation topics (``pydoc_data.topics``), one string per topic."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics)]


def _sample_prompts(seed: int, per_task: int = 40) -> list[str]:
    from jaxkv.eval.tasks import TASKS, answer_text, render

    out = []
    for t, name in enumerate(sorted(TASKS)):
        rng = np.random.default_rng([seed, 7, t])
        for _ in range(per_task):
            text, answers, _ = render(name, rng, int(rng.integers(4, 40)), float(rng.random()))
            out.append(text + answer_text(answers))
    return out


def train_tokenizer(vocab_size: int, *, seed: int = 0):
    """The default model's tokenizer: byte-level BPE with single-digit tokens, trained on the
    ordinary text and sample prompts of every task."""
    from jaxkv.tiny import train_bpe_tokenizer

    tok = train_bpe_tokenizer(ordinary_text() + _sample_prompts(seed), vocab_size, individual_digits=True)
    if tok.get_vocab_size() != vocab_size:
        raise TrainConfigError(f"the tokenizer trained to {tok.get_vocab_size()} ids, not {vocab_size}")
    return tok


def text_documents(tokenizer, *, chunk: int) -> list[np.ndarray]:
    """Ordinary text as token documents of at most ``chunk`` tokens, each starting with the BOS
    when the tokenizer adds one (a tokenizer that adds none: the text's tokens as they come)."""
    bos = tokenizer.token_to_id("<s>")
    docs = []
    for enc in tokenizer.encode_batch(ordinary_text()):
        ids = np.asarray(enc.ids, np.int32)
        head = ids[:1] if len(ids) and bos is not None and ids[0] == bos else ids[:0]
        body, step = ids[len(head):], chunk - len(head)
        for i in range(0, len(body), step):
            docs.append(np.concatenate([head, body[i:i + step]]))
    return docs


def copy_documents(tokenizer, n_docs: int, *, seed: int, eos: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Copy documents: a line of 3-24 random task keys and numbers, `` |``, the same line again;
    the loss counts the copy (every token of it is predictable by looking back). They train the
    look-up-and-copy circuit with a dense signal, where task answers give a few tokens a prompt."""
    from jaxkv.eval.tasks import random_key, random_number

    rng = np.random.default_rng([seed, 1009])
    lines = []
    for _ in range(n_docs):
        parts = [random_key(rng) if rng.random() < 0.5 else random_number(rng, int(rng.integers(2, 8)))
                 for _ in range(int(rng.integers(3, 25)))]
        lines.append(" ".join(parts))
    firsts = tokenizer.encode_batch(lines)
    copies = tokenizer.encode_batch([" | " + x for x in lines], add_special_tokens=False)
    docs = []
    for a, b in zip(firsts, copies):
        ids = np.asarray(a.ids + b.ids + [eos], np.int32)
        mask = np.zeros(len(ids), bool)
        mask[len(a.ids) + 1:] = True  # after " |": the copied line and the end
        docs.append((ids, mask))
    return docs


# ---------------------------------------------------------------------------------------------
# task documents


def _calibrate(tokenizer, name: str) -> tuple[float, float]:
    """(tokens of a prompt without haystack, tokens per haystack unit) of task ``name``."""
    from jaxkv.eval.tasks import render

    n0 = len(tokenizer.encode(render(name, np.random.default_rng(0), 0, 0.5)[0]).ids)
    n1 = len(tokenizer.encode(render(name, np.random.default_rng(0), 200, 0.5)[0]).ids)
    return float(n0), (n1 - n0) / 200.0


def _render_chunk(args) -> list[tuple[np.ndarray, np.ndarray]]:
    """Worker: render and encode documents ``start..stop`` (process-safe: everything is an argument)."""
    tokenizer_json, names, weights, calib, min_len, max_len, seq_len, seed, phase, start, stop, eos, log_lengths = args
    from tokenizers import Tokenizer

    from jaxkv.eval.tasks import answer_text, render

    tok = Tokenizer.from_str(tokenizer_json)
    p = np.asarray(weights, float) / sum(weights)
    prompts, answers = [], []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, phase, i])
        name = names[int(rng.choice(len(names), p=p))]
        base, per_unit = calib[name]
        if log_lengths:  # log-uniform: most documents short, most tokens in long ones
            target = int(round(math.exp(rng.uniform(math.log(min_len), math.log(max_len + 1)))))
        else:
            target = int(rng.integers(min_len, max_len + 1))
        n_units = max(0, int((target - base - 12) / max(per_unit, 1e-6)))
        text, ans, _ = render(name, rng, n_units, float(rng.random()))
        prompts.append(text)
        answers.append(answer_text(ans))
    out = []
    encs = tok.encode_batch(prompts)
    ans_encs = tok.encode_batch(answers, add_special_tokens=False)
    for e, a in zip(encs, ans_encs):
        ids = np.asarray(e.ids + a.ids + [eos], np.int32)
        if len(ids) > seq_len:
            continue  # the length estimate overshot; rare, and the row must hold it whole
        mask = np.zeros(len(ids), bool)
        mask[len(e.ids):] = True
        out.append((ids, mask))
    return out


def task_documents(tokenizer, recipe: Recipe, phase: Phase, n_docs: int, *, seed: int, phase_index: int,
                   workers: int | None = None, log_lengths: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_docs`` task documents ``(ids, loss_mask)`` for ``phase``, the same for the same seed
    whatever the number of worker processes (each document has its own random stream). Target
    lengths are uniform in ``phase.min_len..max_len``, or log-uniform with ``log_lengths``."""
    names = [n for n, _ in recipe.mix]
    weights = [w for _, w in recipe.mix]
    calib = {n: _calibrate(tokenizer, n) for n in names}
    eos = recipe.model.eos_token_ids[0]
    step = 2000
    jobs = [(tokenizer.to_str(), names, weights, calib, phase.min_len, phase.max_len, phase.seq_len, seed,
             phase_index, s, min(s + step, n_docs), eos, log_lengths) for s in range(0, n_docs, step)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1 or len(jobs) == 1:
        chunks = [_render_chunk(j) for j in jobs]
    else:
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            chunks = list(ex.map(_render_chunk, jobs))
    return [d for c in chunks for d in c]


def _phase_documents(tokenizer, recipe: Recipe, phase: Phase, k: int, seed: int, text_docs) -> tuple[list, dict]:
    rows = phase.steps * phase.batch_size / phase.epochs
    tokens = rows * phase.seq_len
    mean_len = (phase.min_len + phase.max_len) / 2
    # whole-document packing leaves on average about half a document of padding per row
    per_row = max(1.0, (phase.seq_len - mean_len / 2) / mean_len)
    n_task = max(phase.batch_size, math.ceil(rows * per_row * (1 - recipe.text_share - recipe.copy_share)))
    docs: list = task_documents(tokenizer, recipe, phase, n_task, seed=seed, phase_index=k)
    if recipe.task_loss == "full":
        docs = [(ids, np.ones_like(mask)) for ids, mask in docs]
    n_copy = 0
    if recipe.copy_share > 0:
        want = tokens * recipe.copy_share
        copies = copy_documents(tokenizer, math.ceil(want / 100), seed=seed + 7919 * k,
                                eos=recipe.model.eos_token_ids[0])  # over 100 tokens each on average
        n_copy = min(len(copies), int(np.searchsorted(np.cumsum([len(c[0]) for c in copies]), want)) + 1)
        docs += copies[:n_copy]
    n_text = 0
    if recipe.text_share > 0 and text_docs:
        # whole passes over the text, then a prefix of it: about text_share of the phase's tokens
        want, have, picked = tokens * recipe.text_share, 0, []
        while have < want:
            d = text_docs[len(picked) % len(text_docs)]
            picked.append(d)
            have += len(d)
        n_text = len(picked)
        docs = docs + picked
    n_all = len(docs)
    stats = {"task_documents": n_all - n_text - n_copy, "copy_documents": n_copy, "text_documents": n_text,
             "task_tokens": int(sum(len(d[0]) for d in docs[:n_all - n_text - n_copy])),
             "copy_tokens": int(sum(len(d[0]) for d in docs[n_all - n_text - n_copy:n_all - n_text])),
             "text_tokens": int(sum(len(d) for d in docs[n_all - n_text:]))}
    return docs, stats


# ---------------------------------------------------------------------------------------------
# the run


def _hardware() -> str:
    import jax

    d = jax.devices()[0]
    return f"{len(jax.devices())} x {d.device_kind} ({d.platform}), jax {jax.__version__}, {platform.machine()}"


def train_default_model(out: str | os.PathLike, *, recipe: Recipe = DEFAULT_RECIPE, seed: int = 0,
                        command: str | None = None, eval_samples: int = 20, eval_tasks: Sequence[str] = EVAL_TASKS,
                        eval_length: int = 2048, log=print) -> Path:
    """Run the recipe into ``out``; returns the exported model folder ``out/model``.

    The model card's scores: the harness (``full`` and ``streaming`` at a quarter of the context)
    on ``eval_tasks`` at ``eval_length`` tokens, ``eval_samples`` held-out samples each."""
    import jax
    import jax.numpy as jnp

    from jaxkv.checkpoints import save_checkpoint
    from jaxkv.training.loop import train_lm

    from jaxkv.eval.tasks import TASKS

    unknown = [t for t in eval_tasks if t not in TASKS]
    if unknown or not eval_tasks:
        raise TrainConfigError(f"eval_tasks: unknown task {unknown[0]!r}; known tasks: {', '.join(sorted(TASKS))}"
                               if unknown else "eval_tasks must name at least one task")
    out = Path(out)
    _claim_run_folder(out, {"recipe": dataclasses.asdict(recipe), "seed": seed})
    t_start = time.time()
    tok_path = out / "tokenizer.json"
    if tok_path.exists():  # this recipe's own tokenizer, from an interrupted run of the same settings
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_path))
    else:
        tokenizer = train_tokenizer(recipe.vocab_size, seed=seed)
        with atomic_path(tok_path) as tmp:
            tokenizer.save(str(tmp))
    params = None
    report: dict = {"phases": []}
    for k, phase in enumerate(recipe.phases):
        t0 = time.time()
        text_docs = text_documents(tokenizer, chunk=min(recipe.text_chunk, phase.seq_len))
        docs, stats = _phase_documents(tokenizer, recipe, phase, k, seed, text_docs)
        t_data = time.time() - t0
        log(f"phase {k}: {stats['task_documents']} task documents ({stats['task_tokens']:,} tokens), "
            f"{stats['copy_documents']} copy documents ({stats['copy_tokens']:,} tokens), "
            f"{stats['text_documents']} text documents ({stats['text_tokens']:,} tokens); made in {t_data:.0f} s")
        result = train_lm(
            recipe.model, docs, params=params, tokenizer=tokenizer, out=out / f"phase-{k}",
            optim=OptimConfig(lr=phase.lr, schedule="cosine", warmup_steps=phase.warmup, total_steps=phase.steps,
                              weight_decay=0.1),
            data=DataConfig(seq_len=phase.seq_len, split_documents=False),
            train=TrainConfig(batch_size=phase.batch_size, steps=phase.steps, seed=seed + k,
                              save_every=max(1, phase.steps // 2), keep=1, log_every=max(1, min(50, phase.steps // 10))),
            extra_meta={"recipe_phase": dataclasses.asdict(phase), "data_source": "default-model recipe"},
        )
        params = jax.device_get(result.state.params)
        last = result.history[-1] if result.history else {}
        check_len = max(128, min(phase.max_len, eval_length))
        check = _phase_check(params, recipe.model, tokenizer, check_len, seed)
        log(f"phase {k}: loss {last.get('loss', float('nan')):.4f}, {last.get('tokens_per_s', 0):,.0f} tokens/s; "
            f"full-cache accuracy at {check_len} tokens: " + ", ".join(f"{t} {a:.2f}" for t, a in check.items()))
        report["phases"].append({**dataclasses.asdict(phase), **stats, "data_seconds": round(t_data, 1),
                                 "seconds": round(time.time() - t0, 1), "final_loss": last.get("loss"),
                                 "tokens_per_s": last.get("tokens_per_s"), "check_length": check_len,
                                 "check_accuracy": check})
    # The model folder is built (weights, scores, card) in a staging folder of this run and only
    # then swapped in for out/model, so an interrupted export leaves the previous model whole.
    staging = Path(tempfile.mkdtemp(prefix=".model.", dir=out))
    model_dir = staging / "model"
    bf16 = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16)), params)
    save_checkpoint(model_dir, recipe.model, bf16, tokenizer=tokenizer)
    report["train_seconds"] = round(time.time() - t_start, 1)
    report["hardware"] = _hardware()
    report["seed"] = seed
    report["command"] = command
    report["parameters"] = int(sum(np.size(a) for a in jax.tree.leaves(params)))
    scores = evaluate_default_model(model_dir, samples=eval_samples, seed=seed + 1, tasks=eval_tasks,
                                    length=eval_length)
    report["scores"] = scores
    report["eval_length"] = eval_length
    _write_json(model_dir / "scores.json", report)
    write_model_card(model_dir, recipe, report)
    replace_folder(model_dir, out / "model")
    shutil.rmtree(staging, ignore_errors=True)
    model_dir = out / "model"
    log(f"wrote {model_dir} ({_folder_bytes(model_dir) / 1e6:.1f} MB)")
    return model_dir


RECIPE_FILE = "recipe.json"


def _claim_run_folder(out: Path, meta: dict) -> None:
    """Make ``out`` this recipe's run folder, or check that it already is one of the same settings.

    A non-empty folder without ``recipe.json`` belongs to somebody else, and one with other
    settings to another run: both are refused before anything is written."""
    meta = json.loads(json.dumps(meta))
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        marker = out / RECIPE_FILE
        if not marker.exists():
            held = sorted(p.name for p in out.iterdir())[:3]
            raise TrainConfigError(f"--out {out} is not empty and is not a default-model run (it holds "
                                   f"{', '.join(held)}); choose another folder")
        old = read_json_object(marker, TrainConfigError)
        if old != meta:
            raise TrainConfigError(f"--out {out} holds a default-model run with other settings (seed or "
                                   "recipe); rerun with the same settings to resume, or choose another folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RECIPE_FILE, json.dumps(meta, indent=1, sort_keys=True) + "\n")


def evaluate_default_model(model_dir: Path, *, samples: int, seed: int, tasks: Sequence[str] = EVAL_TASKS,
                           length: int = 2048) -> list[dict]:
    """Harness rows: ``full`` and ``streaming`` at a quarter of the context, on ``tasks``."""
    from jaxkv.checkpoints import load_checkpoint, load_tokenizer
    from jaxkv.eval.harness import EvalConfig, evaluate

    import jax.numpy as jnp

    config, params = load_checkpoint(model_dir, dtype=jnp.float32)
    tokenizer = load_tokenizer(model_dir)
    cfg = EvalConfig(methods=("full", "streaming"), budgets=(0.25,),
                     tasks=tuple(tasks), lengths=(length,), samples=samples, seed=seed)
    return [r.asdict() for r in evaluate(params, config, tokenizer, cfg)]


def _phase_check(params, config: LlamaConfig, tokenizer, length: int, seed: int, samples: int = 8) -> dict:
    """Full-cache accuracy after a phase (held-out seeds), to follow the curriculum."""
    import jax
    import jax.numpy as jnp

    from jaxkv.eval.harness import EvalConfig, evaluate

    f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    cfg = EvalConfig(methods=("full",), tasks=("niah_single", "passkey"), lengths=(length,), samples=samples,
                     seed=seed + 10_000)
    return {r.task: r.accuracy for r in evaluate(f32, config, tokenizer, cfg)}


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def write_model_card(model_dir: Path, recipe: Recipe, report: dict) -> None:
    m = recipe.model
    lines = [
        "# jaxkv default model",
        "",
        "A small Llama-family model that jaxkv trains itself, so that `jaxkv eval` can tell cache "
        "methods apart on any machine without downloading weights. It retrieves needles from "
        "long synthetic contexts; it is not a general language model.",
        "",
        "## Model",
        f"- {report['parameters']:,} parameters, stored in bfloat16; layers {m.num_layers}, hidden "
        f"{m.hidden_size}, MLP {m.intermediate_size}, query heads {m.num_heads} over KV heads "
        f"{m.num_kv_heads} (GQA), head dimension {m.head_dim}, RoPE (theta {m.rope_theta:g}), tied embeddings, context "
        f"{m.max_position_embeddings}.",
        f"- Tokenizer: byte-level BPE of {recipe.vocab_size} ids trained with `tokenizers`, single-digit tokens; "
        "`<pad>`=0, `<s>`=1 (prepended), `</s>`=2 (end of answer).",
        "",
        "## How it was made",
        f"- Command: `{report['command']}`" if report.get("command") else "- Command: (called from Python)",
        f"- Seed: {report['seed']}. Hardware: {report['hardware']}. Wall time: {report['train_seconds']:.0f} s.",
        "- Data, generated by the recipe (`jaxkv/training/default_model.py`): prompts of jaxkv's RULER-style "
        "tasks (mix: " + ", ".join(f"{n} {w:g}" for n, w in recipe.mix) + ") at random lengths and depths, "
        + ("loss on the answer and `</s>` only" if recipe.task_loss == "answer" else "loss on every token")
        + (f"; copy documents (a line of random keys and numbers, then the line again, loss on the copy) as "
           f"{100 * recipe.copy_share:g}% of the tokens" if recipe.copy_share else "")
        + "; ordinary text (Python's reference documentation, "
        f"`pydoc_data.topics`) as {100 * recipe.text_share:g}% of the tokens, loss on every token.",
        "- Curriculum (AdamW, weight decay 0.1, cosine schedule per phase, bf16 compute over fp32 weights):",
        "",
        "| phase | document tokens | row | batch | steps | peak lr | final loss | tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, p in enumerate(report["phases"]):
        loss = f"{p['final_loss']:.3f}" if p.get("final_loss") is not None else "-"
        tps = f"{p['tokens_per_s']:,.0f}" if p.get("tokens_per_s") else "-"
        lines.append(f"| {k} | {p['min_len']}-{p['max_len']} | {p['seq_len']} | {p['batch_size']} | {p['steps']} "
                     f"| {p['lr']:g} | {loss} | {tps} |")
    lines += ["", "## Scores", "",
              f"`jaxkv eval` harness, {report['eval_length']:,}-token prompts, needles spread evenly over the context "
              f"({report['scores'][0]['samples'] if report['scores'] else 0} samples per row; held-out seeds):", "",
              "| method | budget | task | accuracy | KL vs full | top-1 agreement | KV bytes |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["scores"]:
        lines.append(f"| {r['method']} | {r['budget']:g} | {r['task']} | {r['accuracy']:.2f} | {r['kl']:.3f} "
                     f"| {r['top1_agreement']:.2f} | {r['kv_bytes']:,} |")
    lines += ["", "## Limits",
              "- Trained only on these task formats and a little technical English: outside them its text is poor.",
              f"- Retrieval is trained on documents of up to {max(p.max_len for p in recipe.phases):,} tokens; "
              "longer prompts are outside its training.", ""]
    write_text_atomic(model_dir / "README.md", "\n".join(lines))
