import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.config import preset
from jaxkv.errors import UserError
from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig, TrainConfigError
from jaxkv.training.data import Batches, pack_documents, synthetic_documents
from jaxkv.training.loop import TrainingDiverged, train_lm
from jaxkv.training.optim import make_schedule
from jaxkv.training.step import lm_loss

REPO = Path(__file__).resolve().parents[1]
TINY = preset("tiny")
COUNT = synthetic_documents("count", vocab_size=TINY.vocab_size, seed=0, num_docs=400)


def _cfgs(steps=12, **train):
    return dict(
        optim=OptimConfig(lr=3e-3, warmup_steps=5, total_steps=steps, weight_decay=0.0),
        data=DataConfig(seq_len=64),
        train=TrainConfig(batch_size=8, steps=steps, save_every=4, compute_dtype="float32", **train),
    )


def test_pack_documents_hand_worked():
    rows = pack_documents([[5, 6, 7], [8, 9, 10, 11, 12], [13]], DataConfig(seq_len=4))
    assert rows.tokens.tolist() == [[5, 6, 7, 8], [9, 10, 11, 12], [13, 0, 0, 0]]
    assert rows.segment_ids.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, -1, -1, -1]]
    assert rows.positions.tolist() == [[0, 1, 2, 0], [1, 2, 3, 4], [0, -1, -1, -1]]
    assert rows.loss_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    masked = pack_documents([([5, 6, 7], [0, 1, 1]), [8, 9]], DataConfig(seq_len=4))
    assert masked.loss_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    with pytest.raises(TrainConfigError, match="loss mask shape"):
        pack_documents([([5, 6, 7], [0, 1])], DataConfig(seq_len=4))
    cont = pack_documents([[5, 6, 7], [8, 9, 10, 11, 12], [13]], DataConfig(seq_len=4, position_mode="continuous"))
    assert cont.positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, -1, -1, -1]]
    whole = pack_documents([[5, 6, 7], [8, 9, 10], [11], [12, 13, 14, 15]], DataConfig(seq_len=4, split_documents=False))
    assert whole.tokens.tolist() == [[5, 6, 7, 0], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert whole.segment_ids.tolist() == [[0, 0, 0, -1], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert whole.positions.tolist() == [[0, 1, 2, -1], [0, 1, 2, 0], [0, 1, 2, 3]]
    with pytest.raises(TrainConfigError, match="document 1 has 5 tokens"):
        pack_documents([[5], [6, 7, 8, 9, 10]], DataConfig(seq_len=4, split_documents=False))


def test_the_chunked_loss_equals_the_whole_one_and_its_gradients(tiny_model):
    """Chunks of 3 (not dividing the row: padded) and the whole row give one loss and one
    gradient: the chunking only bounds the logits held at once."""
    from jaxkv.training.step import loss_chunk

    config, params = tiny_model
    rows = pack_documents([list(range(5, 17)), list(range(20, 29)), [3, 4, 5]], DataConfig(seq_len=16))
    batch = {k: jnp.asarray(getattr(rows, k)) for k in ("tokens", "positions", "segment_ids")}
    f = lambda p, c: lm_loss(p, batch, config=config, compute_dtype=jnp.float32, chunk=c)[0]  # noqa: E731
    loss_and_grad = jax.jit(jax.value_and_grad(f), static_argnums=1)  # one compile per chunk, not one per op
    want, want_g = loss_and_grad(params, 15)
    for c in (3,):
        got, got_g = loss_and_grad(params, c)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert loss_chunk(4, 8191, 128256) == 256 and loss_chunk(1, 100, 50) == 100 and loss_chunk(64, 4096, 2 ** 20) == 16


def test_batches_are_a_function_of_the_step_and_cover_each_epoch():
    rows = pack_documents(COUNT, DataConfig(seq_len=64))
    b1 = Batches(rows, batch_size=8, grad_accum=2, seed=3)
    b2 = Batches(rows, batch_size=8, grad_accum=2, seed=3)
    assert b1.get(5)["tokens"].shape == (2, 4, 64)
    for step in (7, 0, 7, 123):
        np.testing.assert_array_equal(b1.get(step)["tokens"], b2.get(step)["tokens"])
    n = len(rows)
    seen = np.concatenate([Batches(rows, batch_size=1, grad_accum=1, seed=3).get(i)["tokens"][0] for i in range(n)])
    assert sorted(map(tuple, seen)) == sorted(map(tuple, rows.tokens))


def test_loss_masks_padding_and_document_boundaries(tiny_model):
    config, params = tiny_model
    rows = pack_documents([[5, 6, 7], [8, 9]], DataConfig(seq_len=8))
    batch = {k: jnp.asarray(getattr(rows, k)) for k in ("tokens", "positions", "segment_ids")}
    loss = jax.jit(lambda p, b: lm_loss(p, b, config=config, compute_dtype=jnp.float32))  # not op by op
    total, count = loss(params, batch)
    assert float(count) == 3  # 5->6, 6->7, 8->9; never 7->8 or into padding
    answers_only = pack_documents([([5, 6, 7], [0, 0, 1]), [8, 9]], DataConfig(seq_len=8))
    batch_a = {k: jnp.asarray(getattr(answers_only, k)) for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    total_a, count_a = loss(params, batch_a)
    assert float(count_a) == 2  # 6->7 and 8->9
    logits, _ = jax.jit(lambda p: __import__("jaxkv").forward(
        p, jnp.array([[5, 6, 7]]), jnp.arange(3)[None], config=config))(params)
    logp = jax.nn.log_softmax(logits[0])
    want = -(logp[0, 6] + logp[1, 7])
    logits2, _ = jax.jit(lambda p: __import__("jaxkv").forward(
        p, jnp.array([[8, 9]]), jnp.arange(2)[None], config=config))(params)
    want = want - jax.nn.log_softmax(logits2[0])[0, 9]
    np.testing.assert_allclose(float(total), float(want), rtol=1e-5)
    want_a = -logp[1, 7] - jax.nn.log_softmax(logits2[0])[0, 9]
    np.testing.assert_allclose(float(total_a), float(want_a), rtol=1e-5)


def test_schedules():
    cos = make_schedule(OptimConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1))
    np.testing.assert_allclose([cos(0), cos(5), cos(10), cos(60), cos(110)], [0, 0.5, 1, 0.55, 0.1], atol=1e-6)
    wsd = make_schedule(OptimConfig(lr=1.0, schedule="wsd", warmup_steps=10, total_steps=100,
                                    decay_fraction=0.2, min_lr_ratio=0.0))
    np.testing.assert_allclose([wsd(5), wsd(50), wsd(80), wsd(90), wsd(100)], [0.5, 1, 1, 0.5, 0], atol=1e-6)


def test_a_warmup_past_the_stable_part_still_decays_by_total_steps():
    wsd = make_schedule(OptimConfig(lr=1.0, schedule="wsd", warmup_steps=8, total_steps=10, decay_fraction=0.5,
                                    min_lr_ratio=0.0))
    np.testing.assert_allclose([wsd(4), wsd(8), wsd(9), wsd(10)], [0.5, 1, 0.5, 0], atol=1e-6)


@pytest.mark.parametrize("field", ["lr", "weight_decay", "eps", "clip_norm", "b1", "min_lr_ratio"])
def test_non_finite_optimizer_settings_are_refused(field):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(TrainConfigError, match=f"{field} must be a finite number"):
            OptimConfig(**{field: bad})


def test_batches_and_rows_must_split_over_the_mesh():
    with pytest.raises(TrainConfigError, match="micro-batch of 3 rows .* data x fsdp = 2"):
        TrainConfig(batch_size=3, mesh=(2, 1, 1))
    with pytest.raises(TrainConfigError, match="micro-batch of 2 rows"):
        TrainConfig(batch_size=4, grad_accum=2, mesh=(1, 4, 1))
    with pytest.raises(TrainConfigError, match="seq_len .33. does not split over the mesh's context axis of 2"):
        TrainConfig(batch_size=4, mesh=(1, 1, 1, 2)).check_seq_len(33)
    TrainConfig(batch_size=4, mesh=(2, 2, 1, 2)).check_seq_len(32)


def test_an_update_that_leaves_non_finite_weights_is_never_saved(tmp_path):
    """The divergence check reads the loss and gradient from before the update: a learning rate
    that is finite as a Python float but infinite in float32 makes finite metrics and inf
    weights. Nothing is checkpointed or exported; the corrected rerun starts afresh in the
    same folder (nothing was trained that it could resume)."""
    cfgs = _cfgs(steps=2)
    bad = {**cfgs, "optim": OptimConfig(lr=1e39, warmup_steps=0, schedule="constant", weight_decay=0.0),
           "train": TrainConfig(batch_size=8, steps=2, save_every=1, compute_dtype="float32")}
    with pytest.raises(TrainingDiverged, match="non-finite weights"):
        train_lm(TINY, COUNT, out=tmp_path / "run", **bad)
    assert not any(p.name.isdigit() for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert not (tmp_path / "run" / "hf").exists()
    result = train_lm(TINY, COUNT, out=tmp_path / "run", **cfgs)  # another lr: accepted, from step 0
    assert result.step == 2 and result.history[0]["step"] == 1


def test_loss_falls_on_a_learnable_task():
    result = train_lm(TINY, COUNT, **{**_cfgs(steps=80), "optim": OptimConfig(
        lr=3e-3, warmup_steps=10, total_steps=80, weight_decay=0.0)})
    losses = [h["loss"] for h in result.history]
    assert losses[0] > 5.5            # about ln(512) at init
    assert np.mean(losses[-5:]) < 1.0  # well below the unigram loss ln(64) = 4.16


def test_gradient_accumulation_equals_one_big_batch():
    a = train_lm(TINY, COUNT, **_cfgs(steps=3))
    b = train_lm(TINY, COUNT, **_cfgs(steps=3, grad_accum=4))
    np.testing.assert_allclose([h["loss"] for h in a.history], [h["loss"] for h in b.history], rtol=2e-5)
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5)


def test_nan_guard_names_the_step():
    params = __import__("jaxkv").init_params(TINY, jax.random.key(0))
    params["norm"]["weight"] = params["norm"]["weight"].at[0].set(jnp.nan)
    with pytest.raises(TrainingDiverged, match="step 1: loss is nan"):
        train_lm(TINY, COUNT, params=params, **_cfgs(steps=2))


def test_a_diverged_state_is_never_checkpointed_between_log_lines(tmp_path):
    """With log lines every 10 steps and checkpoints every 2, the check runs at the checkpoint:
    nothing diverged is saved."""
    params = __import__("jaxkv").init_params(TINY, jax.random.key(0))
    params["norm"]["weight"] = params["norm"]["weight"].at[0].set(jnp.nan)
    cfg = _cfgs(steps=6)
    cfg["train"] = TrainConfig(batch_size=8, steps=6, save_every=2, log_every=10, compute_dtype="float32")
    with pytest.raises(TrainingDiverged, match="step 2: loss is nan"):
        train_lm(TINY, COUNT, params=params, out=tmp_path / "run", **cfg)
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]


def _train_cmd(out, steps):
    return ["train", "lm", "--model-preset", "tiny", "--data", "synthetic:count", "--seq-len", "64",
            "--batch-size", "8", "--steps", str(steps), "--lr", "3e-3", "--warmup", "5",
            "--dtype", "float32", "--save-every", "4", "--out", str(out)]


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_sigkill_after_a_checkpoint_then_resume_logs_the_same_losses(tmp_path):
    from jaxkv.cli import main

    assert main(_train_cmd(tmp_path / "straight", 12)) == 0
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from jaxkv.cli import build_parser, train_setup
        from jaxkv.training.loop import train_lm
        args = build_parser().parse_args({_train_cmd(killed, 12)!r})
        def kill(step, row):
            if step == 9:  # one step past the checkpoint at 8: its log line must be dropped
                os.kill(os.getpid(), signal.SIGKILL)
        train_lm(**train_setup(args), callbacks=[kill])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    assert [s for s, _ in _losses(killed)] == list(range(1, 10))
    assert main(_train_cmd(killed, 12)) == 0
    assert _losses(killed) == _losses(tmp_path / "straight")  # bitwise: floats compared exactly
    # and a longer --steps on the same folder resumes again, on the run's own schedule (cosine over
    # 12 steps): the steps past it keep its final learning rate, with a warning
    with pytest.warns(UserWarning, match="spans 12 steps"):
        assert main(_train_cmd(killed, 14)) == 0
    assert [s for s, _ in _losses(killed)] == list(range(1, 15))
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rows[12]["lr"] == rows[13]["lr"] < rows[11]["lr"]  # the step-13 and -14 rates: the end value
    assert json.loads((killed / "run.json").read_text())["optim"]["total_steps"] == 12
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[-1])
    assert (killed / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the final weights are an HF checkpoint that generates
    from jaxkv.checkpoints import load_checkpoint
    config, params = load_checkpoint(killed / "hf")
    assert config == TINY and (killed / "hf" / "tokenizer.json").exists()
    assert main(["generate", "--model", str(killed / "hf"), "--prompt", "1 2 3", "--max-new-tokens", "2"]) == 0


def test_bad_configs_name_the_field():
    with pytest.raises(TrainConfigError, match="grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(TrainConfigError, match="lr"):
        OptimConfig(lr=0.0)
    with pytest.raises(TrainConfigError, match="schedule"):
        OptimConfig(schedule="linear")
    with pytest.raises(TrainConfigError, match="position_mode"):
        DataConfig(position_mode="absolute")
    with pytest.raises(TrainConfigError, match="mesh"):
        TrainConfig(mesh=(1, 0, 1))
    with pytest.raises(TrainConfigError, match="needs 4 devices"):
        train_lm(TINY, COUNT, **{**_cfgs(), "train": TrainConfig(batch_size=8, steps=2, mesh=(2, 2, 1))})
    with pytest.raises(TrainConfigError, match="batch_size"):
        train_lm(TINY, COUNT[:3], **_cfgs())
    with pytest.raises(TrainConfigError, match="unknown synthetic"):
        synthetic_documents("nope", vocab_size=100, seed=0)


def test_bad_run_folders(tmp_path, capsys):
    from jaxkv.cli import main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(_train_cmd(foreign, 4)) == 2
    assert "not a jaxkv run" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    run = tmp_path / "run"
    assert main(_train_cmd(run, 4)) == 0
    other = _train_cmd(run, 8)
    other[other.index("--lr") + 1] = "1e-3"
    assert main(other) == 2
    assert "different 'optim.lr'" in capsys.readouterr().err

    # damage the checkpoint: resuming must fail with a message naming it
    for f in (run / "checkpoints" / "4").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 7)
    meta_before = (run / "run.json").read_text()
    assert main(_train_cmd(run, 4)) == 2  # the run is at its end: its checkpoint is still read (for hf/)
    err = capsys.readouterr().err
    assert "is damaged" in err and "checkpoints/4" in err and "checksum mismatch" in err
    assert (run / "run.json").read_text() == meta_before


_SHARDED = textwrap.dedent("""
    import os, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    from jaxkv.config import preset
    from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig
    from jaxkv.training.data import synthetic_documents
    from jaxkv.training.loop import train_lm
    assert len(jax.devices()) == 8
    cfg = preset("tiny")
    docs = synthetic_documents("count", vocab_size=cfg.vocab_size, seed=0, num_docs=400)
    out = {}
    for mesh in [(1, 1, 1), (2, 2, 2), (1, 8, 1)]:
        r = train_lm(cfg, docs, optim=OptimConfig(lr=3e-3, warmup_steps=2, total_steps=4),
                     data=DataConfig(seq_len=64),
                     train=TrainConfig(batch_size=8, steps=4, compute_dtype="float32", mesh=mesh))
        q = r.state.params["layers"][0]["attn"]["q"]["kernel"]
        out[str(mesh)] = {"loss": [h["loss"] for h in r.history], "q_spec": str(q.sharding.spec)}
    # cuDNN attention needs q, k, v of one sharding: same_sharding imposes it under a mesh
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    import functools
    from jaxkv.attention import same_sharding
    from jaxkv.training.sharding import ATTENTION_SHARDING, make_mesh
    m = make_mesh(2, 2, 2)
    q, k, v = jnp.ones((4, 16, 8, 32)), jnp.ones((4, 16, 2, 32)), jnp.ones((4, 16, 2, 32))
    mask = jnp.ones((4, 1, 16, 16), bool)
    shard = lambda x, spec: jax.device_put(x, NamedSharding(m, spec))
    args = (shard(q, P(None, None, None, "fsdp")), shard(k, P()), shard(v, P("tensor")), shard(mask, P()))
    impose = jax.jit(functools.partial(same_sharding, sharding=ATTENTION_SHARDING))
    with jax.set_mesh(m):
        res = impose(*args)
        unnamed = jax.jit(same_sharding)(*args)
    out["same_sharding"] = [str(x.sharding.spec) for x in res]
    out["no_names"] = [str(x.sharding.spec) for x in unnamed]
    out["no_mesh"] = [str(x.sharding.spec) for x in impose(*args)]
    print(json.dumps(out))
""")


def test_data_fsdp_tensor_mesh_on_8_cpu_devices_matches_one_device():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one = out["(1, 1, 1)"]["loss"]
    assert out["(2, 2, 2)"]["q_spec"] in ("P('tensor', 'fsdp')", "PartitionSpec('tensor', 'fsdp')")
    for mesh in ("(2, 2, 2)", "(1, 8, 1)"):
        np.testing.assert_allclose(out[mesh]["loss"], one, rtol=1e-5)
    qkv, mask = out["same_sharding"][:3], out["same_sharding"][3]
    assert len(set(qkv)) == 1 and "('data', 'fsdp')" in qkv[0] and "'tensor'" in qkv[0], qkv
    assert "('data', 'fsdp')" in mask and "tensor" not in mask
    assert len(set(out["no_mesh"][:3])) > 1  # without a mesh in context nothing is imposed
    assert len(set(out["no_names"][:3])) > 1  # nor without the axis names: attention names none itself


def test_remat_policies_give_the_same_gradients_and_runs_resume_across_them(tmp_path):
    """Each layer rematerialised (full, dots): the same gradients as keeping every activation,
    the checkpoint in the traced step; a run trained without remat resumes with it, and
    reaches the losses of the run that never stopped."""
    from jaxkv.models.llama import forward, init_params

    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    tok = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 32)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
    grad = lambda remat: jax.grad(lambda p: jnp.mean(forward(p, tok, pos, config=cfg, remat=remat)[0] ** 2))  # noqa
    g0 = jax.jit(grad(None))(params)
    for remat in ("full", "dots"):
        g = jax.jit(grad(remat))(params)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        assert "remat" in str(jax.make_jaxpr(grad(remat))(params))
    with pytest.raises(UserError, match="remat"):
        forward(params, tok, pos, config=cfg, remat="some")
    with pytest.raises(TrainConfigError, match="remat"):
        TrainConfig(remat="some")
    docs = synthetic_documents("count", vocab_size=cfg.vocab_size, seed=0, num_docs=200)
    kw = dict(optim=OptimConfig(lr=3e-3, warmup_steps=1, total_steps=4), data=DataConfig(seq_len=32))
    whole = train_lm(cfg, docs, **kw, train=TrainConfig(batch_size=4, steps=4, save_every=2, compute_dtype="float32"))
    run = tmp_path / "run"
    train_lm(cfg, docs, **kw, out=run, train=TrainConfig(batch_size=4, steps=2, save_every=2, compute_dtype="float32"))
    resumed = train_lm(cfg, docs, **kw, out=run, train=TrainConfig(batch_size=4, steps=4, save_every=2,
                                                                     compute_dtype="float32", remat="full"))
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in whole.history[2:]],
                               rtol=1e-5)


