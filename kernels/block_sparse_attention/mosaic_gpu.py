"""Block-sparse attention's forward for Hopper GPUs: Pallas with its Mosaic GPU lowering (``wgmma``,
TMA copies, warp specialisation), over the same ``BlockPlan`` as the Triton kernel.

A *tile* is one (row of the batch, query head, query block of ``2 * block_q`` rows). By default
one program (CTA) takes one tile; with ``programs=n`` n persistent programs walk the tiles in
turn (program i takes tiles i, i + n, ...), the K/V ring running on from one tile into the next,
so the next tile's first blocks load while the last one finishes. Where shared memory holds two
Q buffers a warpgroup, the next tile's Q loads during this one too (each tile's output goes out
through the buffer its Q came in). Tiles go last query block first (under a causal mask those
list the most key blocks), the heads of one row side by side. Each program has three
warpgroups:

- a *memory* warpgroup walks the block's key list (its full blocks, then its partial ones, as
  ``BlockPlan`` orders them) and copies each listed K and V block into a ring of ``stages`` shared
  memory slots with the tensor-memory accelerator, waiting for a slot to be released before it
  refills it; key blocks the plan leaves out are never read;
- two *compute* warpgroups each own ``block_q`` of the block's query rows: per listed key block
  ``S = Q K^T`` by ``wgmma`` into registers, the online softmax in fp32 (base 2), ``P V`` by
  ``wgmma``; the two alternate on the tensor cores through a shared barrier, so one's softmax
  overlaps the other's matrix products. Full blocks take no mask; partial ones are masked element
  by element by ``mask.visible`` from the positions and segment ids, read straight from global
  memory into the accumulator's row and column layouts (partial blocks are the diagonal and the
  documents' edges: few).

It writes the output and the natural log-sum-exp ``[B, N, T]`` as the Triton kernel does, so the
Triton backward (``pallas_gpu._backward``) takes its residuals unchanged; ``block_sparse_attention``
pairs the two in one ``custom_vjp``. bf16/fp16 only (``wgmma`` has no exact fp32 product), head
dims a multiple of 64; query and key lengths a multiple of the plan's blocks, which must be
``2 * block_q`` by ``block_k``.

jax 0.11.2's Mosaic GPU interpreter rejects ``wgmma``'s accumulator effect, so this kernel is not
run on a CPU: it is lowered there (``tests/gpu_lowering.py``) and compiled and checked against the
reference on a GPU (``pytest -m gpu``). One CTA a tile (the default) has passed those checks on an
H100 in this form; the persistent walk (``programs=n``, one or two Q buffers) is lowered and
shares its body, but has not yet run on a GPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxkv.kernels.block_sparse_attention.mask import BlockPlan, MaskSpec, visible

Array = jax.Array
_NEG = -1e30  # masked scores: finite, so a row with nothing visible makes no NaN
_LOG2E = math.log2(math.e)
_COMPUTE_WGS = 2
_SMEM_LIMIT = 220 * 1024  # of the 227 KiB a Hopper CTA may hold, some left for the barriers

__all__ = ["block_sparse_attention_mosaic_gpu", "MosaicConfig", "tile_coords", "tiles_of_program",
           "why_no_mosaic"]


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """The static part of one call: ``block_q`` rows per compute warpgroup (a CTA holds two),
    ``block_k`` keys a block, ``stages`` K/V slots in flight, ``programs`` CTAs (None: one a
    tile; n: n persistent CTAs walk the tiles, e.g. the GPU's SM count; lowered, not yet run on
    a GPU)."""

    spec: MaskSpec
    scale: float
    block_q: int = 64
    block_k: int = 128
    stages: int = 2
    programs: int | None = None


def _smem_bytes(h: int, block_q: int, block_k: int, stages: int, q_buffers: int) -> int:
    return 2 * (_COMPUTE_WGS * q_buffers * block_q * h + 2 * stages * block_k * h)


def _q_buffers(cfg: MosaicConfig, h: int) -> int:
    """Two Q buffers a compute warpgroup for persistent programs (the next tile's Q loads while
    this one runs) where shared memory holds them, else one."""
    two = cfg.programs is not None and _smem_bytes(h, cfg.block_q, cfg.block_k, cfg.stages, 2) <= _SMEM_LIMIT
    return 2 if two else 1


def tile_coords(tid, *, rows: int, heads: int, q_blocks: int):
    """Tile ``tid``'s (row, head, query block): the last query blocks first (under a causal mask
    they list the most key blocks), the heads of one row side by side (a KV head's query heads
    read the same blocks while they are in L2). ``tid`` an int32 scalar, traced or not."""
    qi = q_blocks - 1 - lax.div(tid, jnp.int32(rows * heads))
    rest = lax.rem(tid, jnp.int32(rows * heads))
    return lax.div(rest, jnp.int32(heads)), lax.rem(rest, jnp.int32(heads)), qi


def tiles_of_program(cta, *, tiles: int, programs: int):
    """How many tiles program ``cta`` walks (it takes ``cta, cta + programs, ...`` below
    ``tiles``); ``programs <= tiles``."""
    return lax.div(jnp.int32(tiles) - 1 - cta, jnp.int32(programs)) + 1


def why_no_mosaic(q: Array, block_q: int, block_k: int, stages: int) -> str | None:
    """Why the kernel cannot take these inputs (None if it can); the device is not asked."""
    h = q.shape[-1]
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"the Mosaic GPU kernel takes bf16 or fp16, not {q.dtype}"
    if h % 64 or h > 256:
        return f"head_dim ({h}) must be a multiple of 64, at most 256, for the Mosaic GPU kernel"
    if block_q != 64:
        return f"block_q ({block_q}) must be 64 for the Mosaic GPU kernel (one wgmma tile a warpgroup)"
    if block_k not in (64, 128, 256):
        return f"block_k ({block_k}) must be 64, 128 or 256 for the Mosaic GPU kernel"
    if stages < 2:
        return f"stages ({stages}) must be at least 2"
    smem = _smem_bytes(h, block_q, block_k, stages, 1)
    if smem > _SMEM_LIMIT:
        return f"block_k={block_k}, stages={stages} and head_dim={h} need {smem} bytes of shared memory (> 220 KiB)"
    return None


def block_sparse_attention_mosaic_gpu(cfg: MosaicConfig, q: Array, k: Array, v: Array, qp: Array, qs: Array,
                                      kp: Array, ks: Array, plan: BlockPlan) -> tuple[Array, Array]:
    """``(out [B, T, N, H], lse [B, N, T])``, the forward only (``api`` pairs it with the Triton
    backward), over a ``plan`` of ``2 * cfg.block_q x cfg.block_k`` blocks made for these
    positions ``qp``, ``kp`` and segment ids ``qs``, ``ks`` (int32; zeros without documents) with
    ``cfg.spec``; q, k, v of one 16-bit dtype, T and S multiples of the plan's blocks (``api``
    pads)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    hm = plan.kv_blocks.shape[1]
    rep = n // hm
    bq, bk, stages = cfg.block_q, cfg.block_k, cfg.stages
    if plan.block_q != _COMPUTE_WGS * bq or plan.block_k != bk:
        raise ValueError(f"the plan's blocks ({plan.block_q} x {plan.block_k}) must be {_COMPUTE_WGS * bq} x {bk}")
    if t % plan.block_q or s % bk:
        raise ValueError(f"T ({t}) and S ({s}) must be multiples of the plan's blocks")
    dtype = q.dtype
    c = cfg.scale * _LOG2E  # scores in base 2
    spec = cfg.spec
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)

    nq = t // plan.block_q
    tiles = nq * b * n
    programs = tiles if cfg.programs is None else min(cfg.programs, tiles)
    qbufs = _q_buffers(cfg, h)

    coords = functools.partial(tile_coords, rows=b, heads=n, q_blocks=nq)

    def kernel(q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, kvb_ref, nf_ref, np_ref, out_ref, lse_ref,
               scoped):
        cta = lax.axis_index("program")
        wg = lax.axis_index("wg")
        (q_smem3, k_smem, v_smem, lse_smem2), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
        mine = tiles_of_program(cta, tiles=tiles, programs=programs)

        def counts(tid):
            row, head, qi = coords(tid)
            mh = lax.div(head, jnp.int32(rep))
            n_full = nf_ref[row, mh, qi]
            return row, head, qi, mh, n_full, n_full + np_ref[row, mh, qi]

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < _COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            lse_smem = lse_smem2.at[wg]

            def load_q(tid, buf):
                row, head, qi = coords(tid)
                q_base = qi * (_COMPUTE_WGS * bq) + wg * bq
                plgpu.copy_gmem_to_smem(q_ref.at[row, pl.ds(q_base, bq), head], q_smem3.at[wg, buf],
                                        q_ready.at[wg * qbufs + buf])

            if qbufs == 2:
                load_q(cta, 0)

            def tile(i, done):  # ``done``: key blocks this program consumed before this tile
                tid = cta + i * programs
                row, head, qi, mh, n_full, n_steps = counts(tid)
                q_base = qi * (_COMPUTE_WGS * bq) + wg * bq
                buf = lax.rem(i, jnp.int32(2)) if qbufs == 2 else 0
                qo_smem = q_smem3.at[wg, buf]  # this tile's Q, then its output
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's output has left shared memory
                if qbufs == 2:
                    @pl.when(i + 1 < mine)
                    def _():
                        load_q(tid + programs, 1 - buf)  # into the buffer the last tile's output left
                else:
                    load_q(tid, 0)
                qpos = plgpu.load(qp_ref.at[row, pl.ds(q_base, bq)], layout=row_layout, optimized=False)
                qseg = plgpu.load(qs_ref.at[row, pl.ds(q_base, bq)], layout=row_layout, optimized=False)
                plgpu.barrier_wait(q_ready.at[wg * qbufs + buf])
                m = plgpu.layout_cast(jnp.full((bq,), _NEG, jnp.float32), row_layout)
                l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), row_layout)
                acc = plgpu.layout_cast(jnp.full((bq, h), 0.0, jnp.float32), plgpu.Layout.WGMMA)

                @pl.when(n_steps > 0)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(done, jnp.int32(stages))])

                pl.when(wg == 1)(take_turn)

                def step(j, carry, masked: bool):
                    acc, m, l = carry
                    slot = lax.rem(done + j, jnp.int32(stages))

                    def qk_scope(acc_ref):
                        plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].T)
                        take_turn()
                        return acc_ref[...]

                    sc = pl.run_scoped(qk_scope, plgpu.ACC((bq, bk), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    sc = sc * c
                    if masked:
                        start = kvb_ref[row, mh, qi, j] * bk
                        kpos = plgpu.load(kp_ref.at[row, pl.ds(start, bk)], layout=col_layout, optimized=False)
                        kseg = plgpu.load(ks_ref.at[row, pl.ds(start, bk)], layout=col_layout, optimized=False)
                        kidx = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA) + start
                        vis = visible(spec, lax.broadcast_in_dim(qpos, (bq, bk), [0]),
                                      lax.broadcast_in_dim(kpos, (bq, bk), [1]),
                                      lax.broadcast_in_dim(qseg, (bq, bk), [0]),
                                      lax.broadcast_in_dim(kseg, (bq, bk), [1]), kidx)
                        sc = jnp.where(vis, sc, _NEG)
                    m_new = jnp.maximum(m, sc.max(axis=1))
                    alpha = jnp.exp2(m - m_new)
                    p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
                    if masked:
                        p = jnp.where(vis, p, 0.0)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    l = l * alpha + p.sum(axis=1)
                    p16 = p.astype(dtype)
                    acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                    plgpu.barrier_arrive(turn)  # softmax done
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.barrier_wait(turn)  # the tensor cores are ours

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                        @pl.when(j + 1 < n_steps)
                        def _():
                            plgpu.barrier_wait(k_ready.at[lax.rem(done + j + 1, jnp.int32(stages))])

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l

                carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), (acc, m, l))
                acc, m, l = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)
                pl.when(wg == 0)(take_turn)

                seen = l > 0.0
                l_safe = jnp.where(seen, l, 1.0)
                acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])  # unseen rows: acc is 0
                qo_smem[...] = acc.astype(dtype)
                lse_smem[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * (1.0 / _LOG2E), -jnp.inf)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[row, pl.ds(q_base, bq), head])
                plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[row, head, pl.ds(q_base, bq)])
                return done + n_steps

            lax.fori_loop(0, mine, tile, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def tile(i, done):  # one ring of ``stages`` slots across all of this program's tiles
                row, head, qi, mh, _, n_steps = counts(cta + i * programs)
                kv_head = lax.div(head, jnp.int32(g))

                def fetch(j, _):
                    step = done + j
                    slot = lax.rem(step, jnp.int32(stages))
                    at = (row, pl.ds(kvb_ref[row, mh, qi, j] * bk, bk), kv_head)

                    @pl.when(step >= stages)
                    def _():
                        plgpu.barrier_wait(k_free.at[slot])
                    plgpu.copy_gmem_to_smem(k_ref.at[at], k_smem.at[slot], k_ready.at[slot])

                    @pl.when(step >= stages)
                    def _():
                        plgpu.barrier_wait(v_free.at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[at], v_smem.at[slot], v_ready.at[slot])
                    return ()

                lax.fori_loop(0, n_steps, fetch, ())
                return done + n_steps

            lax.fori_loop(0, mine, tile, jnp.int32(0))

    def entry(*refs):
        swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        scratch = [plgpu.SMEM((_COMPUTE_WGS, qbufs, bq, h), dtype, transforms=swizzled),
                   plgpu.SMEM((stages, bk, h), dtype, transforms=swizzled),
                   plgpu.SMEM((stages, bk, h), dtype, transforms=swizzled),
                   plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32)]
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped), scratch,
                      (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                       plgpu.Barrier(num_barriers=_COMPUTE_WGS * qbufs)),
                      (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2,
                      plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
                      collective_axes="wg")

    out, lse = plgpu.kernel(
        entry,
        out_type=[jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        grid=(programs,),
        grid_names=("program",),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, qp, qs, kp, ks, plan.kv_blocks, plan.n_full, plan.n_partial)
    return out, lse
