"""Stuffed Mamba's capacity sweep: the passkey training source, the windowed reference reading,
the flatness and recall rules, the fits against known curves, and the command end to end."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.eval.mamba_capacity import (PAPER_FITS, capacity, fit_exponential, fit_linear, forgets, loss_bins,
                                       recall_length, windowed_nll)
from jaxkv.models.mamba2 import Mamba2Config, forward, init_params
from jaxkv.tiny import make_tokenizer
from jaxkv.training.config import TrainConfigError
from jaxkv.training.data import load_documents, passkey_documents

TINY = Mamba2Config(vocab_size=512, hidden_size=32, num_layers=1, num_heads=4, head_dim=16, state_size=8,
                    n_groups=1, chunk_size=16)


def test_recall_length_counts_consecutive_passing_lengths():
    assert recall_length({128: 1.0, 256: 0.95, 512: 0.9, 1024: 1.0}) == 256  # 1024 passing later does not count
    assert recall_length({128: 0.5, 256: 1.0}) == 0
    assert recall_length({512: 1.0, 128: 1.0, 256: 1.0}) == 512


def test_fits_recover_known_curves():
    x = np.array([0.1, 0.5, 1.0, 2.0, 4.0])
    lin = fit_linear(x, 5.172 * x - 4.469)
    assert lin["a"] == pytest.approx(5.172) and lin["b"] == pytest.approx(-4.469) and lin["rmse"] < 1e-9
    p = PAPER_FITS["t_recall"]
    xs = np.arange(1.0, 9.0)
    exp = fit_exponential(xs, p["a"] * (p["b"] ** xs - 1) + p["c"])
    assert exp["b"] == pytest.approx(p["b"], rel=2e-3)
    assert exp["a"] == pytest.approx(p["a"], rel=3e-2) and exp["c"] == pytest.approx(p["c"], abs=0.1)
    assert fit_linear([1.0, 1.0], [2.0, 3.0]) is None and fit_exponential([1.0, 2.0], [1.0, 2.0]) is None


def test_loss_bins_and_flatness_hand_worked():
    t = 8
    nll = np.concatenate([np.full(8, 2.0), np.full(8, 3.0), np.full(16, 5.0)])  # 32 positions
    bins = loss_bins(nll, t)
    assert [(b["start"], b["end"], b["loss"]) for b in bins] == [(4, 8, 2.0), (8, 16, 3.0), (16, 32, 5.0)]
    assert forgets(bins, 0.5) == (False, 3.0)  # no reference: against the training window's last half
    ref = nll.copy()
    ref[16:] = 4.9  # read within T_train, the last bin costs 4.9: 0.1 worse read whole
    bins = loss_bins(nll, t, ref)
    assert bins[2]["excess"] == pytest.approx(0.1) and bins[1]["excess"] == pytest.approx(0.0)
    flat, excess = forgets(bins, 0.15)
    assert flat and excess == pytest.approx(0.1)
    assert not forgets(bins, 0.05)[0]
    with pytest.raises(Exception, match="2 x T_train"):
        loss_bins(nll[:10], t)


def test_windowed_nll_reads_each_position_from_its_window():
    """Position i is scored by a fresh read of the window starting at the largest multiple of
    T/2 that leaves it T/2..T-1 tokens of context: a forward over that window alone."""
    params = init_params(TINY, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 40), 3, TINY.vocab_size))
    t = 8
    got = windowed_nll(params, TINY, tokens, train_len=t, rows_per_call=4)

    @jax.jit
    def nll(ids):
        logp = jax.nn.log_softmax(forward(params, ids, config=TINY)[0], -1)[:, :-1]
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]

    h = t // 2
    for i in range(h - 1, 39):
        start = ((i + 1) // h - 1) * h  # the window where position i has h..t-1 tokens before it
        assert start + t <= 40
        want = np.asarray(nll(jnp.asarray(tokens[:, start:start + t])))[:, i - start]
        np.testing.assert_allclose(got[:, i], want, atol=1e-5, err_msg=f"position {i}")
    assert np.isnan(got[:, :t // 2 - 1]).all()
    assert np.isfinite(got[:, t // 2 - 1:39]).all()  # 40 tokens: windows at 0, 4, ..., 32 reach position 38
    full = np.asarray(nll(jnp.asarray(tokens)))
    np.testing.assert_allclose(got[:, 3:7], full[:, 3:7], atol=1e-5)  # the first window is the stream's start
    with pytest.raises(Exception, match="even"):
        windowed_nll(params, TINY, tokens, train_len=7)


def test_capacity_takes_the_shortest_forgetting_length_and_the_best_recall():
    def m(n, t, flat, recall):
        return {"state_elements": n, "train_len": t, "forgets": flat, "excess_loss": 0.0 if flat else 1.0,
                "recall_length": recall}

    runs = [m(1_000_000, 512, False, 256), m(1_000_000, 2048, True, 1024), m(1_000_000, 8192, True, 512),
            m(2_000_000, 2048, False, 2048), m(2_000_000, 8192, True, 4096), m(4_000_000, 8192, False, 8192)]
    table = capacity(runs)["table"]
    assert [(r["t_forget"], r["t_forget_above"], r["t_recall"]) for r in table] == [
        (2048, None, 1024), (8192, None, 4096), (None, 8192, 8192)]
    fits = capacity(runs)["fits"]
    assert fits["t_forget"]["a"] == pytest.approx(6.144)  # (8.192 - 2.048) / (2 - 1)
    assert fits["t_recall"] is not None


def test_passkey_documents_hold_their_key_and_answer():
    tok = make_tokenizer(512)
    docs = passkey_documents(tok, length=160, count=4, seed=3)
    assert len(docs) == 4 and all(len(d) <= 160 for d in docs)
    texts = [tok.decode(d.tolist()) for d in docs]
    for text in texts:
        key = text.split("The pass key is")[1].split(".")[0].strip().replace(" ", "")
        assert len(key) == 5 and key.isdigit()
        assert text.replace(" ", "").rstrip(".").endswith(key)  # the answer: the key again, at the end
    assert len(set(texts)) == 4
    mixed = load_documents(["synthetic:count:5", "synthetic:passkey:2"], tokenizer=tok, vocab_size=512, seed=0,
                           length=160)
    assert len(mixed) == 7
    with pytest.raises(TrainConfigError, match="row length"):
        load_documents(["synthetic:passkey"], tokenizer=tok, vocab_size=512, seed=0)
    with pytest.raises(TrainConfigError, match="tokenizer"):
        load_documents(["synthetic:passkey:2"], tokenizer=None, vocab_size=512, seed=0, length=160)
    with pytest.raises(TrainConfigError, match="synthetic:NAME:COUNT"):
        load_documents(["synthetic:count:zero"], tokenizer=None, vocab_size=512, seed=0)
    with pytest.raises(TrainConfigError, match="known: copy, count, recall, recall-anywhere, passkey"):
        load_documents(["synthetic:nope"], tokenizer=None, vocab_size=512, seed=0)


def test_the_capacity_command_measures_runs_and_combines_them(tmp_path, capsys):
    """Two tiny runs trained by `jaxkv train mamba` on passkey + count data, measured by the
    command; a second call reuses the measurements; a folder that is no run is refused."""
    from jaxkv.checkpoints import save_checkpoint
    from jaxkv.cli import main

    tok_dir = tmp_path / "tok"
    save_checkpoint(tok_dir, TINY, init_params(TINY, jax.random.key(0)), tokenizer=make_tokenizer(512))
    runs = []
    for name, t, n in (("a", 96, 8), ("b", 128, 16)):
        out = tmp_path / name
        assert main(["train", "mamba", "--tokenizer", str(tok_dir), "--data", "synthetic:passkey:8",
                     "synthetic:count:50", "--seq-len", str(t), "--steps", "1", "--warmup", "1", "--hidden-size",
                     "32", "--head-dim", "16", "--state-size", str(n), "--layers", "1", "--dtype", "float32",
                     "--batch-size", "2", "--out", str(out)]) == 0
        runs.append(str(out))
    cli = ["analyze", "mamba-capacity", "--data", "synthetic:count", "--length", "512", "--streams", "2",
           "--passkey-lengths", "128,160", "--samples", "1", "--out", str(tmp_path / "cap")]
    assert main(cli + ["--runs", *runs]) == 0
    report = json.loads((tmp_path / "cap" / "capacity.json").read_text())
    assert [(r["train_len"], r["state_elements"]) for r in report["runs"]] == [(96, 512), (128, 1024)]
    for r in report["runs"]:
        assert set(r["passkey"]) == {"128", "160"} and r["recall_length"] in (0, 128, 160)
        assert r["loss_bins"][0]["excess"] == pytest.approx(0.0, abs=1e-4)  # within T_train both reads agree
    assert (tmp_path / "cap" / "capacity.png").stat().st_size > 0
    (a_file,) = (tmp_path / "cap" / "runs").glob("a-*.json")
    stamp = a_file.stat().st_mtime_ns
    capsys.readouterr()
    assert main(cli) == 0  # no --runs: the measurements already there, combined again
    assert a_file.stat().st_mtime_ns == stamp
    assert "| 512 | 96 |" in capsys.readouterr().out
    weights = next((tmp_path / "a" / "hf").glob("*.safetensors"))  # new weights in run a: measured again
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert main(cli + ["--runs", runs[0]]) == 0
    assert a_file.stat().st_mtime_ns != stamp
    stamp = a_file.stat().st_mtime_ns  # other held-out data of the same length: measured again
    bins = json.loads(a_file.read_text())["loss_bins"]
    assert main([x if x != "synthetic:count" else "synthetic:copy" for x in cli] + ["--runs", runs[0]]) == 0
    assert a_file.stat().st_mtime_ns != stamp and json.loads(a_file.read_text())["loss_bins"] != bins
    twin = tmp_path / "sweep2" / "a"  # another sweep's run of the same folder name: measured beside it
    import shutil

    shutil.copytree(runs[0], twin)
    assert main(cli + ["--runs", str(twin), str(twin)]) == 0
    assert len(list((tmp_path / "cap" / "runs").glob("a-*.json"))) == 2
    assert main(cli + ["--runs", str(tok_dir)]) == 2
    other = tmp_path / "other"  # run b with another tokenizer: refused, not measured on the wrong ids
    shutil.copytree(runs[1], other)
    (other / "hf" / "tokenizer.json").write_text(make_tokenizer(300).to_str())
    assert main(cli + ["--runs", runs[0], str(other)]) == 2
    assert "tokenizer differs" in capsys.readouterr().err
    assert main(["analyze", "mamba-capacity", "--out", str(tmp_path / "empty")]) == 2


def test_an_odd_training_length_is_refused_by_name(tmp_path):
    """The within-T_train reading windows a run in halves of T_train: a run trained at an odd
    --segment-len is refused naming it, before anything is loaded."""
    from jaxkv.errors import UserError
    from jaxkv.eval.mamba_capacity import measure_run

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "run.json").write_text(json.dumps({"segment_len": 5, "data": {"seq_len": 20}}))
    with pytest.raises(UserError, match="T_train 5 .*--segment-len"):
        measure_run(tmp_path, np.zeros((1, 64), np.int32), passkey_lengths=[128], samples=1)
