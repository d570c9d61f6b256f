"""``full``: keep every token. The reference every other policy is tested against.

Slot ``s`` holds the token at position ``s``; padding (position -1) is dropped. A full cache
cannot lose a token quietly: a prompt chunk longer than its slots is refused at trace time, and
a position at or beyond ``max_len`` (known only at run time, under jit) turns that row's
attention output, and so its logits, into NaN instead of a wrong number.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxkv.cache.kv import KVCache
from jaxkv.cache.policy import CachePolicy, register_policy
from jaxkv.errors import UserError

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
    def _check_fits(state: KVCache, t: int) -> None:
        if t > state.num_slots:
            raise UserError(f"full: a chunk of {t} tokens does not fit a cache of {state.num_slots} slots; "
                            "make the cache at least as long as the prompt plus the tokens to generate "
                            "(init_cache(max_len=...))")

    @staticmethod
    def _overflow(state: KVCache, positions):
        """[B] rows holding a position the cache has no slot for."""
        return jnp.any(positions >= state.num_slots, axis=1)

    def prefill(self, state, *, q, k, v, positions, layer, params=None):
        self._check_fits(state, k.shape[1])
        state = state.write(k, v, positions, state.slot_or_drop(positions))  # slot = position
        return state.poison(self._overflow(state, positions))  # a row that lost a token says so

    def append(self, state, *, q, k, v, positions, phase, layer, params=None):
        self._check_fits(state, k.shape[1])
        state = state.write(k, v, positions, state.slot_or_drop(positions))
        out = self.attend(state, q, positions, layer)
        lost = self._overflow(state, positions).reshape((-1,) + (1,) * (out.ndim - 1))
        return jnp.where(lost, jnp.nan, out).astype(out.dtype), state
