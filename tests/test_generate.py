import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from jaxkv.cache import init_cache
from jaxkv.generate import bucket_length, decode, generate, pad_prompts, prefill, sample_logits

_COMPILES = [0]


def _count(event, duration, **kwargs):
    # recorded for every executable built, compiled or loaded from the persistent cache (conftest)
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


monitoring.register_event_duration_secs_listener(_count)


class CountCompiles:
    def __enter__(self):
        self.start = _COMPILES[0]
        return self

    def __exit__(self, *exc):
        self.n = _COMPILES[0] - self.start


def _inputs(config, prompt, max_new):
    tokens, positions, lengths = pad_prompts([prompt])
    cache = init_cache(config, "full", batch=1, max_len=tokens.shape[1] + max_new, dtype=jnp.float32)
    return tokens, positions, lengths, cache


def test_a_64_step_decode_compiles_once_and_a_same_bucket_prompt_not_again(tiny_model):
    config, params = tiny_model
    rng = np.random.default_rng(0)
    no_stop = np.array([-2], np.int32)
    key = jax.random.key(0)
    for i, n in enumerate((20, 27)):  # both in the 32-token bucket
        tokens, positions, lengths, cache = _inputs(config, rng.integers(3, 500, n), 64)
        last, cache = prefill(params, tokens, positions, lengths, cache, config=config)
        with CountCompiles() as c:
            out, _ = decode(params, cache, last, lengths, key, np.float32(0), np.float32(1), no_stop,
                            config=config, max_new_tokens=64)
            out = np.asarray(out)
        assert (out >= 0).all() and out.shape == (1, 64)
        assert c.n == (1 if i == 0 else 0)
    # the whole generate() path: a new prompt of the same bucket compiles nothing
    with CountCompiles() as c:
        generate(params, config, [rng.integers(3, 500, 30)], max_new_tokens=64, stop_tokens=())
    assert c.n == 0


def test_pad_prompts_hand_worked():
    tokens, positions, lengths = pad_prompts([[5, 6, 7], [8]])
    assert tokens.shape == (2, 16) and lengths.tolist() == [3, 1]
    assert tokens[0, :4].tolist() == [5, 6, 7, 0] and tokens[1, :2].tolist() == [8, 0]
    assert positions[0, :4].tolist() == [0, 1, 2, -1] and positions[1, :2].tolist() == [0, -1]
    assert bucket_length(16) == 16 and bucket_length(17) == 32 and bucket_length(1) == 16


def test_ragged_batch_equals_one_prompt_at_a_time(parity_models):
    config, params, e = parity_models["qwen2"]
    prompts = [e["prompt_a"], e["prompt_b"][:5], e["prompt_b"]]
    batched = generate(params, config, prompts, max_new_tokens=6, stop_tokens=()).tokens
    alone = [generate(params, config, [p], max_new_tokens=6, stop_tokens=()).tokens[0] for p in prompts]
    assert batched == alone


def test_stop_tokens_end_a_row_and_keep_the_stop_token(parity_models):
    config, params, e = parity_models["llama3"]
    greedy = e["greedy_a"].tolist()
    stop = greedy[3]
    first = greedy.index(stop)
    out = generate(params, config, [e["prompt_a"], e["prompt_b"]], max_new_tokens=8, stop_tokens=[stop]).tokens
    assert out[0] == greedy[: first + 1]
    want_b = e["greedy_b"].tolist()
    if stop in want_b:
        want_b = want_b[: want_b.index(stop) + 1]
    assert out[1] == want_b


def test_sampling_is_reproducible_by_key_and_top_p_near_zero_is_greedy(parity_models):
    config, params, e = parity_models["mistral"]
    kw = dict(max_new_tokens=8, stop_tokens=(), temperature=1.5)
    a = generate(params, config, [e["prompt_a"]], key=jax.random.key(1), **kw).tokens
    b = generate(params, config, [e["prompt_a"]], key=jax.random.key(1), **kw).tokens
    c = generate(params, config, [e["prompt_a"]], key=jax.random.key(2), **kw).tokens
    assert a == b and a != c
    near_greedy = generate(params, config, [e["prompt_a"]], key=jax.random.key(3), top_p=1e-6, **kw).tokens
    assert near_greedy[0] == e["greedy_a"].tolist()


