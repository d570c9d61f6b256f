"""Prepacking: the packer, the packed layout, and a packed prefill equal to the padded one for
every kind of policy (plain slots, eviction, low-bit storage, a policy's own prompt attention,
layer inputs, merged layers, an after-prefill index)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from jaxkv.cache import KVCache, init_cache
from jaxkv.errors import UserError
from jaxkv.eval.harness import policy_for
from jaxkv.generate import decode, generate, pad_prompts, prefill
from jaxkv.prepack import bucket_rows, pack_lengths, pack_prompts, prepacked_prefill

_COMPILES = [0]
monitoring.register_event_duration_secs_listener(
    lambda event, d, **k: _COMPILES.__setitem__(0, _COMPILES[0] + (event == "/jax/core/compile/backend_compile_duration")))

LENGTHS = [37, 5, 61, 22, 14, 40, 9, 1]


def _prompts(config, lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, config.vocab_size, n).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------- packer
def test_greedy_packing_is_binpackings_decreasing_least_loaded_fit_and_exact_finds_the_optimum():
    # capacity 10, [6, 5, 4, 3, 2]: heaviest first into the least-loaded bin it fits gives
    # {6, 3}, {5, 4}, {2}; two bins suffice ({6, 4}, {5, 3, 2}), which the integer program finds
    lengths = [6, 5, 4, 3, 2]
    assert pack_lengths(lengths, 10) == [[0, 3], [1, 2], [4]]
    assert pack_lengths(lengths, 10, method="exact") == [[0, 2], [1, 3, 4]]  # fullest first, then by index
    # the greedy answer meets the volume bound: the program is not asked
    assert pack_lengths([5, 5, 4, 6], 10, method="exact") == [[0, 1], [2, 3]]
    assert pack_lengths([0, 3, 0], 4) == [[0, 1, 2]]  # empty items take no room
    assert pack_lengths([], 4) == []


@pytest.mark.parametrize("method", ["greedy", "exact"])
def test_every_item_lands_once_and_no_bin_overflows(method):
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 200, 40).tolist()
    bins = pack_lengths(lengths, 256, method=method, time_limit=5.0)
    assert sorted(i for b in bins for i in b) == list(range(40))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert len(bins) >= -(-sum(lengths) // 256)


def test_the_rows_hold_each_prompt_contiguously_with_positions_from_zero(tiny_model):
    config, _ = tiny_model
    prompts = _prompts(config)
    pk = pack_prompts(prompts)
    assert pk.capacity == 64 and pk.tokens.shape == (bucket_rows(len(pk.bins)), 64)
    assert sorted(p for b in pk.bins for p in b) == list(range(len(prompts)))
    flat_tokens, flat_pos = pk.tokens.reshape(-1), pk.positions.reshape(-1)
    for p, prompt in enumerate(prompts):
        idx = np.asarray(pk.layout.gather)[p, : len(prompt)]
        assert flat_tokens[idx].tolist() == prompt
        assert flat_pos[idx].tolist() == list(range(len(prompt)))
        assert (pk.segment_ids.reshape(-1)[idx] == p).all()
        assert int(pk.layout.last[p]) == idx[-1]
    assert (np.asarray(pk.layout.positions)[:, :64] == pad_prompts(prompts)[1][:, :64]).all()
    assert pk.fill == pytest.approx(sum(LENGTHS) / pk.tokens.size)
    assert (pk.segment_ids[pk.positions < 0] == -1).all()
    held = pack_prompts(prompts, hold_out_last=True)
    assert held.packed_lengths.tolist() == [n - 1 for n in LENGTHS] and held.hold_out_last


@pytest.mark.parametrize("kwargs, match", [
    ({"capacity": 30}, "capacity"),
    ({"method": "first-fit"}, "method"),
])
def test_bad_packing_arguments_name_themselves(tiny_model, kwargs, match):
    config, _ = tiny_model
    with pytest.raises(UserError, match=match):
        pack_prompts(_prompts(config), **kwargs)
    with pytest.raises(UserError, match="non-empty"):
        pack_prompts([[1, 2], []])
    with pytest.raises(UserError, match="capacity"):
        pack_lengths([3, 9], 8)


# ---------------------------------------------------------------------------------------- prefill
def _kv_nodes(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, KVCache))


def _assert_same_cache(got, want):
    """Every array equal; a KV slot array's keys and values where its slot holds a token (an
    unfilled slot holds whatever the padding computed, which differs between the two layouts)."""
    for g, w in zip(_kv_nodes(got.layers), _kv_nodes(want.layers), strict=True):
        if isinstance(w, KVCache):
            np.testing.assert_array_equal(np.asarray(g.positions), np.asarray(w.positions))
            filled = np.asarray(w.positions)[..., None] >= 0
            for a, b in ((g.k, w.k), (g.v, w.v)):
                np.testing.assert_allclose(np.where(filled, np.asarray(a, np.float32), 0),
                                           np.where(filled, np.asarray(b, np.float32), 0), atol=1e-5, rtol=0)
        else:
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5, rtol=0)


# one policy of each kind the packed prefill meets: plain slots, eviction with low-bit storage (mikv), its own
# prompt attention (lserve), layer inputs (cskv), a state shared by layers (minicache), an after-prefill index
# (squeezed); a composition adds only storage, and eviction alone (streaming, razor) is what mikv does first
KINDS = ["full", "mikv", "lserve", "cskv", "minicache", "squeezed"]


@pytest.mark.parametrize("name", KINDS)
def test_a_packed_prefill_equals_the_padded_one_for_every_kind_of_policy(tiny_model, name):
    config, params = tiny_model
    prompts = _prompts(config)
    tokens, positions, lengths = pad_prompts(prompts)
    policy = policy_for(name, 0.4, tokens.shape[1]).prepare(params, config)
    new = lambda: init_cache(config, policy, batch=len(prompts), max_len=tokens.shape[1] + 6,  # noqa: E731
                             dtype=jnp.float32)
    want_logits, want = prefill(params, tokens, positions, lengths, new(), config=config)
    pk = pack_prompts(prompts)
    assert pk.tokens.size < tokens.size  # what the packing saves
    got_logits, got = prepacked_prefill(params, pk, prompts, new(), config=config)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-5, rtol=0)
    _assert_same_cache(got, want)
    if name not in ("full", "mikv", "lserve"):
        return  # equal caches and logits: the decode is the same function of them (checked on three)
    args = (jax.random.key(0), np.float32(0), np.float32(1), np.array([-2], np.int32))
    out_want, _ = decode(params, want, want_logits, lengths, *args, config=config, max_new_tokens=6)
    out_got, _ = decode(params, got, got_logits, pk.lengths, *args, config=config, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(out_got), np.asarray(out_want))


@pytest.mark.parametrize("name", ["full", "streaming"])
def test_generate_with_prepack_returns_the_padded_runs_tokens(default_model, name):
    config, params = default_model
    prompts = _prompts(config, [30, 7, 19, 2, 44], seed=1)
    kw = dict(max_new_tokens=10, policy=name, policy_params={"window": 16, "sinks": 4} if name == "streaming" else None)
    want = generate(params, config, prompts, **kw)
    assert generate(params, config, prompts, prepack=True, **kw).tokens == want.tokens
    assert generate(params, config, prompts, prepack="exact", **kw).tokens == want.tokens
    if name == "full":  # the paper's form: the last token held out is the first decode input
        assert generate(params, config, prompts, prepack=True, hold_out_last=True, **kw).tokens == want.tokens


def test_holding_the_last_token_out_gives_the_full_caches_kv(tiny_model):
    config, params = tiny_model
    prompts = _prompts(config)
    tokens, positions, lengths = pad_prompts(prompts)
    new = lambda: init_cache(config, "full", batch=len(prompts), max_len=tokens.shape[1] + 4,  # noqa: E731
                             dtype=jnp.float32)
    want_logits, want = prefill(params, tokens, positions, lengths, new(), config=config)
    got_logits, got = prepacked_prefill(params, pack_prompts(prompts, hold_out_last=True), prompts, new(),
                                        config=config)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-5, rtol=0)
    _assert_same_cache(got, want)


def test_a_new_batch_of_the_same_buckets_compiles_nothing(tiny_model):
    config, params = tiny_model
    runs = []
    for seed in (5, 6):  # other lengths, same row count, row length and prompt bucket
        prompts = _prompts(config, [30 + seed, 20, 9, 50 - seed, 3], seed=seed)
        pk = pack_prompts(prompts)
        runs.append((prompts, pk))
    assert runs[0][1].tokens.shape == runs[1][1].tokens.shape
    for i, (prompts, pk) in enumerate(runs):
        cache = init_cache(config, "full", batch=len(prompts), max_len=64 + 4, dtype=jnp.float32)
        start = _COMPILES[0]
        jax.block_until_ready(prepacked_prefill(params, pk, prompts, cache, config=config))
        if i:
            assert _COMPILES[0] == start


def test_packing_is_refused_where_it_cannot_apply(tiny_model):
    config, params = tiny_model
    prompts = _prompts(config, [4, 6])
    with pytest.raises(UserError, match="prepack"):
        generate(params, config, prompts, prepack="ffd")
    with pytest.raises(UserError, match="hold_out_last"):
        generate(params, config, prompts, hold_out_last=True)
    from jaxkv.models.llama import forward

    pk = pack_prompts(prompts)
    cache = init_cache(config, "full", batch=3, max_len=20, dtype=jnp.float32)
    with pytest.raises(UserError, match="one row per prompt"):
        prepacked_prefill(params, pk, prompts, cache, config=config)
    with pytest.raises(UserError, match="the packing was made from"):
        prepacked_prefill(params, pk, prompts[:1], cache, config=config)
    other = [list(p) for p in prompts]
    other[1][0] = (other[1][0] + 1) % config.vocab_size  # the same lengths, another token
    with pytest.raises(UserError, match=r"prompts\[1\] is not the token list"):
        prepacked_prefill(params, pk, other, init_cache(config, "full", batch=len(prompts), max_len=64,
                                                        dtype=jnp.float32), config=config)
    with pytest.raises(UserError, match="packing"):
        forward(params, jnp.asarray(pk.tokens), jnp.asarray(pk.positions), None, config=config, packing=pk.layout)


# ---------------------------------------------------------------------------------------- command
def test_generate_command_reads_a_prompts_file_and_writes_jsonl_the_same_with_prepack(tmp_path, capsys):
    from jaxkv.cli import main

    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join([json.dumps({"prompt": "The capital of France"}), json.dumps("one two three"),
                              json.dumps({"prompt": "def add(a, b):"})]) + "\n")
    outs = []
    for extra in ([], ["--prepack"]):
        out = tmp_path / f"out{len(outs)}.jsonl"
        assert main(["generate", "--prompts", str(src), "--max-new-tokens", "6", "--out", str(out), *extra]) == 0
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert [r["output_ids"] for r in outs[0]] == [r["output_ids"] for r in outs[1]]
    assert [r["prompt"] for r in outs[0]] == ["The capital of France", "one two three", "def add(a, b):"]
    assert all(len(r["output_ids"]) >= 1 and isinstance(r["text"], str) for r in outs[0])
    # a plain-text file: one prompt per line; bad lines are named
    plain = tmp_path / "prompts.txt"
    plain.write_text("first prompt\n\nsecond prompt\n")
    assert main(["generate", "--prompts", str(plain), "--max-new-tokens", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["first prompt", "second prompt"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": 3}\n')
    assert main(["generate", "--prompts", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_prompts_files_split_at_newlines_only_and_are_never_overwritten(tmp_path, capsys):
    """Lines end at ``\\n`` (``\\r\\n`` too): U+2028 inside a JSON string or a text line, and a form
    feed, stay in their prompt; a BOM and an upper-case ``.JSONL`` are read as such; ``--out``
    naming the prompts file itself is refused and the file kept."""
    from jaxkv.cli import _read_prompts, main

    text = tmp_path / "p.txt"
    text.write_bytes("\ufefffirst\u2028half\r\nthird\x0cfourth\n\n".encode())
    assert _read_prompts(str(text)) == ["first\u2028half", "third\x0cfourth"]
    jsonl = tmp_path / "p.JSONL"
    jsonl.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n" + json.dumps("c") + "\n",
                     encoding="utf-8")
    assert _read_prompts(str(jsonl)) == ["a\u2028b", "c"]
    before = text.read_bytes()
    assert main(["generate", "--prompts", str(text), "--max-new-tokens", "1", "--out", str(text)]) == 2
    assert "is the --prompts input" in capsys.readouterr().err and text.read_bytes() == before
