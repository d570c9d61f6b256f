"""edATLAS: ambiguous abugida input and romanized word variants (Hindi, Bengali, Thai).

An abugida has too many characters for one keyboard view: consonants, independent vowels, and
the vowel signs, viramas, nuktas and other marks that attach to them. edATLAS shows one view, the
**base consonants and independent vowels**, and recovers the intended word from the ambiguous key
sequence; a second part maps the many informal romanized spellings of a word onto one
vocabulary entry.

* ``Script``/``key_of``: the key function, a word -> the keys pressed on the one-view layout,
  derived from Unicode character properties per script block (``script_keys``): letters (general
  category Lo) of the block are keys, every combining mark (vowel signs, virama, nukta, anusvara,
  candrabindu, visarga, tone marks; categories Mn/Mc) and joiner (Cf) is dropped, precomposed
  nukta letters are decomposed (NFD) to their base; the layout itself is written down once in
  ``_LAYOUTS`` (which letters merge, for Thai which spacing vowel letters are not keys).
* ``Vocabulary.load(lang)``: up to the top 100k words with frequencies, from ``wordfreq`` (hi,
  bn) or ``pythainlp``'s Thai National Corpus counts (th); only words written wholly in the script.
* ``KeyIndex``: key sequences -> words ranked by frequency, exact lookup and prefix completion
  (a sorted key array: a prefix is a contiguous range; the best words of every short prefix are
  precomputed, longer prefixes' ranges are small).
* ``BigramModel``: a context model (interpolated absolute discounting) on running text; Thai has
  running text offline (``pythainlp``'s Wikipedia titles, segmented by its tokenizer), Hindi and
  Bengali do not here, so they rank by frequency alone.
* ``Decoder.decode(keys, context)``: candidates for a key sequence.
* Romanized variants (hi, bn): ``canonical_roman`` normalises a Latin spelling to a canonical key
  (case, diacritics, aspiration, vowel length, w/v, sh/s, doubled letters, a final schwa,
  anusvara); ``VariantIndex`` maps canonical keys of each word's romanizations under several
  schemes (``indic-transliteration``) onto the vocabulary.
* ``simulate_typing``/``evaluate_variants``: the simulations ``jaxkv edatlas eval`` reports.

The data come from the optional packages of ``pip install 'jaxkv[edatlas]'``. Deviations from
the paper (which has no code): the context model is a bigram model, not the paper's language
model; typing is simulated (keystrokes and view switches), not a user study; Hindi and Bengali
have no running text offline, so their simulated text is words drawn by frequency.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import heapq
import math
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

from jaxkv.errors import UserError

__all__ = [
    "LANGUAGES", "Script", "script", "key_of", "Vocabulary", "KeyIndex", "BigramModel", "Decoder",
    "canonical_roman", "romanizations", "informal_variants", "VariantIndex", "simulate_typing",
    "evaluate_variants", "native_cost", "thai_sentences", "check_keys", "evaluate", "format_report",
]

LANGUAGES = ("hi", "bn", "th")
_EXTRA = "pip install 'jaxkv[edatlas]'"


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"edATLAS reads its data from the package {module.split('.')[0]}: {_EXTRA}") from None


def _check_lang(lang: str) -> str:
    if lang not in LANGUAGES:
        raise UserError(f"unknown language {lang!r}; edATLAS knows {', '.join(LANGUAGES)}")
    return lang


# ---------------------------------------------------------------------------------------------
# the key function


# The one-view layout, written down once per script: the Unicode block, letters that share a key
# with another letter, and (Thai) spacing letters of the block that are vowels, not keys.
_LAYOUTS = {
    "hi": {"name": "Devanagari", "block": (0x0900, 0x097F), "merge": {}, "not_keys": ()},
    "bn": {"name": "Bengali", "block": (0x0980, 0x09FF), "merge": {"\u09ce": "\u09a4"},  # khanda ta -> ta
           "not_keys": ()},
    # Thai: the consonants and the vowel letters RU/LU are keys; the spacing vowels (SARA A, AA,
    # AM, the leading E, AE, O, AI MAIMALAI, AI MAIMUAN), LAKKHANGYAO and PAIYANNOI are not
    "th": {"name": "Thai", "block": (0x0E00, 0x0E7F), "merge": {},
           "not_keys": ("SARA ", "LAKKHANGYAO", "PAIYANNOI")},
}


@dataclasses.dataclass(frozen=True)
class Script:
    """One script's one-view layout: ``keys`` (the characters on it), ``marks`` (what the full
    native layout has besides: the second view), ``merge`` (letters typed as another key)."""

    lang: str
    name: str
    block: tuple[int, int]
    keys: frozenset
    marks: frozenset
    merge: dict

    def contains(self, ch: str) -> bool:
        return self.block[0] <= ord(ch) <= self.block[1]


@functools.lru_cache(maxsize=None)
def script(lang: str) -> Script:
    """The layout of ``lang``, derived from the Unicode properties of its block."""
    layout = _LAYOUTS[_check_lang(lang)]
    lo, hi = layout["block"]
    keys, marks = set(), set()
    for cp in range(lo, hi + 1):
        ch = chr(cp)
        name = unicodedata.name(ch, "")
        if not name:
            continue
        cat = unicodedata.category(ch)
        if cat == "Lo" and " LETTER " in name or (cat == "Lo" and lang == "th"):
            if unicodedata.normalize("NFD", ch) != ch or ch in layout["merge"]:
                continue  # a precomposed nukta letter or a merged one: typed as its base
            if any(name.split("CHARACTER ", 1)[-1].startswith(p) for p in layout["not_keys"]):
                marks.add(ch)
                continue
            keys.add(ch)
        elif cat in ("Mn", "Mc"):
            marks.add(ch)
    return Script(lang, layout["name"], (lo, hi), frozenset(keys), frozenset(marks), dict(layout["merge"]))


def key_of(word: str, lang: str) -> str:
    """The keys pressed for ``word`` on the one-view layout of ``lang``: its letters that are keys
    (merged letters as their key), in order; marks, joiners and non-key letters dropped.
    ``"नमस्ते"`` -> ``"नमसत"``."""
    s = script(lang)
    out = []
    for ch in unicodedata.normalize("NFD", word):
        ch = s.merge.get(ch, ch)
        if ch in s.keys:
            out.append(ch)
    return "".join(out)


def check_keys(keys: str, lang: str, what: str = "KEYS") -> str:
    """``keys`` if every character is a key of ``lang``'s layout; else a one-line error."""
    if not isinstance(keys, str) or not keys.strip():
        raise UserError(f"{what} is empty: type the keys pressed, base consonants and independent vowels")
    keys = unicodedata.normalize("NFC", keys.strip())
    s = script(lang)
    for ch in keys:
        if ch not in s.keys:
            other = next((n for n in LANGUAGES if n != lang and script(n).contains(ch)), None)
            why = (f"is {script(other).name}, not {s.name}" if other else
                   "is a mark, not a key" if s.contains(ch) else "is not a key of the layout")
            raise UserError(f"{what}: {ch!r} (U+{ord(ch):04X}) {why}; the keys are {s.name}'s base consonants "
                            f"and independent vowels")
    return keys


