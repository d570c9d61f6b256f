"""``TrainState``: everything a step reads and writes, as one pytree (checkpointed whole)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

__all__ = ["TrainState", "init_state"]


@struct.dataclass
class TrainState:
    """``step`` (int32 scalar), fp32 master ``params``, ``opt_state``, ``rng`` (raw uint32 key
    data, so checkpoints hold plain arrays)."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def init_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))