_CONTEXT = textwrap.dedent("""
    import os, json, functools
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jaxkv.config import preset
    from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig
    from jaxkv.training.data import synthetic_documents
    from jaxkv.training.loop import train_lm
    from jaxkv.training.sharding import ATTENTION_SHARDING, make_mesh
    from jaxkv.attention import attend_dense, attend_reference, attend_sequence_sharded
    cfg = preset("tiny")
    docs = synthetic_documents("count", vocab_size=cfg.vocab_size, seed=0, num_docs=400)
    out = {"loss": {}}
    runs = [(m, mesh) for m in ("full", "intra", "reset", "anchor", "anchor-bos") for mesh in ((1, 1, 1), (2, 1, 2, 2))]
    runs += [("reset", (1, 2, 1, 4)), ("anchor", (1, 2, 1, 4)), ("full", (1, 1, 1, 8)), ("anchor", (1, 1, 1, 8))]
    for mode, mesh in runs:
        r = train_lm(cfg, docs, optim=OptimConfig(lr=3e-3, warmup_steps=2, total_steps=3),
                     data=DataConfig(seq_len=64, attention=mode),
                     train=TrainConfig(batch_size=8, steps=3, compute_dtype="float32", mesh=mesh))
        out["loss"][f"{mode} {mesh}"] = [h["loss"] for h in r.history]
    # the kernel inside the shard_map (interpret mode), against the reference over whole rows
    rng = np.random.default_rng(0)
    b, t, kh, g, h = 2, 64, 2, 2, 16
    q = jnp.asarray(rng.normal(size=(b, t, kh, g, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.sort(rng.integers(0, 4, size=(b, t)), axis=1), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(np.sum(r == d)) for r in np.asarray(seg) for d in range(4)]
                                     ).reshape(b, t), jnp.int32)
    mesh = make_mesh(2, 1, 1, 4)
    errs = {}
    for name, kw in {"segments": {}, "anchor": {"anchor": True}, "window": {"window": 5}}.items():
        want = attend_reference(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), pos, pos, q_segments=seg,
                                k_segments=seg, **kw)
        with jax.set_mesh(mesh):
            got = jax.jit(functools.partial(attend_sequence_sharded, sharding=ATTENTION_SHARDING, segment_ids=seg,
                                            implementation="pallas_gpu", interpret=True, **kw))(q, k, v, pos)
            dense = jax.jit(functools.partial(attend_dense, segment_ids=seg, sharding=ATTENTION_SHARDING, **kw))
            text = str(jax.make_jaxpr(dense)(q, k, v, pos))
        errs[name] = float(jnp.max(jnp.abs(got - want)))
        out.setdefault("routed", []).append("shard_map" in text and "all_gather" in text)
    out["errs"] = errs
    print(json.dumps(out))
""")


