import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.eval.harness import EvalConfig, answer_ids, evaluate, kl_and_agreement, policy_for
from jaxkv.eval.report import JSON_KEYS, format_table, plot_accuracy_vs_bytes, write_json
from jaxkv.eval.tasks import TASKS, make_sample, score
from jaxkv.tiny import make_tokenizer

TOK = make_tokenizer(512)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [1024, 3000])
def test_length_within_2_percent_and_answers_in_the_prompt(task, length):
    s = make_sample(task, TOK, length=length, depth=0.3, seed=7)
    assert 0.98 * length <= s.length <= length
    assert list(s.prompt_ids) == TOK.encode(s.prompt).ids
    for a in s.answers:
        assert a in s.prompt  # the facts to retrieve are all in the context
    assert s.prompt.rstrip().endswith(("is", "are"))


@pytest.mark.parametrize("task", ["niah_single", "niah_single_words", "passkey", "vt", "niah_multikey"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_sits_at_the_stated_depth(task, depth):
    s = make_sample(task, TOK, length=2048, depth=depth, seed=3)
    start, end = s.needle_chars
    head = s.prompt.index("\n\n") + 2
    context_end = s.prompt.rindex("\n\nQuestion:")
    assert s.answers[0] in s.prompt[start:end]
    frac = (start - head) / (context_end - head - (end - start))
    assert abs(frac - depth) < 0.03, frac


def test_same_seed_same_sample_and_different_seed_different():
    a = make_sample("niah_multiquery", TOK, length=1500, depth=0.4, seed=11)
    b = make_sample("niah_multiquery", TOK, length=1500, depth=0.4, seed=11)
    c = make_sample("niah_multiquery", TOK, length=1500, depth=0.4, seed=12)
    assert a == b and a.answers != c.answers


def test_task_contents_hand_checked():
    s = make_sample("cwe", TOK, length=1200, seed=1)
    words = [w for w in s.prompt.split("\n\n")[1].split() if not w.endswith(".")]
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=counts.get, reverse=True)[:10]
    assert set(top) == set(s.answers) and min(counts[w] for w in s.answers) > max(
        c for w, c in counts.items() if w not in s.answers)
    f = make_sample("fwe", TOK, length=1200, seed=1)
    words = f.prompt.split("\n\n")[1].rstrip(".").split()
    counts = {w: words.count(w) for w in set(words)}
    assert set(sorted(counts, key=counts.get, reverse=True)[:3]) == set(f.answers)
    v = make_sample("vt", TOK, length=1200, seed=1)
    value = v.prompt.split("assigned the value ")[1].split(".")[0]
    assert f"VAR {v.answers[0]} = {value}." in v.prompt
    for prev, cur in zip(v.answers, v.answers[1:]):
        assert f"VAR {cur} = VAR {prev}." in v.prompt


def test_score_hand_worked():
    assert score("The special magic number is 1234567.", ("1234567",)) == 1.0
    assert score("it is 123456", ("1234567",)) == 0.0
    assert score("ABC and xyz", ("abc", "XYZ", "def", "ghi")) == 0.5
    with pytest.raises(ValueError):
        score("x", ())


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="unknown task 'nope'.*niah_single"):
        make_sample("nope", TOK, length=1024)
    with pytest.raises(ValueError, match="depth"):
        make_sample("passkey", TOK, length=1024, depth=1.5)
    with pytest.raises(ValueError, match="length"):
        make_sample("passkey", TOK, length=10)
    with pytest.raises(ValueError, match="unknown cache policy 'h2o'"):
        EvalConfig(methods=("h2o",))
    with pytest.raises(ValueError, match="budgets"):
        EvalConfig(budgets=(0.0,))


def test_fidelity_metrics():
    logits = jax.random.normal(jax.random.key(0), (6, 50))
    kl, top1 = kl_and_agreement(logits, logits)
    assert kl == pytest.approx(0.0, abs=1e-6) and top1 == 1.0
    kl, top1 = kl_and_agreement(logits, logits + 3.0)  # a shift changes no distribution
    assert kl == pytest.approx(0.0, abs=1e-5) and top1 == 1.0
    p, q = jnp.log(jnp.array([[0.5, 0.5]])), jnp.log(jnp.array([[0.9, 0.1]]))
    kl, top1 = kl_and_agreement(p, q)
    assert kl == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1), rel=1e-5)
    assert top1 == 1.0  # argmax ties resolve to the first index in both


