"""One conformance test for every registered cache policy (as kvpress tests all its presses),
and the contract's model-level pieces: per-layer policies, traced layer parameters, the
after-prefill hook, phases."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from jaxkv.cache import (CachePolicy, FullCache, LayerSpec, Phase, StreamingCache, available_policies,
                         init_cache, make_policy)
from jaxkv.eval.harness import policy_for
from jaxkv.generate import decode, pad_prompts, prefill
from jaxkv.models.llama import forward

POLICIES = available_policies()
_COMPILES = [0]
monitoring.register_event_duration_secs_listener(
    lambda event, d, **k: _COMPILES.__setitem__(0, _COMPILES[0] + (event == "/jax/core/compile/backend_compile_duration")))


_STEP = jax.jit(forward, static_argnames=("config",))  # one compile per (policy, shapes) across tests


def _sequence(e):
    return jnp.asarray(np.concatenate([e["prompt_a"], e["greedy_a"]]))[None]


def _run(config, params, seq, policy, prefill_len=12, extend_len=5, *, jit_all=False):
    """Logits of a prefill, an extend chunk and then one decode step per remaining token
    (``jit_all``: the prefill and the extend jitted too, one compile each instead of one per
    eager operation)."""
    n = seq.shape[1]
    cache = init_cache(config, policy, batch=seq.shape[0], max_len=n, dtype=jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(n), seq.shape)
    cut = prefill_len + extend_len
    out = []
    run = _STEP if jit_all else forward
    lg, cache = run(params, seq[:, :prefill_len], pos[:, :prefill_len], cache, config=config)
    out.append(lg)
    lg, cache = run(params, seq[:, prefill_len:cut], pos[:, prefill_len:cut], cache, config=config)
    out.append(lg)
    for t in range(cut, n):
        lg, cache = _STEP(params, seq[:, t:t + 1], pos[:, t:t + 1], cache, config=config)
        out.append(lg)
    return jnp.concatenate(out, axis=1), cache


_REFERENCES = {}


def _full_reference(fam, kv_bits, config, params, seq):
    """``full`` in the given storage on a family's sequence: the same for every policy of that
    storage, so computed once per module rather than once per parametrized policy."""
    if (fam, kv_bits) not in _REFERENCES:
        _REFERENCES[fam, kv_bits] = _run(config, params, seq, make_policy("full", kv_bits=kv_bits))[0]
    return _REFERENCES[fam, kv_bits]


@pytest.mark.parametrize("name", POLICIES)
def test_a_budget_that_keeps_everything_equals_full(parity_models, name):
    # mistral: the model's sliding window on top of the policy (a composition's low-bit storage
    # does not change how its policy windows, so compositions run llama3 only)
    for fam in ("llama3",) if "+" in name else ("llama3", "mistral"):
        config, params, e = parity_models[fam]
        seq = _sequence(e)
        got_policy = policy_for(name, 1.0, seq.shape[1]).prepare(params, config)
        # a composition stores in low-bit codes: its reference is `full` in the same storage
        # (which tests/test_storage.py checks against a numpy reference)
        ref = _full_reference(fam, got_policy.kv_bits, config, params, seq)
        got, _ = _run(config, params, seq, got_policy)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0, err_msg=fam)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("batch, max_len, dtype, budget", [(1, 40, jnp.float32, 0.3), (3, 100, jnp.bfloat16, 0.5)])
def test_nbytes_is_the_analytic_count(tiny_model, name, batch, max_len, dtype, budget):
    config, params = tiny_model
    method = policy_for(name, budget, max_len).prepare(params, config)
    cache = init_cache(config, method, batch=batch, max_len=max_len, dtype=dtype)
    expected = sum(p.expected_nbytes(batch=batch, max_len=max_len, dtype=dtype, layer=LayerSpec(i, config))
                   for i, p in enumerate(cache.policies))
    leaves = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.layers))
    assert cache.nbytes == expected == leaves
    tokens = jnp.full((batch, 8), 5, jnp.int32)
    # fixed shapes: a prefilled cache holds the same arrays. The shapes and dtypes the prefill
    # returns are those of its trace, so jax.eval_shape gives them without running the prefill
    # op by op (which compiles every eager operation: tens of seconds for some policies).
    after = jax.eval_shape(lambda c: forward(params, tokens, jnp.broadcast_to(jnp.arange(8), (batch, 8)), c,
                                             config=config)[1], cache)
    assert after.nbytes == expected


@pytest.mark.parametrize("name", POLICIES)
def test_a_decode_loop_compiles_once(tiny_model, name):
    config, params = tiny_model
    method = policy_for(name, 0.5, 32).prepare(params, config)
    rng = np.random.default_rng(0)
    for i, n in enumerate((20, 27)):  # one prompt bucket
        tokens, positions, lengths = pad_prompts([rng.integers(3, 500, n)])
        cache = init_cache(config, method, batch=1, max_len=tokens.shape[1] + 40, dtype=jnp.float32)
        last, cache = prefill(params, tokens, positions, lengths, cache, config=config)
        start = _COMPILES[0]
        out, _ = decode(params, cache, last, lengths, jax.random.key(0), np.float32(0), np.float32(1),
                        np.array([-2], np.int32), config=config, max_new_tokens=40)
        np.asarray(out)
        assert _COMPILES[0] - start == (1 if i == 0 else 0)


@pytest.mark.parametrize("name", POLICIES)
def test_a_ragged_batch_matches_each_row_alone(parity_models, name):
    config, params, e = parity_models["qwen2"]
    prompts = [e["prompt_a"], e["prompt_b"][:7], e["prompt_b"]]
    follow = np.array([[5, 9, 13, 2]] * 3, np.int32)
    method = policy_for(name, 0.5, 24).prepare(params, config)

    step = jax.jit(lambda t, p, c: forward(params, t, p, c, config=config))

    def teacher_forced(rows):
        tokens, positions, lengths = pad_prompts([prompts[r] for r in rows])
        # one cache size for every run: a policy may size its parts by it (a share of max_len)
        cache = init_cache(config, method, batch=len(rows), max_len=32, dtype=jnp.float32)
        lg, cache = step(jnp.asarray(tokens), jnp.asarray(positions), cache)
        out = [[np.asarray(lg[i, :lengths[i]]) for i in range(len(rows))]]
        for j in range(follow.shape[1]):
            lg, cache = step(jnp.asarray(follow[rows, j:j + 1]), jnp.asarray(lengths[:, None] + j), cache)
            out.append([np.asarray(lg[i]) for i in range(len(rows))])
        return [np.concatenate([step[i] for step in out]) for i in range(len(rows))]

    batched = teacher_forced([0, 1, 2])
    # Each row runs alone in a batch of the same shape (three copies of the row): another batch
    # shape compiles to other fusions whose float noise (~1e-7) a policy with discrete choices
    # (low-bit codes, top-k retention or selection) may amplify. That isolates what this test is
    # about: rows of other lengths beside a row change nothing.
    for r in range(3):
        alone = teacher_forced([r, r, r])[0]
        np.testing.assert_allclose(batched[r], alone, atol=2e-5, rtol=0, err_msg=f"row {r}")


# ------------------------------------------------------------------ the model-level contract
def test_policies_may_differ_per_layer(parity_models):
    """A list of per-layer policies: layer 0 full, layer 1 streaming; the logits equal a run
    where each layer's attention is restricted by hand to what its policy keeps, i.e. they sit
    strictly between all-full and all-streaming."""
    config, params, e = parity_models["llama3"]
    seq = _sequence(e)
    stream = StreamingCache(sinks=2, window=6)
    mixed, cache = _run(config, params, seq, [FullCache(), stream])
    full, _ = _run(config, params, seq, "full")
    all_stream, _ = _run(config, params, seq, stream)
    assert cache.layers[0].k.shape[2] == seq.shape[1] and cache.layers[1].k.shape[2] == 8
    d_full = np.abs(np.asarray(mixed - full))[0, 17:].max()
    d_stream = np.abs(np.asarray(mixed - all_stream))[0, 17:].max()
    assert d_full > 1e-4 and d_stream > 1e-4
    np.testing.assert_allclose(np.asarray(mixed[:, :12]), np.asarray(full[:, :12]), atol=1e-5)  # prefill is dense


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ScaledValues(CachePolicy):
    """A test method: a full cache whose values are multiplied by a traced per-layer factor
    (the kind of artifact calibration produces), with an after-prefill hook that counts."""

    name = "_scaled_values_test"  # never registered: the registry stays the library's
    calls: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def capacity(self, max_len):
        return max_len

    def layer_params(self, layer):
        return {"factor": jnp.float32(1.0 + layer.index)}

    def after_prefill(self, cache):
        self.calls.append("after_prefill")
        return cache

    def prefill(self, state, *, q, k, v, positions, layer, params=None):
        return state.write(k, v * params["factor"], positions, state.slot_or_drop(positions))

    def append(self, state, *, q, k, v, positions, phase, layer, params=None):
        self.calls.append(phase)
        state = state.write(k, v * params["factor"], positions, state.slot_or_drop(positions))
        return self.attend(state, q, positions, layer) / params["factor"], state


def test_traced_layer_params_hook_and_phases(parity_models):
    config, params, e = parity_models["llama3"]
    seq = _sequence(e)
    method = _ScaledValues()
    got, cache = _run(config, params, seq, method)
    ref, _ = _run(config, params, seq, "full")
    # scaling the values by f and the output by 1/f is exact: the artifact reached every layer
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    assert [float(p["factor"]) for p in cache.params] == [1.0, 2.0]
    assert cache.params_nbytes == 8 and cache.nbytes == FullCache().expected_nbytes(
        batch=1, max_len=seq.shape[1], dtype=jnp.float32, layer=LayerSpec(0, config)) * 2
    # traced calls: the hook once after the prefill, then one EXTEND chunk per layer, then the
    # decode step traced once per layer (jit)
    assert method.calls.count("after_prefill") == 1
    assert method.calls.count(Phase.EXTEND) == config.num_layers
    assert method.calls.count(Phase.DECODE) == config.num_layers


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="buffer donation is a no-op on the CPU")
@pytest.mark.parametrize("name", POLICIES)
def test_the_donating_prefill_returns_the_cache_a_plain_jit_does(name):
    """`generate.prefill` donates the cache's large buffers; every leaf it returns equals a jit
    that donates nothing. A 24-layer model: with every leaf donated, Squeezed's global threshold
    (one value in 24 leaves) came back as zeros in some layers on the GPU."""
    from jaxkv.config import LlamaConfig
    from jaxkv.generate import _prefill, split_donated
    from jaxkv.models.llama import init_params

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=24, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    params = init_params(config, jax.random.key(0), dtype=jnp.float32)
    n = 160
    seq = jax.random.randint(jax.random.key(1), (1, n), 0, 64)
    policy = policy_for(name, 0.3, n).prepare(params, config)
    pos = jnp.arange(n)[None]
    lengths = jnp.asarray([n], jnp.int32)
    fresh = lambda: init_cache(config, policy, batch=1, max_len=n + 4, dtype=jnp.float32)  # noqa: E731
    plain = jax.jit(_prefill.__wrapped__, static_argnames=("config", "tree"))
    _, want = plain(params, seq, pos, lengths, *split_donated(fresh())[:2], config=config, tree=split_donated(fresh())[2])
    _, got = prefill(params, seq, pos, lengths, fresh(), config=config)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("method", ["full", "mikv", "razor", "lserve", "squeezed[decode_kernel=reference]", "streaming"])
def test_a_position_past_max_len_gives_nan_whatever_the_policy(tiny_model, method):
    """Decoding past the positions the cache was made for turns the row's logits into NaN for
    every policy (some drop such a token, some round their capacity up), while the other row
    and the steps before it stay finite."""
    from jaxkv.cache import make_policy
    from jaxkv.models.llama import forward

    config, params = tiny_model
    policy = make_policy(method, **({"heads": ((0,),) * config.num_layers} if method in ("razor", "lserve") else {}))
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 3, config.vocab_size)
    cache = init_cache(config, policy, batch=2, max_len=18, dtype=jnp.float32)
    pos = jnp.asarray(np.where(np.arange(16)[None] < np.array([[16], [12]]), np.arange(16)[None], -1))
    _, cache = jax.jit(lambda c: forward(params, tokens[:, :16], pos, c, config=config))(cache)
    step = jax.jit(lambda t, p, c: forward(params, t, p, c, config=config))
    finite = []
    for i in range(3):  # row 0 at positions 16, 17, 18: the last is past max_len; row 1 at 12-14
        p = jnp.asarray([[16 + i], [12 + i]])
        lg, cache = step(tokens[:, 16 + i:17 + i], p, cache)
        finite.append(np.isfinite(np.asarray(lg)).all(axis=(1, 2)).tolist())
    assert finite == [[True, True], [True, True], [False, True]]


def test_init_cache_names_a_bad_argument(tiny_model):
    config, _ = tiny_model
    for kwargs, match in [(dict(batch=2.5), "batch must be a positive integer"),
                          (dict(max_len=True), "max_len must be a positive integer"),
                          (dict(dtype=jnp.int32), "floating dtype")]:
        args = {"batch": 1, "max_len": 8, "dtype": jnp.float32, **kwargs}
        with pytest.raises(ValueError, match=match):
            init_cache(config, "full", **args)


def test_sizing_and_head_lists_are_checked_by_name(tiny_model):
    """A head list out of range or of the wrong length is refused even without
    ``prepare``; a budget outside (0, 1] is refused by the policies that
    size themselves from it and by ``policy_for``."""
    config, _ = tiny_model
    n = config.num_layers
    for method in ("razor", "lserve"):
        for heads in [((5,),) * n, ((-1,),) * n, ((0,),) * (n - 1)]:
            with pytest.raises(ValueError, match="heads must list distinct KV heads"):
                init_cache(config, make_policy(method, heads=heads), batch=1, max_len=8, dtype=jnp.float32)
    for bad in (float("nan"), -3.0, 0.0, "x"):
        with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\]"):
            make_policy("mikv", budget=bad, context_len=100)
    with pytest.raises(ValueError, match="context_len must be a positive integer"):
        make_policy("razor", budget=0.5, context_len=-5)
    for name in available_policies():  # every policy's from_budget, through the base class's check
        for bad in (-1.0, float("nan"), 0.0, 1.5):
            with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\]"):
                policy_for(name, bad, 100)
        with pytest.raises(ValueError, match="context_len must be a positive integer"):
            policy_for(name, 0.5, 0)


def test_a_model_level_method_in_a_per_layer_list_is_refused_by_name(tiny_model):
    config, _ = tiny_model
    heads = ((0,),) * config.num_layers
    for policy in (make_policy("squeezed"), make_policy("razor", heads=heads), make_policy("minicache")):
        layers = [policy] + ["full"] * (config.num_layers - 1)
        with pytest.raises(ValueError, match="layer 0 .* is a model-level method"):
            init_cache(config, layers, batch=1, max_len=8, dtype=jnp.float32)
    cache = init_cache(config, ["streaming"] + ["full"] * (config.num_layers - 1), batch=1, max_len=8,
                       dtype=jnp.float32)  # layer policies mix freely
    assert len(cache.layers) == config.num_layers
