import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.attention import attend_reference
from jaxkv.cache import KVCache, available_policies, init_cache, make_policy
from jaxkv.models.llama import forward


def test_registry_and_parameter_errors():
    assert {"full", "streaming"} <= set(available_policies())
    with pytest.raises(ValueError, match="unknown cache policy 'nope'.*full.*streaming"):
        make_policy("nope")
    with pytest.raises(ValueError, match="has no parameter 'windw'.*window"):
        make_policy("streaming", windw=3)
    with pytest.raises(ValueError, match="window"):
        make_policy("streaming", window=0)
    with pytest.raises(ValueError, match="sinks"):
        make_policy("streaming", sinks=-1)
    with pytest.raises(ValueError, match="sinks"):
        make_policy("streaming", sinks=1.5)
    p = make_policy("streaming", sinks=2, window=8)
    assert make_policy(p) is p


@pytest.mark.parametrize("name", [n for n in available_policies() if "+" not in n])
def test_from_budget_refuses_a_budget_outside_the_contract(name):
    """Every policy's ``from_budget`` takes a budget in (0, 1] and a positive context length,
    and names the argument otherwise (instead of sizing a window from NaN or a negative share)."""
    from jaxkv.cache.policy import _REGISTRY
    from jaxkv.errors import UserError

    cls = _REGISTRY[name]
    for budget, context, match in ((float("nan"), 100, "budget"), (-0.5, 100, "budget"), (0, 100, "budget"),
                                   (3.0, 100, "budget"), (True, 100, "budget"), (0.5, 0, "context_len"),
                                   (0.5, 2.5, "context_len")):
        with pytest.raises(UserError, match=match):
            cls.from_budget(budget, context)


def test_a_budget_and_the_field_it_sizes_are_not_both_given():
    """MiKV's budget sizes ``important`` and Razor's its ``window``: given both, or a budget
    without its context length, the policy says so instead of one silently winning."""
    from jaxkv.errors import UserError

    for kwargs, match in ((dict(budget=0.1), "give both or neither"),
                          (dict(important=0.05, budget=0.9, context_len=37), "important .* and budget"),
                          (dict(context_len=37), "give both or neither")):
        with pytest.raises(UserError, match=match):
            make_policy("mikv", **kwargs)
    heads = [[0]] * 2
    with pytest.raises(UserError, match="window .* and budget"):
        make_policy("razor", window=8, budget=0.9, context_len=37, heads=heads)
    from jaxkv.cache import RazorCache

    sized = RazorCache.from_budget(0.5, 1000, heads=heads)  # from_budget's own window is no conflict
    assert sized.window == sized._window_for(0.5, 1000, sized.induction_share + sized.echo_share, sized.sinks)
    for bad in ([[0.7], [1]], [["1"], [0]], [[True], [0]], [0, 1]):
        with pytest.raises(UserError, match="integer KV head indices"):
            make_policy("razor", heads=bad)


def test_nbytes_counts_the_arrays_held(tiny_model):
    config, _ = tiny_model
    full = init_cache(config, "full", batch=3, max_len=100, dtype=jnp.bfloat16)
    per_layer = 2 * 3 * config.num_kv_heads * 100 * config.head_dim * 2 + 3 * config.num_kv_heads * 100 * 4
    assert full.nbytes == config.num_layers * per_layer
    assert full.nbytes == sum(x.nbytes for x in jax.tree.leaves(full))
    stream = init_cache(config, make_policy("streaming", sinks=4, window=16), batch=3, max_len=100,
                        dtype=jnp.bfloat16)
    assert stream.layers[0].k.shape[2] == 20
    assert stream.nbytes == full.nbytes * 20 // 100


def test_write_drops_padding_and_out_of_range_slots():
    c = KVCache.empty(batch=1, num_kv_heads=1, slots=3, head_dim=1, dtype=jnp.float32)
    k = jnp.arange(4, dtype=jnp.float32).reshape(1, 4, 1, 1) + 1
    c = c.write(k, k, jnp.array([[0, 1, 2, -1]]), jnp.array([[2, 0, 3, 3]]))
    assert c.positions[0, 0].tolist() == [1, -1, 0]
    assert c.k[0, 0, :, 0].tolist() == [2.0, 0.0, 1.0]


def _run(config, params, seq, policy, prefill_len):
    n = seq.shape[1]
    cache = init_cache(config, policy, batch=seq.shape[0], max_len=n, dtype=jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(n), seq.shape)
    logits, cache = forward(params, seq[:, :prefill_len], pos[:, :prefill_len], cache, config=config)
    out = [logits]
    step = jax.jit(lambda c, t, p: forward(params, t, p, c, config=config))
    for t in range(prefill_len, n):
        lg, cache = step(cache, seq[:, t:t + 1], pos[:, t:t + 1])
        out.append(lg)
    return jnp.concatenate(out, axis=1), cache


