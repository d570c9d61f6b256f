"""jaxkv train lm / default-model: run folders that are locked, verified and fingerprinted;
interrupted starts, finished runs, non-UTF-8 data, foreign --out folders, late errors."""

import fcntl
import subprocess
import sys
import textwrap


from jaxkv.cli import main

TRAIN = ["train", "lm", "--model-preset", "tiny", "--seq-len", "64", "--batch-size", "8", "--lr", "3e-3",
         "--warmup", "2", "--dtype", "float32", "--save-every", "2"]


def _train(out, steps, data=("synthetic:count",)):
    return main([*TRAIN, "--data", *map(str, data), "--steps", str(steps), "--out", str(out)])


def test_a_folder_left_by_an_interrupted_start_is_reused(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # what the first seconds of a run leave
    (run / ".lock").write_text("")
    assert _train(run, 2) == 0
    assert (run / "run.json").exists()


def test_a_byte_flipped_checkpoint_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, 2) == 0
    files = sorted((p for p in (run / "checkpoints" / "2").rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    files[0].write_bytes(bytes(data))
    assert _train(run, 4) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and "checksum mismatch" in err and err.count("\n") == 1


def test_a_truncated_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, 2) == 0
    big = max((p for p in (run / "checkpoints" / "2").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 3])
    assert _train(run, 4) == 2
    assert "checksum mismatch" in capsys.readouterr().err


def test_steps_below_the_finished_step_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, 4) == 0
    capsys.readouterr()
    before = (run / "run.json").read_text()
    assert _train(run, 2) == 0
    assert "already at step 4 (--steps 2)" in capsys.readouterr().out
    assert (run / "run.json").read_text() == before


def test_edited_data_is_noticed_on_resume(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"document {i} with a few words in it" for i in range(300)))
    run = tmp_path / "run"
    assert main([*TRAIN, "--data", str(text), "--steps", "2", "--out", str(run)]) == 0
    text.write_text(text.read_text().replace("document 7 ", "document seven "))
    assert main([*TRAIN, "--data", str(text), "--steps", "4", "--out", str(run)]) == 2
    assert "trained on other data" in capsys.readouterr().err


def test_a_second_run_on_a_locked_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, 2) == 0
    with open(run / ".lock", "a+") as held:  # another run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345\n")
        held.flush()
        assert _train(run, 4) == 2
    err = capsys.readouterr().err
    assert "in use by another jaxkv run" in err
    assert _train(run, 4) == 0  # released: the run resumes


def test_a_run_json_that_is_not_an_object(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, 2) == 0
    (run / "run.json").write_text("[1, 2]")
    assert _train(run, 4) == 2
    assert "not an object" in capsys.readouterr().err


def test_non_utf8_data_names_the_file(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert _train(tmp_path / "run", 2, data=[bad]) == 2
    err = capsys.readouterr().err
    assert "latin1.txt" in err and "not UTF-8" in err and not (tmp_path / "run").exists()


def test_ctrl_c_says_where_a_rerun_resumes(tmp_path):
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        import jaxkv.training.loop as loop
        from jaxkv.cli import main
        real = loop.train_lm
        def stop(step, row):
            if step == 3:
                raise KeyboardInterrupt
        loop.train_lm = lambda **kw: real(**kw, callbacks=[stop])
        sys.exit(main({[*TRAIN, "--data", "synthetic:count", "--steps", "6", "--out", str(run)]!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "interrupted; rerun the same command to resume from the last checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _train(run, 6) == 0


def test_default_model_refuses_a_foreign_out_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # somebody's tokenizer: must not be reused
    assert main(["train", "default-model", "--out", str(out), "--scale", "0.001"]) == 2
    assert "not a default-model run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]


def test_default_model_checks_eval_tasks_before_training(tmp_path, capsys):
    assert main(["train", "default-model", "--out", str(tmp_path / "r"), "--eval-tasks", "niah_single,nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