def test_context_parallel_meshes_on_8_cpu_devices_match_one_device():
    """Tokens split over the mesh's context axis (with data and tensor, with fsdp, or alone over
    8 devices): every packing mode's losses equal one device's (fp32); attend_dense under such a
    mesh goes through the shard_map (keys and values gathered), and the block-sparse kernel
    inside it (interpret mode) equals the reference over whole rows."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CONTEXT], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    loss = out["loss"]
    for key, got in loss.items():
        mode = key.split()[0]
        np.testing.assert_allclose(got, loss[f"{mode} (1, 1, 1)"], rtol=1e-5, err_msg=key)
    assert len({round(v[0], 4) for k, v in loss.items() if k.endswith("(1, 1, 1)")}) > 1  # the modes differ
    assert all(out["routed"]), out["routed"]
    assert max(out["errs"].values()) < 1e-5, out["errs"]


_OVERLAP = textwrap.dedent("""
    import os, warnings
    os.environ["XLA_FLAGS"] = "--xla_gpu_all_gather_combine_threshold_bytes=1024"  # the user's own, kept
    from jaxkv.training.sharding import OVERLAP_XLA_FLAGS, enable_collective_overlap
    assert enable_collective_overlap()
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_gpu_all_gather_combine_threshold_bytes=1024" in flags
    assert sum(f.startswith("--xla_gpu_all_gather_combine_threshold_bytes") for f in flags) == 1
    assert all(f in flags for f in OVERLAP_XLA_FLAGS if "all_gather_combine" not in f)
    import jax
    assert float(jax.numpy.ones(3).sum()) == 3.0  # XLA parsed every flag (an unknown one aborts it)
    os.environ["XLA_FLAGS"] = ""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert not enable_collective_overlap()  # too late: the backend has started
    assert "not in effect" in str(seen[0].message) and os.environ["XLA_FLAGS"] == ""
    print("ok")
