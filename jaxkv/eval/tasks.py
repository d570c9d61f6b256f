"""RULER-style synthetic long-context tasks, generated locally for any tokenizer.

Each task builds a prompt of a target length in tokens (of the given tokenizer) from haystack
units (sentences or list items), hides the facts to find ("needles") at a chosen depth, and
ends with a question and the beginning of the answer, which the model continues. Everything is
drawn from ``numpy.random.default_rng(seed)``: the same (task, length, depth, seed) and tokenizer
give the same sample. The wording is jaxkv's own; the task designs follow RULER (Hsieh et al.).

Tasks:
  niah_single        one key -> 7-digit number needle in a noise haystack (repeated plain sentences)
  niah_single_words  the same in a haystack of random sentences built from wonderwords' lists
  niah_multikey      four needles with different keys; the question asks for one
  niah_multivalue    four numbers for one key; all four are asked for
  niah_multiquery    four needles with different keys; two are asked for
  vt                 variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops)
                     in noise; the answer is every variable that holds the value
  cwe                common words: a numbered word list where 10 words occur 6 times each and
                     the rest 2 times; the answer is the 10 common words (RULER repeats them
                     30 and 3 times; 6 and 2 keep the task within reach of 2k-token prompts)
  fwe                frequent words: coded words drawn from a Zipf law; the answer is the 3 most
                     frequent
  passkey            a 5-digit pass key in noise

Scoring (``score``): RULER's string match: the share of reference answers that appear, case
insensitively, in the model's output.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources
from typing import Callable

import numpy as np
from jaxkv.errors import UserError

__all__ = ["Sample", "TASKS", "answer_text", "make_sample", "render", "score", "word_lists"]

NOISE = ("The river runs to the sea.", "The hills stay green in spring.", "A bird sings on the roof.",
         "The road goes on and on.")


def _noise(n: int) -> list[str]:
    return [NOISE[i % len(NOISE)] for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt. ``answers``: the strings to find in the output; ``needle_chars``: the
    character offsets of the first needle in ``prompt`` (for depth checks), or None."""

    task: str
    prompt: str
    prompt_ids: tuple[int, ...]
    answers: tuple[str, ...]
    target_length: int
    depth: float
    seed: int
    max_new_tokens: int
    needle_chars: tuple[int, int] | None

    @property
    def length(self) -> int:
        return len(self.prompt_ids)


@functools.lru_cache(maxsize=1)
def word_lists() -> dict[str, tuple[str, ...]]:
    """Nouns, verbs and adjectives shipped by the ``wonderwords`` package (sorted, lower case)."""
    assets = resources.files("wonderwords") / "assets"
    out = {}
    for kind, fname in (("noun", "nounlist.txt"), ("verb", "verblist.txt"), ("adjective", "adjectivelist.txt")):
        words = {w.strip().lower() for w in (assets / fname).read_text().splitlines()}
        out[kind] = tuple(sorted(w for w in words if w.isalpha() and 3 <= len(w) <= 10))
    return out


def _pick(rng, seq, n=None, replace=True):
    idx = rng.choice(len(seq), size=n, replace=replace)
    return seq[int(idx)] if n is None else [seq[int(i)] for i in idx]


def random_key(rng) -> str:
    """A needle key: ``adjective-noun`` from wonderwords' lists."""
    w = word_lists()
    return f"{_pick(rng, w['adjective'])}-{_pick(rng, w['noun'])}"


def random_number(rng, digits: int) -> str:
    """A ``digits``-digit decimal number without a leading zero."""
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _word_sentence(rng) -> str:
    w = word_lists()
    return (f"The {_pick(rng, w['adjective'])} {_pick(rng, w['noun'])} "
            f"{_pick(rng, w['verb'])}s the {_pick(rng, w['noun'])}.")


# A task builder: (rng, n_units, depth) -> (context pieces, index of the first needle in them or
# None, question, answer prefix, answers). The haystack has ``n_units`` units; the first needle
# goes in at unit round(depth * n_units).
Builder = Callable[[np.random.Generator, int, float], tuple[list[str], int | None, str, str, tuple[str, ...]]]


