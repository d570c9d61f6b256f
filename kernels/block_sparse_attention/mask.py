"""The mask of block-sparse attention: what a query may see, token by token and block by block.

A mask is a ``MaskSpec`` (static: causal, sliding window, attention sinks, anchor) applied to
runtime inputs, never a dense ``[T, S]`` array: query positions ``[B, T]``, key positions
``[B, S]`` (-1: a padding query, an empty key slot), optional segment ids ``[B, T]`` / ``[B, S]``
(documents of a packed row) and an optional ``block_mask [B, Hm, T / mask_block, S /
mask_block]`` from a selection step (Hm = 1, K or N heads). Query ``i`` sees key ``j`` iff

  1. the query is real and the key slot filled:   ``qp_i >= 0`` and ``kp_j >= 0``
  2. causal (``causal``):                         ``kp_j <= qp_i``
  3. window (``window``), sinks (``sinks``):      ``qp_i - kp_j < window`` or ``kp_j < sinks``
     (sliding window with ``sinks = 0``; StreamingLLM's Lambda shape with ``sinks > 0``)
  4. documents (segment ids given):               ``qs_i == ks_j``, or, with ``anchor``, ``j == 0``
     (every document also sees the row's first key, the shared anchor of AnchorAttention)
  5. selection (``block_mask`` given):            ``block_mask[h, i // mask_block, j // mask_block]``

``visible`` is rules 1-4 on tiles (the reference and the kernels' partial blocks share it).
``block_plan`` compiles the rules to blocks of ``block_q x block_k`` (the splash-attention idea):
each block is *empty* (no pair visible: never read), *full* (every pair visible: no mask) or
*partial* (masked element by element), decided from per-block minima and maxima of the positions
and segment ids, so a plan costs ``O(T/bq * S/bk)`` and is built under jit at run time (segment
ids are data). Per (row, mask head, query block) the plan lists the full key blocks, then the
partial ones, each ascending; the transposed lists (per key block, its query blocks) serve the
backward pass. A block classified partial may turn out empty (the bounds are conservative); one
classified full or empty is exactly that.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
__all__ = ["MaskSpec", "BlockPlan", "visible", "block_plan", "kernel_segments", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = 0, 1, 2
_BIG = 2 ** 30


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskSpec:
    """The static part of a mask (rules 2-4 above); hashable, so it can be a jit static argument."""

    causal: bool = True
    window: int | None = None  # rule 3: keys within the last ``window`` positions (None: no limit)
    sinks: int = 0             # rule 3: with a window, keys at positions below ``sinks`` stay visible
    anchor: bool = False       # rule 4: the row's first key is visible to every document

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise ValueError(f"MaskSpec.causal must be a bool, got {self.causal!r}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise ValueError(f"MaskSpec.window must be None or a positive int, got {self.window!r}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"MaskSpec.sinks must be a non-negative int, got {self.sinks!r}")
        if self.sinks and self.window is None:
            raise ValueError(f"MaskSpec.sinks ({self.sinks}) needs a window: without one every key is visible")
        if not isinstance(self.anchor, bool):
            raise ValueError(f"MaskSpec.anchor must be a bool, got {self.anchor!r}")


def visible(spec: MaskSpec, qp: Array, kp: Array, qs: Array | None = None, ks: Array | None = None,
            k_index: Array | None = None) -> Array:
    """Rules 1-4 for every (query, key) pair of ``qp [..., T, 1]`` and ``kp [..., 1, S]`` (and the
    segment ids, broadcast alike; ``k_index [..., 1, S]`` the keys' indices, needed for the anchor):
    a boolean ``[..., T, S]``."""
    ok = (qp >= 0) & (kp >= 0)
    if spec.causal:
        ok &= kp <= qp
    if spec.window is not None:
        near = qp - kp < spec.window
        ok &= (near | (kp < spec.sinks)) if spec.sinks else near
    if qs is not None:
        same = qs == ks
        ok &= (same | (k_index == 0)) if spec.anchor else same
    return ok


@struct.dataclass
class BlockPlan:
    """``block_plan``'s output. ``kv_blocks [B, Hm, nq, nk]``: per query block its key blocks, the
    ``n_full [B, Hm, nq]`` full ones first, then ``n_partial`` partial ones (the rest: padding,
    never read); ``q_blocks [B, Hm, nk, nq]`` with ``nq_full``, ``nq_partial`` the same per key
    block; ``states [B, Hm, nq, nk]`` int8 (``EMPTY``, ``PARTIAL``, ``FULL``)."""

    kv_blocks: Array
    n_full: Array
    n_partial: Array
    q_blocks: Array
    nq_full: Array
    nq_partial: Array
    states: Array
    block_q: int = struct.field(pytree_node=False)
    block_k: int = struct.field(pytree_node=False)

    @property
    def density(self) -> Array:
        """Share of the (query block, key block) pairs read, per row and mask head ``[B, Hm]``."""
        return jnp.mean((self.states != EMPTY).astype(jnp.float32), axis=(2, 3))


def _bounds(x: Array, real: Array, block: int):
    """Per block of ``block`` along the last axis: (min, max) of ``x`` over ``real`` entries,
    whether any and whether all are real."""
    b, n = x.shape
    xb, rb = x.reshape(b, n // block, block), real.reshape(b, n // block, block)
    lo = jnp.min(jnp.where(rb, xb, _BIG), axis=-1)
    hi = jnp.max(jnp.where(rb, xb, -_BIG), axis=-1)
    return lo, hi, jnp.any(rb, axis=-1), jnp.all(rb, axis=-1)


def _order(states: Array):
    """Per last-axis row: indices of FULL entries, then PARTIAL, each ascending; their counts."""
    n = states.shape[-1]
    j = jnp.arange(n, dtype=jnp.int32)
    key = jnp.where(states == FULL, j, jnp.where(states == PARTIAL, n + j, 2 * n + j))
    order = jnp.argsort(key, axis=-1).astype(jnp.int32)
    return order, jnp.sum(states == FULL, -1).astype(jnp.int32), jnp.sum(states == PARTIAL, -1).astype(jnp.int32)


def block_plan(spec: MaskSpec, q_positions: Array, k_positions: Array, *, block_q: int, block_k: int,
               q_segments: Array | None = None, k_segments: Array | None = None, block_mask: Array | None = None,
               mask_block: int | None = None) -> BlockPlan:
    """Classify every ``block_q x block_k`` block (see the module docstring). ``T`` and ``S``
    must be multiples of the blocks; ``block_mask``'s cells (``mask_block`` tokens a side) must be
    whole multiples of both blocks."""
    b, t = q_positions.shape
    s = k_positions.shape[1]
    if t % block_q or s % block_k:
        raise ValueError(f"the query length ({t}) and key length ({s}) must be multiples of block_q ({block_q}) "
                         f"and block_k ({block_k})")
    qlo, qhi, qany, qall = _bounds(q_positions, q_positions >= 0, block_q)
    klo, khi, kany, kall = _bounds(k_positions, k_positions >= 0, block_k)
    qlo, qhi, qany, qall = (x[:, :, None] for x in (qlo, qhi, qany, qall))
    klo, khi, kany, kall = (x[:, None, :] for x in (klo, khi, kany, kall))
    maybe = qany & kany
    full = qall & kall
    if spec.causal:
        maybe &= klo <= qhi
        full &= khi <= qlo
    if spec.window is not None:
        near_some, near_all = qlo - khi < spec.window, qhi - klo < spec.window
        if spec.sinks:
            near_some |= klo < spec.sinks
            near_all |= khi < spec.sinks
        maybe &= near_some
        full &= near_all
    if q_segments is not None:
        a_lo, a_hi, _, _ = _bounds(q_segments, q_positions >= 0, block_q)
        c_lo, c_hi, _, _ = _bounds(k_segments, k_positions >= 0, block_k)
        a_lo, a_hi, c_lo, c_hi = a_lo[:, :, None], a_hi[:, :, None], c_lo[:, None, :], c_hi[:, None, :]
        overlap = (a_lo <= c_hi) & (c_lo <= a_hi)
        if spec.anchor:  # key block 0 holds the anchor
            overlap |= (jnp.arange(s // block_k) == 0)[None, None, :]
        maybe &= overlap
        full &= (a_lo == a_hi) & (c_lo == c_hi) & (a_lo == c_lo)
    states = jnp.where(full, FULL, jnp.where(maybe, PARTIAL, EMPTY)).astype(jnp.int8)[:, None]  # [B, 1, nq, nk]
    if block_mask is not None:
        if mask_block is None or mask_block % block_q or mask_block % block_k:
            raise ValueError(f"mask_block ({mask_block}) must be a multiple of block_q ({block_q}) and "
                             f"block_k ({block_k})")
        cells = jnp.repeat(jnp.repeat(block_mask, mask_block // block_q, axis=2), mask_block // block_k, axis=3)
        cells = cells[:, :, :t // block_q, :s // block_k]
        states = jnp.where(cells, states, EMPTY).astype(jnp.int8)
    kv_blocks, n_full, n_partial = _order(states)
    q_blocks, nq_full, nq_partial = _order(jnp.swapaxes(states, 2, 3))
    return BlockPlan(kv_blocks=kv_blocks, n_full=n_full, n_partial=n_partial, q_blocks=q_blocks, nq_full=nq_full,
                     nq_partial=nq_partial, states=states, block_q=block_q, block_k=block_k)


def kernel_segments(spec: MaskSpec, q_positions: Array, k_positions: Array, q_segments: Array | None,
                    k_segments: Array | None) -> tuple[MaskSpec, Array, Array]:
    """What the kernels take: int32 segment rows (zeros without documents, so every key is in
    the query's document) and ``spec`` without the anchor when there are no documents (it opens
    the first key to other documents; with one document it adds nothing)."""
    if q_segments is None:
        zeros = lambda p: jnp.zeros(p.shape, jnp.int32)  # noqa: E731
        return dataclasses.replace(spec, anchor=False), zeros(q_positions), zeros(k_positions)
    return spec, q_segments.astype(jnp.int32), k_segments.astype(jnp.int32)
