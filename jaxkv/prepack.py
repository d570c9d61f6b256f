"""Prepacking: prefill a batch of prompts of different lengths as packed rows, not padded ones.

A padded batch of prompts spends its prefill on padding: 64 prompts padded to the longest hold
``64 x longest`` tokens, most of them padding when lengths spread as MMLU's do. Prepacking
bin-packs the prompts into rows of a fixed capacity, concatenates each row's prompts with
**positions restarting at 0 per prompt** and a block-diagonal causal mask (segment ids: the
block-sparse kernel on a GPU, never a dense mask there), runs one forward over the rows, and
unpacks each prompt's K/V into its own decode slot of the cache. The decode loop that follows
is ``jaxkv.generate``'s, unchanged.

Conventions:
  prompts    lists of token ids; prompt ``p`` has ``n_p`` tokens.
  rows       ``tokens, positions, segment_ids [R, C]``; padding has position -1 and segment -1.
  layout     ``PackedLayout``: for each prompt ``p`` and its token ``j``, the flat index
             ``row * C + col`` of that token in the rows (``gather [P, Tp]``; ``Tp`` the padded
             prompt bucket); ``positions [P, Tp]`` = ``j`` or -1 (what the cache stores, as an
             unpacked prefill would).

Inside the model (``forward(..., packing=layout)``), every layer projects Q/K/V on the packed
rows, attends within segments, then hands the policy each prompt's own Q/K/V (and layer input)
gathered into ``[P, Tp]``: a compressing policy compresses each prompt as if it had been
prefilled alone. A policy with its own prompt attention (LServe's Λ-shaped streaming heads) runs
it on the unpacked prompts and the result is packed back.

Packing: ``binpacking.to_constant_volume`` (heaviest first, each prompt into the least-loaded
row it fits) or an exact integer program (``method="exact"``,
scipy's HiGHS MILP with a time limit, starting from the greedy answer).

Deviations from the paper (one line each):
- capacity defaults to the padded bucket of the longest prompt, not the longest prompt itself:
  rows are padded to that bucket for compile reuse anyway, so filling it is free.
- the exact program uses scipy's MILP solver (HiGHS, already a jax dependency), not OR-Tools.
- ``hold_out_last=False`` (the default) reads each prompt's first logits from the packed pass at
  its last token; the paper holds the last token out as the first decode input
  (``hold_out_last=True`` does that). Both give the unpacked run's KV and tokens for ``full``; for
  a compressing policy the default compresses the whole prompt, exactly as ``generate`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxkv.errors import UserError
from jaxkv.typing import Array

__all__ = ["Packing", "PackedLayout", "pack_lengths", "pack_prompts", "prepacked_prefill", "PACK_METHODS"]

PACK_METHODS = ("greedy", "exact")


def bucket_rows(n: int) -> int:
    """Rows are padded to 1, 2, 4, then a multiple of 4 (fewer compiles, little padding)."""
    return 1 << max(0, n - 1).bit_length() if n <= 4 else -(-n // 4) * 4


def pack_lengths(lengths: Sequence[int], capacity: int, *, method: str = "greedy",
                 time_limit: float = 10.0) -> list[list[int]]:
    """Bins of item indices whose lengths sum to at most ``capacity`` each (every length must
    fit). ``method``: ``'greedy'`` (``binpacking``, decreasing order) or ``'exact'`` (an integer
    program over at most the greedy answer's bins, solved for up to ``time_limit`` seconds; the
    greedy bins are kept when the solver finds nothing better in time). Bins are returned
    fullest first; items inside a bin in index order."""
    lengths = [int(n) for n in lengths]
    if method not in PACK_METHODS:
        raise UserError(f"method must be one of {PACK_METHODS}, got {method!r}")
    if not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise UserError(f"capacity must be a positive integer, got {capacity!r}")
    if any(n < 0 for n in lengths):
        raise UserError("lengths must be >= 0")
    if max(lengths, default=0) > capacity:
        raise UserError(f"capacity={capacity} is below the longest item ({max(lengths)} tokens)")
    if not lengths:
        return []
    import binpacking

    # binpacking 2.x: items heaviest first, each into the least-loaded bin where it fits
    weighted = [(i, n) for i, n in enumerate(lengths) if n > 0]
    bins = [sorted(i for i, _ in b) for b in binpacking.to_constant_volume(weighted, capacity, weight_pos=1) if b]
    empty = [i for i, n in enumerate(lengths) if n == 0]  # a 0-token item takes no room: any bin
    if method == "exact" and len(bins) > 1:
        bins = _exact_bins([lengths[i] for b in bins for i in b], [i for b in bins for i in b], capacity,
                           len(bins), time_limit) or bins
    if empty:
        bins = bins or [[]]
        bins[-1] = sorted(bins[-1] + empty)
    return sorted(bins, key=lambda b: (-sum(lengths[i] for i in b), b))


def _exact_bins(sizes, ids, capacity, upper, time_limit):
    """Minimum-bin packing as a MILP: x[i, b] item i in bin b, y[b] bin used; None unless the
    solver returns a solution with fewer bins than ``upper``."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    n, m = len(sizes), upper - 1  # ask for fewer bins than the greedy answer
    if m < 1 or math.ceil(sum(sizes) / capacity) > m:
        return None  # the greedy answer meets the volume bound: it is optimal
    nv = n * m + m  # x row-major, then y
    rows = lil_matrix((n + m + max(0, m - 1), nv))
    lo, hi = [], []
    for i in range(n):  # each item in exactly one bin
        rows[i, i * m:(i + 1) * m] = 1
        lo.append(1), hi.append(1)
    for b in range(m):  # a bin holds at most its capacity, and only if used
        for i in range(n):
            rows[n + b, i * m + b] = sizes[i]
        rows[n + b, n * m + b] = -capacity
        lo.append(-np.inf), hi.append(0)
    for b in range(m - 1):  # bins used in order (breaks the symmetry between bins)
        rows[n + m + b, n * m + b] = -1
        rows[n + m + b, n * m + b + 1] = 1
        lo.append(-np.inf), hi.append(0)
    cost = np.concatenate([np.zeros(n * m), np.ones(m)])
    res = milp(cost, constraints=LinearConstraint(rows.tocsr(), lo, hi), integrality=np.ones(nv),
               bounds=Bounds(0, 1), options={"time_limit": float(time_limit), "disp": False})
    if res.x is None:
        return None
    x = np.round(res.x[: n * m]).reshape(n, m)
    bins = [sorted(ids[i] for i in range(n) if x[i, b] > 0.5) for b in range(m)]
    return [b for b in bins if b]


