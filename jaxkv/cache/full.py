"""``full``: keep every token. The reference every other policy is tested against.

Slot ``s`` holds the token at position ``s``; padding (position -1) is dropped. A full cache
cannot lose a token quietly: a prompt chunk longer than its slots is refused at trace time, and
a position at or beyond ``max_len`` (known only at run time, under jit) turns that row's
attention output, and so its logits, into NaN instead of a wrong number.

``decode_kernel="pallas_gpu"`` (or ``"pallas_tpu"``, ``"reference"``) sends decode steps through
``jaxkv.kernels.sparse_decode.dense_decode`` (every block of the head-major cache), or, in
low-bit storage (``full+mikv``), through ``jaxkv.kernels.quantized_decode``, which reads the
packed codes; prefill, extend chunks and sliding-window layers keep the jnp attention.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxkv.cache.kv import KVCache
from jaxkv.cache.policy import (CachePolicy, Phase, check_decode_kernel, kernel_block, kernel_options,
                                register_policy)
from jaxkv.errors import UserError

__all__ = ["FullCache"]


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class FullCache(CachePolicy):
    name = "full"
    decode_kernel: str | None = None  # pallas_gpu | pallas_tpu | reference: decode steps through the kernel dispatch
    kernel_interpret: bool = False    # run that kernel in Pallas interpret mode (a CPU check; slow)

    def __post_init__(self):
        super().__post_init__()
        check_decode_kernel(self.name, self.decode_kernel, self.kernel_interpret)

    def capacity(self, max_len: int) -> int:
        return max_len

    @classmethod
    def from_budget(cls, budget: float, context_len: int, **named) -> "FullCache":
        return cls(**named)  # keeps everything whatever the budget

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
        if self.decode_kernel is not None and phase is Phase.DECODE and layer.sliding_window is None:
            out = self._kernel_decode(state, q, positions)
        else:
            out = self.attend(state, q, positions, layer)
        lost = self._overflow(state, positions).reshape((-1,) + (1,) * (out.ndim - 1))
        return jnp.where(lost, jnp.nan, out).astype(out.dtype), state

    def _kernel_decode(self, state: KVCache, q, positions):
        """One new token per row over slots ``0..position`` (slot = position; a row whose position
        is -1 sees nothing and gets 0) through the kernel dispatch; ``q [B, 1, K, G, H]``."""
        from jaxkv.kernels.sparse_decode import dense_decode

        slots = state.num_slots
        block = kernel_block(self.name, self.decode_kernel, slots)
        options = kernel_options(self.decode_kernel, self.kernel_interpret)
        if self.quantized:  # packed codes, read as they are stored
            from jaxkv.kernels.quantized_decode import quantized_decode

            if self.decode_kernel in ("pallas_gpu", "pallas_tpu"):
                options["block_size"] = block
            seen = jnp.arange(slots)[None, None, :] <= positions[:, :1, None]  # [B, 1, S]: slots up to the token
            qk, qv = state.qk, state.qv
            out, _ = quantized_decode(q[:, 0], qk.codes, qk.scale[..., 0], qk.zero[..., 0], qv.codes,
                                      qv.scale[..., 0], qv.zero[..., 0], jnp.where(seen, state.positions, -1),
                                      bits=qk.bits, implementation=self.decode_kernel, **options)
            return out[:, None].astype(jnp.dtype(state.dtype))
        out, _ = dense_decode(q[:, 0], state.k, state.v, jnp.maximum(positions[:, 0] + 1, 0), block_size=block,
                              implementation=self.decode_kernel, **options)
        return out[:, None]
