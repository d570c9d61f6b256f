"""The evaluation harness: every (method, budget, task, length) measured on the same samples.

Per sample and method:
  accuracy      RULER string match of the greedy continuation (``tasks.score``);
  kl, top1      fidelity to the full cache: the next-token distributions over the reference
                answer, teacher forced, compared with the full cache's (mean KL(full || method)
                in nats, and the share of positions whose argmax agrees);
  kv_bytes      bytes the policy's cache holds (``ModelCache.nbytes``), beside the full cache's;
                both caches have the slots of the prompt bucket (a power of two) plus the answer's,
                so the full cache counts its bucket's padding: a ratio at a length just past a
                power of two reads lower than at one just below it;
  attended_fraction   the share of the context's (token, KV head) pairs the last teacher-forced
                decode step attended over (``CachePolicy.attended_keys``; what query-aware
                methods save), None where a policy does not say;
  prefill_ms    wall time of the jitted prefill (after a warm-up of the same shapes);
  decode tok/s  generated tokens / wall time of the jitted decode loop.

The full cache runs once per sample; its answer-span logits are reused for every method. All
samples of a (task, length) share one prompt bucket and each method is sized once for the
requested length (its budget a share of ``length``, not of each sample's few tokens fewer), so
nothing recompiles between samples.

A Mamba-2 (``Mamba2Config``) runs the same tasks with its state as the cache: only ``full``
applies, and ``kv_bytes`` is the state's bytes (the same at every length).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache import LayerSpec, ModelCache, make_policy
from jaxkv.cache.policy import parse_policy_spec
from jaxkv.config import LlamaConfig
from jaxkv.eval.tasks import TASKS, Sample, answer_text, make_sample, score
from jaxkv.generate import decode, init_model_cache, is_state_space, model_forward, pad_prompts, prefill
from jaxkv.errors import UserError

__all__ = ["EvalConfig", "Row", "evaluate", "policy_for", "kl_and_agreement", "answer_ids", "attended_fraction"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    methods: tuple[str, ...] = ("full", "streaming")
    budgets: tuple[float, ...] = (0.25,)
    tasks: tuple[str, ...] = ("niah_single",)
    lengths: tuple[int, ...] = (2048,)
    samples: int = 10
    seed: int = 0

    def __post_init__(self):
        for name in ("methods", "budgets", "tasks", "lengths"):  # a bare string would be read letter by letter
            if isinstance(getattr(self, name), (str, bytes)) or not hasattr(getattr(self, name), "__iter__"):
                raise UserError(f"{name} must be a sequence of values, got {getattr(self, name)!r}")
        for m in self.methods:
            make_policy(m)  # an unknown name or parameter is refused here, naming the known ones
        for t in self.tasks:
            if t not in TASKS:
                raise UserError(f"unknown task {t!r}; known tasks: {', '.join(sorted(TASKS))}")
        for b in self.budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
                raise UserError(f"budgets must be numbers in (0, 1], got {b!r}")
        for n in self.lengths:
            if not isinstance(n, int) or n < 64:
                raise UserError(f"lengths must be integers >= 64, got {n!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise UserError(f"samples must be an integer >= 1, got {self.samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("methods", "budgets", "tasks", "lengths"):
            values = getattr(self, name)
            twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if twice is not None:
                raise UserError(f"{name} lists {twice!r} twice")
        if not self.methods or not self.tasks or not self.lengths or not self.budgets:
            raise UserError("methods, budgets, tasks and lengths must each name at least one value")


@dataclasses.dataclass(frozen=True)
class Row:
    method: str
    budget: float
    task: str
    length: int
    accuracy: float
    kl: float
    top1_agreement: float
    kv_bytes: int
    full_kv_bytes: int
    attended_fraction: float | None
    prefill_ms: float
    decode_tokens_per_s: float
    samples: int

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


def policy_for(method: str, budget: float, context_len: int):
    """The policy ``method`` sized for ``budget`` of a ``context_len``-token prompt. For a
    composition (``razor+mikv``) the budget is the share of tokens the policy keeps; its storage
    then holds them in fewer bytes (the bytes are reported as held). Parameters in the name
    (``minicache[merge=average]``, ``razor[window=64]``) are kept as given; the budget sizes the
    rest around them (``from_budget``)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise UserError(f"budget must be a number in (0, 1], got {budget!r}")
    name, params = parse_policy_spec(method)
    base = make_policy(name)
    make_policy(method)  # checks the parameters by name first, for a clear error
    fields = dict(params)
    if "bits" in fields and base.kv_bits is not None and "+" in name:  # a composition's storage bits
        fields["kv_bits"] = fields.pop("bits")
    fields.setdefault("kv_bits", base.kv_bits)
    return type(base).from_budget(budget, context_len, **fields)


