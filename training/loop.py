"""The language-model training loop: shard, (resume), step, log, checkpoint, plot.

``train_lm`` is what ``jaxkv train lm`` runs. The train step is jitted once with the state's
shardings and donated buffers; each step's batch is a pure function of the step number, so a
run resumed from a checkpoint logs the same losses as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxkv.checkpoints import save_checkpoint
from jaxkv.config import LlamaConfig
from jaxkv.fileio import read_json_object, write_text_atomic
from jaxkv.models.llama import init_params
from jaxkv.training.checkpoint import RunDir
from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig
from jaxkv.training.data import Batches, data_fingerprint, pack_documents
from jaxkv.training.metrics import MetricsLog, Progress, plot_metrics
from jaxkv.training.optim import make_optimizer, make_schedule
from jaxkv.training.sharding import batch_sharding, make_mesh, state_shardings
from jaxkv.training.state import TrainState, init_state
from jaxkv.training.step import make_train_step

__all__ = ["TrainingDiverged", "TrainResult", "train_lm", "run_meta", "run_schedule", "open_run", "run_steps",
           "export_final", "needs_export"]

EXPORT_FILE = "export.json"  # the step whose weights hf/ holds, written once hf/ is complete


class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    """The final state, the logged rows and the step reached (a run folder already at or past
    ``train.steps`` returns its latest checkpoint and trains nothing)."""

    state: TrainState
    history: list[dict]
    out: Path | None
    step: int = 0


def _global_batch(batch: dict, sharding) -> dict:
    """Host arrays -> global jax.Arrays (each process passes the same full batch)."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}


def run_meta(optim: OptimConfig, data: DataConfig, train: TrainConfig, documents) -> dict:
    """The settings a run folder records and a resumed run must match (``steps`` may grow)."""
    meta = {"optim": dataclasses.asdict(optim), "data": dataclasses.asdict(data), "train": dataclasses.asdict(train)}
    meta["train"]["mesh"] = list(train.mesh)
    meta["steps"] = meta["train"].pop("steps")
    meta["train"].pop("remat")  # memory against compute, the same math: a run may resume with another
    if optim.schedule == "constant":  # only cosine and wsd are laid over the run's length
        meta["optim"].pop("total_steps")
    meta["data_fingerprint"] = data_fingerprint(documents)
    return meta


def run_schedule(optim: OptimConfig, out) -> OptimConfig:
    """The optimizer settings a run resumes with. Cosine and wsd schedules are laid over
    ``total_steps``, so a resumed run keeps the length its folder recorded (a longer ``--steps``
    trains on at the schedule's final learning rate, with a warning) rather than re-stretching
    the schedule under steps already taken."""
    if out is None or optim.schedule == "constant" or not (Path(out) / "run.json").is_file():
        return optim
    try:
        recorded = read_json_object(Path(out) / "run.json", ValueError).get("optim", {}).get("total_steps")
    except ValueError:  # RunDir names what is wrong with the folder
        return optim
    if not isinstance(recorded, int) or recorded == optim.total_steps:
        return optim
    import warnings

    warnings.warn(f"{out} holds a run whose {optim.schedule} learning-rate schedule spans {recorded} steps; it "
                  f"keeps that schedule (asked for {optim.total_steps}): steps past {recorded} train at its final "
                  "learning rate", stacklevel=3)
    return dataclasses.replace(optim, total_steps=recorded)


def open_run(make_state, *, tx, mesh, out, meta: dict | None, train: TrainConfig):
    """``(state, start, run, shardings)``: the state sharded over ``mesh``, restored from the
    latest checkpoint of the run folder ``out`` (locked, its ``meta`` checked) or made fresh
    by ``make_state``. A run already at ``train.steps`` comes back closed, nothing to train."""
    abstract = jax.eval_shape(make_state)
    shardings = state_shardings(abstract, tx, mesh)
    run, start, state = None, 0, None
    if out is not None:
        run = RunDir(out, meta, keep=train.keep, may_change=("steps",))
        latest = run.latest_step()
        if latest is not None:
            abstract_sharded = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
            state = run.restore(latest, abstract_sharded)
            start = latest
    if start == 0:
        state = jax.jit(make_state, out_shardings=shardings)()
    if start >= train.steps:
        # run.json keeps the steps it records
        run.close()
        return state, start, run, shardings
    if run is not None:
        run.write_meta()
    return state, start, run, shardings


def export_final(out, config, state, *, step: int, tokenizer=None) -> None:
    """Process 0 writes ``metrics.png`` and the weights of ``state`` as an HF folder ``out/hf``,
    then records ``step`` in ``out/export.json``: a run stopped before that point exports again
    when it is run once more (``needs_export``)."""
    if jax.process_index() != 0:
        return
    out = Path(out)
    if (out / "metrics.jsonl").exists():
        plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    save_checkpoint(out / "hf", config, jax.device_get(state.params), tokenizer=tokenizer, overwrite=True)
    write_text_atomic(out / EXPORT_FILE, json.dumps({"step": int(step)}) + "\n")


def needs_export(out, step: int) -> bool:
    """True when ``out/hf`` does not hold the weights of checkpoint ``step``: missing, or
    recorded at another step (a run from before the record, with ``hf/`` in place, counts as
    exported)."""
    out = Path(out)
    if not (out / "hf" / "config.json").exists():
        return True
    if not (out / EXPORT_FILE).exists():
        return False
    return read_json_object(out / EXPORT_FILE, ValueError).get("step") != step


