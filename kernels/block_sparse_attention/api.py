"""``block_sparse_attention``: the one entry point; checks the arguments, pads to whole blocks,
builds the block plan and picks the implementation."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxkv.kernels.block_sparse_attention.mask import MaskSpec, block_plan, kernel_segments
from jaxkv.kernels.block_sparse_attention.reference import block_sparse_attention_reference
from jaxkv.kernels.dispatch import IMPLEMENTATIONS, use_kernel, use_tpu_kernel

Array = jax.Array
__all__ = ["IMPLEMENTATIONS", "block_sparse_attention"]


def _pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 16 and not x & (x - 1)


def _check(q, k, v, q_positions, k_positions, mask, q_segments, k_segments, block_mask, mask_block):
    if not isinstance(mask, MaskSpec):
        raise ValueError(f"mask must be a MaskSpec, got {type(mask).__name__}")
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [B, T, N, H] and k, v one [B, S, K, H] shape; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != h or n % kh:
        raise ValueError(f"k {k.shape} does not match q {q.shape}: same batch and head dim, and the query heads "
                         f"({n}) a multiple of the KV heads ({kh})")
    if q_positions.shape != (b, t):
        raise ValueError(f"q_positions must be [B, T] = [{b}, {t}], got {q_positions.shape}")
    if k_positions.shape != (b, s):
        raise ValueError(f"k_positions must be [B, S] = [{b}, {s}], got {k_positions.shape}")
    if (q_segments is None) != (k_segments is None):
        raise ValueError("q_segments and k_segments must be given together")
    if q_segments is not None and (q_segments.shape != (b, t) or k_segments.shape != (b, s)):
        raise ValueError(f"q_segments must be [B, T] = [{b}, {t}] and k_segments [B, S] = [{b}, {s}], got "
                         f"{q_segments.shape} and {k_segments.shape}")
    if block_mask is not None:
        if not _pow2(mask_block):
            raise ValueError(f"mask_block must be a power of two >= 16 with a block_mask, got {mask_block!r}")
        want = (b, -(-t // mask_block), -(-s // mask_block))
        if block_mask.ndim != 4 or (block_mask.shape[0], *block_mask.shape[2:]) != want \
                or block_mask.shape[1] not in (1, kh, n):
            raise ValueError(f"block_mask must be [B, 1 or K or N, ceil(T / mask_block), ceil(S / mask_block)] = "
                             f"[{b}, 1|{kh}|{n}, {want[1]}, {want[2]}], got {block_mask.shape}")
        if block_mask.dtype != jnp.bool_:
            raise ValueError(f"block_mask must be bool, got {block_mask.dtype}")


def block_sparse_attention(q: Array, k: Array, v: Array, q_positions: Array, k_positions: Array, *,
                           mask: MaskSpec = MaskSpec(), q_segments: Array | None = None,
                           k_segments: Array | None = None, block_mask: Array | None = None,
                           mask_block: int | None = None, scale: float | None = None,
                           implementation: str | None = None, block_q: int | None = None,
                           block_k: int | None = None,
                           backward_blocks: tuple[int, int] | None = (64, 64), return_lse: bool = False,
                           **kernel_options):
    """Attention of ``q [B, T, N, H]`` over ``k, v [B, S, K, H]`` (GQA: query head ``n`` reads KV
    head ``n // (N / K)``) under ``mask`` (a ``MaskSpec``), the positions ``[B, T]`` / ``[B, S]``
    (-1: padding), optional segment ids and an optional selection ``block_mask [B, 1|K|N,
    ceil(T / mask_block), ceil(S / mask_block)]``: ``out [B, T, N, H]`` (and with ``return_lse``
    the log-sum-exp ``[B, N, T]`` fp32, not differentiated). Differentiable in ``q, k, v``.

    ``implementation``: ``"pallas_gpu"`` (blocks of ``block_q x block_k``, powers of two >= 16,
    default 128 x 64, at most ``mask_block``; empty blocks skipped; the backward in blocks of
    ``backward_blocks``, None: the forward's), ``"mosaic_gpu"`` (asked for by name; Hopper GPUs,
    bf16/fp16, head dims a multiple of 64: the forward by ``wgmma`` in blocks of 128 x
    ``block_k``, default 128, the Triton backward; ``kernel_options`` ``stages``, ``programs``
    (persistent CTAs), ``num_warps``, ``num_stages``), ``"pallas_tpu"`` (asked for by name: the
    forward in the same blocks, ``block_k`` a multiple of 128 on a TPU; the backward by
    ``jax.vjp`` of the dense reference; tested in the TPU interpreter and lowered for the TPU,
    not yet run on one) or ``"reference"`` (dense jnp); an explicit one that cannot run raises,
    None takes the Triton kernel on a GPU and otherwise warns and runs the reference.
    ``kernel_options`` (``num_warps``, ``num_stages``, ``interpret``) go to the kernel."""
    _check(q, k, v, q_positions, k_positions, mask, q_segments, k_segments, block_mask, mask_block)
    if implementation not in (None, "mosaic_gpu") + IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS + ('mosaic_gpu',)} or None, "
                         f"got {implementation!r}")
    mosaic = implementation == "mosaic_gpu"  # asked for by name: None keeps the Triton kernel
    block_q = 128 if block_q is None else block_q
    block_k = (128 if mosaic else 64) if block_k is None else block_k
    backward_blocks = (block_q, block_k) if backward_blocks is None else tuple(backward_blocks)
    if mask_block is not None:
        block_q, block_k = min(block_q, mask_block), min(block_k, mask_block)
        backward_blocks = tuple(min(x, mask_block) for x in backward_blocks)

    def why_not():
        if jax.default_backend() != "gpu":
            return f"the backend is {jax.default_backend()}, not gpu"
        if not _pow2(q.shape[-1]):
            return f"head_dim ({q.shape[-1]}) must be a power of two >= 16"
        return None

    if not (_pow2(block_q) and _pow2(block_k)):
        raise ValueError(f"block_q and block_k must be powers of two >= 16, got {block_q!r} and {block_k!r}")
    if len(backward_blocks) != 2 or not all(_pow2(x) for x in backward_blocks):
        raise ValueError(f"backward_blocks must be two powers of two >= 16, got {backward_blocks!r}")
    if mosaic:
        out, lse = _mosaic(q, k, v, q_positions, k_positions, q_segments, k_segments, block_mask, mask, mask_block,
                           scale, block_q, block_k, backward_blocks, kernel_options)
        return (out, jax.lax.stop_gradient(lse)) if return_lse else out
    if use_tpu_kernel(implementation, kernel_options, ("interpret",)):
        interpret = bool(kernel_options.get("interpret"))
        if not interpret and block_k % 128:
            raise ValueError(f"block_k ({block_k}) must be a multiple of 128 for the TPU kernel (its key rows fill "
                             "whole lane tiles)")
        out, lse = _tpu(q, k, v, q_positions, k_positions, q_segments, k_segments, block_mask, mask, mask_block,
                        scale, block_q, block_k, interpret)
        return (out, jax.lax.stop_gradient(lse)) if return_lse else out
    if use_kernel("block_sparse_attention", implementation, kernel_options, why_not):
        from jaxkv.kernels.block_sparse_attention.pallas_gpu import block_sparse_attention_pallas_gpu

        t = q.shape[1]
        qq, kk, vv, qp, kp, qs, ks, plan = _pad_and_plan(
            q, k, v, q_positions, k_positions, q_segments, k_segments, block_mask, mask, mask_block, block_q, block_k,
            multiple=(max(block_q, backward_blocks[0]), max(block_k, backward_blocks[1])))
        backward_plan = _backward_plan(plan, backward_blocks, mask, qp, kp, qs, ks, block_mask, mask_block)
        out, lse = block_sparse_attention_pallas_gpu(qq, kk, vv, qp, kp, plan, mask=mask, q_segments=qs,
                                                     k_segments=ks, scale=scale, backward_plan=backward_plan,
                                                     **kernel_options)
        out, lse = out[:, :t], lse[:, :, :t]
    else:
        out, lse = block_sparse_attention_reference(q, k, v, q_positions, k_positions, mask=mask,
                                                    q_segments=q_segments, k_segments=k_segments,
                                                    block_mask=block_mask, mask_block=mask_block, scale=scale)
    return (out, jax.lax.stop_gradient(lse)) if return_lse else out


def _pad_and_plan(q, k, v, q_positions, k_positions, q_segments, k_segments, block_mask, mask, mask_block,
                  block_q, block_k, multiple=None):
    """The inputs padded to whole blocks (to multiples of ``multiple``, default the blocks;
    padding positions -1, segment 0) and their block plan."""
    t, s = q.shape[1], k.shape[1]
    mq, mk = (block_q, block_k) if multiple is None else multiple
    pt, ps = -t % mq, -s % mk
    pad = lambda x, n, value: jnp.pad(x, ((0, 0), (0, n)) + ((0, 0),) * (x.ndim - 2),  # noqa: E731
                                     constant_values=value)
    qp, kp = pad(q_positions, pt, -1), pad(k_positions, ps, -1)
    qs = None if q_segments is None else pad(q_segments, pt, 0)
    ks = None if k_segments is None else pad(k_segments, ps, 0)
    plan = block_plan(mask, qp, kp, block_q=block_q, block_k=block_k, q_segments=qs, k_segments=ks,
                      block_mask=block_mask, mask_block=mask_block)
    return pad(q, pt, 0), pad(k, ps, 0), pad(v, ps, 0), qp, kp, qs, ks, plan


def _backward_plan(plan, backward_blocks, mask, qp, kp, qs, ks, block_mask, mask_block):
    """The plan in the backward's blocks: ``plan`` itself when they are the forward's."""
    if tuple(backward_blocks) == (plan.block_q, plan.block_k):
        return plan
    return block_plan(mask, qp, kp, block_q=backward_blocks[0], block_k=backward_blocks[1], q_segments=qs,
                      k_segments=ks, block_mask=block_mask, mask_block=mask_block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12, 13))
def _tpu(q, k, v, q_positions, k_positions, q_segments, k_segments, block_mask, mask, mask_block, scale, block_q,
         block_k, interpret):
    """The TPU kernel's forward; its backward is ``jax.vjp`` of the dense reference."""
    from jaxkv.kernels.block_sparse_attention.pallas_tpu import block_sparse_attention_pallas_tpu

    t = q.shape[1]
    qq, kk, vv, qp, kp, qs, ks, plan = _pad_and_plan(q, k, v, q_positions, k_positions, q_segments, k_segments,
                                                     block_mask, mask, mask_block, block_q, block_k)
    out, lse = block_sparse_attention_pallas_tpu(qq, kk, vv, qp, kp, plan, mask=mask, q_segments=qs, k_segments=ks,
                                                 scale=scale, interpret=interpret)
    return out[:, :t], lse[:, :, :t]


def _tpu_fwd(q, k, v, q_positions, k_positions, q_segments, k_segments, block_mask, mask, mask_block, scale,
             block_q, block_k, interpret):
    out = _tpu(q, k, v, q_positions, k_positions, q_segments, k_segments, block_mask, mask, mask_block, scale,
               block_q, block_k, interpret)
    return out, (q, k, v, q_positions, k_positions, q_segments, k_segments, block_mask)


def _tpu_bwd(mask, mask_block, scale, block_q, block_k, interpret, res, cts):
    q, k, v, q_positions, k_positions, q_segments, k_segments, block_mask = res
    _, vjp = jax.vjp(lambda q, k, v: block_sparse_attention_reference(
        q, k, v, q_positions, k_positions, mask=mask, q_segments=q_segments, k_segments=k_segments,
        block_mask=block_mask, mask_block=mask_block, scale=scale)[0], q, k, v)
    dq, dk, dv = vjp(cts[0].astype(q.dtype))
    return dq, dk, dv, None, None, None, None, None


_tpu.defvjp(_tpu_fwd, _tpu_bwd)


def _hopper() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def _mosaic(q, k, v, q_positions, k_positions, q_segments, k_segments, block_mask, mask, mask_block, scale,
            block_q, block_k, backward_blocks, kernel_options):
    """The Mosaic GPU forward (Hopper: wgmma, TMA) and the Triton backward in one ``custom_vjp``;
    ``kernel_options``: ``stages`` (K/V slots in flight) and ``programs`` (None: one CTA a tile;
    an int: that many persistent CTAs walk the tiles; lowered, not yet run on a GPU) for the
    forward, ``num_warps`` and ``num_stages`` for the backward."""
    from jaxkv.kernels.block_sparse_attention import mosaic_gpu, pallas_gpu

    other = sorted(set(kernel_options) - {"stages", "programs", "num_warps", "num_stages"})
    if other:
        raise ValueError(f"kernel options {other} are not the Mosaic GPU kernel's (it takes stages and programs, "
                         f"and num_warps and num_stages for its Triton backward)")
    programs = kernel_options.get("programs")
    if programs is not None and (isinstance(programs, bool) or not isinstance(programs, int) or programs < 1):
        raise ValueError(f"programs must be None or a positive int, got {programs!r}")
    if jax.default_backend() != "gpu":
        raise ValueError(f"implementation='mosaic_gpu' cannot run: the backend is {jax.default_backend()}, not gpu")
    if not _hopper():
        raise ValueError(f"implementation='mosaic_gpu' needs a Hopper GPU (wgmma), got {jax.devices()[0].device_kind}")
    stages = kernel_options.get("stages", 2)
    if mask_block is not None and mask_block % 128:
        raise ValueError(f"mask_block ({mask_block}) must be a multiple of 128 for mosaic_gpu (its query tiles)")
    if block_q != 128:
        raise ValueError(f"block_q ({block_q}) must be 128 for mosaic_gpu: two warpgroups of 64 query rows")
    why = mosaic_gpu.why_no_mosaic(q, 64, block_k, stages)
    if why is not None:
        raise ValueError(f"implementation='mosaic_gpu' cannot run: {why}")
    t = q.shape[1]
    qq, kk, vv, qp, kp, qs, ks, plan = _pad_and_plan(
        q, k, v, q_positions, k_positions, q_segments, k_segments, block_mask, mask, mask_block, block_q, block_k,
        multiple=(max(block_q, backward_blocks[0]), max(block_k, backward_blocks[1])))
    bwd_plan = _backward_plan(plan, backward_blocks, mask, qp, kp, qs, ks, block_mask, mask_block)
    spec, qs, ks = kernel_segments(mask, qp, kp, qs, ks)
    h = q.shape[-1]
    sc = h ** -0.5 if scale is None else float(scale)
    mcfg = mosaic_gpu.MosaicConfig(spec=spec, scale=sc, block_q=64, block_k=block_k, stages=stages,
                                   programs=programs)
    tcfg = pallas_gpu.Config(spec=spec, scale=sc, block_q=backward_blocks[0], block_k=backward_blocks[1],
                             num_warps=kernel_options.get("num_warps", 4),
                             num_stages=kernel_options.get("num_stages", 3), interpret=False)
    out, lse = _mosaic_attention(mcfg, tcfg, qq, kk.astype(q.dtype), vv.astype(q.dtype), qp.astype(jnp.int32), qs,
                                 kp.astype(jnp.int32), ks, plan, bwd_plan)
    return out[:, :t], lse[:, :, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mosaic_attention(mcfg, tcfg, q, k, v, qp, qs, kp, ks, plan, plan_bwd):
    from jaxkv.kernels.block_sparse_attention.mosaic_gpu import block_sparse_attention_mosaic_gpu

    return tuple(block_sparse_attention_mosaic_gpu(mcfg, q, k, v, qp, qs, kp, ks, plan))


def _mosaic_attention_fwd(mcfg, tcfg, q, k, v, qp, qs, kp, ks, plan, plan_bwd):
    out, lse = _mosaic_attention(mcfg, tcfg, q, k, v, qp, qs, kp, ks, plan, plan_bwd)
    return (out, lse), (q, k, v, qp, qs, kp, ks, plan_bwd, out, lse)


def _mosaic_attention_bwd(mcfg, tcfg, res, cts):
    from jaxkv.kernels.block_sparse_attention.pallas_gpu import _backward

    return _backward(tcfg, res, cts)


_mosaic_attention.defvjp(_mosaic_attention_fwd, _mosaic_attention_bwd)