def native_cost(word: str, lang: str) -> tuple[int, int]:
    """``(keystrokes, view switches)`` to type ``word`` on the full native layout modelled as two
    views: view 1 the keys, view 2 the marks (and non-key letters); each character is a
    keystroke, each change of view one more, and the word ends back on view 1."""
    s = script(lang)
    strokes, switches, view = 0, 0, 1
    for ch in unicodedata.normalize("NFD", word):  # a nukta letter is its base and the nukta
        v = 1 if s.merge.get(ch, ch) in s.keys else 2
        if v != view:
            switches += 1
            view = v
        strokes += 1
    return strokes, switches + (view != 1)


def _in_script(word: str, lang: str) -> bool:
    s = script(lang)
    return bool(word) and all(s.contains(ch) or ch in "\u200c\u200d" for ch in word) and bool(key_of(word, lang))


# ---------------------------------------------------------------------------------------------
# vocabularies


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Words of one language with their frequencies (relative, summing to at most 1), most
    frequent first."""

    lang: str
    words: tuple[str, ...]
    freqs: np.ndarray

    @classmethod
    def load(cls, lang: str, size: int = 100_000) -> "Vocabulary":
        """The top ``size`` words written wholly in the script: ``wordfreq`` for hi/bn (its Hindi
        list has about 27k words), the Thai National Corpus counts of ``pythainlp`` for th."""
        _check_lang(lang)
        if not isinstance(size, int) or size < 1:
            raise UserError(f"size must be a positive integer, got {size!r}")
        if lang == "th":
            tnc = _need("pythainlp.corpus.tnc")
            counts = collections.Counter()
            for w, c in tnc.word_freqs():
                w = unicodedata.normalize("NFC", w.strip())
                if _in_script(w, lang):
                    counts[w] += int(c)
            total = sum(counts.values())
            pairs = [(w, c / total) for w, c in counts.most_common(size)]
        else:
            wordfreq = _need("wordfreq")
            pairs = []
            for w in wordfreq.top_n_list(lang, size * 2, wordlist="best"):
                w = unicodedata.normalize("NFC", w)
                if _in_script(w, lang):
                    pairs.append((w, wordfreq.word_frequency(w, lang)))
                if len(pairs) == size:
                    break
        merged = collections.defaultdict(float)
        for w, f in pairs:
            merged[w] += f
        ordered = sorted(merged.items(), key=lambda p: (-p[1], p[0]))
        return cls(lang, tuple(w for w, _ in ordered), np.array([f for _, f in ordered], np.float64))

    @classmethod
    def from_counts(cls, lang: str, counts: dict) -> "Vocabulary":
        """A vocabulary from ``{word: count}`` (tests, a user's own word list)."""
        _check_lang(lang)
        bad = [w for w in counts if not _in_script(w, lang)]
        if bad:
            raise UserError(f"words not written in {script(lang).name}: {', '.join(map(repr, bad[:3]))}")
        total = float(sum(counts.values()))
        ordered = sorted(counts.items(), key=lambda p: (-p[1], p[0]))
        return cls(lang, tuple(w for w, _ in ordered), np.array([c / total for _, c in ordered], np.float64))

    def __len__(self) -> int:
        return len(self.words)

    def top(self, n: int) -> "Vocabulary":
        """The ``n`` most frequent words."""
        return Vocabulary(self.lang, self.words[:n], self.freqs[:n])


# ---------------------------------------------------------------------------------------------
# the key index


class KeyIndex:
    """Key sequences -> words, ranked by frequency: ``lookup(keys)`` (words whose whole key
    sequence is ``keys``) and ``complete(prefix)`` (words whose key sequence starts with it)."""

    PRECOMPUTED_PREFIX = 2  # the best words of every prefix up to this many keys are kept

    def __init__(self, vocab: Vocabulary, *, top: int = 10):
        self.vocab, self.lang, self.top = vocab, vocab.lang, top
        self.vocab_set = frozenset(vocab.words)
        entries = sorted((key_of(w, vocab.lang), -f, w) for w, f in zip(vocab.words, vocab.freqs))
        self._keys = [k for k, _, _ in entries]
        self._entries = [(w, -nf) for _, nf, w in entries]
        self._exact: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
        for k, nf, w in entries:  # sorted by key then frequency: each list is ranked already
            self._exact[k].append((w, -nf))
        self._prefix: dict[str, list[tuple[str, float]]] = {}
        heaps: dict[str, list] = collections.defaultdict(list)
        for k, nf, w in entries:
            for n in range(1, min(len(k), self.PRECOMPUTED_PREFIX) + 1):
                h = heaps[k[:n]]
                item = (-nf, w)
                if len(h) < top:
                    heapq.heappush(h, item)
                elif item > h[0]:
                    heapq.heapreplace(h, item)
        for p, h in heaps.items():
            self._prefix[p] = [(w, f) for f, w in sorted(h, key=lambda x: (-x[0], x[1]))]

    def lookup(self, keys: str, k: int | None = None) -> list[tuple[str, float]]:
        """``[(word, frequency)]`` for the key sequence ``keys``, most frequent first."""
        found = self._exact.get(keys, [])
        return found[: k or self.top]

    def complete(self, prefix: str, k: int | None = None) -> list[tuple[str, float]]:
        """The most frequent words whose key sequence starts with ``prefix``."""
        k = k or self.top
        if len(prefix) <= self.PRECOMPUTED_PREFIX and k <= self.top:
            return self._prefix.get(prefix, [])[:k]
        lo = bisect.bisect_left(self._keys, prefix)
        hi = bisect.bisect_left(self._keys, prefix + "\U0010ffff")
        return heapq.nlargest(k, self._entries[lo:hi], key=lambda e: (e[1], e[0]))

    def __len__(self) -> int:
        return len(self._keys)


# ---------------------------------------------------------------------------------------------
# the context model


class BigramModel:
    """Interpolated absolute-discounting bigram model, ``P(w | v) = max(c(v,w) - d, 0) / c(v) +
    d N1+(v .) / c(v) * P_uni(w)``, with the unigram ``P_uni`` from the vocabulary's frequencies
    (so unseen words keep their frequency)."""

    def __init__(self, sentences: Iterable[Sequence[str]], vocab: Vocabulary, *, discount: float = 0.75):
        if not 0 < discount < 1:
            raise UserError(f"discount must be in (0, 1), got {discount}")
        self.discount = discount
        self.unigram = dict(zip(vocab.words, vocab.freqs))
        self.floor = float(vocab.freqs[-1]) * 0.5 if len(vocab) else 1e-9
        self.pairs: dict[tuple[str, str], int] = collections.Counter()
        self.left: dict[str, int] = collections.Counter()
        self.fanout: dict[str, int] = collections.Counter()
        for s in sentences:
            for v, w in zip(s, s[1:]):
                if self.pairs[v, w] == 0:
                    self.fanout[v] += 1
                self.pairs[v, w] += 1
                self.left[v] += 1

    def logprob(self, word: str, prev: str | None) -> float:
        uni = self.unigram.get(word, self.floor)
        c = self.left.get(prev, 0) if prev is not None else 0
        if not c:
            return math.log(uni)
        d = self.discount
        p = max(self.pairs.get((prev, word), 0) - d, 0) / c + d * self.fanout[prev] / c * uni
        return math.log(p)


# ---------------------------------------------------------------------------------------------
# decoding


class Decoder:
    """Candidates for a key sequence: the index's words, reranked by the context model when one
    is given and a previous word is known."""

    def __init__(self, index: KeyIndex, context_model: BigramModel | None = None):
        self.index, self.context_model = index, context_model

    def decode(self, keys: str, *, prev: str | None = None, k: int = 5, complete: bool = False) -> list[str]:
        """The top ``k`` words for ``keys`` (``complete``: words whose keys start with them)."""
        pool = self.index.complete(keys, max(k, self.index.top)) if complete else self.index.lookup(keys)
        if self.context_model is not None and prev is not None and len(pool) > 1:
            pool = sorted(pool, key=lambda e: -self.context_model.logprob(e[0], prev))
        return [w for w, _ in pool[:k]]


def thai_sentences(n: int | None = None, *, seed: int = 0) -> list[list[str]]:
    """Thai running text available offline: ``pythainlp``'s Wikipedia titles segmented into words
    by its ``newmm`` tokenizer (``n`` of them, a seeded sample, in a fixed order)."""
    corpus = _need("pythainlp.corpus")
    tokenize = _need("pythainlp.tokenize").word_tokenize
    titles = sorted(corpus.get_corpus("wikipedia_titles_th.txt"))
    if n is not None and n < len(titles):
        rng = np.random.default_rng(seed)
        titles = [titles[i] for i in sorted(rng.choice(len(titles), n, replace=False))]
    out = []
    for t in titles:
        words = [unicodedata.normalize("NFC", w) for w in tokenize(t, engine="newmm", keep_whitespace=False)]
        if words and all(_in_script(w, "th") for w in words):
            out.append(words)
    return out


# ---------------------------------------------------------------------------------------------
# romanized variants (hi, bn)


_VOWELS = "aeiou"


def canonical_roman(text: str, lang: str) -> str:
    """A Latin spelling of a Hindi or Bengali word normalised to a canonical key: case and
    diacritics dropped; (bn) v/w read as b, (hi) w as v; sh, ph, z, q, x read as s, f, j, k, ks;
    an h after a consonant (aspiration) dropped; long vowels collapsed (aa, ee/ii, oo/uu); m or ng
    before a consonant read as n (anusvara); doubled letters single; a final inherent a dropped.
    ``"Kitaab"``, ``"kitAba"`` and ``"kitab"`` -> ``"kitab"``."""
    if lang not in ("hi", "bn"):
        raise UserError(f"romanized variants are for hi and bn, not {lang!r}")
    t = unicodedata.normalize("NFKD", text)
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    t = re.sub(r"[^a-z]", "", t)
    if lang == "bn":
        t = t.replace("w", "b").replace("v", "b")
    else:
        t = t.replace("w", "v")
    for a, b in (("sh", "s"), ("ph", "f"), ("z", "j"), ("q", "k"), ("x", "ks"), ("ch", "c")):
        t = t.replace(a, b)
    t = re.sub(r"([^aeiouh])h", r"\1", t)
    for a, b in (("aa", "a"), ("ee", "i"), ("ii", "i"), ("oo", "u"), ("uu", "u")):
        t = t.replace(a, b)
    t = re.sub(r"(?:ng|m)(?=[^aeiou])", "n", t)
    t = re.sub(r"(.)\1+", r"\1", t)
    if len(t) > 2 and t.endswith("a") and t[-2] not in _VOWELS:
        t = t[:-1]
    return t


_SCHEME_NAMES = ("ITRANS", "HK", "IAST", "OPTITRANS", "VELTHUIS", "KOLKATA")
INDEX_SCHEMES = ("ITRANS", "HK", "IAST")  # the index's spellings; the rest are held out


def romanizations(word: str, lang: str, schemes: Sequence[str] = INDEX_SCHEMES) -> dict[str, str]:
    """``{scheme: spelling}`` of ``word`` under ``indic-transliteration`` schemes."""
    sanscript = _need("indic_transliteration.sanscript")
    src = sanscript.DEVANAGARI if lang == "hi" else sanscript.BENGALI
    return {s: sanscript.transliterate(word, src, getattr(sanscript, s)) for s in schemes}


def informal_variants(roman: str) -> dict[str, str]:
    """Informal spellings of one (ITRANS-like) romanization, one rule each: the inherent vowel
    dropped at the end, long vowels written short, w for v, s for sh, a doubled consonant, and
    long vowels written doubled (aa, ee, oo)."""
    low = roman.lower()
    return {
        "schwa dropped": re.sub(r"([^aeiou])a$", r"\1", low),
        "long vowels short": roman.replace("A", "a").replace("I", "i").replace("U", "u").lower(),
        "w for v": low.replace("v", "w"),
        "s for sh": low.replace("sh", "s"),
        "doubled consonant": re.sub(r"([bcdfgjklmnprstvz])", r"\1\1", low, count=1),
        "long vowels doubled": roman.replace("A", "aa").replace("I", "ee").replace("U", "oo").lower(),
    }


class VariantIndex:
    """Canonical keys of each word's romanizations (``schemes``) -> vocabulary words by frequency."""

    def __init__(self, vocab: Vocabulary, *, schemes: Sequence[str] = INDEX_SCHEMES):
        if vocab.lang not in ("hi", "bn"):
            raise UserError(f"romanized variants are for hi and bn, not {vocab.lang!r}")
        self.vocab, self.lang = vocab, vocab.lang
        table: dict[str, dict[str, float]] = collections.defaultdict(dict)
        self.spellings: dict[str, str] = {}
        for w, f in zip(vocab.words, vocab.freqs):
            for spelling in set(romanizations(w, self.lang, schemes).values()):
                table[canonical_roman(spelling, self.lang)][w] = f
                self.spellings.setdefault(spelling.lower(), w)
        self._table = {k: [w for w, _ in sorted(v.items(), key=lambda p: (-p[1], p[0]))] for k, v in table.items()}

    def lookup(self, roman: str, k: int = 5) -> list[str]:
        """Vocabulary words a romanized spelling may be, most frequent first."""
        if not isinstance(roman, str) or not re.search(r"[A-Za-z]", unicodedata.normalize("NFKD", roman)):
            raise UserError(f"ROMAN must be a word in Latin letters, got {roman!r}")
        return self._table.get(canonical_roman(roman, self.lang), [])[:k]

    def exact(self, roman: str) -> str | None:
        """The baseline: a word whose index spelling is exactly ``roman`` (case aside)."""
        return self.spellings.get(roman.lower())


# ---------------------------------------------------------------------------------------------
# simulations


def simulate_typing(decoder: Decoder, text: Sequence[Sequence[str]], *, suggestions: int = 3,
                    complete: bool = False) -> dict:
    """Type every word of ``text`` (sentences of words) on the one-view layout and on the full
    native one. A word costs its keys plus one tap to commit it when it is among the top
    ``suggestions`` candidates (space for the first, a tap on the suggestion bar otherwise);
    otherwise the keys typed and then the native cost. ``complete``: the user stops typing as soon
    as the word is among the top ``suggestions`` completions of the keys typed so far (and at the
    last key, among the candidates of the whole sequence).
    Returns accuracies, keystrokes, view switches and the keystroke saving."""
    lang = decoder.index.lang
    n = top1 = topk = 0
    ed = native = native_switches = 0
    for sentence in text:
        prev = None
        for w in sentence:
            keys = key_of(w, lang)
            strokes, switches = native_cost(w, lang)
            native += strokes + switches + 1  # the space
            native_switches += switches
            cands = decoder.decode(keys, prev=prev, k=suggestions)
            n += 1
            top1 += bool(cands) and cands[0] == w
            topk += w in cands
            if complete:  # completions of the shorter prefixes, then the exact candidates
                typed = next((i for i in range(1, len(keys))
                              if w in decoder.decode(keys[:i], prev=prev, k=suggestions, complete=True)),
                             len(keys) if w in cands else None)
                ed += (typed + 1) if typed is not None else (len(keys) + strokes + switches + 1)
            else:
                ed += len(keys) + 1 if w in cands else len(keys) + strokes + switches + 1
            prev = w
    return {"words": n, "top1": top1 / max(n, 1), f"top{suggestions}": topk / max(n, 1),
            "keystrokes": ed, "native_keystrokes": native, "native_view_switches": native_switches,
            "keystroke_saving": 1 - ed / max(native, 1), "view_switches": 0}


def evaluate_variants(index: VariantIndex, words: Sequence[str], *, k: int = 3) -> dict:
    """Map held-out spellings of ``words`` back to them: the schemes not in the index
    (OPTITRANS, VELTHUIS, KOLKATA) and the informal rules applied to the ITRANS spelling.
    Per source: top-1 / top-k accuracy of ``index.lookup`` and of the exact-spelling baseline."""
    held_out = [s for s in _SCHEME_NAMES if s not in INDEX_SCHEMES]
    rows: dict[str, list] = collections.defaultdict(list)
    for w in words:
        spell = romanizations(w, index.lang, ("ITRANS", *held_out))
        variants = {f"scheme {s}": spell[s] for s in held_out}
        variants.update({f"informal: {r}": v for r, v in informal_variants(spell["ITRANS"]).items()})
        for source, v in variants.items():
            cands = index.lookup(v, k)
            rows[source].append((bool(cands) and cands[0] == w, w in cands, index.exact(v) == w))
    out = {}
    for source, r in rows.items():
        a = np.array(r, bool)
        out[source] = {"top1": float(a[:, 0].mean()), f"top{k}": float(a[:, 1].mean()),
                       "exact_baseline": float(a[:, 2].mean()), "n": len(r)}
    allr = np.array([x for r in rows.values() for x in r], bool)
    out["all"] = {"top1": float(allr[:, 0].mean()), f"top{k}": float(allr[:, 1].mean()),
                  "exact_baseline": float(allr[:, 2].mean()), "n": len(allr)}
    return out


def _timed_decode(decoder: Decoder, keys: Sequence[str], repeats: int = 3) -> float:
    """Mean microseconds to decode one key sequence (the best of ``repeats`` passes)."""
    import time

    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for k in keys:
            decoder.decode(k)
        best = min(best, time.perf_counter() - t)
    return best / max(len(keys), 1) * 1e6


def evaluate(lang: str, *, size: int = 100_000, words: int = 5000, sentences: int = 20_000, variant_words: int = 1000,
             seed: int = 0) -> dict:
    """``jaxkv edatlas eval``: simulated typing on held-out text (Thai: 10% of the segmented
    Wikipedia titles, the rest trains the bigram model; Hindi/Bengali: ``words`` words drawn by
    frequency, no context model) and, for hi/bn, variant mapping on ``variant_words`` words drawn
    by frequency. Returns the report (JSON-ready)."""
    _check_lang(lang)
    for name, v in (("words", words), ("sentences", sentences), ("variant_words", variant_words)):
        if not isinstance(v, int) or v < 1:
            raise UserError(f"{name} must be a positive integer, got {v!r}")
    vocab = Vocabulary.load(lang, size)
    index = KeyIndex(vocab)
    rng = np.random.default_rng(seed)
    report = {"lang": lang, "script": script(lang).name, "vocabulary": len(vocab), "keys_on_the_view": len(script(lang).keys),
              "distinct_key_sequences": len(set(index._keys))}
    model = None
    if lang == "th":
        sents = thai_sentences(sentences, seed=seed)
        order = rng.permutation(len(sents))
        cut = len(sents) // 10
        test = [sents[i] for i in order[:cut]]
        model = BigramModel([sents[i] for i in order[cut:]], vocab)
        test = [[w for w in s if w in index.vocab_set] for s in test]  # words outside the vocabulary dropped
        text, budget = [], words
        for s in test:
            if s and budget > 0:
                text.append(s[:budget])
                budget -= len(text[-1])
        report["text"] = (f"{sum(map(len, text))} words of {len(text)} held-out Wikipedia titles (segmented by "
                          f"pythainlp), the bigram model trained on the other {len(sents) - cut}")
    else:
        p = vocab.freqs / vocab.freqs.sum()
        drawn = [vocab.words[i] for i in rng.choice(len(vocab), words, p=p)]
        text = [drawn[i: i + 10] for i in range(0, len(drawn), 10)]
        report["text"] = f"{words} words drawn by frequency (no running {script(lang).name} text offline)"
    rows = {}
    for name, dec in (("frequency", Decoder(index)), *((("frequency + bigram context", Decoder(index, model)),)
                                                      if model else ())):
        rows[name] = simulate_typing(dec, text)
        rows[name + ", with completion"] = simulate_typing(dec, text, complete=True)
    report["typing"] = rows
    keys = [key_of(w, lang) for s in text for w in s][:2000]
    report["decode_us"] = _timed_decode(Decoder(index, model), keys)
    if lang in ("hi", "bn"):
        vindex = VariantIndex(vocab)
        p = vocab.freqs / vocab.freqs.sum()
        chosen = [vocab.words[i] for i in rng.choice(len(vocab), min(variant_words, len(vocab)), replace=False, p=p)]
        report["variants"] = evaluate_variants(vindex, chosen)
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['lang']} ({report['script']}): {report['vocabulary']} words, {report['keys_on_the_view']} keys "
             f"on one view, {report['distinct_key_sequences']} distinct key sequences; {report['text']}",
             f"  {'ranking':<36} {'top-1':>7} {'top-3':>7} {'keystrokes':>11} {'native (switches)':>19} {'saving':>8}"]
    for name, r in report["typing"].items():
        lines.append(f"  {name:<36} {r['top1']:>7.1%} {r['top3']:>7.1%} {r['keystrokes']:>11} "
                     f"{r['native_keystrokes']:>11} ({r['native_view_switches']:>5}) {r['keystroke_saving']:>8.1%}")
    lines.append(f"  decoding a key sequence: {report['decode_us']:.1f} µs")
    if "variants" in report:
        lines.append(f"  {'romanized variants':<36} {'top-1':>7} {'top-3':>7} {'exact-spelling baseline':>24}")
        for name, r in report["variants"].items():
            lines.append(f"  {name:<36} {r['top1']:>7.1%} {r['top3']:>7.1%} {r['exact_baseline']:>24.1%}")
    return "\n".join(lines)
