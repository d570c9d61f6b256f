"""Attention masks from positions and segment ids, and the reference attention.

Shapes (see ``jaxkv.typing``): queries ``[B, T, K, G, H]``; keys and values head-major
``[B, K, S, H]``; query positions ``[B, T]``; key positions ``[B, K, S]`` (per head, so a
cache may evict different tokens in different heads) or ``[B, S]``.

Masking is by absolute position, never by slot index: a key is visible to a query iff

  1. the key slot is filled (``k_pos >= 0``) and the query is real (``q_pos >= 0``);
  2. causal: ``k_pos <= q_pos``;
  3. window (Mistral): ``q_pos - k_pos < window``;
  4. packed rows: the segment ids are equal, or, with ``anchor`` (AnchorAttention), the key is
     the row's first slot: one shared anchor token every document sees.

A query that sees no key (padding) gets a uniform average instead of NaN; its output is
garbage by design and callers ignore it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp

from jaxkv.typing import Array
from jaxkv.errors import UserError

__all__ = ["visibility_mask", "attention_scores", "attention_weights", "attend_reference", "attend_with_lse", "merge_attention",
           "contiguous_layout", "contiguous_rows", "attend_sinks_window", "attend_dense", "same_sharding",
           "AttentionSharding", "attend_chunk", "attend_sequence_sharded"]

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def visibility_mask(
    q_positions: Array,
    k_positions: Array,
    *,
    window: int | None = None,
    q_segments: Array | None = None,
    k_segments: Array | None = None,
    anchor: bool = False,
) -> Array:
    """Boolean mask ``[B, K or 1, T, S]``: which key each query may attend to (rules above)."""
    if k_positions.ndim == 2:
        k_positions = k_positions[:, None, :]
    qp = q_positions[:, None, :, None]
    kp = k_positions[:, :, None, :]
    mask = (kp >= 0) & (qp >= 0) & (kp <= qp)
    if window is not None:
        mask &= qp - kp < window
    if (q_segments is None) != (k_segments is None):
        raise UserError("q_segments and k_segments must be given together")
    if anchor and q_segments is None:
        raise UserError("anchor needs segment ids: it opens the row's first key to every document")
    if q_segments is not None:
        same = q_segments[:, None, :, None] == k_segments[:, None, None, :]
        if anchor:
            same |= (jnp.arange(kp.shape[-1]) == 0)[None, None, None, :]
        mask &= same
    return mask


def attention_weights(q: Array, k: Array, q_positions: Array, k_positions: Array, *,
                      window: int | None = None, q_segments: Array | None = None,
                      k_segments: Array | None = None, scale: float | None = None,
                      k_bias: Array | None = None, anchor: bool = False) -> Array:
    """Softmax weights ``[B,K,G,T,S]`` (fp32) of ``q [B,T,K,G,H]`` over ``k [B,K,S,H]``, masked by
    the rules above. ``k_bias [B,K,S]`` is added to every query's score of a slot (a slot that
    stands for ``n`` tokens, such as a compensation token, carries ``log n``)."""
    s = attention_scores(q, k, q_positions, k_positions, window=window, q_segments=q_segments,
                         k_segments=k_segments, scale=scale, k_bias=k_bias, anchor=anchor)
    return jax.nn.softmax(s, axis=-1)  # 3. softmax in fp32


def attention_scores(q: Array, k: Array, q_positions: Array, k_positions: Array, *,
                     window: int | None = None, q_segments: Array | None = None,
                     k_segments: Array | None = None, scale: float | None = None,
                     k_bias: Array | None = None, anchor: bool = False) -> Array:
    """The scaled scores ``[B,K,G,T,S]`` (fp32) before the softmax of ``attention_weights``, a
    masked pair holding a large negative number (what analyses of the logits read)."""
    if q.ndim != 5 or k.ndim != 4:
        raise UserError(f"expected q [B,T,K,G,H] and k [B,K,S,H]; got {q.shape}, {k.shape}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # 1. scores
    s = jnp.einsum("BTKGH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    if k_bias is not None:
        s = s + k_bias[:, :, None, None, :].astype(jnp.float32)
    # 2. mask by position (and segment)
    mask = visibility_mask(q_positions, k_positions, window=window,
                           q_segments=q_segments, k_segments=k_segments, anchor=anchor)
    return jnp.where(mask[:, :, None], s, _MASKED)


def attend_reference(
    q: Array,
    k: Array,
    v: Array,
    q_positions: Array,
    k_positions: Array,
    *,
    window: int | None = None,
    q_segments: Array | None = None,
    k_segments: Array | None = None,
    scale: float | None = None,
    k_bias: Array | None = None,
    anchor: bool = False,
) -> Array:
    """Softmax attention of ``q [B,T,K,G,H]`` over ``k, v [B,K,S,H]``; returns ``[B,T,K,G,H]``.

    Scores and softmax in fp32 (as transformers' eager attention); the weighted sum runs in
    the value dtype; ``k_bias`` as in ``attention_weights``.
    """
    _check_attend(q, k, v, q_positions, k_positions)
    p = attention_weights(q, k, q_positions, k_positions, window=window, q_segments=q_segments,
                          k_segments=k_segments, scale=scale, k_bias=k_bias, anchor=anchor).astype(v.dtype)
    return jnp.einsum("BKGTS,BKSH->BTKGH", p, v)


def attend_with_lse(q: Array, k: Array, v: Array, q_positions: Array, k_positions: Array, *,
                    window: int | None = None, visible: Array | None = None) -> tuple[Array, Array]:
    """``attend_reference`` that also returns the log-sum-exp of the scores, ``[B,K,G,T]`` fp32
    (``-inf`` where a query sees no key; its output is then 0), so that attention over disjoint
    key sets can be merged exactly (``merge_attention``). ``visible [B,K,S]`` masks slots out on
    top of the position rules."""
    _check_attend(q, k, v, q_positions, k_positions, value_dim_may_differ=True)  # CSKV's values are latents
    mask = visibility_mask(q_positions, k_positions, window=window)
    if visible is not None:
        mask &= visible[:, :, None, :]
    return _masked_lse(q, k, v, mask)


def _check_attend(q, k, v, q_positions, k_positions, *, value_dim_may_differ: bool = False) -> None:
    """``q [B,T,K,G,H]``, ``k, v [B,K,S,H]``, ``q_positions [B,T]``, ``k_positions [B,S]``,
    ``[B,1,S]`` or ``[B,K,S]``: positions that only broadcast would read every query (or key) at
    one place."""
    same = v.shape[:3] == k.shape[:3] if value_dim_may_differ else v.shape == k.shape
    if q.ndim != 5 or k.ndim != 4 or v.ndim != 4 or not same:
        raise UserError(f"expected q [B,T,K,G,H] and k, v [B,K,S,H]; got {q.shape}, {k.shape}, {v.shape}")
    b, t = q.shape[:2]
    if tuple(q_positions.shape) != (b, t):
        raise UserError(f"q_positions must be [B, T] = [{b}, {t}], got {list(q_positions.shape)}")
    if tuple(k_positions.shape) not in ((b, k.shape[2]), (b, 1, k.shape[2]), (b, k.shape[1], k.shape[2])):
        raise UserError(f"k_positions must be [B, S] = [{b}, {k.shape[2]}], [B, 1, S] or [B, K, S], got "
                        f"{list(k_positions.shape)}")


def merge_attention(parts: list[tuple[Array, Array]]) -> Array:
    """Merge attention outputs over disjoint key sets, ``[(out [B,T,K,G,H], lse [B,K,G,T]), ...]``,
    into the attention over their union: each part weighted by ``exp(lse_i - lse)``."""
    lses = jnp.stack([lse for _, lse in parts])  # [P, B, K, G, T]
    total = jax.nn.logsumexp(lses, axis=0)
    safe = jnp.where(jnp.isfinite(total), total, 0.0)
    out = 0.0
    for (o, lse) in parts:
        w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - safe), 0.0)  # [B, K, G, T]
        out = out + o.astype(jnp.float32) * w.transpose(0, 3, 1, 2)[..., None]
    return out.astype(parts[0][0].dtype)


DENSE_IMPLEMENTATIONS = ("reference", "cudnn", "pallas_gpu", "mosaic_gpu")


def _default_dense_implementation(dtype, packed: bool, head_dim: int) -> str:
    """cuDNN on a GPU for 16-bit inputs, except for packed rows (segment ids) on one device,
    which go to the block-sparse kernel: cuDNN would need the dense ``[B, 1, T, T]`` mask (6x
    slower forward + backward at 8k, BENCHMARKS.md). Under a mesh the kernel, which has no
    partitioning rule, is not the default."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        mesh = jax.sharding.get_abstract_mesh()
        one_device = mesh.empty or math.prod(mesh.axis_sizes) == 1
        if packed and head_dim >= 16 and not head_dim & (head_dim - 1) and one_device:
            return "pallas_gpu"
        return "cudnn"
    return "reference"


def attend_dense(
    q: Array,
    k: Array,
    v: Array,
    positions: Array,
    *,
    window: int | None = None,
    segment_ids: Array | None = None,
    implementation: str | None = None,
    sharding: AttentionSharding | None = None,
    anchor: bool = False,
) -> Array:
    """Self-attention of a chunk over itself: ``q [B,T,K,G,H]``, ``k, v [B,T,K,H]`` (token-major,
    as projected). The mask follows the module rules (positions, window, segments).

    ``implementation``: ``'reference'`` (plain jnp, any backend), ``'cudnn'`` (fused flash
    attention through ``jax.nn.dot_product_attention``; GPU, bf16/fp16), ``'pallas_gpu'`` (the
    block-sparse kernel, ``jaxkv.kernels.block_sparse_attention``: segment ids and windows from
    the positions, never a dense mask; forward and backward) or ``'mosaic_gpu'`` (the same mask
    through that kernel's Hopper forward, ``wgmma``, and its Triton backward). ``None`` picks the
    Triton kernel on a GPU for 16-bit packed rows on one device, cudnn for other 16-bit inputs on
    a GPU, and the reference otherwise; an explicit request that cannot run fails loudly. (A query that sees
    nothing, padding, gets 0 from the kernel and a uniform average from the others: garbage
    either way, ignored by callers.) ``sharding``: the mesh axes cuDNN's inputs are constrained
    to under a mesh (``same_sharding``); where its ``sequence_axis`` spans more than one device
    of the mesh in context, the row's tokens are split over it (``attend_sequence_sharded``).
    ``anchor`` (with ``segment_ids``): every document also
    sees the row's first token (AnchorAttention's shared anchor).
    """
    if anchor and segment_ids is None:
        raise UserError("anchor needs segment_ids: it opens the row's first key to every document")
    if implementation is not None and implementation not in DENSE_IMPLEMENTATIONS:
        raise UserError(f"implementation must be one of {DENSE_IMPLEMENTATIONS}, got {implementation!r}")
    if _sequence_shards(sharding) > 1:
        return attend_sequence_sharded(q, k, v, positions, window=window, segment_ids=segment_ids,
                                       implementation=implementation, sharding=sharding, anchor=anchor)
    impl = implementation or _default_dense_implementation(q.dtype, segment_ids is not None, q.shape[-1])
    chunk = functools.partial(attend_chunk, q, k, v, positions, positions, window=window, q_segments=segment_ids,
                              k_segments=segment_ids, anchor=anchor)
    if impl in ("pallas_gpu", "mosaic_gpu"):
        return chunk(implementation=impl)
    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise UserError("implementation='cudnn' needs a GPU backend")
        try:
            return _attend_dense_cudnn(q, k, v, positions, window, segment_ids, sharding, anchor)
        except Exception as e:  # shapes or dtypes cuDNN does not take: fall back, loudly
            if implementation == "cudnn":
                raise
            warnings.warn(f"cuDNN attention unavailable for q {q.shape} {q.dtype} ({e}); using the reference")
    return chunk(implementation="reference")


@dataclasses.dataclass(frozen=True)
class AttentionSharding:
    """The mesh axes attention's inputs are laid out over (the caller's names): rows over
    ``batch_axes``, heads over ``head_axis``, and tokens over ``sequence_axis`` (context
    parallelism: ``attend_dense`` then gathers the keys and values of the whole row, and each
    device attends its own queries; see ``attend_sequence_sharded``)."""

    batch_axes: tuple[str, ...] = ()
    head_axis: str | None = None
    sequence_axis: str | None = None


def same_sharding(q: Array, k: Array, v: Array, mask: Array, sharding: AttentionSharding | None = None
                  ) -> tuple[Array, Array, Array, Array]:
    """Under a mesh (``jax.set_mesh``), give ``q [B,T,N,H]``, ``k, v [B,T,K,H]`` and ``mask
    [B,1,T,S]`` one layout: batch over ``sharding.batch_axes``, heads over ``sharding.head_axis``
    when both head counts divide (axes the mesh lacks or of size 1 are skipped). cuDNN's
    partitioner refuses inputs sharded differently, which sharding propagation produces under
    FSDP (q and k/v come from differently shaped weights). Without a mesh in context, or without
    ``sharding``, the arrays pass through unchanged."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or sharding is None:
        return q, k, v, mask
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch = tuple(a for a in sharding.batch_axes if sizes.get(a, 1) > 1)
    n_batch = math.prod(sizes[a] for a in batch)
    batch_spec = batch if batch and q.shape[0] % n_batch == 0 else None
    tp = sizes.get(sharding.head_axis, 1) if sharding.head_axis else 1
    heads = sharding.head_axis if tp > 1 and q.shape[2] % tp == 0 and k.shape[2] % tp == 0 else None
    qkv = P(batch_spec, None, heads, None)
    q, k, v = (jax.lax.with_sharding_constraint(x, qkv) for x in (q, k, v))
    mask = jax.lax.with_sharding_constraint(mask, P(batch_spec, None, None, None))
    return q, k, v, mask


def _sequence_shards(sharding: AttentionSharding | None) -> int:
    """How many devices the tokens are split over under the mesh in context (1: none)."""
    if sharding is None or sharding.sequence_axis is None:
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(sharding.sequence_axis, 1)


def attend_chunk(q: Array, k: Array, v: Array, q_positions: Array, k_positions: Array, *,
                 window: int | None = None, q_segments: Array | None = None, k_segments: Array | None = None,
                 implementation: str = "reference", anchor: bool = False, **kernel_options) -> Array:
    """Attention of a chunk of queries ``q [B,T,K,G,H]`` over a longer run of keys ``k, v
    [B,S,K,H]`` (token-major), the mask from the positions and segment ids of each side (the
    module rules; ``anchor``: key 0 of ``k`` is the shared anchor). ``implementation``:
    ``'reference'``, ``'pallas_gpu'`` or ``'mosaic_gpu'`` (the block-sparse kernel's Triton or
    Hopper forward; ``kernel_options`` go to it, e.g. ``interpret``)."""
    if implementation in ("pallas_gpu", "mosaic_gpu"):
        from jaxkv.kernels.block_sparse_attention import MaskSpec, block_sparse_attention

        b, t, kh, g, h = q.shape
        out = block_sparse_attention(q.reshape(b, t, kh * g, h), k, v, q_positions, k_positions,
                                     mask=MaskSpec(window=window, anchor=anchor), q_segments=q_segments,
                                     k_segments=k_segments, implementation=implementation, **kernel_options)
        return out.reshape(b, t, kh, g, h)
    if implementation != "reference" or kernel_options:
        raise UserError(f"attend_chunk takes implementation 'reference', 'pallas_gpu' or 'mosaic_gpu' (kernel "
                        f"options only with a kernel); got {implementation!r} with {sorted(kernel_options)}")
    return attend_reference(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), q_positions, k_positions,
                            window=window, q_segments=q_segments, k_segments=k_segments, anchor=anchor)


def attend_sequence_sharded(q: Array, k: Array, v: Array, positions: Array, *, sharding: AttentionSharding,
                            window: int | None = None, segment_ids: Array | None = None,
                            implementation: str | None = None, anchor: bool = False, **kernel_options) -> Array:
    """``attend_dense`` with the row's tokens split over ``sharding.sequence_axis`` of the mesh in
    context (context parallelism), as a ``shard_map`` over every mesh axis: each device
    all-gathers the keys, values, positions and segment ids of its rows along the sequence axis
    and attends its own ``T / n`` queries over them (``attend_chunk``); the gradient of the
    gather is a reduce-scatter of the keys' and values' gradients. Rows go over
    ``sharding.batch_axes`` and KV heads over ``sharding.head_axis`` where they divide. The
    mask is the positions' and segments', so every packing mode (documents, restarted
    positions, the shared anchor: key 0 of the gathered row) is the unsharded one.
    ``implementation``: ``'reference'``, ``'pallas_gpu'``, or None (the kernel on a GPU for
    16-bit inputs with power-of-two head dims, else the reference); cuDNN, whose causal mask
    assumes aligned queries and keys, is not used here."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    seq = sharding.sequence_axis
    b, t, kh, _, h = q.shape
    if t % sizes[seq]:
        raise UserError(f"the sequence axis {seq!r} splits tokens {sizes[seq]} ways: the row's {t} tokens must "
                        "be a multiple of that")
    if implementation is None:
        kernel_ok = (jax.default_backend() == "gpu" and jnp.dtype(q.dtype) in (jnp.bfloat16, jnp.float16)
                     and h >= 16 and not h & (h - 1))
        implementation = "pallas_gpu" if kernel_ok else "reference"
    if implementation not in ("reference", "pallas_gpu"):
        raise UserError(f"sequence-sharded attention takes implementation 'reference' or 'pallas_gpu', "
                        f"got {implementation!r}")
    batch = tuple(a for a in sharding.batch_axes if sizes.get(a, 1) > 1)
    batch_spec = batch if batch and b % math.prod(sizes[a] for a in batch) == 0 else None
    tp = sizes.get(sharding.head_axis, 1) if sharding.head_axis else 1
    heads = sharding.head_axis if tp > 1 and kh % tp == 0 else None
    qspec, kvspec, tspec = P(batch_spec, seq, heads, None, None), P(batch_spec, seq, heads, None), P(batch_spec, seq)
    gather = functools.partial(jax.lax.all_gather, axis_name=seq, axis=1, tiled=True)

    def local(q, k, v, pos, *seg):
        segs = {} if not seg else {"q_segments": seg[0], "k_segments": gather(seg[0])}
        return attend_chunk(q, gather(k), gather(v), pos, gather(pos), window=window, implementation=implementation,
                            anchor=anchor, **segs, **kernel_options)

    args = (q, k, v, positions) + (() if segment_ids is None else (segment_ids,))
    specs = (qspec, kvspec, kvspec, tspec) + (() if segment_ids is None else (tspec,))
    # check_vma off: a Pallas kernel's outputs carry no record of the mesh axes they vary over
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qspec, check_vma=False)(*args)


