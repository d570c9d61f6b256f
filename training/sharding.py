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

__all__ = ["parse_mesh", "make_mesh", "param_specs", "state_shardings", "batch_sharding", "initialize_distributed",
           "OVERLAP_XLA_FLAGS", "enable_collective_overlap"]

AXES = ("data", "fsdp", "tensor", "context")
# attention's inputs under these meshes: rows over data and fsdp, heads over tensor, tokens over context
ATTENTION_SHARDING = AttentionSharding(batch_axes=("data", "fsdp"), head_axis="tensor", sequence_axis="context")


# XLA's flags that overlap the collectives of a sharded step with its compute on GPUs, named in
# one place (``enable_collective_overlap``). The layer stack is unrolled, so the latency-hiding
# scheduler is what moves each layer's weight all-gather (FSDP) ahead of the compute that needs
# it and each gradient's reduce-scatter under the backward of the layers below; the pipelined
# forms act on loops (a scanned stack, a microbatch loop); the combine thresholds batch small
# collectives into large ones. Each name is checked by XLA's flag parser in the tests (an
# unknown flag stops XLA), on any backend.
OVERLAP_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
)


def enable_collective_overlap(environ=None) -> bool:
    """Add ``OVERLAP_XLA_FLAGS`` to ``XLA_FLAGS`` in ``environ`` (``os.environ`` by default),
    keeping any of those flags the user already set, before jax starts its backends (XLA reads
    the variable once, then). True if the flags are in effect for this process; False with a
    warning if a backend already started, since the flags would then be ignored."""
    import warnings

    environ = os.environ if environ is None else environ
    set_by_user = {f.split("=")[0] for f in environ.get("XLA_FLAGS", "").split()}
    extra = [f for f in OVERLAP_XLA_FLAGS if f.split("=")[0] not in set_by_user]
    if extra:
        from jax._src import xla_bridge

        if environ is os.environ and xla_bridge.backends_are_initialized():
            warnings.warn("collective overlap: jax's backends already started, so XLA_FLAGS is not read again; "
                          "the overlap flags are not in effect", stacklevel=2)
            return False
        environ["XLA_FLAGS"] = " ".join([environ.get("XLA_FLAGS", "")] + extra).strip()
    return True


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
