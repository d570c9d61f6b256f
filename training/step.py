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
from jaxkv.models.llama import forward
from jaxkv.training.state import TrainState

__all__ = ["lm_loss", "make_train_step"]


def lm_loss(params, batch: dict, *, config: LlamaConfig, compute_dtype) -> tuple[jax.Array, jax.Array]:
    """``(sum of token NLL, number of valid targets)`` for one batch of ``[b, T]`` rows."""
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
    logits, _ = forward(params, tokens, positions, config=config, segment_ids=segments,
                        compute_dtype=compute_dtype)
    valid = (positions[:, 1:] >= 0) & (positions[:, :-1] >= 0) & (segments[:, 1:] == segments[:, :-1])
    if "loss_mask" in batch:
        valid &= batch["loss_mask"][:, 1:]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


def make_train_step(config: LlamaConfig, tx: optax.GradientTransformation, schedule, *,
                    compute_dtype=jnp.bfloat16, loss=None):
    """``step(state, batch, *frozen) -> (state, metrics)``; ``batch`` arrays are ``[accum, b, T]``.

    ``loss(params, micro_batch, *frozen) -> (sum, count)`` defaults to ``lm_loss``; ``frozen``
    are arguments the loss reads but does not train (e.g. a frozen base model's weights)."""
    if loss is None:
        def loss(p, mb):
            return lm_loss(p, mb, config=config, compute_dtype=compute_dtype)

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
