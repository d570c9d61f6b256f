"""ICN: correlation in the vocabulary key space, and in-context navigation decoding.

Peng, An & Shang, "Correlation and Navigation in the Vocabulary Key Representation Space of
Language Models" (2024). The next-token distribution is a softmax over dot products of one query
(the last hidden state) with a fixed set of keys, the unembedding rows. Tokens whose keys sit near
a top-ranked key are ranked high with it whether or not they lead to a right answer, so rank
enumeration and sampling spend their budget on near neighbours of what was already found. ICN
(in-context navigation) puts the answers found so far back into the prompt, which moves the query
away from their keys, and explores the highest-ranked first token not tried yet.

What this module holds:

* **Knowledge probes with closed answer sets** (``knowledge_probes()``): instructions such as
  "Please show me some US states." with every accepted answer and its aliases, built from ISO data
  (``pycountry``: countries, subdivisions, languages, currencies) and from what Python itself knows
  (``calendar``: months, weekdays; ``unicodedata``: Greek letters, zodiac signs, chess pieces, card
  suits). ``Probe.judge`` normalises case, accents, articles and punctuation and returns the
  canonical answer, so aliases of one answer count once.
* **The list format** (``ListFormat``): the paper's prompt, the instruction then a numbered list
  of quoted answers ending in an open quote; an item ends at the closing quote. ``ways_format()``
  is the chain-of-thought variant ("### Way k:").
* ``cluster_keys``: k-means of the unembedding rows (``jaxkv.kmeans``, the one Squeezed
  Attention's index uses) for ``jaxkv.eval.keyspace``.
* ``Explorer``: batched first-token logits and greedy / sampled completions on any Llama-family
  model, every forward jit-compiled once per (batch bucket, length bucket).
* ``icn_explore`` (ICN), ``rank_enumerate`` and ``sample_answers`` (the baselines at the same
  budget of N generations), and ``self_consistency`` (majority vote over k chain-of-thought paths
  found by ICN or sampled) on ``arithmetic_problems``.

Deviations from the paper, each where it lives: answers are judged against closed answer sets by
string matching, not by a hosted model; the paper's ICN also appends an answer that repeats an
earlier one (so do we); the completion of a chosen first token runs from the original prompt by
default, as in the official code, or from the navigated prompt (``complete_from="navigated"``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import unicodedata
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.errors import UserError

__all__ = [
    "Probe", "normalize_answer", "knowledge_probes", "probe_names", "ListFormat", "ways_format",
    "KeyClusters", "cluster_keys", "default_cluster_count", "Explorer", "Exploration",
    "icn_explore", "rank_enumerate", "sample_answers", "distinct_correct",
    "ArithmeticProblem", "arithmetic_problems", "self_consistency", "majority_vote",
]


# ---------------------------------------------------------------------------------------------
# judging


_ARTICLES = ("the ", "a ", "an ")
_ENUMERATION = re.compile(r"^\s*\d+[.)]\s+")  # "1. Monday": a list number the model wrote itself


def normalize_answer(text: str) -> str:
    """Lower case, accents and periods removed, other punctuation read as spaces, ``&`` as
    ``and``, a leading list number ("1. ") and article dropped, whitespace collapsed:
    ``" The Côte-d'Ivoire! "`` -> ``"cote d ivoire"``."""
    text = _ENUMERATION.sub("", unicodedata.normalize("NFKD", text))
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.casefold().replace("&", " and ").replace(".", "")  # "U.S." = "US"
    text = re.sub(r"[^\w]+", " ", text).replace("_", " ")
    text = " ".join(text.split())
    for a in _ARTICLES:
        if text.startswith(a):
            text = text[len(a):]
            break
    return text


@dataclasses.dataclass(frozen=True)
class Probe:
    """A knowledge probe: an ``instruction`` and the closed set of answers it accepts.

    ``aliases`` maps each normalised alias to its canonical answer (``answers`` are the canonical
    forms, in a fixed order). ``judge(text)`` is the canonical answer ``text`` names, or None."""

    name: str
    instruction: str
    answers: tuple[str, ...]
    aliases: dict = dataclasses.field(repr=False, compare=False, hash=False, default_factory=dict)

    @classmethod
    def build(cls, name: str, instruction: str, entries: Iterable[tuple[str, Sequence[str]]]) -> "Probe":
        """``entries``: ``(canonical, aliases)`` pairs; the canonical form is an alias of itself
        and names that answer even when another entry lists it as an alias ("Congo" is the
        Republic of the Congo, not "Congo, The Democratic Republic of the"). Another alias claimed
        by two answers is dropped from both (it names neither for sure)."""
        entries = [(c, list(more)) for c, more in entries]
        answers = list(dict.fromkeys(c for c, _ in entries))
        aliases = {normalize_answer(c): c for c in reversed(answers)}
        canonical_keys, clash = set(aliases), set()
        for canonical, more in entries:
            for a in more:
                key = normalize_answer(a)
                if not key or key in canonical_keys:
                    continue
                if key in aliases and aliases[key] != canonical:
                    clash.add(key)
                aliases.setdefault(key, canonical)
        for key in clash:
            del aliases[key]
        if not answers:
            raise UserError(f"probe {name!r} has no answers")
        return cls(name, instruction, tuple(answers), aliases)

    def judge(self, text: str) -> str | None:
        return self.aliases.get(normalize_answer(text))


def distinct_correct(probe: Probe, answers: Iterable[str]) -> int:
    """How many different canonical answers of ``probe`` the texts ``answers`` name."""
    return len({c for c in (probe.judge(a) for a in answers) if c is not None})


# Common English short names that ISO 3166 spells otherwise (pycountry's `common_name` covers
# Bolivia, Iran, Moldova, North/South Korea, Taiwan, Tanzania, Venezuela; these it does not).
_COUNTRY_ALIASES = {
    "RU": ["Russia"], "VN": ["Vietnam"], "SY": ["Syria"], "LA": ["Laos"], "CZ": ["Czech Republic"],
    "TR": ["Turkey"], "CI": ["Ivory Coast"], "US": ["USA", "US", "United States of America", "America"],
    "GB": ["UK", "Britain", "Great Britain"], "VA": ["Vatican", "Vatican City"],
    "CD": ["DR Congo", "DRC", "Democratic Republic of the Congo", "Congo-Kinshasa"],
    "CG": ["Republic of the Congo", "Congo-Brazzaville"], "BN": ["Brunei"], "CV": ["Cape Verde"],
    "SZ": ["Swaziland"], "MK": ["Macedonia"], "MM": ["Burma"], "PS": ["Palestine"],
    "FM": ["Micronesia"], "TL": ["East Timor"], "NL": ["Holland"],
}


def _country_entries():
    import pycountry

    out = []
    for c in pycountry.countries:
        names = [c.name, getattr(c, "common_name", None), getattr(c, "official_name", None)]
        names += _COUNTRY_ALIASES.get(c.alpha_2, [])
        if "," in c.name:  # "Korea, Republic of" -> also "Korea"
            names.append(c.name.split(",")[0])
        if "(" in c.name:  # "Holy See (Vatican City State)" -> "Holy See"
            names.append(c.name.split("(")[0])
        names = [n for n in names if n]
        out.append((getattr(c, "common_name", None) or c.name, names))
    return out


def _subdivision_entries(country: str, types: Sequence[str], suffixes: Sequence[str] = ()):
    import pycountry

    out = []
    for s in sorted(pycountry.subdivisions.get(country_code=country), key=lambda s: s.code):
        if s.type not in types:
            continue
        name, names = s.name, [s.name]
        for suf in suffixes:  # "Henan Sheng" -> "Henan" (and "Henan Province")
            if name.endswith(" " + suf):
                name = name[: -len(suf) - 1]
        names += [name] + [f"{name} {t}" for t in ("Province", "State", "Prefecture", "Territory")]
        out.append((name, names))
    return out


def _language_entries():
    import pycountry

    out = []
    for lang in pycountry.languages:
        if not hasattr(lang, "alpha_2"):
            continue  # the ~180 languages of ISO 639-1, not the 7,900 of ISO 639-3
        names = [lang.name, getattr(lang, "common_name", None)]
        for part in lang.name.split(";"):
            names.append(part.split("(")[0])
        names = [n.strip() for n in names if n and n.strip()]
        if lang.name.startswith("Modern Greek"):
            names.append("Greek")
        out.append((lang.name.split("(")[0].strip(), names))
    return out


def _currency_entries():
    import pycountry

    out = []
    for cur in pycountry.currencies:
        # funds, units of account and precious metals (codes of funds and X.. codes but the CFA
        # and CFP francs and the East Caribbean dollar) are not what one names as a currency
        if cur.alpha_3.startswith("X") and cur.alpha_3 not in ("XAF", "XOF", "XPF", "XCD"):
            continue
        if any(w in cur.name for w in ("Fund", "Unidad", "Mvdol", "WIR", "Unit", "Bond")):
            continue
        out.append((cur.name, [cur.name, cur.alpha_3]))
    return out


def _calendar_entries(kind: str):
    import calendar

    with calendar.different_locale("C"):  # English names whatever the user's locale
        names = list(calendar.month_name)[1:] if kind == "months" else list(calendar.day_name)
    return [(n, [n, n[:3], n + "s"]) for n in names if n]  # "Fridays"


_ENGLISH_SPELLING = {"Lamda": "Lambda"}


def _unicode_names(first: int, last: int, prefix: str, suffix: str = "", skip: Sequence[int] = ()):
    out = []
    for cp in range(first, last + 1):
        if cp in skip:
            continue
        n = unicodedata.name(chr(cp))
        if n.startswith(prefix) and n.endswith(suffix):
            word = n[len(prefix): len(n) - len(suffix)].strip().capitalize()
            aliases = [word, word + "s"]
            if word in _ENGLISH_SPELLING:  # Unicode's name is not the English one (LAMDA)
                word = _ENGLISH_SPELLING[word]
                aliases = [word, word + "s"] + aliases
            out.append((word, aliases))
    return out


def _probe_specs():
    """name -> (instruction, entries factory); the built-in probes."""
    return {
        "countries": ("Please show me some countries.", _country_entries),
        "countries_b": ("Please show me some countries whose names start with the letter B.",
                        lambda: _initial(_country_entries(), "B")),
        "countries_m": ("Please show me some countries whose names start with the letter M.",
                        lambda: _initial(_country_entries(), "M")),
        "countries_s": ("Please show me some countries whose names start with the letter S.",
                        lambda: _initial(_country_entries(), "S")),
        "us_states": ("Please show me some US states.", lambda: _subdivision_entries("US", ["State"])),
        "canada": ("Please show me some provinces or territories of Canada.",
                   lambda: _subdivision_entries("CA", ["Province", "Territory"])),
        "australia": ("Please show me some states or territories of Australia.",
                      lambda: _subdivision_entries("AU", ["State", "Territory"])),
        "india": ("Please show me some states of India.", lambda: _subdivision_entries("IN", ["State"])),
        "mexico": ("Please show me some states of Mexico.",
                   lambda: _subdivision_entries("MX", ["State", "Federal entity"])),
        "brazil": ("Please show me some states of Brazil.",
                   lambda: _subdivision_entries("BR", ["State", "Federal district"])),
        "japan": ("Please show me some prefectures of Japan.", lambda: _subdivision_entries("JP", ["Prefecture"])),
        "china": ("Please show me some provinces of China.",
                  lambda: _subdivision_entries("CN", ["Province"], suffixes=("Sheng",))),
        "languages": ("Please show me some languages that people speak.", _language_entries),
        "currencies": ("Please show me some currencies.", _currency_entries),
        "months": ("Please show me some months of the year.", lambda: _calendar_entries("months")),
        "weekdays": ("Please show me some days of the week.", lambda: _calendar_entries("weekdays")),
        "greek_letters": ("Please show me some letters of the Greek alphabet.",
                          lambda: _unicode_names(0x3B1, 0x3C9, "GREEK SMALL LETTER ", skip=(0x3C2,))),
        "zodiac": ("Please show me some signs of the zodiac.", lambda: _unicode_names(0x2648, 0x2653, "")),
        "chess_pieces": ("Please show me some chess pieces.",
                         lambda: _unicode_names(0x2654, 0x2659, "WHITE CHESS ")),
        "card_suits": ("Please show me some suits of playing cards.",
                       lambda: _unicode_names(0x2660, 0x2667, "BLACK ", " SUIT")),
    }


def _initial(entries, letter: str):
    return [(c, [a for a in names if normalize_answer(a).startswith(letter.lower())])
            for c, names in entries if normalize_answer(c).startswith(letter.lower())]


def probe_names() -> list[str]:
    return list(_probe_specs())


@functools.lru_cache(maxsize=None)
def _built_probes() -> tuple[Probe, ...]:
    try:
        import pycountry  # noqa: F401
    except ImportError:
        raise UserError("the knowledge probes are built from ISO data in the package pycountry: "
                        "pip install pycountry") from None
    return tuple(Probe.build(name, instruction, make()) for name, (instruction, make) in _probe_specs().items())


def knowledge_probes(names: Sequence[str] | None = None) -> list[Probe]:
    """The built-in probes (all, or those named, in that order)."""
    probes = {p.name: p for p in _built_probes()}
    if names is None:
        return list(probes.values())
    unknown = [n for n in names if n not in probes]
    if unknown:
        raise UserError(f"unknown probe(s) {', '.join(map(repr, unknown))}; the probes are {', '.join(probes)}")
    return [probes[n] for n in names]


# ---------------------------------------------------------------------------------------------
# prompts


@dataclasses.dataclass(frozen=True)
class ListFormat:
    """How a list of explored answers is written into the prompt, and where an item ends.

    The prompt is the instruction (plus ``different`` once answers are listed: the navigated
    prompt), a blank line, then the reply: ``header``, each explored answer as
    ``item.format(i=k) + answer + written_close`` and a newline, then the open item for the next
    one. A completion ends at the first ``close`` or ``stop_at`` string."""

    header: str = "Answer:"
    item: str = '{i}. "'
    close: str = '"'
    stop_at: tuple[str, ...] = ("\n",)
    written_close: str = '"'
    different: str = "Give an answer different from those already listed."

    def instruction_text(self, instruction: str, explored: Sequence[str] = ()) -> str:
        return instruction if not explored or not self.different else f"{instruction} {self.different}"

    def reply_text(self, explored: Sequence[str] = ()) -> str:
        items = "".join(self.item.format(i=k + 1) + a.strip() + self.written_close + "\n"
                        for k, a in enumerate(explored))
        return f"{self.header}\n{items}{self.item.format(i=len(explored) + 1)}"

    def text(self, instruction: str, explored: Sequence[str] = ()) -> str:
        """The whole prompt as plain text (the paper's form, without a chat template)."""
        return f"{self.instruction_text(instruction, explored)}\n\n{self.reply_text(explored)}"

    def cut(self, completion: str) -> str:
        """The answer a completion gives: its text up to the item's end, stripped."""
        end = len(completion)
        for s in (self.close, *self.stop_at):
            k = completion.find(s) if s else -1
            if k >= 0:
                end = min(end, k)
        return completion[:end].strip()

    @property
    def stop_chars(self) -> str:
        """Characters any of whose appearance in a token ends a completion on the device."""
        return "".join(sorted({s[0] for s in (self.close, *self.stop_at) if s}))


def ways_format() -> ListFormat:
    """The chain-of-thought list of the paper's code: "### Way k:" items, each ending at ``###``."""
    return ListFormat(header="Here are different ways to solve the problem:", item="### Way {i}:\n", close="###",
                      stop_at=(), written_close="", different="Show a different way from those already listed.")


# ---------------------------------------------------------------------------------------------
# k-means over the vocabulary keys


@dataclasses.dataclass(frozen=True)
class KeyClusters:
    """k-means of the vocabulary keys: ``labels [V]``, ``centers [k, D]``, ``inertia`` (sum of
    squared distances to the assigned centers) and ``seed_inertia`` (the same at the k-means++
    centers, before any Lloyd iteration)."""

    labels: np.ndarray
    centers: np.ndarray
    inertia: float
    seed_inertia: float


def default_cluster_count(vocab_size: int) -> int:
    """The paper's 1,024 clusters for Llama-3's 128,256 tokens, scaled to ``vocab_size``."""
    return max(2, round(1024 * vocab_size / 128256))


@functools.partial(jax.jit, static_argnames=("k", "max_iters"))
def _cluster(x, key, *, k: int, max_iters: int):
    from jaxkv.kmeans import inertia, kmeans

    valid = jnp.ones(x.shape[:1], bool)
    seed_labels, seed_centers = kmeans(x, valid, k, key, max_iters=0)
    labels, centers = kmeans(x, valid, k, key, max_iters=max_iters)
    return labels, centers, inertia(x, valid, labels, centers), inertia(x, valid, seed_labels, seed_centers)


def cluster_keys(keys, k: int, *, seed: int = 0, max_iters: int = 100) -> KeyClusters:
    """k-means of the rows of ``keys [V, D]`` into ``k`` clusters (``jaxkv.kmeans``: k-means++,
    then Lloyd iterations until no label changes or ``max_iters``; fp32). The same ``seed`` gives
    the same clusters."""
    keys = np.asarray(keys)
    if keys.ndim != 2 or keys.shape[0] == 0:
        raise UserError(f"keys must be a non-empty [V, D] array, got shape {keys.shape}")
    if not isinstance(k, int) or not 1 <= k <= keys.shape[0]:
        raise UserError(f"k must be an integer in [1, {keys.shape[0]}] (the number of keys), got {k!r}")
    if not isinstance(max_iters, int) or max_iters < 1:
        raise UserError(f"max_iters must be a positive integer, got {max_iters!r}")
    labels, centers, inertia, seed_inertia = _cluster(jnp.asarray(keys, jnp.float32), jax.random.key(seed), k=k,
                                                      max_iters=max_iters)
    return KeyClusters(np.asarray(labels), np.asarray(centers), float(inertia), float(seed_inertia))


# ---------------------------------------------------------------------------------------------
# batched first tokens and completions


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Exploration:
    """One explored generation: its first token (id and text), the completion's answer text,
    when judged against a probe the canonical answer it names (None: wrong), and the first
    token's rank (0 = best) in the ranking it was taken from (ICN: the navigated prompt's; None
    when sampled)."""

    first_token: int
    first_text: str
    answer: str
    correct: str | None = None
    rank: int | None = None


class Explorer:
    """First-token logits and completions of prompts on one model, batched and jit-compiled.

    Rows are padded to a power-of-two batch and the prompts to a power-of-two length (``jaxkv.
    generate``'s buckets), so a new batch of the same buckets compiles nothing. ``template``: a
    ``jaxkv.chat.ChatTemplate``; with it the instruction goes in a user turn and the list starts
    the assistant's reply. ``max_rows`` bounds one forward's batch (larger requests run in
    chunks). ``max_answer_tokens``: the tokens a completion may add (after its first token); the
    first-token prefill allocates the same cache, so it reuses the completions' compiled prefill."""

    def __init__(self, params, config, tokenizer, *, template=None, fmt: ListFormat | None = None,
                 max_rows: int = 128, max_answer_tokens: int = 16):
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.template, self.fmt = template, fmt or ListFormat()
        for name, v in (("max_rows", max_rows), ("max_answer_tokens", max_answer_tokens)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        self.max_rows = _bucket(max_rows)
        self.max_answer_tokens = max_answer_tokens
        self._stop: dict[str, np.ndarray] = {}

    # prompts ---------------------------------------------------------------------------------
    def render(self, user: str, reply: str) -> list[int]:
        """Token ids of a prompt: ``user`` then the start of the reply ``reply`` (in a chat
        template's user turn and assistant turn when there is a template, else plain text with a
        blank line between)."""
        if self.template is None:
            return self.tokenizer.encode(f"{user}\n\n{reply}").ids
        text = self.template.render([{"role": "user", "content": user}], add_generation_prompt=True) + reply
        return self.tokenizer.encode(text, add_special_tokens=False).ids  # the template wrote them

    def prompt_ids(self, instruction: str, explored: Sequence[str] = ()) -> list[int]:
        """Token ids of the list prompt for ``instruction`` with ``explored`` answers listed."""
        return self.render(self.fmt.instruction_text(instruction, explored), self.fmt.reply_text(explored))

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([int(token)], skip_special_tokens=False)

    def stop_tokens(self, chars: str | None = None) -> np.ndarray:
        """Ids whose text holds one of ``chars`` (default: the format's ``stop_chars``), and the
        end-of-sequence / end-of-turn ids."""
        chars = self.fmt.stop_chars if chars is None else chars
        if chars not in self._stop:
            stop = set(int(t) for t in self.config.eos_token_ids)
            if self.template is not None:
                stop |= set(self.template.end_of_turn_ids(self.tokenizer))
            if chars:
                for tok in range(self.tokenizer.get_vocab_size()):
                    if any(c in self.token_text(tok) for c in chars):
                        stop.add(tok)
            self._stop[chars] = np.array(sorted(t for t in stop if 0 <= t < self.config.vocab_size) or [-2], np.int32)
        return self._stop[chars]

    # forwards --------------------------------------------------------------------------------
    def _chunks(self, rows: list):
        for i in range(0, len(rows), self.max_rows):
            yield rows[i: i + self.max_rows]

    def _pad_rows(self, rows: list) -> list:
        return rows + [rows[-1]] * (_bucket(len(rows)) - len(rows))

    def first_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """``[B, V]`` fp32 logits of the token after each prompt."""
        from jaxkv.cache import init_cache
        from jaxkv.generate import pad_prompts, prefill

        out = []
        dtype = self.params["embed"]["embedding"].dtype
        for chunk in self._chunks(list(prompts)):
            rows = self._pad_rows(chunk)
            tokens, positions, lengths = pad_prompts(rows)
            self._check_length(tokens.shape[1], self.max_answer_tokens)
            cache = init_cache(self.config, "full", batch=len(rows), max_len=tokens.shape[1] + self.max_answer_tokens,
                               dtype=dtype)
            logits, _ = prefill(self.params, tokens, positions, lengths, cache, config=self.config)
            out.append(np.asarray(logits[: len(chunk)], np.float32))
        return np.concatenate(out)

    def _check_length(self, t: int, new: int = 0):
        if t + new > self.config.max_position_embeddings:
            raise UserError(f"a prompt of {t} tokens (bucketed) + {new} new tokens exceeds the model's context of "
                            f"{self.config.max_position_embeddings}")

    def continue_(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, key=None, stop_chars: str | None = None) -> list[list[int]]:
        """New tokens after each prompt (greedy at ``temperature == 0``), up to the first stop
        token (kept; ``stop_tokens(stop_chars)``) or ``max_new_tokens``."""
        from jaxkv.cache import init_cache
        from jaxkv.generate import decode, pad_prompts, prefill

        key = jax.random.key(0) if key is None else key
        dtype = self.params["embed"]["embedding"].dtype
        out = []
        for n, chunk in enumerate(self._chunks(list(prompts))):
            rows = self._pad_rows(chunk)
            tokens, positions, lengths = pad_prompts(rows)
            self._check_length(tokens.shape[1], max_new_tokens)
            cache = init_cache(self.config, "full", batch=len(rows), max_len=tokens.shape[1] + max_new_tokens,
                               dtype=dtype)
            last, cache = prefill(self.params, tokens, positions, lengths, cache, config=self.config)
            new, _ = decode(self.params, cache, last, lengths, jax.random.fold_in(key, n), np.float32(temperature),
                            np.float32(top_p), self.stop_tokens(stop_chars), config=self.config,
                            max_new_tokens=max_new_tokens)
            new = np.asarray(new)[: len(chunk)]
            out += [[int(t) for t in row if t >= 0] for row in new]
        return out

    def complete(self, prompts: Sequence[Sequence[int]], first_tokens: Sequence[int]) -> list[Exploration]:
        """Greedy completions of ``prompt + [first_token]``, cut at the item's end."""
        rows = [list(p) + [int(t)] for p, t in zip(prompts, first_tokens, strict=True)]
        news = self.continue_(rows, max_new_tokens=self.max_answer_tokens)
        return [self._exploration(t, new) for t, new in zip(first_tokens, news)]

    def _exploration(self, first: int, new: Sequence[int]) -> Exploration:
        text = self.tokenizer.decode([int(first), *new], skip_special_tokens=True)
        return Exploration(int(first), self.token_text(first), self.fmt.cut(text))


# ---------------------------------------------------------------------------------------------
# ICN and the baselines


def _check_budget(n, what="n"):
    if not isinstance(n, int) or n < 1:
        raise UserError(f"{what} must be a positive integer, got {n!r}")


def _judged(probe: Probe | None, e: Exploration) -> Exploration:
    return e if probe is None else dataclasses.replace(e, correct=probe.judge(e.answer))


def icn_explore(explorer: Explorer, instructions: Sequence[str], rounds: int, *, complete_from: str = "original",
                probes: Sequence[Probe] | None = None) -> list[list[Exploration]]:
    """In-context navigation, batched over ``instructions``: ``rounds`` rounds, each of which puts
    the answers found so far into the prompt (``ListFormat.text``), takes the highest-ranked first
    token not explored yet for that instruction and completes it greedily from the original prompt
    (``complete_from="original"``, the paper's default) or from the navigated one
    (``"navigated"``). Returns each instruction's explorations in round order; with ``probes``
    (one per instruction) each is judged."""
    _check_budget(rounds, "rounds")
    if complete_from not in ("original", "navigated"):
        raise UserError(f"complete_from must be 'original' or 'navigated', got {complete_from!r}")
    probes = _check_probes(probes, instructions)
    original = [explorer.prompt_ids(s) for s in instructions]
    found: list[list[Exploration]] = [[] for _ in instructions]
    for _ in range(rounds):
        navigated = [explorer.prompt_ids(s, [e.answer for e in f]) for s, f in zip(instructions, found)]
        logits = explorer.first_logits(navigated)
        picks, ranks = [], []
        for row, f in zip(logits, found):
            tried = {e.first_token for e in f}
            order = np.argsort(-row, kind="stable")
            r = next(r for r, t in enumerate(order[: len(tried) + 1]) if int(t) not in tried)
            picks.append(int(order[r]))
            ranks.append(r)
        base = original if complete_from == "original" else navigated
        for i, e in enumerate(explorer.complete(base, picks)):
            found[i].append(_judged(probes[i], dataclasses.replace(e, rank=ranks[i])))
    return found


def rank_enumerate(explorer: Explorer, instructions: Sequence[str], n: int, *,
                   probes: Sequence[Probe] | None = None) -> list[list[Exploration]]:
    """The top-``n`` first tokens of each instruction's prompt, each completed greedily."""
    _check_budget(n)
    probes = _check_probes(probes, instructions)
    prompts = [explorer.prompt_ids(s) for s in instructions]
    logits = explorer.first_logits(prompts)
    tops = np.argsort(-logits, axis=-1, kind="stable")[:, :n]
    rows = [p for p in prompts for _ in range(n)]
    done = explorer.complete(rows, tops.reshape(-1).tolist())
    return [[_judged(probes[i], dataclasses.replace(e, rank=r)) for r, e in enumerate(done[i * n: (i + 1) * n])]
            for i in range(len(instructions))]


def sample_answers(explorer: Explorer, instructions: Sequence[str], n: int, *, temperature: float = 1.0,
                   top_p: float = 1.0, seed: int = 0, probes: Sequence[Probe] | None = None) -> list[list[Exploration]]:
    """``n`` independent samples per instruction from its prompt (``temperature``, ``top_p``), each
    of ``explorer.max_answer_tokens`` tokens at most (the first one included)."""
    _check_budget(n)
    if not temperature > 0:
        raise UserError(f"temperature must be > 0 for sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    probes = _check_probes(probes, instructions)
    prompts = [explorer.prompt_ids(s) for s in instructions]
    rows = [p for p in prompts for _ in range(n)]
    news = explorer.continue_(rows, max_new_tokens=explorer.max_answer_tokens, temperature=temperature, top_p=top_p,
                              key=jax.random.key(seed))
    done = [explorer._exploration(new[0], new[1:]) if new else Exploration(-1, "", "") for new in news]
    return [[_judged(probes[i], e) for e in done[i * n: (i + 1) * n]] for i in range(len(instructions))]


def _check_probes(probes, instructions):
    if isinstance(instructions, str) or not instructions:
        raise UserError("instructions must be a non-empty list of strings")
    if probes is None:
        return [None] * len(instructions)
    if len(probes) != len(instructions):
        raise UserError(f"probes: {len(probes)} given for {len(instructions)} instructions (one each)")
    return list(probes)


# ---------------------------------------------------------------------------------------------
# self-consistency on closed-form arithmetic


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
    question: str
    answer: int


# (text, operation on a*b and c): "-" takes c below a*b, "+" a one-digit c, "/" a divisor of a*b
_PROBLEMS = (
    ("{name} has {a} boxes with {b} pencils in each box. {name} gives away {c} pencils. How many pencils "
     "does {name} have left?", "-"),
    ("A baker makes {a} trays of {b} muffins and then bakes {c} more muffins. How many muffins are there "
     "in total?", "+"),
    ("{name} reads {a} pages every day for {b} days and then {c} more pages. How many pages does {name} "
     "read in all?", "+"),
    ("A shop has {a} shelves with {b} toys on each shelf. It sells {c} toys. How many toys are left?", "-"),
    ("{name} buys {a} packs of {b} stickers and shares them equally among {c} friends, keeping none. How "
     "many stickers does each friend get?", "/"),
    ("There are {a} buses with {b} children on each bus. {c} children get off. How many children are "
     "still on the buses?", "-"),
)
_NAMES = ("Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack")


def arithmetic_problems(n: int, *, seed: int = 0) -> list[ArithmeticProblem]:
    """``n`` two-step word problems with exact integer answers: a product of two numbers in 2..9,
    then a difference, a sum or an exact division; reproducible by ``seed``."""
    _check_budget(n)
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        template, op = _PROBLEMS[int(rng.integers(len(_PROBLEMS)))]
        a, b = int(rng.integers(2, 10)), int(rng.integers(2, 10))
        name = _NAMES[int(rng.integers(len(_NAMES)))]
        if op == "-":
            c = int(rng.integers(1, a * b))
            answer = a * b - c
        elif op == "+":
            c = int(rng.integers(1, 10))
            answer = a * b + c
        else:
            divisors = [d for d in range(2, 10) if (a * b) % d == 0]
            c = divisors[int(rng.integers(len(divisors)))]  # 2 divides or a, b themselves do
            answer = a * b // c
        out.append(ArithmeticProblem(template.format(name=name, a=a, b=b, c=c), answer))
    return out


_NUMBER = re.compile(r"-?\d+")


def majority_vote(answers: Sequence[int | None]) -> int | None:
    """The most common non-None answer (the earliest of tied ones), or None."""
    votes = collections.Counter(a for a in answers if a is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == best)


def _final_answers(explorer: Explorer, problems, paths: Sequence[Sequence[str]]) -> list[list[int | None]]:
    """Each path's number: the path written after the problem, then a request for the number in
    quotes (the paper's "Final Answer (Only Number)" step), completed greedily."""
    rows, shape = [], []
    for p, ps in zip(problems, paths):
        shape.append(len(ps))
        for path in ps:
            reply = f'{explorer.fmt.header}\n{path.strip()}\n\nFinal answer (only the number): "'
            rows.append(explorer.render(p.question, reply))
    news = explorer.continue_(rows, max_new_tokens=8, stop_chars='"\n')
    numbers = []
    for new in news:
        text = explorer.tokenizer.decode(new, skip_special_tokens=True).split('"')[0].replace(",", "")
        m = _NUMBER.search(text)
        numbers.append(int(m.group()) if m else None)
    out, k = [], 0
    for n in shape:
        out.append(numbers[k: k + n])
        k += n
    return out


def self_consistency(explorer: Explorer, problems: Sequence[ArithmeticProblem], k: int, *, method: str = "icn",
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> dict:
    """Majority vote over ``k`` chain-of-thought paths per problem, found by ICN (``method="icn"``)
    or sampled (``"sample"``); ``explorer.fmt`` should be ``ways_format()`` and its
    ``max_answer_tokens`` a path's length. Returns ``{"accuracy"`` (of the vote),
    ``"path_accuracy"`` (mean over paths), ``"votes"``: ``[[int | None] per path] per problem}``."""
    _check_budget(k, "k")
    if method not in ("icn", "sample"):
        raise UserError(f"method must be 'icn' or 'sample', got {method!r}")
    questions = [p.question for p in problems]
    if method == "icn":
        found = icn_explore(explorer, questions, k)
    else:
        found = sample_answers(explorer, questions, k, temperature=temperature, top_p=top_p, seed=seed)
    votes = _final_answers(explorer, problems, [[e.answer for e in f] for f in found])
    right = [majority_vote(v) == p.answer for v, p in zip(votes, problems)]
    paths = [np.mean([a == p.answer for a in v]) for v, p in zip(votes, problems)]
    return {"accuracy": float(np.mean(right)), "path_accuracy": float(np.mean(paths)), "votes": votes}
