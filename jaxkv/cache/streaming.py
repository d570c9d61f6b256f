"""``streaming``: attention sinks + a recent window (StreamingLLM).

Keeps the first ``sinks`` tokens and the most recent ``window`` tokens in
``sinks + window`` slots: sinks at slots ``0..sinks-1``, the window as a ring buffer after them.

Deviation from StreamingLLM: keys keep the RoPE of their absolute positions (the cache contract)
instead of being re-rotated to their position inside the cache, which only matters beyond the
model's trained context.
Contract: dropping tokens that leave the window is the method; a cache made for ``max_len``
tokens shorter than ``sinks + window`` holds positions ``0..max_len-1`` only, and a later
position is not stored (size the cache for the prompt plus the tokens to generate, as
``generate`` does). An extend chunk of T > 1 tokens is written whole before attending, so a
query early in the chunk may see fewer than ``window`` recent tokens; a chunk longer than
``window`` is refused.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxkv.cache.kv import KVCache
from jaxkv.cache.policy import CachePolicy, register_policy
from jaxkv.errors import UserError

__all__ = ["StreamingCache"]


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamingCache(CachePolicy):
    name = "streaming"
    sinks: int = 4
    window: int = 1024

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or self.sinks < 0:
            raise UserError(f"streaming: sinks must be an integer >= 0, got {self.sinks!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise UserError(f"streaming: window must be an integer >= 1, got {self.window!r}")

    def capacity(self, max_len: int) -> int:
        return min(self.sinks + self.window, max_len)

    @classmethod
    def from_budget(cls, budget: float, context_len: int, **named) -> "StreamingCache":
        sinks = named.get("sinks", cls.sinks)
        return cls(**{"window": max(1, int(round(budget * context_len)) - sinks), **named})

    def _slots(self, state: KVCache, positions, keep):
        s = state.num_slots
        ring = self.sinks + (positions - self.sinks) % max(s - self.sinks, 1)
        slot = jnp.where(positions < self.sinks, positions, ring)
        slot = jnp.where(s >= self.sinks + self.window, slot, positions)  # capacity == max_len
        return state.slot_or_drop(slot, keep & (positions >= 0))

    def prefill(self, state, *, q, k, v, positions, layer, params=None):
        # keep the sinks and the last `window` tokens of each row
        last = jnp.max(positions, axis=1, keepdims=True)
        keep = (positions < self.sinks) | (positions > last - self.window)
        return state.write(k, v, positions, self._slots(state, positions, keep))

    def append(self, state, *, q, k, v, positions, phase, layer, params=None):
        if k.shape[1] > self.window:
            raise UserError(
                f"streaming: a {phase.value} chunk of {k.shape[1]} tokens exceeds window={self.window}"
            )
        state = state.write(k, v, positions, self._slots(state, positions, True))
        return self.attend(state, q, positions, layer), state
