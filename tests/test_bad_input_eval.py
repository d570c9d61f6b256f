"""jaxkv eval: output paths checked before the work, nobody's files touched, clear list errors,
Ctrl-C."""

import time

import pytest

from jaxkv.cli import main
from jaxkv.eval.report import write_json


def test_a_bad_json_path_fails_before_the_evaluation(tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["eval", "--samples", "1", "--json", str(tmp_path / "missing" / "rows.json")]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 5  # no model was run
    assert "--json" in err and "does not exist" in err and ".tmp" not in err
    assert main(["eval", "--samples", "1", "--plot", str(tmp_path)]) == 2
    assert "--plot" in capsys.readouterr().err


def test_writing_json_leaves_the_users_tmp_file_alone(tmp_path):
    mine = tmp_path / "rows.tmp"
    mine.write_text("my notes")
    write_json([], tmp_path / "rows.json")
    assert mine.read_text() == "my notes"
    assert (tmp_path / "rows.json").read_text() == "[]\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json", "rows.tmp"]


@pytest.mark.parametrize("flag, value, listed", [
    ("--methods", "full,streaming,full", "'full'"), ("--lengths", "1024,1024", "1024"),
    ("--budgets", "0.25,0.25", "0.25"), ("--tasks", "passkey,passkey", "'passkey'"),
])
def test_duplicates_are_refused(capsys, flag, value, listed):
    assert main(["eval", flag, value]) == 2
    assert f"lists {listed} twice" in capsys.readouterr().err


def test_the_lengths_limit_message_names_the_longest_allowed(capsys):
    assert main(["eval", "--lengths", "4096"]) == 2  # the default model's context is 4096
    err = capsys.readouterr().err
    assert "--lengths 4096 is too long" in err and "the longest --lengths it takes is 4032" in err


def test_ctrl_c_stops_cleanly(monkeypatch, capsys):
    import jaxkv.eval.harness as harness

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "evaluate", interrupted)
    assert main(["eval", "--samples", "1"]) == 130
    assert capsys.readouterr().err == "jaxkv: interrupted; nothing was written\n"


@pytest.mark.parametrize("flag", ["--methods", "--tasks"])
def test_an_empty_list_is_refused_not_read_as_the_default(capsys, flag):
    assert main(["eval", flag, ""]) == 2
    assert flag.lstrip("-") in capsys.readouterr().err


def test_each_method_is_sized_once_per_requested_length(tiny_model, monkeypatch):
    """Samples of one (task, length) are a few tokens apart; the methods are sized for the
    requested length, so one policy (one compile, one calibration) serves every sample."""
    import jaxkv.eval.harness as harness
    from jaxkv.eval.harness import EvalConfig, evaluate
    from jaxkv.tiny import make_tokenizer

    config, params = tiny_model
    calls = []
    real = harness.policy_for
    monkeypatch.setattr(harness, "policy_for", lambda m, b, n: calls.append((m, b, n)) or real(m, b, n))
    cfg = EvalConfig(methods=("full", "streaming"), tasks=("niah_single",), lengths=(256,), samples=3, seed=0)
    evaluate(params, config, make_tokenizer(config.vocab_size), cfg)
    assert calls == [("streaming", 0.25, 256)]


@pytest.mark.parametrize("flag, value", [("--budgets", "0.25,"), ("--tasks", "passkey,,vt"), ("--lengths", ",1024")])
def test_an_empty_entry_in_a_list_is_refused(capsys, flag, value):
    assert main(["eval", flag, value]) == 2
    assert f"{flag} has an empty entry" in capsys.readouterr().err


def test_eval_config_refuses_a_bare_string_and_a_bool_budget():
    from jaxkv.errors import UserError
    from jaxkv.eval.harness import EvalConfig

    with pytest.raises(UserError, match="tasks must be a sequence"):
        EvalConfig(tasks="passkey")
    for bad in (True, "0.5"):
        with pytest.raises(UserError, match="budgets must be numbers in"):
            EvalConfig(budgets=(bad,))