@jax.jit
def _finite(params) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def _all_finite(params) -> bool:
    return bool(jax.device_get(_finite(params)))


def run_steps(step_fn, state, *, start: int, batches: Batches, bsharding, mesh, train: TrainConfig,
              run: RunDir | None, out, tokens_per_row: int, callbacks=()) -> tuple[TrainState, list[dict]]:
    """Steps ``start .. train.steps`` of ``step_fn(state, batch) -> (state, metrics)``: logging
    (``metrics.jsonl``, progress), the divergence check, checkpoints every ``save_every`` and
    at the end, callbacks; the run folder is closed whatever happens. Shared by every recipe."""
    log = MetricsLog(Path(out) / "metrics.jsonl", resume_step=start) if out is not None else None
    progress = Progress(train.steps, start, enabled=jax.process_index() == 0)
    history: list[dict] = []
    try:
        t_last = time.perf_counter()
        for step in range(start, train.steps):
            batch = _global_batch(batches.get(step), bsharding)
            with jax.set_mesh(mesh):  # layers that name mesh axes (cuDNN attention) see them
                state, metrics = step_fn(state, batch)
            done = step + 1
            logged = done % train.log_every == 0 or done == train.steps
            if logged or (run is not None and done % train.save_every == 0):  # never checkpoint a diverged state
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                    raise TrainingDiverged(
                        f"step {done}: loss is {m['loss']} and gradient norm {m['grad_norm']}; "
                        "stopping (lower --lr, check the data, or use float32)")
            if logged:
                now = time.perf_counter()
                elapsed, t_last = now - t_last, now
                steps_since = train.log_every if done % train.log_every == 0 else done % train.log_every
                row = {"step": done, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                       "tokens": m["tokens"],
                       "tokens_per_s": steps_since * train.batch_size * tokens_per_row / max(elapsed, 1e-9)}
                history.append(row)
                if log is not None and jax.process_index() == 0:
                    log.write(row)
                progress.update(done, row["loss"], row["tokens_per_s"])
            else:
                row = {"step": done}
            if run is not None and (done % train.save_every == 0 or done == train.steps):
                if not _all_finite(state.params):  # the loss and gradient norm are from before the update
                    raise TrainingDiverged(f"step {done}: the update left non-finite weights; not saved "
                                           "(lower --lr, check the data, or use float32)")
                run.save(done, state)
            for cb in callbacks:
                cb(done, row)
    finally:
        progress.close()
        if log is not None:
            log.close()
        if run is not None:
            run.close()
    return state, history


def train_lm(
    model_config: LlamaConfig,
    documents: Sequence[Sequence[int]],
    *,
    optim: OptimConfig,
    data: DataConfig,
    train: TrainConfig,
    out: str | Path | None = None,
    params: dict | None = None,
    callbacks: Sequence[Callable[[int, dict], None]] = (),
    extra_meta: dict | None = None,
    tokenizer=None,
) -> TrainResult:
    """Train ``model_config`` on ``documents`` (lists of token ids).

    ``params`` starts from given weights (e.g. a loaded checkpoint) instead of a random init.
    With ``out``, checkpoints every ``train.save_every`` steps and resumes from the latest one;
    writes ``metrics.jsonl``, ``metrics.png`` and, at the end, the final weights as an HF
    checkpoint in ``out/hf`` (with ``tokenizer`` when given), ready for ``jaxkv generate``.
    ``callbacks(step, metrics)`` run after each step's logging and checkpointing.
    """
    train.check_seq_len(data.seq_len)
    mesh = make_mesh(*train.mesh)
    optim = run_schedule(optim, out)
    tx = make_optimizer(optim)
    schedule = make_schedule(optim)
    compute_dtype = jnp.bfloat16 if train.compute_dtype == "bfloat16" else jnp.float32
    batches = Batches(pack_documents(documents, data, anchor_id=model_config.bos_token_id), batch_size=train.batch_size,
                      grad_accum=train.grad_accum, seed=train.seed)

    def make_state():
        p = params if params is not None else init_params(model_config, jax.random.key(train.seed))
        return init_state(p, tx, train.seed)

    meta = None
    if out is not None:
        meta = {"model": model_config.to_hf(), **run_meta(optim, data, train, documents), **(extra_meta or {})}
    state, start, run, shardings = open_run(make_state, tx=tx, mesh=mesh, out=out, meta=meta, train=train)
    if start >= train.steps:  # already trained this far: nothing to train (hf/ written if it is not yet)
        if needs_export(out, start):
            export_final(out, model_config, state, step=start, tokenizer=tokenizer)
        return TrainResult(state=state, history=[], out=Path(out), step=start)
    bsharding = batch_sharding(mesh)

    remat = None if train.remat == "none" else train.remat
    step_fn = jax.jit(make_train_step(model_config, tx, schedule, compute_dtype=compute_dtype, attention=data.attention,
                                      remat=remat),
                      in_shardings=(shardings, bsharding), out_shardings=(shardings, None),
                      donate_argnums=0)
    state, history = run_steps(step_fn, state, start=start, batches=batches, bsharding=bsharding, mesh=mesh,
                               train=train, run=run, out=out, tokens_per_row=data.seq_len, callbacks=callbacks)
    if out is not None:
        export_final(out, model_config, state, step=train.steps, tokenizer=tokenizer)
    return TrainResult(state=state, history=history, out=Path(out) if out is not None else None,
                       step=train.steps)