@struct.dataclass
class PackedLayout:
    """Where each prompt's tokens sit in the packed rows (traced arrays; see the module doc).

    ``segment_ids [R, C]``; ``gather [P, Tp]`` flat row indices (0 on padding); ``positions
    [P, Tp]`` (-1 on padding); ``last [P]`` the flat index of each prompt's last packed token."""

    segment_ids: Array
    gather: Array
    positions: Array
    last: Array

    def unpack(self, x: Array) -> Array:
        """``[R, C, ...]`` -> ``[P, Tp, ...]`` (padding holds some real token's values)."""
        return x.reshape(-1, *x.shape[2:])[self.gather]

    def pack(self, y: Array) -> Array:
        """``[P, Tp, ...]`` -> ``[R, C, ...]`` (zeros on the rows' padding)."""
        r, c = self.segment_ids.shape
        where = jnp.where(self.positions >= 0, self.gather, r * c)  # padding writes nowhere
        flat = jnp.zeros((r * c, *y.shape[2:]), y.dtype).at[where].set(y, mode="drop")
        return flat.reshape(r, c, *y.shape[2:])

    def last_hidden(self, x: Array) -> Array:
        """``[R, C, D]`` -> ``[P, 1, D]``: each prompt's last packed token."""
        return x.reshape(-1, x.shape[-1])[self.last][:, None]


@dataclasses.dataclass(frozen=True)
class Packing:
    """A batch of prompts packed into rows (host arrays): ``tokens, positions, segment_ids [R, C]``,
    ``layout`` (device-ready ``PackedLayout``), ``bins`` (prompt indices per row), ``lengths [P]``
    (each prompt's whole length) and ``packed_lengths`` (what the rows hold of it)."""

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    layout: PackedLayout
    bins: tuple[tuple[int, ...], ...]
    lengths: np.ndarray
    packed_lengths: np.ndarray
    capacity: int
    hold_out_last: bool
    pack_seconds: float

    @property
    def fill(self) -> float:
        """Share of the rows' slots holding prompt tokens (1 - padding)."""
        return float(self.packed_lengths.sum()) / max(1, self.tokens.size)