def contiguous_rows(positions: Array) -> Array:
    """``[B]`` bool: the rows of ``positions [B, T]`` that are a run ``p0, p0+1, ...`` followed
    only by padding (-1), the layout ``generate.pad_prompts`` makes. On it, masking by position
    equals masking by index (causal, window), which fused and blocked kernels rely on."""
    t = positions.shape[1]
    idx = jnp.arange(t, dtype=positions.dtype)[None, :]
    valid = positions >= 0
    n = jnp.sum(valid, axis=1, keepdims=True)
    prefix = valid == (idx < n)
    run = jnp.where(valid, positions - idx == positions[:, :1], True)
    return jnp.all(prefix & run, axis=1)


def contiguous_layout(positions: Array) -> Array:
    """Scalar bool: every row of ``positions [B, T]`` is contiguous (``contiguous_rows``)."""
    return jnp.all(contiguous_rows(positions))


def _attend_dense_cudnn(q, k, v, positions, window, segment_ids, sharding, anchor=False):
    b, t, kh, g, h = q.shape
    q2 = q.reshape(b, t, kh * g, h)

    def masked(q2, k, v):
        # explicit [B, 1, T, T] mask: any layout, packed segments
        mask = visibility_mask(positions, positions, window=window, q_segments=segment_ids, k_segments=segment_ids,
                               anchor=anchor)
        # A query that sees nothing (padding) attends to itself: a fully masked row may come back
        # as NaN from a fused kernel, and NaN in a padding row's values would reach real rows
        # (0 * NaN) in the next layer. In self-attention a real query always sees itself (same
        # position and segment), so the rows that see nothing are exactly the padding queries.
        pad_rows = (positions < 0)[:, None, :, None]
        mask = mask | (pad_rows & jnp.eye(t, dtype=bool))
        q2, k, v, mask = same_sharding(q2, k, v, mask, sharding)
        return jax.nn.dot_product_attention(q2, k, v, mask=mask, implementation="cudnn")

    if segment_ids is not None:
        return masked(q2, k, v).reshape(b, t, kh, g, h)

    def fused(q2, k, v):
        # contiguous right-padded rows: cuDNN's own causal (and sliding-window) mask and sequence
        # lengths, no [T, T] mask in memory (what lets a 128k prompt prefill)
        lengths = jnp.sum(positions >= 0, axis=1).astype(jnp.int32)
        out = jax.nn.dot_product_attention(
            q2, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            local_window_size=None if window is None else (window - 1, 0), implementation="cudnn")
        return jnp.where((positions >= 0)[:, :, None, None], out, jnp.zeros((), out.dtype))

    out = jax.lax.cond(contiguous_layout(positions), fused, masked, q2, k, v)
    return out.reshape(b, t, kh, g, h)