""")


def test_collective_overlap_flags_are_xlas_and_keep_the_users_own():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _OVERLAP], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_meshes_of_four_axes_parse_and_refuse_what_they_cannot_do():
    from jaxkv.training.sharding import parse_mesh
    from jaxkv.training.config import TrainConfig, TrainConfigError

    assert parse_mesh("1,2,1") == (1, 2, 1) and parse_mesh("2,1,1,4") == (2, 1, 1, 4)
    for bad in ("1,1", "1,1,1,1,1", "1,0,1,2", "a,b,c"):
        with pytest.raises(UserError, match="--mesh"):
            parse_mesh(bad)
    with pytest.raises(TrainConfigError, match="mesh"):
        TrainConfig(mesh=(1, 1))
    assert TrainConfig(mesh=(1, 1, 1, 2)).mesh == (1, 1, 1, 2)


_PROCESS = textwrap.dedent("""
    import json, sys
    from jaxkv.training.sharding import initialize_distributed
    initialize_distributed()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    import jax
    from jaxkv.config import preset
    from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig
    from jaxkv.training.data import synthetic_documents
    from jaxkv.training.loop import train_lm
    cfg = preset("tiny")
    docs = synthetic_documents("count", vocab_size=cfg.vocab_size, seed=0, num_docs=400)
    mesh = tuple(json.loads(sys.argv[1]))
    r = train_lm(cfg, docs, optim=OptimConfig(lr=3e-3, warmup_steps=2, total_steps=3),
                 data=DataConfig(seq_len=64),
                 train=TrainConfig(batch_size=8, steps=3, compute_dtype="float32", mesh=mesh))
    print(json.dumps({"devices": len(jax.devices()), "loss": [h["loss"] for h in r.history]}))