def test_policy_for_budget():
    assert policy_for("full", 0.1, 1000).name == "full"
    s = policy_for("streaming", 0.25, 2000)
    assert s.sinks + s.window == 500


def test_parameters_in_a_method_name_win_over_the_budget(tiny_model):
    """A field the budget would size, named in the method, is kept through ``prepare``; named
    sinks leave streaming at the budget's tokens."""
    config, params = tiny_model
    assert policy_for("razor[window=64]", 0.5, 256).prepare(params, config).window == 64
    assert policy_for("razor+mikv[window=64]", 0.5, 256).prepare(params, config).window == 64
    assert policy_for("mikv[important=0.1]", 0.5, 256).prepare(params, config).important == 0.1
    s = policy_for("streaming[sinks=64]", 0.25, 2000)
    assert (s.sinks, s.sinks + s.window) == (64, 500)
    assert policy_for("mikv", 0.5, 256).prepare(params, config).important != 0.5  # unnamed: sized by the bytes
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        EvalConfig(seed=-1)
    with pytest.raises(ValueError, match="samples must be an integer"):
        EvalConfig(samples=2.5)


def test_harness_on_a_tiny_model_tells_streaming_from_full(tiny_model, tmp_path):
    config, params = tiny_model
    rows = evaluate(params, config, TOK, EvalConfig(methods=("full", "streaming"), budgets=(0.1, 1.0),
                                                    tasks=("passkey",), lengths=(256,), samples=2))
    by = {(r.method, r.budget): r for r in rows}
    full, tight, loose = by[("full", 1.0)], by[("streaming", 0.1)], by[("streaming", 1.0)]
    assert full.kl == 0.0 and full.top1_agreement == 1.0 and full.kv_bytes == full.full_kv_bytes
    # budget 1.0 keeps the whole prompt (only the last answer tokens push the first ones out);
    # budget 0.1 holds ~10x fewer bytes and drifts further from the full cache
    assert tight.kv_bytes < 0.15 * full.full_kv_bytes < loose.kv_bytes
    assert 0 <= loose.kl < tight.kl and loose.top1_agreement >= tight.top1_agreement
    assert all(r.prefill_ms > 0 and r.decode_tokens_per_s > 0 for r in rows)
    # share of the context attended at the last step: all of it for full, the ring for streaming
    assert full.attended_fraction == 1.0
    ring = 0.1 * 256  # sinks + window of the 0.1 budget, over a context of ~256 + the answer span
    assert 0.5 * ring / 300 < tight.attended_fraction < ring / 256

    write_json(rows, tmp_path / "rows.json")
    data = json.loads((tmp_path / "rows.json").read_text())
    assert set(JSON_KEYS) <= set(data[0]) and len(data) == 3
    plot_accuracy_vs_bytes(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    table = format_table(rows)
    assert "streaming" in table and "passkey" in table


def test_answer_ids_decode_to_the_answers():
    s = make_sample("niah_multivalue", TOK, length=512, seed=0)
    text = TOK.decode(answer_ids(TOK, s))
    assert all(a in text for a in s.answers)


def test_a_sample_whose_answer_runs_past_the_models_context_is_refused(tiny_model):
    import dataclasses

    config, params = tiny_model
    sample = make_sample("passkey", TOK, length=256)
    short = dataclasses.replace(config, max_position_embeddings=len(sample.prompt_ids) + 2)
    with pytest.raises(ValueError, match="exceed the model's context"):
        evaluate(params, short, TOK, EvalConfig(methods=("full",), budgets=(1.0,), tasks=("passkey",),
                                                lengths=(256,), samples=1))


def test_json_reports_write_null_for_non_finite_numbers(tmp_path):
    import json

    from jaxkv.fileio import json_text

    text = json_text({"kl": float("nan"), "loss": [1.0, float("inf")], "n": 3})
    assert json.loads(text) == {"kl": None, "loss": [1.0, None], "n": 3} and "NaN" not in text