def test_sample_logits_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.vmap(lambda k: sample_logits(logits, k, jnp.float32(1.0), jnp.float32(0.7))[0])(keys)
    freq = np.bincount(np.asarray(draw), minlength=4) / 4000
    # top-p 0.7 keeps {0.5, 0.3} (mass before the third token is 0.8 >= 0.7), renormalised
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
    assert int(sample_logits(logits, keys[0], jnp.float32(0.0), jnp.float32(1.0))[0]) == 0
    # a tie at the cut: both tied tokens stay (not the lower id alone), each drawn half as often
    tied = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
    draw = jax.vmap(lambda k: sample_logits(tied, k, jnp.float32(1.0), jnp.float32(0.75))[0])(keys)
    np.testing.assert_allclose(np.bincount(np.asarray(draw), minlength=3) / 4000, [0.5, 0.25, 0.25], atol=0.03)


def test_top_p_one_keeps_every_token():
    """With top_p = 1 no token is masked, though float32's running sum of 32,000 probabilities
    reaches 1 before the last of them."""
    from unittest import mock

    logits = jax.random.normal(jax.random.key(0), (1, 32000)) * 3
    seen = {}
    real = jax.random.categorical

    def spy(key, masked, axis=-1):
        seen["masked"] = masked
        return real(key, masked, axis=axis)

    with mock.patch("jax.random.categorical", spy), jax.disable_jit():  # the branch runs on concrete values
        sample_logits(logits, jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0))
    assert np.isfinite(np.asarray(seen["masked"])).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[]]), r"prompts\[0\] must be a non-empty"),
    (dict(prompts=[[1, 2], [3, 999]]), r"prompts\[1\] has token ids outside"),
    (dict(prompts=[[1.5, 2.0]]), "integer token ids"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(temperature=0.5), "PRNG key"),
    (dict(max_new_tokens=60), "exceeds the model's context of 64"),
    (dict(policy="nope"), "unknown cache policy"),
    (dict(policy="streaming", policy_params={"window": -3}), "window"),
    (dict(stop_tokens=[500]), "stop token 500"),
])
def test_bad_generation_arguments(parity_models, kwargs, message):
    config, params, e = parity_models["llama3"]
    args = dict(prompts=[e["prompt_a"]])
    args.update(kwargs)
    prompts = args.pop("prompts")
    with pytest.raises(ValueError, match=message):
        generate(params, config, prompts, **args)


def test_forward_logits_at_is_those_rows_of_the_full_logits(tiny_model):
    from jaxkv.models.llama import forward

    config, params = tiny_model
    tokens, positions, lengths = pad_prompts([[5, 6, 7, 8, 9], [3, 4]])
    full, _ = forward(params, tokens, positions, config=config)
    at, _ = forward(params, tokens, positions, config=config, logits_at=lengths - 1)
    want = np.take_along_axis(np.asarray(full), (lengths - 1)[:, None, None], axis=1)
    np.testing.assert_allclose(np.asarray(at), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="logits_at must be"):
        forward(params, tokens, positions, config=config, logits_at=np.array([1, 2, 3]))