""")


def test_two_processes_with_gloo_match_one_process():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "JAX_PLATFORMS": "cpu"}
    single = subprocess.run([sys.executable, "-c", _PROCESS, "[1, 1, 1]"], capture_output=True, text=True, env=base)
    assert single.returncode == 0, single.stderr[-2000:]
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, "[2, 1, 1]"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**base, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    want = json.loads(single.stdout.strip().splitlines()[-1])["loss"]
    for out, _ in outs:
        got = json.loads(out.strip().splitlines()[-1])
        assert got["devices"] == 2
        np.testing.assert_allclose(got["loss"], want, rtol=1e-5)


def test_a_run_folder_from_before_the_attention_modes_resumes_under_the_mode_it_used(tmp_path):
    from jaxkv.training.checkpoint import RUN_FILE, RunDir, RunDirError
    from jaxkv.training.loop import run_meta

    docs = [[5, 6, 7, 8]]
    for position_mode, now, ok in (("document", "reset", True), ("continuous", "intra", True),
                                   ("document", "anchor", False)):
        folder = tmp_path / f"{position_mode}-{now}"
        folder.mkdir()
        old = run_meta(OptimConfig(), DataConfig(position_mode=position_mode), TrainConfig(), docs)
        old["data"].pop("attention")  # what a run folder written before the modes holds
        (folder / RUN_FILE).write_text(json.dumps(old))
        (folder / "checkpoints" / "1").mkdir(parents=True)  # it trained: its settings hold
        new = run_meta(OptimConfig(), DataConfig(attention=now), TrainConfig(), docs)
        if ok:
            RunDir(folder, new, keep=1).close()
        else:
            with pytest.raises(RunDirError, match="data.attention"):
                RunDir(folder, new, keep=1)


def test_a_run_stopped_before_its_checksums_or_its_hf_folder_recovers(tmp_path):
    """A checkpoint orbax finished whose hashes were never recorded (the run stopped in between)
    is hashed on resume, with a warning, instead of blocking the folder; a run at its last step
    whose ``hf/`` is missing or older than its checkpoint writes it again."""
    from jaxkv.checkpoints import load_checkpoint

    out = tmp_path / "run"
    first = train_lm(TINY, COUNT, out=out, **_cfgs(steps=4))
    sums = json.loads((out / "checksums.json").read_text())
    assert set(sums) == {"4"} and json.loads((out / "export.json").read_text()) == {"step": 4}
    (out / "checksums.json").write_text(json.dumps({}))  # as if stopped between orbax and the hashes
    import shutil

    shutil.rmtree(out / "hf")  # ... and before hf/ was written
    with pytest.warns(UserWarning, match="checksums were not recorded"):
        again = train_lm(TINY, COUNT, out=out, **_cfgs(steps=4))
    assert again.history == [] and again.step == 4
    assert json.loads((out / "checksums.json").read_text()) == sums  # the same files, the same hashes
    _, params = load_checkpoint(out / "hf", dtype=jnp.float32)
    want = first.state.params["layers"][0]["attn"]["q"]["kernel"]
    np.testing.assert_array_equal(np.asarray(params["layers"][0]["attn"]["q"]["kernel"]), np.asarray(want))
    (out / "export.json").write_text(json.dumps({"step": 2}))  # hf/ from an earlier step: written again
    stamp = (out / "hf" / "model.safetensors").stat().st_mtime_ns
    train_lm(TINY, COUNT, out=out, **_cfgs(steps=4))
    assert (out / "hf" / "model.safetensors").stat().st_mtime_ns != stamp
    assert json.loads((out / "export.json").read_text()) == {"step": 4}
    stamp = (out / "hf" / "model.safetensors").stat().st_mtime_ns
    train_lm(TINY, COUNT, out=out, **_cfgs(steps=4))  # up to date: nothing written
    assert (out / "hf" / "model.safetensors").stat().st_mtime_ns == stamp


def test_anchor_rows_need_two_slots():
    with pytest.raises(TrainConfigError, match="seq_len must be at least 2 with attention='anchor'"):
        DataConfig(seq_len=1, attention="anchor")
    with pytest.raises(TrainConfigError, match="anchor-bos"):
        DataConfig(seq_len=1, attention="anchor-bos")
    assert DataConfig(seq_len=1, attention="intra").seq_len == 1


def test_bindings_documents_never_rebind_within_the_gap_and_answer_the_current_value():
    """synthetic:bindings: BOS, then writes (key, value) and queries (QUERY, key, value); replayed
    token by token, no key is written twice within 64 tokens, every query asks a key written in
    the last 48 and is answered with that key's latest value; over a long stream keys are rebound."""
    from jaxkv.training.data import bindings_documents, load_documents

    docs = np.stack(bindings_documents(vocab_size=64, length=400, count=30, seed=3))
    assert docs.shape == (30, 400) and docs.dtype == np.int32 and (docs[:, 0] == 1).all()
    rebound = queries = 0
    for doc in docs:
        last, value, i = {}, {}, 1
        while i < len(doc):
            if doc[i] == 2:  # QUERY key value
                if i + 1 < len(doc):
                    key = int(doc[i + 1])
                    assert 3 <= key < 43 and i - last[key] <= 48
                    if i + 2 < len(doc):
                        assert doc[i + 2] == value[key]
                        queries += 1
                i += 3
            else:  # key value
                key = int(doc[i])
                assert 3 <= key < 43
                if key in last:
                    assert i - last[key] >= 64
                    rebound += 1
                last[key] = i
                if i + 1 < len(doc):
                    assert 43 <= doc[i + 1] < 59
                    value[key] = int(doc[i + 1])
                i += 2
    assert queries > 30 * 40 and rebound > 30 * 20  # both happen often in 400 tokens
    short = np.stack(bindings_documents(vocab_size=64, length=64, count=50, seed=3))
    assert not np.array_equal(short, np.stack(bindings_documents(vocab_size=64, length=64, count=50, seed=4)))
    via = load_documents(["synthetic:bindings:5"], tokenizer=None, vocab_size=64, seed=3, length=64)
    np.testing.assert_array_equal(np.stack(via), short[:5])
    streams = load_documents(["synthetic:bindings-stream:2"], tokenizer=None, vocab_size=64, seed=3, length=50)
    np.testing.assert_array_equal(np.stack(streams), np.stack(bindings_documents(vocab_size=64, length=400,
                                                                                 count=2, seed=3)))
    with pytest.raises(TrainConfigError, match="vocabulary of at least 59"):
        bindings_documents(vocab_size=58, length=64, count=1, seed=0)
    with pytest.raises(TrainConfigError, match="needs the row length"):
        load_documents(["synthetic:bindings"], tokenizer=None, vocab_size=64, seed=0)


