"""AnchorAttention's continued-pretraining experiment: the data sources it trains on, the run
options it records, reading checkpoints read-only, and ``jaxkv analyze long-context`` (scores
cached per checkpoint, runs that do not compare refused, the table's averages worked by hand)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from jaxkv.errors import UserError
from jaxkv.eval import long_context as lc
from jaxkv.training.config import TrainConfigError
from jaxkv.training.data import load_documents, shuffle_documents


@pytest.fixture(scope="module")
def default_tokenizer():
    from jaxkv.checkpoints import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("default"))


def test_the_task_mix_lookup_and_pydoc_sources_fit_their_rows(default_tokenizer):
    tok = default_tokenizer
    eos = tok.token_to_id("</s>")
    tasks = load_documents(["synthetic:tasks:40"], tokenizer=tok, vocab_size=tok.get_vocab_size(), seed=0, length=1024)
    lengths = np.array([len(d) for d in tasks])
    assert len(tasks) == 40 and lengths.max() <= 1023  # one short of the row: an anchor fits beside the longest
    assert all(int(d[-1]) == eos for d in tasks)
    # log-uniform targets in 128..1023: the median near sqrt(128 * 1023) = 362, far below the midpoint 575
    assert np.median(lengths) < 500 and lengths.min() < 256 and lengths.max() > 700
    lookup = load_documents(["synthetic:lookup:5"], tokenizer=tok, vocab_size=tok.get_vocab_size(), seed=0)
    for ids, mask in lookup:
        assert len(ids) == len(mask) and mask[0] == 0 and 0 < mask.sum() < len(mask)  # the loss on the copy only
    pydoc = load_documents(["synthetic:pydoc:3"], tokenizer=tok, vocab_size=tok.get_vocab_size(), seed=0, length=300)
    assert len(pydoc) == 3 and all(len(d) <= 299 for d in pydoc)
    with pytest.raises(TrainConfigError, match="synthetic:tasks:2.*tokenizer"):
        load_documents(["synthetic:tasks:2"], tokenizer=None, vocab_size=512, seed=0, length=512)
    with pytest.raises(TrainConfigError, match="at least 64 tokens"):
        load_documents(["synthetic:tasks:2"], tokenizer=tok, vocab_size=tok.get_vocab_size(), seed=0, length=1)
    with pytest.raises(TrainConfigError, match="synthetic:pydoc.*row length"):
        load_documents(["synthetic:pydoc"], tokenizer=tok, vocab_size=tok.get_vocab_size(), seed=0)


def test_shuffling_is_a_seeded_permutation():
    docs = [np.array([i]) for i in range(50)]
    a, b, c = shuffle_documents(docs, 0), shuffle_documents(docs, 0), shuffle_documents(docs, 1)
    assert sorted(int(d[0]) for d in a) == list(range(50))
    assert [int(d[0]) for d in a] == [int(d[0]) for d in b] != [int(d[0]) for d in c]


def _scored(run, step, scores):
    return {"run": run, "step": step, "settings": {"tasks": ["a", "b"], "lengths": [1, 2], "samples": 1, "seed": 0},
            "scores": scores, "mean": 100 * float(np.mean(list(scores.values())))}


def _info(run, mode):
    return {"run": run, "mode": mode, "rope_theta": 1e6, "seq_len": 8, "steps": 2, "tokens_per_s": 10.0,
            "step_s": 0.8, "final_loss": 1.0}


def test_the_table_averages_over_checkpoints_as_worked_by_hand():
    scored = {"x": [_scored("x", 1, {"a@1": 1.0, "b@1": 0.5, "a@2": 0.0, "b@2": 0.5}),
                    _scored("x", 2, {"a@1": 1.0, "b@1": 1.0, "a@2": 0.5, "b@2": 0.5})],
              "y": [_scored("y", 2, {"a@1": 1.0, "b@1": 1.0, "a@2": 1.0, "b@2": 0.0})]}
    report = lc.long_context([_info("x", "anchor"), _info("y", "full")], scored)
    full, anchor = report["rows"]  # in the paper's order: full first
    assert (full["mode"], anchor["mode"]) == ("full", "anchor")
    # x per key over its checkpoints: a@1 1, b@1 .75, a@2 .25, b@2 .5 -> 62.5
    assert anchor["score"] == pytest.approx(62.5)
    assert anchor["by_length"] == pytest.approx({"1": 87.5, "2": 37.5})
    assert anchor["by_task"] == pytest.approx({"a": 62.5, "b": 62.5})
    assert anchor["per_checkpoint"] == pytest.approx([50.0, 75.0])
    assert full["score"] == pytest.approx(75.0) and report["ranking"] == ["full", "anchor"]
    assert report["paper_ranking"] == ["anchor", "full"] and anchor["paper"] == 73.25
    # scored in two pieces and merged: the same table
    one = lc.long_context([_info("x", "anchor")], {"x": scored["x"]})
    two = lc.long_context([_info("y", "full")], {"y": scored["y"]})
    assert lc.merge_long_context([one, two]) == report
    with pytest.raises(UserError, match="already"):
        lc.merge_long_context([one, one])
    other = {**two, "settings": {**two["settings"], "samples": 8}}
    with pytest.raises(UserError, match="other settings"):
        lc.merge_long_context([one, other])


def _train(main, tmp_path, name, model, mode, data=("synthetic:lookup:30", "synthetic:pydoc:20")):
    out = tmp_path / name
    assert main(["train", "lm", "--model", str(model), "--data", *data, "--shuffle", "--whole-documents",
                 "--seq-len", "512", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--save-every", "1",
                 "--keep", "2", "--attention", mode, "--rope-theta", "1e5", "--out", str(out)]) == 0
    return out


def test_analyze_long_context_scores_runs_reuses_scores_and_refuses_what_does_not_compare(tmp_path, capsys):
    from jaxkv.checkpoints import load_checkpoint
    from jaxkv.cli import main
    from jaxkv.tiny import create_tiny_checkpoint
    from jaxkv.training.checkpoint import RunDirError

    model = tmp_path / "tiny"
    create_tiny_checkpoint(model)
    full = _train(main, tmp_path, "full", model, "full")
    anchor = _train(main, tmp_path, "anchor", model, "anchor")
    meta = json.loads((anchor / "run.json").read_text())
    assert meta["shuffled"] is True and meta["data"]["split_documents"] is False
    assert meta["model"]["rope_theta"] == 1e5 and meta["model"]["max_position_embeddings"] >= 512

    # the last checkpoint read read-only is the run's exported model
    config, params = lc.checkpoint_params(anchor, 2)
    _, exported = load_checkpoint(anchor / "hf")
    import jax

    leaves, want = jax.tree.leaves(params), jax.tree.leaves(exported)
    assert len(leaves) == len(want) > 0
    for a, b in zip(leaves, want):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-6)
    assert config.rope_theta == 1e5

    out = tmp_path / "lc"
    cli = ["analyze", "long-context", "--tasks", "passkey,niah_single", "--lengths", "256", "--samples", "1",
           "--last", "2", "--out", str(out)]
    assert main(cli + ["--runs", str(full), str(anchor), "--base"]) == 0
    report = json.loads((out / "long_context.json").read_text())
    assert [r["mode"] for r in report["rows"]] == ["full", "anchor"] and "base" in report
    for row in report["rows"]:
        assert row["checkpoints"] == [1, 2]
        cached = [json.loads((out / "evals" / row["run"] / f"{s}.json").read_text()) for s in (1, 2)]
        keys = cached[0]["scores"]
        assert row["score"] == pytest.approx(100 * np.mean([np.mean([c["scores"][k] for c in cached]) for k in keys]))
        assert row["tokens_per_s"] is None or row["tokens_per_s"] > 0
    assert (out / "long_context.md").read_text().count("| anchor |") == 2
    stamps = {p: p.stat().st_mtime_ns for p in (out / "evals").rglob("*.json")}
    assert len(stamps) == 5  # 2 runs x 2 checkpoints + the starting model
    assert main(cli + ["--runs", str(full), str(anchor), "--base"]) == 0  # every score reused
    assert {p: p.stat().st_mtime_ns for p in (out / "evals").rglob("*.json")} == stamps

    other = _train(main, tmp_path, "other", model, "intra", data=("synthetic:lookup:31",))
    capsys.readouterr()
    for runs, message in (([full, other], "its data"), ([full, full], "two runs train with --attention full"),
                          ([tmp_path], "no run.json")):
        assert main(cli + ["--runs", *map(str, runs)]) == 2
        assert message in capsys.readouterr().err

    damaged = tmp_path / "damaged"
    shutil.copytree(anchor, damaged)
    victim = max((p for p in (damaged / "checkpoints" / "2").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
    with pytest.raises(RunDirError, match="damaged"):
        lc.checkpoint_params(damaged, 2)


def test_the_harness_builds_each_sample_once_per_process(tiny_model):
    from jaxkv.eval.harness import EvalConfig, _sample, evaluate
    from jaxkv.tiny import make_tokenizer

    config, params = tiny_model
    tok = make_tokenizer(config.vocab_size)
    cfg = EvalConfig(methods=("full",), tasks=("passkey",), lengths=(256,), samples=2, seed=123)
    first = evaluate(params, config, tok, cfg)
    misses = _sample.cache_info().misses
    again = evaluate(params, config, tok, cfg)
    assert _sample.cache_info().misses == misses  # the second grid built no sample
    assert [r.accuracy for r in first] == [r.accuracy for r in again]


def test_two_runs_of_one_folder_name_are_refused():
    """Scores are stored under out/evals/<folder name>: sweep/full/run and sweep/anchor/run would
    replace each other's, so they are refused naming both."""
    from jaxkv.errors import UserError
    from jaxkv.eval.long_context import check_comparable

    base = {"init": "x", "data_fingerprint": "d", "seq_len": 64, "steps": 4}
    infos = [{**base, "run": "run", "path": "sweep/full/run", "mode": "full"},
             {**base, "run": "run", "path": "sweep/anchor/run", "mode": "anchor"}]
    with pytest.raises(UserError, match="sweep/full/run and sweep/anchor/run share the folder name 'run'"):
        check_comparable(infos)
    infos[1]["run"] = "anchor-run"
    check_comparable(infos)