def kl_and_agreement(ref_logits: jax.Array, logits: jax.Array) -> tuple[float, float]:
    """Mean KL(softmax(ref) || softmax(logits)) in nats and top-1 agreement over rows ``[A, V]``."""
    ref = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32), axis=-1)
    got = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(ref) * (ref - got), axis=-1)
    agree = jnp.argmax(ref, axis=-1) == jnp.argmax(got, axis=-1)
    return float(jnp.mean(jnp.maximum(kl, 0.0))), float(jnp.mean(agree))


def answer_ids(tokenizer, sample: Sample) -> list[int]:
    """The reference continuation (``tasks.answer_text``) as token ids, without special tokens."""
    return tokenizer.encode(answer_text(sample.answers), add_special_tokens=False).ids


@functools.partial(jax.jit, static_argnames=("config",))
def _teacher_forced(params, cache, ids, start, *, config: LlamaConfig):
    """Feed ``ids [A]`` one token at a time from position ``start``; logits ``[A, V]`` of each
    step (the prediction of the next answer token)."""

    def step(cache, x):
        i, tok = x
        logits, cache = model_forward(config)(params, tok[None, None], (start + i)[None, None], cache,
                                              config=config)
        return cache, logits[0, 0]

    cache, logits = jax.lax.scan(step, cache, (jnp.arange(ids.shape[0]), ids))
    return logits, cache


def attended_fraction(cache, context_tokens: int, config) -> float | None:
    """Mean over rows of the (token, KV head) pairs the last step attended, over every layer,
    as a share of ``context_tokens`` x KV heads x layers; None if a layer's policy does not say
    (or the model has no KV cache)."""
    if not isinstance(cache, ModelCache):
        return None
    total = 0.0
    for i, policy in enumerate(cache.policies):
        spec = LayerSpec(i, config)
        n = policy.attended_keys(cache.layers[policy.state_index(spec)])
        if n is None:
            return None
        total = total + n
    return float(jnp.mean(total)) / (context_tokens * config.num_kv_heads * config.num_layers)


