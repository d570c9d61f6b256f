"""The default model's recipe: tokenizer, documents, the end-to-end run at toy scale, and the
shipped model itself."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxkv.config import LlamaConfig
from jaxkv.training.config import TrainConfigError
from jaxkv.training.default_model import (DEFAULT_RECIPE, Phase, Recipe, task_documents, text_documents,
                                          train_default_model, train_tokenizer)

TOK = train_tokenizer(1024)


def test_tokenizer_splits_digits_and_round_trips():
    text = "The special magic number for calm-river is 9043217. What is it?"
    enc = TOK.encode(text)
    assert enc.ids[0] == 1  # <s>
    digits = [t for t in enc.tokens if any(c.isdigit() for c in t)]
    assert digits == list("9043217")
    assert TOK.decode(enc.ids, skip_special_tokens=True) == text


def test_task_documents_mask_the_answer_and_end_of_answer_only():
    phase = Phase(seq_len=1024, min_len=200, max_len=600, steps=1, batch_size=1, lr=1e-3)
    docs = task_documents(TOK, DEFAULT_RECIPE, phase, 40, seed=3, phase_index=0, workers=1)
    assert len(docs) >= 38
    for ids, mask in docs:
        assert len(ids) <= 1024 and ids[0] == 1 and ids[-1] == 2
        n = int(mask.sum())
        assert mask[-n:].all() and not mask[:-n].any()
        answer = TOK.decode(ids[-n:-1].tolist())
        prompt = TOK.decode(ids[:-n].tolist(), skip_special_tokens=True)
        assert prompt.rstrip().endswith(("is", "are"))
        # the pieces tokenize as the whole text does: what the model sees at evaluation
        assert TOK.encode(prompt + answer).ids == ids[:-1].tolist()
    again = task_documents(TOK, DEFAULT_RECIPE, phase, 40, seed=3, phase_index=0, workers=1)
    assert all((a[0] == b[0]).all() for a, b in zip(docs, again))
    other = task_documents(TOK, DEFAULT_RECIPE, phase, 40, seed=4, phase_index=0, workers=1)
    assert any(len(a[0]) != len(b[0]) or (a[0] != b[0]).any() for a, b in zip(docs, other))


def test_task_documents_reach_their_lengths_and_mix():
    phase = Phase(seq_len=2048, min_len=1000, max_len=1500, steps=1, batch_size=1, lr=1e-3)
    docs = task_documents(TOK, DEFAULT_RECIPE, phase, 60, seed=0, phase_index=1, workers=1)
    lengths = np.array([len(d[0]) for d in docs])
    assert np.median(lengths) > 900 and lengths.max() <= 2048


def test_text_documents_are_chunked():
    docs = text_documents(TOK, chunk=128)
    assert len(docs) > 100 and max(len(d) for d in docs) <= 128 and all(d[0] == 1 for d in docs)


def test_recipe_rejects_bad_settings():
    with pytest.raises(TrainConfigError, match="min_len <= max_len <= seq_len"):
        Phase(seq_len=512, min_len=100, max_len=600, steps=1, batch_size=1, lr=1e-3)
    with pytest.raises(TrainConfigError, match="unknown task 'nope'"):
        Recipe(model=DEFAULT_RECIPE.model, vocab_size=1024, phases=DEFAULT_RECIPE.phases, mix=(("nope", 1.0),))
    with pytest.raises(TrainConfigError, match="vocab_size"):
        Recipe(model=DEFAULT_RECIPE.model, vocab_size=512, phases=DEFAULT_RECIPE.phases, mix=DEFAULT_RECIPE.mix)
    assert DEFAULT_RECIPE.scaled(0.01).phases[0].steps == round(DEFAULT_RECIPE.phases[0].steps * 0.01)


@pytest.mark.slow
def test_recipe_runs_end_to_end_at_toy_scale(tmp_path):
    model = LlamaConfig(family="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=2, num_kv_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
                        bos_token_id=1, eos_token_ids=(2,))
    recipe = Recipe(model=model, vocab_size=512, mix=(("niah_single", 1.0), ("passkey", 1.0)), text_share=0.1,
                    phases=(Phase(seq_len=256, min_len=80, max_len=200, steps=3, batch_size=2, lr=1e-3, warmup=1),
                            Phase(seq_len=512, min_len=200, max_len=400, steps=2, batch_size=2, lr=1e-3, warmup=1)))
    out = train_default_model(tmp_path / "run", recipe=recipe, command="jaxkv train default-model --out run",
                              eval_samples=1, eval_tasks=("niah_single",), eval_length=256, log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "scores.json",
                                                     "tokenizer.json"]
    from safetensors.numpy import load_file

    assert {str(a.dtype) for a in load_file(out / "model.safetensors").values()} == {"bfloat16"}
    report = json.loads((out / "scores.json").read_text())
    assert [p["steps"] for p in report["phases"]] == [3, 2]
    assert {(r["method"], r["task"]) for r in report["scores"]} == {("full", "niah_single"),
                                                                   ("streaming", "niah_single")}
    card = (out / "README.md").read_text()
    assert "jaxkv train default-model --out run" in card and "| streaming | 0.25 | niah_single |" in card
    # a rerun resumes: every phase is complete, nothing trains again
    again = train_default_model(tmp_path / "run", recipe=recipe, eval_samples=1, eval_tasks=("niah_single",),
                                eval_length=256, log=lambda *_: None)
    assert json.loads((again / "scores.json").read_text())["phases"][0]["final_loss"] is None


# --- the shipped model --------------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parents[1] / "jaxkv" / "assets" / "default_model"


def test_shipped_default_model_is_complete_and_small():
    names = {p.name for p in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "scores.json"} <= names
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 10 * 2**20
    card = (SHIPPED / "README.md").read_text()
    report = json.loads((SHIPPED / "scores.json").read_text())
    assert report["command"] in card and str(report["seed"]) in card
    full = {r["task"]: r["accuracy"] for r in report["scores"] if r["method"] == "full"}
    assert full["niah_single"] >= 0.95


def test_default_model_retrieves_and_streaming_loses_needles_outside_its_window():
    import jax.numpy as jnp

    from jaxkv.checkpoints import load_checkpoint, load_tokenizer
    from jaxkv.checkpoints import resolve_model
    from jaxkv.eval.harness import EvalConfig, evaluate

    path = resolve_model("default")
    assert path == SHIPPED
    config, params = load_checkpoint(path, dtype=jnp.float32)
    tokenizer = load_tokenizer(path)
    assert config.num_kv_heads < config.num_heads  # GQA
    # two samples, needles at depths 0.25 and 0.75 of a 1,024-token prompt; a window of about
    # 100 tokens (budget 0.1) sees neither
    rows = evaluate(params, config, tokenizer, EvalConfig(methods=("full", "streaming"), budgets=(0.1,),
                                                          lengths=(1024,), samples=2, seed=5))
    by = {r.method: r for r in rows}
    assert by["full"].accuracy == 1.0
    assert by["streaming"].accuracy == 0.0 and by["streaming"].kl > 0.5
    assert by["streaming"].kv_bytes < 0.15 * by["full"].kv_bytes