def _insert(units: list[str], needles: list[str], depth: float, rng, spread: bool) -> tuple[list[str], int]:
    """Put the first needle at ``depth`` and the others (if ``spread``) at random places."""
    n = len(units)
    first = int(round(depth * n))
    places = [first] + ([int(p) for p in rng.integers(0, n + 1, len(needles) - 1)] if spread else [first] * (len(needles) - 1))
    out = list(units)
    order = sorted(range(len(needles)), key=lambda i: (places[i], i), reverse=True)
    for i in order:
        out.insert(places[i], needles[i])
    return out, out.index(needles[0])


def _niah(n_keys: int, n_values: int, n_queries: int, haystack: str):
    def build(rng, n_units, depth):
        keys = []
        while len(keys) < n_keys:
            k = random_key(rng)
            if k not in keys:
                keys.append(k)
        values = {k: [random_number(rng, 7) for _ in range(n_values if i == 0 else 1)] for i, k in enumerate(keys)}
        needles = [f"The special magic number for {k} is {v}." for k in keys for v in values[k]]
        if haystack == "noise":
            units = _noise(n_units)
        else:
            units = [_word_sentence(rng) for _ in range(n_units)]
        queried = keys[:n_queries]
        body, idx = _insert(units, needles, depth, rng, spread=len(needles) > 1)
        if n_values > 1:
            question = f"What are all the special magic numbers for {keys[0]}?"
            prefix = f"The special magic numbers for {keys[0]} are"
            answers = tuple(values[keys[0]])
        elif n_queries > 1:
            question = f"What are the special magic numbers for {' and '.join(queried)}?"
            prefix = f"The special magic numbers for {' and '.join(queried)} are"
            answers = tuple(values[k][0] for k in queried)
        else:
            question = f"What is the special magic number for {keys[0]}?"
            prefix = f"The special magic number for {keys[0]} is"
            answers = (values[keys[0]][0],)
        return body, idx, question, prefix, answers
    return build


def _passkey(rng, n_units, depth):
    key = random_number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    body, idx = _insert(_noise(n_units), [needle], depth, rng, spread=False)
    return body, idx, "What is the pass key?", "The pass key is", (key,)


def _vt(rng, n_units, depth, hops: int = 4):
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(letters, 5))
        if name not in names:
            names.append(name)
    value = random_number(rng, 5)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    units = _noise(n_units)
    n = len(units)
    # chain in order, starting at `depth`, spread over the rest of the context
    start = int(round(depth * n))
    places = np.sort(rng.integers(start, n + 1, hops + 1))
    places[0] = start
    body = list(units)
    for i in reversed(range(hops + 1)):
        body.insert(int(places[i]), needles[i])
    question = f"Find all variables that are assigned the value {value}."
    prefix = f"The variables assigned the value {value} are"
    return body, body.index(needles[0]), question, prefix, tuple(names)


def _cwe(rng, n_units, depth, n_common: int = 10, common_reps: int = 6, rare_reps: int = 2):
    nouns = word_lists()["noun"]
    chosen = [nouns[int(i)] for i in rng.permutation(len(nouns))[: n_common + n_units]]
    common, rare = chosen[:n_common], chosen[n_common:]
    words = common * common_reps + rare * rare_reps
    order = rng.permutation(len(words))
    items = [f"{i + 1}. {words[j]}" for i, j in enumerate(order)]
    question = f"What are the {n_common} most common words in the list above?"
    prefix = f"The {n_common} most common words in the list are"
    return [" ".join(items)], None, question, prefix, tuple(common)


def _fwe(rng, n_units, depth, alpha: float = 2.0, vocab: int = 60):
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    coded = []
    while len(coded) < vocab:
        w = "".join(rng.choice(letters, 5))
        if w not in coded:
            coded.append(w)
    ranks = np.arange(1, vocab + 1, dtype=float)
    p = ranks ** -alpha
    p /= p.sum()
    draws = list(rng.choice(vocab, size=max(30, n_units), p=p))  # prefix-stable in n_units
    counts = np.bincount(draws, minlength=vocab)
    rest = int(counts[3:].max())
    for r in range(3):  # make the top three unambiguous
        draws += [r] * max(0, rest + 1 - int(counts[r]))
    words = [coded[i] for i in draws]
    words = [words[i] for i in rng.permutation(len(words))]
    question = "What are the 3 most frequent coded words in the text above?"
    prefix = "The 3 most frequent coded words are"
    return [" ".join(words) + "."], None, question, prefix, tuple(coded[:3])