def test_recall_documents_layout_and_chain():
    """synthetic:recall: BOS, key, the Markov chain, QUERY, key; recall-anywhere: the QUERY, key
    pairs at a constant rate; the chain's transition entropy is RECALL_ENTROPY; the chain is the same for every
    seed, the samples are not."""
    from collections import Counter

    from jaxkv.training.data import RECALL_ENTROPY, load_documents, recall_documents

    end = np.stack(recall_documents(vocab_size=64, length=40, count=300, seed=3))
    assert (end[:, 0] == 1).all() and (end[:, -2] == 2).all() and (end[:, 2:-2] >= 11).all()
    np.testing.assert_array_equal(end[:, 1], end[:, -1])
    docs = np.stack(recall_documents(vocab_size=64, length=600, count=200, seed=3, anywhere=True))
    assert docs.shape == (200, 600) and docs.dtype == np.int32
    assert (docs[:, 0] == 1).all() and set(np.unique(docs[:, 1])) == set(range(3, 11))
    rows, cols = np.nonzero(docs[:, 2:] == 2)
    np.testing.assert_array_equal(docs[rows, cols + 3], docs[rows, 1])  # every query is answered with the key
    assert abs(len(rows) / docs[:, 2:].size - 1 / 34) < 0.004  # 1/32 per chain token, a pair per query
    keys_after = (docs[:, 2:] >= 3) & (docs[:, 2:] <= 10)
    assert keys_after.sum() == len(rows) and (docs[:, -1] != 2).all()

    def chain_pairs(d):
        pairs = Counter()
        for row in d:
            chain = row[row >= 11]
            pairs.update(zip(chain[:-1].tolist(), chain[1:].tolist()))
        return pairs

    pairs = chain_pairs(docs)
    firsts = Counter()
    for (a, _), n in pairs.items():
        firsts[a] += n
    assert len(pairs) == 48 * 3 and len(firsts) == 48  # every state reached, each with its three successors
    entropy = -sum(n * np.log(n / firsts[a]) for (a, _), n in pairs.items()) / sum(firsts.values())
    assert abs(entropy - RECALL_ENTROPY) < 0.02 and abs(RECALL_ENTROPY - 0.9376) < 1e-3
    other = np.stack(recall_documents(vocab_size=64, length=600, count=200, seed=4, anywhere=True))
    assert not np.array_equal(docs, other) and set(chain_pairs(other)) == set(pairs)
    assert set(chain_pairs(end)) <= set(pairs)
    for name, anywhere in (("recall", False), ("recall-anywhere", True)):
        via = load_documents([f"synthetic:{name}:5"], tokenizer=None, vocab_size=64, seed=3, length=600)
        np.testing.assert_array_equal(np.stack(via), np.stack(recall_documents(vocab_size=64, length=600, count=5,
                                                                               seed=3, anywhere=anywhere)))
    with pytest.raises(TrainConfigError, match="vocabulary of at least 59"):
        recall_documents(vocab_size=58, length=64, count=1, seed=0)
    with pytest.raises(TrainConfigError, match=">= 5 tokens"):
        recall_documents(vocab_size=64, length=4, count=1, seed=0)
    with pytest.raises(TrainConfigError, match="row length"):
        load_documents(["synthetic:recall"], tokenizer=None, vocab_size=64, seed=0)


def test_text_documents_add_no_tokens_when_the_tokenizer_adds_no_bos():
    """Chunks of the reference text: with a BOS-adding tokenizer each chunk opens with it; with
    one that adds none the chunks are the text's tokens as they come, none repeated."""
    from jaxkv.tiny import make_tokenizer
    from jaxkv.training.default_model import ordinary_text, text_documents

    tok = make_tokenizer(512)
    texts = ordinary_text()[:20]
    plain = make_tokenizer(512)
    plain.post_processor = None
    import jaxkv.training.default_model as dm

    original = dm.ordinary_text
    dm.ordinary_text = lambda: texts
    try:
        with_bos, without = text_documents(tok, chunk=64), text_documents(plain, chunk=64)
    finally:
        dm.ordinary_text = original
    bos = tok.token_to_id("<s>")
    assert all(d[0] == bos and len(d) <= 64 for d in with_bos)
    want = np.concatenate([plain.encode(t).ids for t in texts])
    assert want[0] != bos and all(len(d) <= 64 for d in without)
    np.testing.assert_array_equal(np.concatenate(without), want)