def test_only_the_large_leaves_of_a_cache_are_donated():
    """split_donated puts leaves of at least SMALL_LEAF_BYTES in the donated half and the rest
    in the other; join_donated gives the same tree back."""
    from jaxkv.generate import SMALL_LEAF_BYTES, join_donated, split_donated

    tree = {"k": jnp.ones((SMALL_LEAF_BYTES // 4,), jnp.float32), "t": jnp.full((2,), 3.0),
            "n": [jnp.arange(3), jnp.ones((SMALL_LEAF_BYTES // 2 - 1,), jnp.bfloat16)]}
    big, small, treedef = split_donated(tree)
    assert [x is not None for x in big] == [True, False, False, False]  # leaves in key order: k, n[0], n[1], t
    assert [x is not None for x in small] == [False, True, True, True]
    back = join_donated(big, small, treedef)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert a is b


def test_greedy_and_stopless_decoding_compile_no_branch_and_give_the_general_loops_tokens(parity_models):
    """A temperature of 0 compiles argmax without the sampling branch, and stop tokens that cannot
    occur (all negative) a loop of a fixed trip count; the tokens equal the general loop's (the
    runtime branch and the early-exit while loop), which the default flags keep."""
    from jaxkv.generate import _decode, split_donated

    config, params, e = parity_models["llama3"]
    tokens, positions, lengths, cache = _inputs(config, e["prompt_a"], 12)
    last, cache = prefill(params, tokens, positions, lengths, cache, config=config)
    args = (last, lengths, jax.random.key(0), np.float32(0), np.float32(1), np.array([-2], np.int32))

    def run(greedy, fixed):
        big, small, tree = split_donated(jax.tree.map(jnp.copy, cache))
        return np.asarray(_decode(params, big, small, *args, config=config, max_new_tokens=12, tree=tree,
                                  greedy=greedy, fixed=fixed)[0])

    want = run(False, False)
    np.testing.assert_array_equal(run(True, True), want)
    np.testing.assert_array_equal(run(True, False), want)

    big, small, tree = split_donated(cache)
    text = str(jax.make_jaxpr(lambda b, s: _decode.__wrapped__(params, b, s, *args, config=config, max_new_tokens=12,
                                                              tree=tree, greedy=True, fixed=True))(big, small))
    assert " cond[" not in text and "scan[" in text and "while[" not in text  # a static trip count
    text = str(jax.make_jaxpr(lambda b, s: _decode.__wrapped__(params, b, s, *args, config=config, max_new_tokens=12,
                                                              tree=tree))(big, small))
    assert " cond[" in text and "while[" in text  # the general loop keeps the branch and the early exit


def test_decode_under_an_outer_jit_keeps_the_general_loop(parity_models):
    """Traced temperature and stop tokens (decode called inside a jit) cannot pick a mode: the
    general loop runs, with the tokens of the concrete call."""
    config, params, e = parity_models["llama3"]
    tokens, positions, lengths, cache = _inputs(config, e["prompt_a"], 6)
    last, cache = prefill(params, tokens, positions, lengths, cache, config=config)
    stops = np.array([-2], np.int32)
    run = lambda c, t, s: decode(params, c, last, lengths, jax.random.key(0), t, np.float32(1), s,  # noqa: E731
                                 config=config, max_new_tokens=6)[0]
    want = np.asarray(run(jax.tree.map(jnp.copy, cache), np.float32(0), stops))
    got = np.asarray(jax.jit(run)(cache, jnp.float32(0), jnp.asarray(stops)))
    np.testing.assert_array_equal(got, want)


def test_decode_takes_a_list_of_stop_tokens_and_refuses_no_new_tokens(parity_models):
    """Stop tokens as a Python list give the array's tokens (a list reached the jit as a pytree);
    ``max_new_tokens`` of 0 is refused by name, and a numpy integer is a valid count."""
    config, params, e = parity_models["llama3"]
    tokens, positions, lengths, cache = _inputs(config, e["prompt_a"], 6)
    last, cache = prefill(params, tokens, positions, lengths, cache, config=config)
    run = lambda s, n=6: decode(params, jax.tree.map(jnp.copy, cache), last, lengths, jax.random.key(0),  # noqa: E731
                                np.float32(0), np.float32(1), s, config=config, max_new_tokens=n)[0]
    want = np.asarray(run(np.array([-2], np.int32)))
    np.testing.assert_array_equal(np.asarray(run([-2])), want)
    np.testing.assert_array_equal(np.asarray(run((-2,), np.int64(6))), want)
    stop = int(want[0, 2])  # the third token: the row ends there, kept, -1 after
    got = np.asarray(run([stop]))
    assert got[0, :3].tolist() == want[0, :3].tolist() and got[0, 3:].tolist() == [-1] * 3
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        run([-2], 0)
    out = generate(params, config, [e["prompt_a"]], max_new_tokens=np.int64(3)).tokens
    assert len(out[0]) == 3
