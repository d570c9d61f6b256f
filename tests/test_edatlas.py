"""edATLAS (jaxkv.edatlas): the key function per script on hand-worked words, the index's lookups
and completions, the context model, the romanization normaliser and variant mapping, the typing
simulation's costs, bad input, and the command."""

import io

import numpy as np
import pytest

pytest.importorskip("wordfreq", reason="edATLAS needs pip install 'jaxkv[edatlas]'")

from jaxkv import edatlas as ed  # noqa: E402
from jaxkv.errors import UserError  # noqa: E402


@pytest.mark.parametrize("lang, word, keys", [
    ("hi", "नमस्ते", "नमसत"),      # virama and vowel sign e dropped
    ("hi", "किताब", "कतब"),        # vowel signs i, aa dropped
    ("hi", "क़िला", "कल"),          # precomposed qa (ka + nukta) typed as ka
    ("hi", "आँख", "आख"),          # candrabindu dropped; the independent vowel aa is a key
    ("hi", "हिंदी", "हद"),          # anusvara dropped
    ("bn", "বাংলা", "বল"),          # anusvara and aa signs dropped
    ("bn", "উৎসব", "উতসব"),        # khanda ta typed as ta
    ("bn", "বড়", "বড"),            # rra = dda + nukta
    ("th", "ไป", "ป"),             # the leading vowel ai is not a key
    ("th", "สวัสดี", "สวสด"),       # mai han-akat and sara ii dropped
    ("th", "น้ำ", "น"),             # tone mark and sara am dropped
    ("th", "ฤดู", "ฤด"),            # ru is an independent vowel: a key
])
def test_the_key_function_on_hand_worked_words(lang, word, keys):
    assert ed.key_of(word, lang) == keys


def test_the_layouts_come_from_the_unicode_blocks():
    hi, bn, th = ed.script("hi"), ed.script("bn"), ed.script("th")
    assert {"क", "ह", "अ", "औ"} <= hi.keys and not ({"ि", "्", "ं", "़", "क़"} & hi.keys)
    assert {"ি", "্", "ং"} <= bn.marks and "ৎ" not in bn.keys
    assert len(th.keys) == 46 and all("\u0e01" <= c <= "\u0e2e" for c in th.keys)  # ko kai .. ho nokhuk, ru, lu
    assert not ({"เ", "า", "ะ", "่"} & th.keys)
    assert ed.native_cost("नमस्ते", "hi") == (6, 4)  # न म स | ् | त | े, then back to the keys
    assert ed.native_cost("कमल", "hi") == (3, 0)


@pytest.fixture(scope="module")
def hindi():
    return ed.Vocabulary.from_counts("hi", {"कल": 50, "काल": 30, "किला": 20, "कली": 10, "कमल": 40, "कमला": 5,
                                            "नमस्ते": 8, "कोयल": 3})


def test_the_index_ranks_by_frequency_and_completes_prefixes(hindi):
    index = ed.KeyIndex(hindi, top=3)
    assert [w for w, _ in index.lookup("कल")] == ["कल", "काल", "किला"]  # कली too, past top=3
    assert [w for w, _ in index.lookup("कल", 10)] == ["कल", "काल", "किला", "कली"]
    assert index.lookup("कखग") == []
    assert [w for w, _ in index.complete("क")] == ["कल", "कमल", "काल"]  # precomputed prefix
    assert [w for w, _ in index.complete("कम", 5)] == ["कमल", "कमला"]
    assert [w for w, _ in index.complete("कयल", 5)] == ["कोयल"]
    assert [w for w, _ in index.complete("नमस", 5)] == ["नमस्ते"]  # a longer prefix: the sorted range
    assert abs(sum(hindi.freqs) - 1) < 1e-12


def test_the_bigram_context_reranks_candidates(hindi):
    index = ed.KeyIndex(hindi)
    model = ed.BigramModel([["नमस्ते", "काल"], ["नमस्ते", "काल"], ["कमल", "कल"]], hindi)
    dec = ed.Decoder(index, model)
    assert dec.decode("कल")[0] == "कल"  # no previous word: frequency
    assert dec.decode("कल", prev="नमस्ते")[0] == "काल"  # seen twice after it
    # absolute discounting: the seen pair keeps (2 - d) / 2 plus its share of the unigram mass
    p = np.exp(model.logprob("काल", "नमस्ते"))
    assert abs(p - ((2 - 0.75) / 2 + 0.75 * 1 / 2 * hindi.freqs[hindi.words.index("काल")])) < 1e-12


def test_simulated_typing_counts_keystrokes_and_falls_back_to_the_native_layout(hindi):
    dec = ed.Decoder(ed.KeyIndex(hindi))
    r = ed.simulate_typing(dec, [["कल", "कली"]], suggestions=3)
    # कल: 2 keys + space (top-1); कली: rank 4 for कल -> 2 keys, then natively क ल ी (3, 2 switches) + space
    assert r["keystrokes"] == 3 + (2 + 3 + 2 + 1)
    assert r["native_keystrokes"] == 3 + (3 + 2 + 1) and r["native_view_switches"] == 2
    assert r["top1"] == 0.5 and r["top3"] == 0.5
    # कमला shares the keys कमल with the more frequent कमल: second for the whole sequence, and among
    # the top 3 completions of "कम" already: 2 keys and a tap on the suggestion
    c = ed.simulate_typing(dec, [["कमला"]], complete=True)
    assert c["keystrokes"] == 3 and c["top1"] == 0.0 and c["top3"] == 1.0
    assert ed.simulate_typing(dec, [["कमला"]])["keystrokes"] == 3 + 1