def test_streaming_with_a_window_covering_the_sequence_equals_full(parity_models):
    config, params, e = parity_models["llama3"]
    seq = jnp.asarray(np.concatenate([e["prompt_a"], e["greedy_a"]]))[None]
    full, _ = _run(config, params, seq, "full", 12)
    stream, _ = _run(config, params, seq, make_policy("streaming", sinks=4, window=seq.shape[1]), 12)
    np.testing.assert_allclose(np.asarray(stream), np.asarray(full), atol=1e-6, rtol=0)


def test_streaming_keeps_sinks_and_recent_window_exactly(parity_models):
    """Each decode step must equal dense attention restricted by hand to the sink and
    recent-window positions, and the cache must hold exactly those positions."""
    config, params, e = parity_models["llama3"]
    sinks, window_s, prefill_len = 2, 5, 12
    seq = jnp.asarray(np.concatenate([e["prompt_a"], e["greedy_a"]]))[None]
    n = seq.shape[1]
    logits, cache = _run(config, params, seq, make_policy("streaming", sinks=sinks, window=window_s), prefill_len)
    kept = sorted(cache.layers[0].positions[0, 0].tolist())
    assert kept == [0, 1] + list(range(n - window_s, n))

    # Reference: decode step at position t sees positions {0..sinks-1} U {t-window+1..t},
    # while the prompt (prefill) sees everything causally. Build it with a custom attention.
    from jaxkv.models import llama as llama_mod

    def restricted(q, k, v, positions, *, window=None, segment_ids=None, implementation=None, sharding=None,
                   anchor=False):
        kp = positions[:, None, :]
        decode_mask = (kp[:, :, None, :] < sinks) | (kp[:, :, None, :] > positions[:, None, :, None] - window_s)
        allowed = jnp.where(positions[:, None, :, None] >= prefill_len, decode_mask, True)
        kpos_masked = jnp.where(allowed, kp[:, :, None, :], -1)  # [B,1,T,S]
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        outs = [attend_reference(q[:, i:i + 1], kt, vt, positions[:, i:i + 1], kpos_masked[:, :, i], window=window)
                for i in range(q.shape[1])]
        return jnp.concatenate(outs, axis=1)

    orig = llama_mod.attend_dense
    llama_mod.attend_dense = restricted
    try:
        ref, _ = forward(params, seq, jnp.arange(n)[None], config=config)
    finally:
        llama_mod.attend_dense = orig
    np.testing.assert_allclose(np.asarray(logits[0, prefill_len:]), np.asarray(ref[0, prefill_len:]),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logits[0, :prefill_len]), e["full_logits_a"][:prefill_len],
                               atol=1e-4, rtol=0)


def test_streaming_decode_chunk_longer_than_window_is_refused(parity_models):
    config, params, e = parity_models["llama3"]
    cache = init_cache(config, make_policy("streaming", sinks=1, window=2), batch=1, max_len=16,
                       dtype=jnp.float32)
    tok = jnp.asarray(e["prompt_a"][:4])[None]
    _, cache = forward(params, tok, jnp.arange(4)[None], cache, config=config)
    with pytest.raises(ValueError, match="exceeds window"):
        forward(params, tok[:, :3], jnp.arange(4, 7)[None], cache, config=config)


@pytest.mark.skipif(jax.default_backend() in ("gpu", "tpu"), reason="the refusal is for a backend without the kernel")
def test_a_decode_kernel_for_another_backend_is_refused_when_the_cache_is_made(tiny_model):
    """Not at the first decode step after a whole prefill: when the cache is made, naming the
    way out (the interpreter, or the reference path)."""
    from jaxkv.errors import UserError

    config, _ = tiny_model
    for spec in ("full", "squeezed", "lserve"):
        for kernel in ("pallas_gpu", "pallas_tpu"):
            extra = {"heads": [[0]] * config.num_layers} if spec == "lserve" else {}
            with pytest.raises(UserError, match=f"decode_kernel={kernel} runs on a"):
                init_cache(config, make_policy(spec, decode_kernel=kernel, **extra), batch=1, max_len=32,
                           dtype=jnp.float32)
            init_cache(config, make_policy(spec, decode_kernel=kernel, kernel_interpret=True, **extra), batch=1,
                       max_len=32, dtype=jnp.float32)
