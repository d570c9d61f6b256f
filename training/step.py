"""The loss and the pure train step (jitted once by the loop, buffers donated).

Loss: next-token cross-entropy in fp32 over valid targets only. A target at ``t+1`` is valid
when both ``t`` and ``t+1`` are real tokens (position >= 0) of the same document (equal segment
ids) and the batch's ``loss_mask`` (if any) marks ``t+1``, so padding, document boundaries and
masked-out spans (e.g. prompts when training on answers) never contribute. Gradient accumulation scans over
micro-batches summing token losses and counts, then divides once: the update equals the one
of a single large batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxkv.config import LlamaConfig
from jaxkv.models.llama import forward, lm_head
from jaxkv.training.sharding import ATTENTION_SHARDING
from jaxkv.training.state import TrainState

__all__ = ["lm_loss", "loss_chunk", "make_train_step", "LOGITS_CHUNK_BYTES"]


LOGITS_CHUNK_BYTES = 512 * 2 ** 20  # fp32 logits held at once by the chunked loss (and recomputed in the backward)


def loss_chunk(batch: int, seq_len: int, vocab_size: int) -> int:
    """Tokens per row whose logits one chunk of the loss computes: a power of two such that
    ``batch x chunk x vocab`` fp32 logits fit ``LOGITS_CHUNK_BYTES`` (at least 16, at most the row)."""
    c = max(16, 1 << max(0, (LOGITS_CHUNK_BYTES // (4 * batch * vocab_size)).bit_length() - 1))
    return min(c, seq_len)


def lm_loss(params, batch: dict, *, config: LlamaConfig, compute_dtype, chunk: int | None = None,
            attention_implementation: str | None = None, attention_sharding=ATTENTION_SHARDING,
            attention: str = "reset", remat: str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(sum of token NLL, number of valid targets)`` for one batch of ``[b, T]`` rows.

    Chunked cross-entropy: the LM head and the log-softmax run on ``chunk`` tokens at a time
    (default ``loss_chunk``) under ``jax.checkpoint``, so the ``[b, T, V]`` fp32 logits are never
    held whole, forward or backward (16 GiB at 4 x 8k tokens and a 128k vocabulary).

    ``attention``: the packing's mode (``training.config.ATTENTION_MODES``): 'full' attends across
    the row (no segment mask, the fused causal kernel), 'anchor' opens the row's first token to
    every document; the others mask by segment ids as packed. ``remat``: each layer's
    rematerialisation policy (``models.llama.REMAT_POLICIES``; None: none)."""
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
    hidden, _ = forward(params, tokens, positions, config=config,
                        segment_ids=None if attention == "full" else segments, anchor=attention == "anchor",
                        compute_dtype=compute_dtype, hidden_only=True,
                        attention_implementation=attention_implementation, attention_sharding=attention_sharding,
                        remat=remat)
    valid = (positions[:, 1:] >= 0) & (positions[:, :-1] >= 0) & (segments[:, 1:] == segments[:, :-1])
    if "loss_mask" in batch:
        valid &= batch["loss_mask"][:, 1:]
    b, t1 = valid.shape
    c = chunk or loss_chunk(b, t1, config.vocab_size)
    n = -(-t1 // c)
    pad = n * c - t1
    h = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad)))
    valid = jnp.pad(valid, ((0, 0), (0, pad)))
    chunks = lambda x: jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)  # noqa: E731  [n, b, c, ...]

    @jax.checkpoint
    def one(total, xs):
        hc, tc, vc = xs
        logp = jax.nn.log_softmax(lm_head(params, hc, config=config), axis=-1)
        nll = -jnp.take_along_axis(logp, tc[..., None], axis=-1)[..., 0]
        return total + jnp.sum(jnp.where(vc, nll, 0.0)), None

    total, _ = jax.lax.scan(one, jnp.float32(0), (chunks(h), chunks(targets), chunks(valid)))
    return total, jnp.sum(valid).astype(jnp.float32)


def make_train_step(config: LlamaConfig, tx: optax.GradientTransformation, schedule, *,
                    compute_dtype=jnp.bfloat16, loss=None, attention_implementation: str | None = None,
                    attention: str = "reset", remat: str | None = None):
    """``step(state, batch, *frozen) -> (state, metrics)``; ``batch`` arrays are ``[accum, b, T]``.

    ``loss(params, micro_batch, *frozen) -> (sum, count)`` defaults to ``lm_loss``; ``frozen``
    are arguments the loss reads but does not train (e.g. a frozen base model's weights)."""
    if loss is None:
        def loss(p, mb):
            return lm_loss(p, mb, config=config, compute_dtype=compute_dtype,
                           attention_implementation=attention_implementation, attention=attention, remat=remat)

    def step(state: TrainState, batch: dict, *frozen):
        def micro(carry, mb):
            grads, loss_sum, count = carry
            (l, n), g = jax.value_and_grad(lambda p: loss(p, mb, *frozen), has_aux=True)(state.params)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + l, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, loss_sum, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), batch)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return step
