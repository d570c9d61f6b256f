"""Meshes with named axes (data, fsdp, tensor, context) and partition rules for the Llama parameters.

XLA SPMD is the distributed engine: parameters and batches carry ``NamedSharding``s and jit
inserts the collectives. The same code runs on one device (a 1x1x1 mesh) or many, on one host
or several (``jax.distributed.initialize`` first; see ``initialize_distributed``).

Rules (matrices are ``[out, in]``; ``fsdp`` shards the model dimension D of every matrix,
``tensor`` the heads / FFN / vocabulary dimension): q/k/v, gate/up, lm_head and the embedding
``[*, D] -> (tensor, fsdp)``; o, down ``[D, *] -> (fsdp, tensor)``; norms and biases
replicated. An axis that does not divide its dimension is dropped (replicated) for that array.
Batches shard their rows over ``(data, fsdp)`` and their tokens over ``context`` (context
parallelism: parameters are replicated over it, every token-wise layer runs on its share of the
row, and attention gathers the row's keys and values: ``attention.attend_sequence_sharded``).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxkv.attention import AttentionSharding
from jaxkv.training.config import TrainConfigError
from jaxkv.errors import UserError

__all__ = ["parse_mesh", "make_mesh", "param_specs", "state_shardings", "batch_sharding", "initialize_distributed"]

AXES = ("data", "fsdp", "tensor", "context")
# attention's inputs under these meshes: rows over data and fsdp, heads over tensor, tokens over context
ATTENTION_SHARDING = AttentionSharding(batch_axes=("data", "fsdp"), head_axis="tensor", sequence_axis="context")


def parse_mesh(text: str) -> tuple[int, ...]:
    """``'DATA,FSDP,TENSOR[,CONTEXT]'`` -> three or four positive device counts (``--mesh`` of
    the CLI; context, the ways a row's tokens are split, defaults to 1)."""
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise UserError(f"--mesh must be three or four positive integers data,fsdp,tensor[,context]; got {text!r}")
    return shape


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, context: int = 1, devices=None) -> Mesh:
    """A mesh over the first ``data * fsdp * tensor * context`` devices (all of them by default)."""
    devices = jax.devices() if devices is None else devices
    n = data * fsdp * tensor * context
    if n > len(devices):
        raise TrainConfigError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} x context={context} needs {n} "
                               f"devices, but {len(devices)} are available")
    return Mesh(np.asarray(devices[:n]).reshape(data, fsdp, tensor, context), AXES)


def _rule(path: tuple, ndim: int) -> P:
    names = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
    parent = names[-2] if len(names) > 1 else None
    if ndim < 2:
        return P()
    if parent in ("o", "down"):
        return P("fsdp", "tensor")
    return P("tensor", "fsdp")


def _fit(spec: P, shape, mesh: Mesh) -> P:
    """Drop mesh axes that do not divide the dimension they shard."""
    out = []
    for axis, dim in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
        out.append(axis if axis is None or dim % mesh.shape[axis] == 0 else None)
    return P(*out)


def param_specs(params, mesh: Mesh):
    return jax.tree_util.tree_map_with_path(lambda p, x: _fit(_rule(p, x.ndim), x.shape, mesh), params)


def state_shardings(abstract_state, tx: optax.GradientTransformation, mesh: Mesh):
    """NamedShardings for a TrainState: optimizer moments follow their parameters."""
    pspecs = param_specs(abstract_state.params, mesh)
    opt_specs = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, pspecs,
                                      transform_non_params=lambda _: P(),
                                      is_leaf=lambda x: isinstance(x, P))
    specs = abstract_state.replace(step=P(), params=pspecs, opt_state=opt_specs, rng=P())
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are ``[accum, rows, T]``: rows split over data and fsdp, tokens over context."""
    return NamedSharding(mesh, P(None, ("data", "fsdp"), "context"))


def initialize_distributed() -> None:
    """Join a multi-process run when the standard environment says so.

    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (or a TPU slice /
    SLURM environment that jax detects by itself) make every process call
    ``jax.distributed.initialize``; on CPU the collectives use gloo.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # must not touch a backend before initialize(): decide from the environment alone
        if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
