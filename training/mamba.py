"""Mamba-2 length training: truncated backpropagation through time with the state passed
across segments (Stuffed Mamba's training setting), on the training spine (the optax step,
orbax checkpoints, resume, metrics).

A batch row of ``segments x segment_len`` tokens is one stream: the forward runs it one segment
of ``segment_len`` (the training length T_train) at a time, each from the state the previous
segment ended in, with the gradient cut at every boundary (``stop_gradient`` on the carried
state): the model learns to keep working from a state it was handed, not only from zeros.
``segments = 1`` is plain training at T_train from a zero state. Targets are every next token
of the row that is real, of the same document and marked by the batch's ``loss_mask`` (as
``training.step.lm_loss``); documents
packed in one row share the stream, as in pretraining without state resets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxkv.models import mamba2
from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig, TrainConfigError
from jaxkv.training.data import Batches, pack_documents
from jaxkv.training.loop import TrainResult, export_final, needs_export, open_run, run_meta, run_schedule, run_steps
from jaxkv.training.optim import make_optimizer, make_schedule
from jaxkv.training.sharding import batch_sharding, make_mesh
from jaxkv.training.state import init_state
from jaxkv.training.step import make_train_step

__all__ = ["mamba_loss", "train_mamba"]


def mamba_loss(params: dict, batch: dict, *, config: mamba2.Mamba2Config, segment_len: int, compute_dtype
               ) -> tuple[jax.Array, jax.Array]:
    """``(sum of token NLL, number of targets)`` over rows ``[b, T]`` (T a multiple of
    ``segment_len``), segment by segment with the state carried and the gradient truncated."""
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
    b, t = tokens.shape
    if t % segment_len:
        raise ValueError(f"the row length ({t}) must be a multiple of segment_len ({segment_len})")
    n = t // segment_len
    nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    valid = (positions >= 0) & (jnp.pad(positions[:, 1:], ((0, 0), (0, 1)), constant_values=-1) >= 0) \
        & (segments == jnp.pad(segments[:, 1:], ((0, 0), (0, 1)), constant_values=-1))
    if "loss_mask" in batch:  # (tokens, loss_mask) documents: only the marked targets count
        valid &= jnp.pad(batch["loss_mask"][:, 1:], ((0, 0), (0, 1)), constant_values=False)
    per_seg = lambda x: jnp.moveaxis(x.reshape(b, n, segment_len), 1, 0)  # noqa: E731  [n, b, L]

    def one(carry, xs):
        state, total = carry
        tok, pos, tgt, ok = xs
        logits, state = mamba2.forward(params, tok, pos, state, config=config, compute_dtype=compute_dtype)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
        return (jax.lax.stop_gradient(state), total + jnp.sum(jnp.where(ok, nll, 0.0))), None

    state0 = mamba2.init_state(config, batch=b, dtype=compute_dtype)
    (_, total), _ = jax.lax.scan(jax.checkpoint(one), (state0, jnp.float32(0)),
                                 (per_seg(tokens), per_seg(positions), per_seg(nxt), per_seg(valid)))
    return total, jnp.sum(valid).astype(jnp.float32)


def train_mamba(model_config: mamba2.Mamba2Config, documents: Sequence[Sequence[int]], *, segment_len: int,
                optim: OptimConfig, data: DataConfig, train: TrainConfig, out: str | Path | None = None,
                params: dict | None = None, callbacks: Sequence[Callable[[int, dict], None]] = (),
                extra_meta: dict | None = None, tokenizer=None) -> TrainResult:
    """Train a Mamba-2 on ``documents`` in rows of ``data.seq_len`` tokens (a multiple of
    ``segment_len``: the segments a row's state passes through). Resumes from ``out`` as
    ``train_lm`` does and writes the final weights as an HF folder ``out/hf`` (with ``tokenizer``,
    a ``tokenizers.Tokenizer``, beside them when given: ``jaxkv generate --model out/hf`` then runs)."""
    if data.seq_len % segment_len:
        raise ValueError(f"seq_len ({data.seq_len}) must be a multiple of segment_len ({segment_len})")
    if len(train.mesh) > 3 and train.mesh[3] > 1:
        raise TrainConfigError("train mamba: the context axis (tokens split over devices) is for language-model "
                               "training; give mesh as data,fsdp,tensor")
    mesh = make_mesh(*train.mesh)
    optim = run_schedule(optim, out)
    tx, schedule = make_optimizer(optim), make_schedule(optim)
    compute_dtype = jnp.bfloat16 if train.compute_dtype == "bfloat16" else jnp.float32
    batches = Batches(pack_documents(documents, data), batch_size=train.batch_size, grad_accum=train.grad_accum,
                      seed=train.seed)

    def make_state():
        p = params if params is not None else mamba2.init_params(model_config, jax.random.key(train.seed))
        return init_state(p, tx, train.seed)

    meta = None
    if out is not None:
        meta = {"model": model_config.to_hf(), "segment_len": segment_len, **run_meta(optim, data, train, documents),
                **(extra_meta or {})}
    state, start, run, shardings = open_run(make_state, tx=tx, mesh=mesh, out=out, meta=meta, train=train)
    if start >= train.steps:  # nothing to train (hf/ written if it is not yet)
        if needs_export(out, start):
            export_final(out, model_config, state, step=start, tokenizer=tokenizer)
        return TrainResult(state=state, history=[], out=Path(out), step=start)
    bsharding = batch_sharding(mesh)

    def loss(p, mb):
        return mamba_loss(p, mb, config=model_config, segment_len=segment_len, compute_dtype=compute_dtype)

    step_fn = jax.jit(make_train_step(model_config, tx, schedule, compute_dtype=compute_dtype, loss=loss),
                      in_shardings=(shardings, bsharding), out_shardings=(shardings, None), donate_argnums=0)
    state, history = run_steps(step_fn, state, start=start, batches=batches, bsharding=bsharding, mesh=mesh,
                               train=train, run=run, out=out, tokens_per_row=data.seq_len, callbacks=callbacks)
    if out is not None:
        export_final(out, model_config, state, step=train.steps, tokenizer=tokenizer)
    return TrainResult(state=state, history=history, out=Path(out) if out is not None else None, step=train.steps)