def attend_sinks_window(q: Array, k: Array, v: Array, positions: Array, *, sinks: int, window: int,
                        block: int | None = None, implementation: str | None = None) -> Array:
    """Causal self-attention of a chunk where each query sees only the keys at positions below
    ``sinks`` and its last ``window`` positions (StreamingLLM's Lambda mask): ``q [B,T,K,G,H]``,
    ``k, v [B,T,K,H]`` (token-major, as projected) -> ``[B,T,K,G,H]``.

    Blocked: queries in blocks of ``block`` (default ``window``) attend to the sink tokens and to
    their own and the previous key block, so memory is ``O(T * (sinks + 2 * block))``, not
    ``O(T^2)``. Exact on the layout ``contiguous_layout`` accepts; any other layout comes back
    as NaN in its row (loudly wrong, never silently), since a far key's index would not be in the blocks.

    ``implementation``: ``"reference"`` (this blocked jnp pass) or ``"pallas_gpu"`` (the
    block-sparse kernel with ``MaskSpec(window=window, sinks=sinks)``: exact on any layout, only
    the sink and local blocks read); None takes the kernel where ``attend_dense`` would (16-bit,
    one GPU).
    """
    if implementation not in (None, "reference", "pallas_gpu"):
        raise UserError(f"implementation must be reference or pallas_gpu, got {implementation!r}")
    b, t, kh, g, h = q.shape
    if (implementation or _default_dense_implementation(q.dtype, True, h)) == "pallas_gpu":
        from jaxkv.kernels.block_sparse_attention import MaskSpec, block_sparse_attention

        out = block_sparse_attention(q.reshape(b, t, kh * g, h), k, v, positions, positions,
                                     mask=MaskSpec(window=window, sinks=sinks), implementation="pallas_gpu")
        return out.reshape(b, t, kh, g, h)
    blk = int(window if block is None else block)
    if blk < window:
        raise UserError(f"attend_sinks_window: block ({blk}) must be at least window ({window})")
    nb = -(-t // blk)
    pad = nb * blk - t
    ns = min(sinks, t)
    qp = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    kpad = jnp.pad(positions, ((0, 0), (blk, pad)), constant_values=-1)  # a leading empty block
    kk = jnp.pad(k, ((0, 0), (blk, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, K, blk + nb*blk, H]
    vv = jnp.pad(v, ((0, 0), (blk, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    qq = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    sink_k, sink_v, sink_p = kk[:, :, blk:blk + ns], vv[:, :, blk:blk + ns], kpad[:, blk:blk + ns]

    def one(i):
        qb = jax.lax.dynamic_slice_in_dim(qq, i * blk, blk, axis=1)
        qpb = jax.lax.dynamic_slice_in_dim(qp, i * blk, blk, axis=1)
        # keys: previous and own block (indices (i-1)*blk .. (i+1)*blk, shifted by the empty block)
        kb = jax.lax.dynamic_slice_in_dim(kk, i * blk, 2 * blk, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(vv, i * blk, 2 * blk, axis=2)
        kpb = jax.lax.dynamic_slice_in_dim(kpad, i * blk, 2 * blk, axis=1)
        kind = jnp.arange(2 * blk) + (i - 1) * blk  # key indices in the chunk
        qpe, kpe = qpb[:, None, :, None], kpb[:, None, None, :]
        local = (kpe < sinks) | (qpe - kpe < window)
        out_l, lse_l = _masked_lse(qb, kb, vb, visibility_mask(qpb, kpb) & local & (kind >= 0)[None, None, None, :])
        # sinks not already among the local keys
        sp = sink_p[:, None, None, :]
        sink_mask = visibility_mask(qpb, sink_p) & (sp < sinks) & (jnp.arange(ns) < (i - 1) * blk)[None, None, None, :]
        out_s, lse_s = _masked_lse(qb, sink_k, sink_v, sink_mask)
        return merge_attention([(out_l, lse_l), (out_s, lse_s)])

    out = jax.lax.map(one, jnp.arange(nb))  # [nb, B, blk, K, G, H]
    out = out.transpose(1, 0, 2, 3, 4, 5).reshape(b, nb * blk, kh, g, h)[:, :t]
    ok = contiguous_rows(positions).reshape((-1,) + (1,) * (out.ndim - 1))  # another layout: that row is NaN
    return jnp.where(ok, out, jnp.full((), jnp.nan, out.dtype))


def _masked_lse(q, k, v, mask):
    """Attention of ``q [B,T,K,G,H]`` over ``k, v [B,K,S,H]`` under ``mask [B,1 or K,T,S]``, with
    its log-sum-exp (as ``attend_with_lse``)."""
    s = jnp.einsum("BTKGH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    s = jnp.where(mask[:, :, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(mask[:, :, None], jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0)[..., None]), 0.0)
    return jnp.einsum("BKGTS,BKSH->BTKGH", p.astype(v.dtype), v), lse
