"""CSKV's training: the low-rank K/V factors fitted by a layer-wise reconstruction loss, the base
model frozen (``jaxkv train cskv``).

Loss, per valid token and summed over layers: the mean squared error of the rebuilt keys and
values against the model's own, ``||x (down up) - x W^T||^2 / (K H)`` for K and for V, where
``x`` is the layer's attention input from the frozen model. The paper measures the key error
after RoPE; RoPE rotates each channel pair, which preserves distances, so the error before it
is the same number (and cheaper). Biases cancel. Only the factors train (fp32 masters, AdamW
with the spine's schedule and clipping); the frozen weights enter the jitted step as an
argument, not as constants or checkpointed state. The run folder is the spine's (locked,
resumed exactly, ``metrics.jsonl``/``metrics.png``); the result is ``OUT/factors.safetensors``,
a calibration file ``cskv[calibration=OUT/factors.safetensors]`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkv.training.config import DataConfig, OptimConfig, TrainConfig, TrainConfigError
from jaxkv.training.data import Batches, pack_documents
from jaxkv.training.loop import TrainResult, open_run, run_meta, run_schedule, run_steps
from jaxkv.training.metrics import plot_metrics
from jaxkv.training.optim import make_optimizer, make_schedule
from jaxkv.training.sharding import batch_sharding, make_mesh, param_specs
from jaxkv.training.state import init_state
from jaxkv.training.step import make_train_step

__all__ = ["reconstruction_loss", "train_cskv", "FACTORS_FILE"]

FACTORS_FILE = "factors.safetensors"
_NAMES = ("k_down", "k_up", "v_down", "v_up")


def reconstruction_loss(factors: dict, frozen: dict, batch: dict, *, config, compute_dtype) -> tuple[jax.Array, jax.Array]:
    """``(sum over valid tokens of the summed per-layer K and V MSE, valid tokens)``;
    ``factors["layers"][i]`` holds layer ``i``'s ``k_down, k_up, v_down, v_up``."""
    from jaxkv.models.llama import attention_inputs

    tokens, positions = batch["tokens"], batch["positions"]
    xs = attention_inputs(frozen, tokens, positions, config=config, segment_ids=batch["segment_ids"],
                          compute_dtype=compute_dtype)
    valid = (positions >= 0).astype(jnp.float32)
    total = jnp.float32(0)
    width = config.num_kv_heads * config.head_dim
    for i, x in enumerate(xs):
        x = jax.lax.stop_gradient(x).astype(jnp.float32)
        f, attn = factors["layers"][i], frozen["layers"][i]["attn"]
        for name in ("k", "v"):
            target = x @ attn[name]["kernel"].astype(jnp.float32).T
            rebuilt = (x @ f[f"{name}_down"]) @ f[f"{name}_up"]
            err = jnp.sum((rebuilt - target) ** 2, axis=-1) / width
            total = total + jnp.sum(err * valid)
    return total, jnp.sum(valid)


def train_cskv(config, params: dict, documents: Sequence, *, key_density: float, value_density: float,
               optim: OptimConfig, data: DataConfig, train: TrainConfig, out: str | Path,
               calibration: str | None = None, extra_meta: dict | None = None) -> TrainResult:
    """Fit ``cskv``'s factors at the given densities to the frozen model ``params`` on
    ``documents``, starting from ASVD (with a ``jaxkv calibrate cskv`` file) or SVD; writes the
    run folder ``out`` and ``out/factors.safetensors``."""
    from jaxkv.cache.cskv import CALIBRATION_METHOD, CSKVCache
    from jaxkv.calibration import model_fingerprint, save_calibration

    start_policy = CSKVCache(key_density=key_density, value_density=value_density, calibration=calibration)
    init = start_policy.prepare(params, config).factors
    if len(train.mesh) > 3 and train.mesh[3] > 1:
        raise TrainConfigError("train cskv: the context axis (tokens split over devices) is for language-model "
                               "training; give mesh as data,fsdp,tensor")
    mesh = make_mesh(*train.mesh)
    optim = run_schedule(optim, out)
    tx, schedule = make_optimizer(optim), make_schedule(optim)
    compute_dtype = jnp.bfloat16 if train.compute_dtype == "bfloat16" else jnp.float32
    batches = Batches(pack_documents(documents, data), batch_size=train.batch_size, grad_accum=train.grad_accum,
                      seed=train.seed)
    start_factors = {"layers": [{k: jnp.asarray(layer[k]) for k in _NAMES} for layer in init.layers]}

    def make_state():
        return init_state(start_factors, tx, train.seed)

    fingerprint = model_fingerprint(config, params)
    meta = {"recipe": "cskv", "model_fingerprint": fingerprint, "key_density": key_density,
            "value_density": value_density, "start": init.source,
            **run_meta(optim, data, train, documents), **(extra_meta or {})}
    state, start, run, shardings = open_run(make_state, tx=tx, mesh=mesh, out=out, meta=meta, train=train)
    history = []
    if start < train.steps:
        frozen_sharding = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, mesh),
                                       is_leaf=lambda x: isinstance(x, P))
        frozen = jax.device_put(params, frozen_sharding)
        bsharding = batch_sharding(mesh)
        loss = lambda f, mb, p: reconstruction_loss(f, p, mb, config=config, compute_dtype=compute_dtype)  # noqa: E731
        step = jax.jit(make_train_step(config, tx, schedule, compute_dtype=compute_dtype, loss=loss),
                       in_shardings=(shardings, bsharding, frozen_sharding), out_shardings=(shardings, None),
                       donate_argnums=0)
        state, history = run_steps(lambda s, b: step(s, b, frozen), state, start=start, batches=batches,
                                   bsharding=bsharding, mesh=mesh, train=train, run=run, out=out,
                                   tokens_per_row=data.seq_len)
    if jax.process_index() == 0:
        if history:
            plot_metrics(Path(out) / "metrics.jsonl", Path(out) / "metrics.png")
        layers = jax.device_get(state.params)["layers"]
        tensors = {f"layer{i}.{k}": np.asarray(layer[k], np.float32) for i, layer in enumerate(layers) for k in _NAMES}
        save_calibration(Path(out) / FACTORS_FILE, method=CALIBRATION_METHOD, tensors=tensors,
                         settings={"key_density": key_density, "value_density": value_density,
                                   "steps": max(start, train.steps), "trained": True},
                         fingerprint=fingerprint)
    return TrainResult(state=state, history=history, out=Path(out), step=max(start, train.steps))

