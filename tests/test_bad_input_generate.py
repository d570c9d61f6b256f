"""jaxkv generate and forward: bad prompts, seeds, token ids and caches too small."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv.cli import main
from jaxkv.config import preset
from jaxkv.errors import UserError
from jaxkv.tiny import create_tiny_checkpoint

TINY = preset("tiny")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return create_tiny_checkpoint(tmp_path_factory.mktemp("g") / "tiny")


@pytest.fixture(scope="module")
def params():
    return jaxkv.init_params(TINY, jax.random.key(0))


def test_non_utf8_prompt_is_one_line(tiny_dir):
    argv = [sys.executable.encode(), b"-m", b"jaxkv.cli", b"generate", b"--model", str(tiny_dir).encode(),
            b"--prompt", b"caf\xe9"]
    proc = subprocess.run(argv, capture_output=True)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert err.startswith("jaxkv: error: --prompt is not valid UTF-8") and err.count("\n") == 1


def test_huge_seed_is_refused_by_the_parser(tiny_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--seed", str(10**30)])
    assert e.value.code == 2 and "seed" in capsys.readouterr().err


def test_out_of_range_token_ids_are_refused(params):
    tokens = jnp.array([[1, 2, TINY.vocab_size]])
    with pytest.raises(UserError, match="outside \\[0, 512\\)"):
        jaxkv.forward(params, tokens, jnp.arange(3)[None], None, config=TINY)
    # padding (position -1) may hold anything
    logits, _ = jaxkv.forward(params, tokens, jnp.array([[0, 1, -1]]), None, config=TINY)
    assert np.isfinite(np.asarray(logits[:, :2])).all()


def test_a_full_cache_shorter_than_the_prompt_is_refused(params):
    cache = jaxkv.init_cache(TINY, "full", batch=1, max_len=8, dtype=jnp.float32)
    with pytest.raises(UserError, match="does not fit a cache of 8 slots"):
        jaxkv.forward(params, jnp.ones((1, 10), jnp.int32), jnp.arange(10)[None], cache, config=TINY)


def test_a_full_cache_overflowing_in_decode_says_so_with_nan(params):
    """Under jit the position is a run-time value: the row whose token found no slot gets NaN
    logits (before, it got finite, wrong ones); the other row is untouched."""
    cache = jaxkv.init_cache(TINY, "full", batch=2, max_len=8, dtype=jnp.float32)
    tokens = jnp.full((2, 8), 5, jnp.int32)
    _, cache = jaxkv.forward(params, tokens, jnp.broadcast_to(jnp.arange(8), (2, 8)), cache, config=TINY)
    step = jax.jit(lambda c, p: jaxkv.forward(params, jnp.full((2, 1), 7, jnp.int32), p, c, config=TINY))
    logits, _ = step(cache, jnp.array([[8], [7]]))  # row 0 overflows; row 1 rewrites its last slot
    assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1])).all()


def test_an_empty_prompt_is_refused(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "", "--max-new-tokens", "2"]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


def test_forward_refuses_what_it_would_otherwise_ignore_or_misread(params):
    """Float positions (fractional rotations), bool tokens, an anchor or an attention
    implementation the cached path would drop, indices past the row, and a batch that is not the
    cache's: each refused by name, not run."""
    tok = jnp.ones((2, 8), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    with pytest.raises(UserError, match="positions must be integers"):
        jaxkv.forward(params, tok, pos.astype(jnp.float32) + 0.5, None, config=TINY)
    with pytest.raises(UserError, match="tokens must be integers"):
        jaxkv.forward(params, tok.astype(bool), pos, None, config=TINY)
    with pytest.raises(UserError, match="logits_at must be indices in \\[0, 8\\)"):
        jaxkv.forward(params, tok, pos, None, config=TINY, logits_at=jnp.array([20, 3]))
    cache = jaxkv.init_cache(TINY, "full", batch=2, max_len=16, dtype=jnp.float32)
    with pytest.raises(UserError, match="anchor is for the cache-free forward"):
        jaxkv.forward(params, tok, pos, cache, config=TINY, anchor=True)
    with pytest.raises(UserError, match="implementation must be one of"):
        jaxkv.forward(params, tok, pos, cache, config=TINY, attention_implementation="bogus")
    with pytest.raises(UserError, match="tokens hold 1 rows, the cache 2"):
        jaxkv.forward(params, tok[:1], pos[:1], cache, config=TINY)


def test_an_infinite_temperature_is_refused(params):
    with pytest.raises(UserError, match="temperature must be a finite number"):
        jaxkv.generate(params, TINY, [[1, 2, 3]], max_new_tokens=2, temperature=float("inf"), key=jax.random.key(0))
