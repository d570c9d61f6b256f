import json
import subprocess
import sys

import pytest

from jaxkv.cli import main
from jaxkv.tiny import create_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return create_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _json_run(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_full_and_streaming(tiny_dir, capsys):
    from jaxkv.checkpoints import load_tokenizer

    out = _json_run(capsys, "generate", "--model", str(tiny_dir), "--prompt", "The passkey is",
                    "--max-new-tokens", "6", "--json")
    tok = load_tokenizer(tiny_dir)
    assert out["prompt_ids"] == tok.encode("The passkey is").ids and out["prompt_ids"][0] == 1
    assert 1 <= len(out["output_ids"]) <= 6
    assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=True)
    # a window covering the whole sequence gives the same tokens with fewer bytes held
    s = _json_run(capsys, "generate", "--model", str(tiny_dir), "--prompt", "The passkey is",
                  "--max-new-tokens", "6", "--json", "--cache", "streaming",
                  "--cache-arg", "sinks=2", "--cache-arg", "window=10")
    assert s["output_ids"] == out["output_ids"]
    assert s["cache_bytes"] < out["cache_bytes"]
    b = _json_run(capsys, "generate", "--model", str(tiny_dir), "--prompt", "The passkey is",
                  "--max-new-tokens", "6", "--json", "--dtype", "bfloat16", "--temperature", "0.8",
                  "--seed", "3")
    assert len(b["output_ids"]) >= 1


@pytest.mark.parametrize("argv, message", [
    (["--model", "{tmp}/absent"], "does not exist"),
    (["--model", "{tmp}/corrupt"], "not a readable safetensors"),
    (["--model", "{ckpt}", "--max-new-tokens", "4000"], "exceeds the model's context"),
    (["--model", "{ckpt}", "--cache", "streaming", "--cache-arg", "window=-1"], "window"),
    (["--model", "{ckpt}", "--cache", "streaming", "--cache-arg", "size=3"], "no parameter 'size'"),
    (["--model", "{ckpt}", "--cache-arg", "oops"], "NAME=VALUE"),
])
def test_user_errors_are_one_line(tiny_dir, tmp_path, capsys, argv, message):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_dir / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    argv = [a.format(tmp=tmp_path, ckpt=tiny_dir) for a in argv]
    assert main(["generate", "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxkv: error:") and message in err and "\n" not in err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxkv.cli", "generate", "--model", str(tmp_path / "x"),
                           "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("jaxkv: error:")
    proc = subprocess.run([sys.executable, "-m", "jaxkv.cli", "generate", "--model", "x", "--prompt", "hi",
                           "--max-new-tokens", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "positive integer" in proc.stderr


def test_create_tiny_refuses_to_overwrite(tiny_dir, capsys):
    assert main(["create-tiny", str(tiny_dir)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_eval_runs_on_the_default_model(tmp_path, capsys):
    rows_path, png = tmp_path / "rows.json", tmp_path / "acc.png"
    assert main(["eval", "--samples", "1", "--lengths", "1024", "--json", str(rows_path), "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    assert "niah_single" in table and "streaming" in table and "full" in table
    rows = json.loads(rows_path.read_text())
    assert {r["method"] for r in rows} == {"full", "streaming"}
    assert {"method", "budget", "task", "length", "accuracy", "kl", "top1_agreement", "kv_bytes", "full_kv_bytes",
            "prefill_ms", "decode_tokens_per_s"} <= set(rows[0])
    full = next(r for r in rows if r["method"] == "full")
    assert full["accuracy"] == 1.0 and full["kv_bytes"] == full["full_kv_bytes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_unknown_method_lists_the_known_ones(capsys):
    assert main(["eval", "--methods", "full,nope", "--samples", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown cache policy 'nope'" in err and "full" in err and "streaming" in err


def test_internal_bugs_keep_their_traceback(monkeypatch, tiny_dir):
    """Only user errors become one line: a plain ValueError from inside jaxkv is a bug."""
    generate_module = sys.modules["jaxkv.generate"]  # the package exports the function of that name

    def broken(*a, **k):
        raise ValueError("an internal bug")

    monkeypatch.setattr(generate_module, "generate", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["generate", "--model", str(tiny_dir), "--prompt", "hi"])


def test_generate_does_not_import_the_training_stack(tiny_dir):
    code = ("import sys; from jaxkv.cli import main; "
            f"assert main(['generate', '--model', {str(tiny_dir)!r}, '--prompt', 'hi', '--max-new-tokens', '2']) == 0; "
            "bad = sorted(m for m in sys.modules if m.startswith(('jaxkv.training', 'orbax', 'matplotlib', 'jaxkv.eval'))); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
