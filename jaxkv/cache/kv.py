"""The KV cache pytrees.

``KVCache`` is one layer's slots: keys and values head-major ``[B, K, S, H]`` (keys after RoPE)
and the absolute position of each slot per head, ``[B, K, S]`` int32, -1 for an empty slot.
Per-head positions let a policy keep different tokens in different heads while masks and RoPE
stay exact. ``ModelCache`` holds one state per layer (a tuple, so layers may differ: another
block type, such as a Mamba-2 block's conv and SSM state, is another state type in the tuple),
the per-layer policies and their traced parameters, and whether the prompt is in.

Shapes never change after ``init``: writes scatter into fixed slots, so jit never recompiles.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxkv.typing import Array

__all__ = ["KVCache", "ModelCache", "tree_nbytes"]


def tree_nbytes(tree: Any) -> int:
    """Bytes held by the array leaves of a pytree (shape x itemsize; works on abstract arrays)."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@struct.dataclass
class KVCache:
    """One layer's KV slots. ``k, v: [B, K, S, H]``; ``positions: [B, K, S]`` (-1 = empty)."""

    k: Array
    v: Array
    positions: Array

    @classmethod
    def empty(cls, *, batch: int, num_kv_heads: int, slots: int, head_dim: int, dtype) -> "KVCache":
        shape = (batch, num_kv_heads, slots, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            positions=jnp.full(shape[:3], -1, jnp.int32),
        )

    @property
    def num_slots(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self)

    def slot_or_drop(self, slots: Array, keep: Array | bool = True) -> Array:
        """``slots`` where ``keep`` holds and the slot exists, else the index ``write`` drops."""
        s = self.num_slots
        return jnp.where(keep & (slots >= 0) & (slots < s), slots, s)

    def poison(self, rows: Array) -> "KVCache":
        """NaN values in the rows ``rows [B]`` (bool): a row that lost a token says so in every
        later output instead of a wrong number."""
        return self.replace(v=jnp.where(rows[:, None, None, None], jnp.nan, self.v).astype(self.v.dtype))

    def write(self, k: Array, v: Array, positions: Array, slots: Array) -> "KVCache":
        """Scatter new tokens ``k, v: [B, T, K, H]`` with ``positions [B, T]`` into ``slots [B, T]``.

        A slot index ``>= num_slots`` drops the token (used for padding and evicted tokens).
        Slots must be distinct within a row: XLA leaves the winner of a duplicate undefined.
        """
        b = jnp.arange(k.shape[0])[:, None]
        pos = jnp.broadcast_to(positions[:, :, None], positions.shape + (k.shape[2],))
        return KVCache(
            k=self.k.at[b, :, slots].set(k.astype(self.k.dtype), mode="drop"),
            v=self.v.at[b, :, slots].set(v.astype(self.v.dtype), mode="drop"),
            positions=self.positions.at[b, :, slots].set(pos.astype(jnp.int32), mode="drop"),
        )


@struct.dataclass
class ModelCache:
    """The whole model's cache: one state per layer (a tuple, so layers may differ).

    ``layers``    per-layer states (traced);
    ``params``    per-layer traced parameters of the policy (``CachePolicy.layer_params``;
                  None where a layer has none), not counted in ``nbytes``;
    ``policies``  per-layer policies (static);
    ``method``    the model-level policy that made them (its ``after_prefill`` hook runs after
                  the prompt), or None when per-layer policies were given directly;
    ``max_len``   the positions ``0 .. max_len - 1`` it was made for (static): the model's forward
                  gives NaN logits for a row at a position past them, whatever the policy;
    ``prefilled`` False until the first forward (static: the prompt's pass traces other code).
                  The phase of a forward follows from it and the chunk length (``Phase``): a
                  static record of the last phase would make the first decode step and the
                  next differ and recompile, so only this bit is kept.
    """

    layers: tuple
    params: tuple
    policies: tuple = struct.field(pytree_node=False)
    method: Any = struct.field(pytree_node=False, default=None)
    prefilled: bool = struct.field(pytree_node=False, default=False)
    max_len: int | None = struct.field(pytree_node=False, default=None)  # the positions it was made for

    @property
    def nbytes(self) -> int:
        """Bytes held by every array of every layer (what the device actually keeps)."""
        return sum(p.nbytes(layer) for p, layer in zip(self.policies, self.layers))

    @property
    def params_nbytes(self) -> int:
        """Bytes of the policies' traced parameters (calibration artifacts), kept beside the cache."""
        return tree_nbytes(self.params)