TASKS: dict[str, tuple[Builder, int]] = {
    # name: (builder, max_new_tokens)
    "niah_single": (_niah(1, 1, 1, "noise"), 16),
    "niah_single_words": (_niah(1, 1, 1, "words"), 16),
    "niah_multikey": (_niah(4, 1, 1, "noise"), 16),
    "niah_multivalue": (_niah(1, 4, 1, "noise"), 48),
    "niah_multiquery": (_niah(4, 1, 2, "noise"), 32),
    "vt": (_vt, 40),
    "cwe": (_cwe, 64),
    "fwe": (_fwe, 32),
    "passkey": (_passkey, 12),
}


HEADER = "Read the text below and answer the question at the end.\n\n"


def render(task: str, rng: np.random.Generator, n_units: int,
           depth: float) -> tuple[str, tuple[str, ...], tuple[int, int] | None]:
    """The prompt of ``task`` with ``n_units`` haystack units, the first needle at ``depth``:
    ``(text, answers, character span of the first needle or None)``. Draws from ``rng``."""
    builder, _ = TASKS[task]
    body, idx, question, prefix, answers = builder(rng, n_units, depth)
    text = HEADER + " ".join(body) + f"\n\nQuestion: {question}\nAnswer: {prefix}"
    span = None
    if idx is not None:
        start = len(HEADER) + sum(len(u) + 1 for u in body[:idx])
        span = (start, start + len(body[idx]))
    return text, tuple(answers), span


def answer_text(answers: tuple[str, ...]) -> str:
    """The reference continuation of a prompt: `` a, b, c.`` (what the default model is trained
    to write, and the span the harness teacher-forces)."""
    return " " + ", ".join(answers) + "."


def make_sample(task: str, tokenizer, *, length: int, depth: float = 0.5, seed: int = 0) -> Sample:
    """A sample of ``task`` whose prompt is as close to ``length`` tokens as the haystack's
    granularity allows (never longer)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"depth must be in [0, 1], got {depth}")
    if length < 64:
        raise UserError(f"length must be >= 64 tokens, got {length}")
    max_new = TASKS[task][1]

    def build(n_units):
        # One stream per sample, drawn in a fixed order (needles first, then haystack units), so
        # n + 1 units extend n units and the token count grows with n: binary search applies.
        text, answers, span = render(task, np.random.default_rng(seed), n_units, depth)
        return text, tokenizer.encode(text).ids, answers, span

    lo, hi = 0, 1
    while len(build(hi)[1]) <= length:  # find an upper bound
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            raise UserError(f"cannot reach {length} tokens with task {task!r}")
    if lo == 0 and len(build(0)[1]) > length:
        raise UserError(f"task {task!r} needs more than {length} tokens even without a haystack")
    while hi - lo > 1:  # largest unit count that fits
        mid = (lo + hi) // 2
        if len(build(mid)[1]) <= length:
            lo = mid
        else:
            hi = mid
    for n in range(lo + 8, lo, -1):  # absorb small non-monotonic steps of the tokenizer
        if len(build(n)[1]) <= length:
            lo = n
            break
    text, ids, answers, needle_chars = build(lo)
    return Sample(task=task, prompt=text, prompt_ids=tuple(ids), answers=tuple(answers), target_length=length,
                  depth=depth, seed=seed, max_new_tokens=max_new, needle_chars=needle_chars)


def score(output: str, answers: tuple[str, ...]) -> float:
    """Share of ``answers`` contained in ``output`` (case-insensitive), as RULER scores."""
    if not answers:
        raise UserError("a sample needs at least one reference answer")
    out = output.lower()
    return sum(a.lower() in out for a in answers) / len(answers)
