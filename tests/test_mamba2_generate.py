"""Mamba-2 through generation and the evaluation harness: a batch of prompts of different
lengths decodes the tokens each prompt gets alone (a Python loop of recurrent steps, the
reference), the cache is the state, cache policies and prepacking are refused by name, and
`jaxkv generate` / `jaxkv eval` run a Mamba-2 folder with its tokenizer."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.checkpoints import load_model, load_tokenizer, resolve_model, save_checkpoint
from jaxkv.cli import main
from jaxkv.errors import UserError
from jaxkv.eval.harness import EvalConfig, evaluate
from jaxkv.generate import generate
from jaxkv.models.mamba2 import Mamba2Config, forward, init_params, init_state

FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "mamba2" / "groups2_chunk5_bias_tied"
_FWD = jax.jit(forward, static_argnames=("config",))


def _greedy_alone(params, config, prompt, n):
    """The reference: one prompt, no padding, then n recurrent steps, a token at a time."""
    logits, state = _FWD(params, jnp.asarray(prompt)[None], config=config)
    out = [int(jnp.argmax(logits[0, -1]))]
    for _ in range(n - 1):
        logits, state = _FWD(params, jnp.asarray([[out[-1]]]), None, state, config=config)
        out.append(int(jnp.argmax(logits[0, -1])))
    return out


def test_a_padded_batch_decodes_what_each_prompt_decodes_alone():
    config, params = load_model(FIXTURE)
    assert isinstance(config, Mamba2Config)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 19, 12)]
    result = generate(params, config, prompts, max_new_tokens=6, stop_tokens=[])
    for p, got in zip(prompts, result.tokens):
        assert got == _greedy_alone(params, config, p, 6)
    assert result.cache_nbytes == init_state(config, batch=3, dtype=jnp.float32).nbytes


def test_a_stop_token_ends_a_row_and_leaves_the_others():
    config, params = load_model(FIXTURE)
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1]]
    free = generate(params, config, prompts, max_new_tokens=6, stop_tokens=[]).tokens
    stop = free[0][2]
    got = generate(params, config, prompts, max_new_tokens=6, stop_tokens=[stop]).tokens
    assert got[0] == free[0][:free[0].index(stop) + 1]
    assert got[1] == (free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_cache_policies_and_prepacking_are_refused_by_name():
    config, params = load_model(FIXTURE)
    with pytest.raises(UserError, match="'streaming'.*fixed-size state"):
        generate(params, config, [[1, 2, 3]], policy="streaming")
    with pytest.raises(UserError, match="prepack"):
        generate(params, config, [[1, 2, 3]], prepack=True)
    with pytest.raises(UserError, match="methods streaming"):
        evaluate(params, config, None, EvalConfig(methods=("full", "streaming")))


@pytest.fixture(scope="module")
def mamba_folder(tmp_path_factory):
    """A random Mamba-2 over the default model's tokenizer, saved with it."""
    tok = load_tokenizer(resolve_model("default"))
    config = Mamba2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=2, num_heads=2, head_dim=32,
                          state_size=8, chunk_size=32)
    folder = tmp_path_factory.mktemp("mamba") / "hf"
    save_checkpoint(folder, config, init_params(config, jax.random.key(0)), tokenizer=tok)
    return folder, config


def test_the_cli_generates_and_evaluates_a_mamba2_folder(mamba_folder, tmp_path, capsys):
    folder, config = mamba_folder
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(folder), "--prompt", "The capital of France is", "--max-new-tokens",
                 "4", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    state_bytes = init_state(config, batch=1, dtype=jnp.float32).nbytes
    assert row["cache_bytes"] == state_bytes and 1 <= len(row["output_ids"]) <= 4
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(folder), "--lengths", "128", "--samples", "1", "--dtype", "float32",
                 "--json", str(report)]) == 0
    rows = json.loads(report.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [r["method"] for r in rows] == ["full"]
    assert rows[0]["kv_bytes"] == rows[0]["full_kv_bytes"] == state_bytes
    assert rows[0]["attended_fraction"] is None
    capsys.readouterr()
    for argv, flag in ((["generate", "--model", str(folder), "--prompt", "x", "--cache", "streaming"], "--cache"),
                       (["eval", "--model", str(folder), "--methods", "full,razor"], "--methods")):
        assert main(argv) == 2
        assert flag in capsys.readouterr().err