@pytest.mark.parametrize("spelling, lang, key", [
    ("Kitaab", "hi", "kitab"), ("kitAba", "hi", "kitab"), ("kitab", "hi", "kitab"),
    ("shiksha", "hi", "siks"), ("shikShA", "hi", "siks"), ("śikṣā", "hi", "siks"),
    ("bangla", "bn", "banl"), ("vAMlA", "bn", "banl"), ("Bhasha", "bn", "bas"),
    ("pani", "hi", "pani"), ("paanee", "hi", "pani"), ("hindee", "hi", "hindi"),
])
def test_the_romanization_normaliser_on_hand_worked_spellings(spelling, lang, key):
    assert ed.canonical_roman(spelling, lang) == key


def test_variants_map_onto_the_vocabulary(hindi):
    vocab = ed.Vocabulary.from_counts("hi", {"किताब": 10, "पानी": 30, "शिक्षा": 5, "हिंदी": 20})
    index = ed.VariantIndex(vocab)
    assert index.lookup("kitaab") == ["किताब"] and index.lookup("paanee") == ["पानी"]
    assert index.lookup("shiksha") == ["शिक्षा"] and index.lookup("Hindee") == ["हिंदी"]
    assert index.exact("kitAba") == "किताब" and index.exact("kitaab") is None  # the baseline: spellings only
    r = ed.evaluate_variants(index, ["किताब", "पानी"])
    assert r["all"]["n"] == 2 * (3 + 6) and 0 <= r["all"]["exact_baseline"] <= r["all"]["top3"] <= 1
    assert r["informal: long vowels doubled"]["top1"] == 1.0


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(UserError, match="unknown language 'ta'"):
        ed.key_of("தமிழ்", "ta")
    with pytest.raises(UserError, match="empty"):
        ed.check_keys("  ", "hi")
    with pytest.raises(UserError, match="is Bengali, not Devanagari"):
        ed.check_keys("কম", "hi")
    with pytest.raises(UserError, match="is a mark, not a key"):
        ed.check_keys("कि", "hi")
    with pytest.raises(UserError, match="not a key of the layout"):
        ed.check_keys("kam", "hi")
    with pytest.raises(UserError, match="not written in Devanagari"):
        ed.Vocabulary.from_counts("hi", {"कल": 1, "kal": 2})
    with pytest.raises(UserError, match="Latin letters"):
        ed.VariantIndex(ed.Vocabulary.from_counts("hi", {"कल": 1})).lookup("कल")
    with pytest.raises(UserError, match="hi and bn"):
        ed.canonical_roman("sawasdee", "th")


def test_real_vocabularies_load_and_decode(monkeypatch):
    hi = ed.Vocabulary.load("hi", 3000)
    assert len(hi) == 3000 and hi.words[0] == "के" and np.all(np.diff(hi.freqs) <= 0)
    dec = ed.Decoder(ed.KeyIndex(hi))
    assert "भारत" in dec.decode(ed.key_of("भारत", "hi"), k=3)
    th = ed.Vocabulary.load("th", 3000)
    assert all(ed._in_script(w, "th") for w in th.words) and "ที่" in th.words[:5]


def test_the_command_decodes_maps_variants_and_reads_standard_input(capsys, monkeypatch):
    from jaxkv.cli import main

    assert main(["edatlas", "decode", "--lang", "hi", "--size", "3000", "भरत"]) == 0
    assert "भारत" in capsys.readouterr().out.split()
    assert main(["edatlas", "variant", "--lang", "hi", "--size", "3000", "bhaarat"]) == 0
    assert "भारत" in capsys.readouterr().out.split()
    monkeypatch.setattr("sys.stdin", io.StringIO("भरत\nকম\n\nकम\n"))
    assert main(["edatlas", "decode", "--lang", "hi", "--size", "3000", "-"]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 2 and "Bengali" in err  # the bad line reported, the rest answered
    assert main(["edatlas", "decode", "--lang", "ta", "x"]) == 2
    assert "unknown language 'ta'" in capsys.readouterr().err
    assert main(["edatlas", "decode", "--lang", "hi,bn", "x"]) == 2
    assert "one --lang" in capsys.readouterr().err


def test_a_missing_extra_names_the_pip_command(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_wordfreq(name, *a):
        if name.split(".")[0] == "wordfreq":
            raise ImportError(f"No module named {name!r}")
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", without_wordfreq)
    with pytest.raises(UserError, match=r"package wordfreq: pip install 'jaxkv\[edatlas\]'"):
        ed.Vocabulary.load("hi", 10)