def _span_slots(n_answer: int) -> int:
    """Teacher-forced steps for an answer of ``n_answer`` tokens (its first ``n_answer - 1``
    tokens are fed), rounded up to a multiple of 16 so that answers of other lengths reuse one
    compiled scan; the logits past the answer are dropped."""
    return -(-max(n_answer - 1, 1) // 16) * 16


def _block(x):
    return jax.block_until_ready(x)


class _Runner:
    """Runs one sample under one policy: prefill, greedy decode, teacher-forced answer span."""

    def __init__(self, params, config: LlamaConfig, tokenizer):
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.dtype = params["embed"]["embedding"].dtype
        self._warm: set = set()

    def run(self, sample: Sample, policy, ans: list[int]) -> dict:
        tokens, positions, lengths = pad_prompts([sample.prompt_ids])
        t = tokens.shape[1]
        span = _span_slots(len(ans))
        max_new = max(sample.max_new_tokens, span + 1)
        context = getattr(self.config, "max_position_embeddings", None)  # a Mamba-2 has no position limit
        if context is not None and len(sample.prompt_ids) + max_new > context:
            raise UserError(f"a {sample.task} prompt of {len(sample.prompt_ids)} tokens and its {max_new} answer "
                            f"positions exceed the model's context of {context}; "
                            "use a shorter length")
        max_len = t + max_new
        key = (policy, t, max_new, span)
        if key not in self._warm:  # compile outside the timed region
            self._once(policy, tokens, positions, lengths, max_len, sample.max_new_tokens, ans)
            self._warm.add(key)
        return self._once(policy, tokens, positions, lengths, max_len, sample.max_new_tokens, ans)

    def _once(self, policy, tokens, positions, lengths, max_len, max_new, ans):
        cfg = self.config
        cache = init_model_cache(cfg, policy, batch=1, max_len=max_len, dtype=self.dtype)
        nbytes = cache.nbytes
        t0 = time.perf_counter()
        last, cache = prefill(self.params, tokens, positions, lengths, cache, config=cfg)
        _block(last)
        prefill_s = time.perf_counter() - t0
        # teacher-forced answer span: the first answer token is predicted by the prefill logits
        tf_cache = jax.tree.map(jnp.copy, cache)
        stop = np.array(cfg.eos_token_ids or (-2,), np.int32)
        t0 = time.perf_counter()
        out, _ = decode(self.params, cache, last, lengths, jax.random.key(0), np.float32(0), np.float32(1),
                        stop, config=cfg, max_new_tokens=max_new)
        out = np.asarray(_block(out))[0]
        decode_s = time.perf_counter() - t0
        new = [int(x) for x in out if x >= 0]
        n = len(ans) - 1
        ids = np.zeros(_span_slots(len(ans)), np.int32)
        ids[:n] = ans[:-1]
        span, tf_cache = _teacher_forced(self.params, tf_cache, jnp.asarray(ids), jnp.int32(int(lengths[0])),
                                         config=cfg)
        attended = attended_fraction(tf_cache, int(lengths[0]) + ids.shape[0], cfg)
        logits = jnp.concatenate([last[0][None], span[:n]], axis=0)
        return {"tokens": new, "text": self.tokenizer.decode(new, skip_special_tokens=True),
                "logits": np.asarray(logits), "kv_bytes": nbytes, "prefill_s": prefill_s, "attended": attended,
                "decode_tokens_per_s": max(len(new) - 1, 1) / decode_s}


# Samples are the same for every model that shares a tokenizer (an immutable ``Sample``; the key
# holds the tokenizer, so its id is never reused while cached): scoring several checkpoints in one
# process builds each long prompt once, which at 16k tokens costs more than running the model.
_sample = functools.lru_cache(maxsize=2048)(make_sample)


def evaluate(params, config: LlamaConfig, tokenizer, cfg: EvalConfig,
             progress: Callable[[int, int], None] | None = None) -> list[Row]:
    """Run the grid; one ``Row`` per (method, budget, task, length), averaged over samples.

    ``full`` is always run (it is the fidelity reference) and reported once, at budget 1.0.
    """
    if is_state_space(config) and tuple(cfg.methods) != ("full",):
        others = ", ".join(m for m in cfg.methods if m != "full")
        raise UserError(f"methods {others}: a Mamba-2's cache is its fixed-size state, and cache policies "
                        "compress a transformer's KV cache; evaluate it with methods=('full',)")
    runner = _Runner(params, config, tokenizer)
    prepared: dict = {}

    def policy(m, b, length):  # prepared once per (method, budget, length): calibration runs once
        if (m, b, length) not in prepared:
            prepared[m, b, length] = policy_for(m, b, length).prepare(params, config)
        return prepared[m, b, length]

    grid = [(m, b) for m in cfg.methods if m != "full" for b in cfg.budgets]
    total = len(cfg.tasks) * len(cfg.lengths) * cfg.samples
    acc: dict[tuple, list[dict]] = {}
    done = 0
    for task in cfg.tasks:
        for length in cfg.lengths:
            for i in range(cfg.samples):
                depth = (i + 0.5) / cfg.samples  # needles spread evenly over the context
                sample = _sample(task, tokenizer, length=length, depth=depth, seed=cfg.seed * 100_003 + i)
                ans = answer_ids(tokenizer, sample)
                full = runner.run(sample, None if is_state_space(config) else make_policy("full"), ans)
                runs = [("full", 1.0, full)] if "full" in cfg.methods else []
                for m, b in grid:
                    runs.append((m, b, runner.run(sample, policy(m, b, length), ans)))
                for m, b, r in runs:
                    kl, top1 = kl_and_agreement(full["logits"], r["logits"])
                    acc.setdefault((m, b, task, length), []).append({
                        "accuracy": score(r["text"], sample.answers), "kl": kl, "top1": top1,
                        "kv_bytes": r["kv_bytes"], "full_kv_bytes": full["kv_bytes"], "attended": r["attended"],
                        "prefill_ms": 1e3 * r["prefill_s"], "tps": r["decode_tokens_per_s"]})
                done += 1
                if progress is not None:
                    progress(done, total)
    rows = []
    for (m, b, task, length), rs in acc.items():
        rows.append(Row(
            method=m, budget=b, task=task, length=length,
            accuracy=statistics.fmean(r["accuracy"] for r in rs),
            kl=statistics.fmean(r["kl"] for r in rs),
            top1_agreement=statistics.fmean(r["top1"] for r in rs),
            kv_bytes=int(statistics.median(r["kv_bytes"] for r in rs)),
            full_kv_bytes=int(statistics.median(r["full_kv_bytes"] for r in rs)),
            attended_fraction=(None if any(r["attended"] is None for r in rs)
                               else statistics.fmean(r["attended"] for r in rs)),
            prefill_ms=statistics.median(r["prefill_ms"] for r in rs),
            decode_tokens_per_s=statistics.median(r["tps"] for r in rs),
            samples=len(rs)))
    return rows


def progress_bar(done: int, total: int, stream=sys.stderr) -> None:
    width = 30
    filled = int(width * done / total)
    stream.write(f"\r[{'#' * filled}{'-' * (width - filled)}] {done}/{total} samples")
    if done == total:
        stream.write("\n")
    stream.flush()