def pack_prompts(prompts: Sequence[Sequence[int]], *, capacity: int | None = None, method: str = "greedy",
                 time_limit: float = 10.0, hold_out_last: bool = False) -> Packing:
    """Pack token lists into rows (see the module doc). ``capacity`` (row length) defaults to the
    padded bucket of the longest prompt; ``hold_out_last`` leaves each prompt's last token out
    of the rows (the paper's first decode input)."""
    from jaxkv.generate import bucket_length

    prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("prompts must be a non-empty list of non-empty token lists")
    t0 = time.perf_counter()
    lengths = np.array([len(p) for p in prompts], np.int32)
    packed = lengths - 1 if hold_out_last else lengths.copy()
    longest = int(packed.max())
    if capacity is None:
        capacity = bucket_length(max(1, longest))
    elif not isinstance(capacity, (int, np.integer)) or capacity < max(1, longest):
        raise UserError(f"capacity must be an integer of at least the longest packed prompt ({longest} tokens), "
                        f"got {capacity!r}")
    bins = pack_lengths(packed.tolist(), int(capacity), method=method, time_limit=time_limit) or [[]]
    r, c = bucket_rows(len(bins)), int(capacity)
    tp = bucket_length(int(lengths.max()))  # the unpacked prompt bucket, as generate pads
    tokens = np.zeros((r, c), np.int32)
    positions = np.full((r, c), -1, np.int32)
    segments = np.full((r, c), -1, np.int32)
    gather = np.zeros((len(prompts), tp), np.int32)
    last = np.zeros((len(prompts),), np.int32)
    for row, b in enumerate(bins):
        col = 0
        for p in b:
            n = int(packed[p])
            tokens[row, col:col + n] = prompts[p][:n]
            positions[row, col:col + n] = np.arange(n)
            segments[row, col:col + n] = p
            gather[p, :n] = row * c + col + np.arange(n)
            last[p] = row * c + col + max(n - 1, 0)
            col += n
    steps = np.arange(tp, dtype=np.int32)
    unpacked = np.where(steps[None] < packed[:, None], steps[None], -1).astype(np.int32)
    layout = PackedLayout(segment_ids=segments, gather=gather, positions=unpacked, last=last)
    return Packing(tokens=tokens, positions=positions, segment_ids=segments, layout=layout,
                   bins=tuple(tuple(b) for b in bins), lengths=lengths, packed_lengths=packed,
                   capacity=c, hold_out_last=bool(hold_out_last), pack_seconds=time.perf_counter() - t0)


@functools.partial(jax.jit, static_argnames=("config", "tree", "hold_out_last"), donate_argnames=("big",))
def _packed_prefill(params, tokens, positions, layout, last_tokens, lengths, big, small, *, config, tree,
                    hold_out_last):
    from jaxkv.generate import join_donated
    from jaxkv.models.llama import forward

    logits, cache = forward(params, tokens, positions, join_donated(big, small, tree), config=config,
                            packing=layout)
    if hold_out_last:  # the held-out token is the first decode input: its logits come from there
        logits, cache = forward(params, last_tokens[:, None], (lengths - 1)[:, None], cache, config=config)
    return logits[:, 0], cache


def prepacked_prefill(params, packing: Packing, prompts: Sequence[Sequence[int]], cache, *, config):
    """Prefill ``cache`` (batch = number of prompts, from ``init_cache``) from ``packing``'s rows;
    returns ``(logits [P, V] of each prompt's next token, cache)`` ready for
    ``jaxkv.generate.decode`` with ``lengths=packing.lengths``. Jitted; the cache's large
    buffers are donated (do not reuse ``cache``)."""
    from jaxkv.generate import split_donated

    n = len(packing.lengths)
    if len(prompts) != n or [len(p) for p in prompts] != packing.lengths.tolist():
        raise UserError("prompts must be the token lists the packing was made from (same count and lengths)")
    flat, gather = packing.tokens.reshape(-1), np.asarray(packing.layout.gather)
    for i, (p, m) in enumerate(zip(prompts, packing.packed_lengths.tolist())):
        if not np.array_equal(flat[gather[i, :m]], np.asarray(p[:m], np.int32)):
            raise UserError(f"prompts[{i}] is not the token list the packing was made from (same length, "
                            "other tokens)")
    from jaxkv.cache import KVCache

    slots = jax.tree.leaves(cache.layers, is_leaf=lambda x: isinstance(x, KVCache))
    rows = {int(x.positions.shape[0]) for x in slots if isinstance(x, KVCache)}  # KV slot arrays [B, K, S]
    if rows - {n}:
        raise UserError(f"cache must hold one row per prompt ({n}); it holds {sorted(rows)}")
    last_tokens = np.array([p[-1] for p in prompts], np.int32)
    big, small, tree = split_donated(cache)
    return _packed_prefill(params, packing.tokens, packing.positions, packing.layout, last_tokens,
                           packing.lengths, big, small, config=config, tree=tree, hold_out_last=packing.hold_out_last)
