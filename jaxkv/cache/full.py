"""``full``: keep every token. The reference every other policy is tested against.

Slot ``s`` holds the token at position ``s``; padding (position -1) is dropped.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxkv.cache.kv import KVCache
from jaxkv.cache.policy import CachePolicy, register_policy

__all__ = ["FullCache"]


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class FullCache(CachePolicy):
    name = "full"

    def capacity(self, max_len: int) -> int:
        return max_len

    @classmethod
    def from_budget(cls, budget: float, context_len: int) -> "FullCache":
        return cls()  # keeps everything whatever the budget

    @staticmethod
    def _slots(state: KVCache, positions):
        # position == slot; padding and out-of-range positions go to an index that is dropped.
        ok = (positions >= 0) & (positions < state.num_slots)
        return jnp.where(ok, positions, state.num_slots)

    def prefill(self, state, *, q, k, v, positions):
        return state.write(k, v, positions, self._slots(state, positions))

    def decode(self, state, *, q, k, v, positions, window=None):
        state = state.write(k, v, positions, self._slots(state, positions))
        return self.attend(state, q, positions, window), state
