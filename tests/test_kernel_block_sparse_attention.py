"""block_sparse_attention: the mask rules and the block plan against the dense mask, the
reference against a numpy softmax and the anchor equivalence, and every kernel backend against
the reference, forward and gradients (``jax.vjp`` of the reference), through one shared test base
(interpret mode on the CPU; compiled with ``-m gpu``)."""
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxkv.kernels.block_sparse_attention import (EMPTY, FULL, PARTIAL, MaskSpec, block_plan, block_sparse_attention,
                                                  block_sparse_attention_reference, dense_visibility, visible)
from jaxkv.models.layers import apply_rope, rope_angles, rope_inv_freq

# absolute tolerance per dtype for unit-variance values, scaled by sqrt(keys) below
TOL = {jnp.float32: 2e-6, jnp.bfloat16: 2e-2}


def _qkv(rng, b, t, s, n, kh, h, dtype):
    r = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    return r(b, t, n, h), r(b, s, kh, h), r(b, s, kh, h)


def _segments(rng, b, t, docs):
    """Ragged documents: ``docs`` runs of random lengths per row, ids 0, 1, ..."""
    out = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), docs - 1, replace=False))
        out.append(np.repeat(np.arange(docs), np.diff(np.concatenate([[0], cuts, [t]]))))
    return jnp.asarray(np.stack(out), jnp.int32)


def _jit_bsa(**static):
    """``block_sparse_attention`` jit-compiled with ``static`` (the mask, block sizes, the
    implementation and its options) fixed: one compile instead of one per eager operation (the
    reference's and the block plan's; the kernel runs in interpret mode either way). Array keyword
    arguments (segment ids, a block mask) are traced."""
    return jax.jit(lambda q, k, v, qp, kp, arrays: block_sparse_attention(q, k, v, qp, kp, **static, **arrays))


def _split(kw):
    """``kw`` as (its array values, the rest)."""
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
    return arrays, {k: v for k, v in kw.items() if k not in arrays}


# ------------------------------------------------------------------ the mask
def test_mask_spec_names_bad_fields():
    for kwargs, field in [({"window": 0}, "window"), ({"sinks": 4}, "sinks"), ({"sinks": -1, "window": 4}, "sinks"),
                          ({"causal": 1}, "causal"), ({"anchor": "yes"}, "anchor")]:
        with pytest.raises(ValueError, match=field):
            MaskSpec(**kwargs)


def test_visible_hand_worked():
    """Positions 0..5 in two documents (0, 0, 0, 1, 1, 1); the last query is padding."""
    qp = jnp.asarray([0, 1, 2, 3, 4, -1])[:, None]
    kp = jnp.asarray([0, 1, 2, 3, 4, 5])[None, :]
    seg = jnp.asarray([0, 0, 0, 1, 1, 1])
    idx = jnp.arange(6)[None, :]
    causal = np.tril(np.ones((6, 6), bool))
    causal[5] = False
    np.testing.assert_array_equal(np.asarray(visible(MaskSpec(), qp, kp)), causal)
    win = np.asarray(visible(MaskSpec(window=2), qp, kp))
    np.testing.assert_array_equal(win[4], [0, 0, 0, 1, 1, 0])
    lam = np.asarray(visible(MaskSpec(window=2, sinks=1), qp, kp))
    np.testing.assert_array_equal(lam[4], [1, 0, 0, 1, 1, 0])
    docs = np.asarray(visible(MaskSpec(), qp, kp, seg[:, None], seg[None, :], idx))
    np.testing.assert_array_equal(docs[4], [0, 0, 0, 1, 1, 0])
    anchor = np.asarray(visible(MaskSpec(anchor=True), qp, kp, seg[:, None], seg[None, :], idx))
    np.testing.assert_array_equal(anchor[4], [1, 0, 0, 1, 1, 0])
    both = np.asarray(visible(MaskSpec(causal=False), qp, kp, seg[:, None], seg[None, :], idx))
    np.testing.assert_array_equal(both[1], [1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("spec,docs", [(MaskSpec(), 0), (MaskSpec(window=24), 0), (MaskSpec(window=20, sinks=5), 0),
                                       (MaskSpec(), 4), (MaskSpec(anchor=True), 4), (MaskSpec(causal=False), 3)])
def test_block_plan_agrees_with_the_dense_mask(spec, docs):
    """EMPTY blocks hold no visible pair and FULL ones only visible pairs; each list holds the
    full blocks, then the partial ones, ascending; the transposed lists are the same plan."""
    rng = np.random.default_rng(docs)
    b, t, bq, bk = 2, 96, 16, 32
    pos = jnp.broadcast_to(jnp.arange(t), (b, t)).at[1, 80:].set(-1)
    seg = _segments(rng, b, t, docs) if docs else None
    plan = block_plan(spec, pos, pos, block_q=bq, block_k=bk, q_segments=seg, k_segments=seg)
    vis = np.asarray(dense_visibility(spec, pos, pos, q_segments=seg, k_segments=seg))[:, 0]
    st = np.asarray(plan.states)[:, 0]
    cells = vis.reshape(b, t // bq, bq, t // bk, bk)
    np.testing.assert_array_equal(st == EMPTY, ~cells.any(axis=(2, 4)) & (st != PARTIAL))  # exact where decided
    assert not cells.any(axis=(2, 4))[st == EMPTY].any()
    assert cells.all(axis=(2, 4))[st == FULL].all()
    assert (st == PARTIAL).any() and ((st == FULL).any() or spec.window is not None)  # blocks wider than the window
    kv, nf, npart = np.asarray(plan.kv_blocks)[:, 0], np.asarray(plan.n_full)[:, 0], np.asarray(plan.n_partial)[:, 0]
    for r in range(b):
        for i in range(t // bq):
            f, p = kv[r, i, :nf[r, i]], kv[r, i, nf[r, i]:nf[r, i] + npart[r, i]]
            np.testing.assert_array_equal(f, np.flatnonzero(st[r, i] == FULL))
            np.testing.assert_array_equal(p, np.flatnonzero(st[r, i] == PARTIAL))
    qb, nqf = np.asarray(plan.q_blocks)[:, 0], np.asarray(plan.nq_full)[:, 0]
    for r in range(b):
        for j in range(t // bk):
            np.testing.assert_array_equal(qb[r, j, :nqf[r, j]], np.flatnonzero(st[r, :, j] == FULL))
    if spec == MaskSpec() and not docs:  # causal: partial blocks are exactly those on the diagonal
        for i in range(t // bq):
            for j in range(t // bk):
                if st[0, i, j] == PARTIAL:
                    assert j * bk < (i + 1) * bq and i * bq < (j + 1) * bk


def test_block_plan_applies_a_selection_per_head():
    pos = jnp.broadcast_to(jnp.arange(64), (1, 64))
    sel = jnp.asarray(np.random.default_rng(0).random((1, 2, 2, 2)) < 0.5).at[0, 0].set(True)
    plan = block_plan(MaskSpec(causal=False), pos, pos, block_q=16, block_k=16, block_mask=sel, mask_block=32)
    st = np.asarray(plan.states)
    want = np.repeat(np.repeat(np.asarray(sel), 2, axis=2), 2, axis=3)
    np.testing.assert_array_equal(st == FULL, want)
    np.testing.assert_allclose(np.asarray(plan.density), want.mean(axis=(2, 3)))
    with pytest.raises(ValueError, match="mask_block"):
        block_plan(MaskSpec(), pos, pos, block_q=16, block_k=16, block_mask=sel, mask_block=24)


# ------------------------------------------------------------------ the reference
def test_reference_equals_a_numpy_softmax():
    rng = np.random.default_rng(3)
    b, t, n, kh, h = 1, 20, 4, 2, 8
    q, k, v = _qkv(rng, b, t, t, n, kh, h, jnp.float32)
    pos = jnp.arange(t)[None]
    seg = _segments(rng, b, t, 3)
    spec = MaskSpec(window=6, anchor=True)
    out, lse = jax.jit(lambda q, k, v, p, s: block_sparse_attention_reference(  # one compile, not one per op
        q, k, v, p, p, mask=spec, q_segments=s, k_segments=s))(q, k, v, pos, seg)
    vis = np.asarray(dense_visibility(spec, pos, pos, q_segments=seg, k_segments=seg))[0, 0]
    qn, kn, vn = (np.asarray(x, np.float64)[0] for x in (q, k, v))
    for head in range(n):
        s = qn[:, head] @ kn[:, head // 2].T / np.sqrt(h)
        s = np.where(vis, s, -np.inf)
        m = s.max(-1, keepdims=True)
        p = np.exp(s - m)
        np.testing.assert_allclose(np.asarray(out)[0, :, head], (p / p.sum(-1, keepdims=True)) @ vn[:, head // 2],
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(lse)[0, head], np.log(p.sum(-1)) + m[:, 0], atol=1e-5)
    # a query that sees nothing: out 0, lse -inf, and zero (not NaN) gradients
    pad = pos.at[0, 5].set(-1)
    out, lse = jax.jit(block_sparse_attention_reference)(q, k, v, pad, pos)
    assert np.all(np.asarray(out)[0, 5] == 0) and np.all(np.isneginf(np.asarray(lse)[0, :, 5]))
    g = jax.jit(jax.grad(lambda q: jnp.sum(block_sparse_attention_reference(q, k, v, pad, pos)[0])))(q)
    assert np.isfinite(np.asarray(g)).all() and np.all(np.asarray(g)[0, 5] == 0)


def _rotary(x, positions, h):
    cos, sin = rope_angles(positions, rope_inv_freq(h, 10000.0))
    return apply_rope(x, cos, sin)


@pytest.mark.parametrize("implementation,options", [("reference", {}), ("pallas_gpu", {"interpret": True}),
                                                    ("pallas_tpu", {"interpret": True})],
                         ids=["reference", "pallas_gpu", "pallas_tpu"])
def test_a_shared_anchor_equals_bos_per_document(implementation, options):
    """AnchorAttention's equivalence: one anchor token A at position 0 seen by every document
    (document mask + anchor, continuous positions) gives the same outputs for the document tokens
    as a copy of A at rotary position 0 in front of each document with plain segment ids."""
    rng = np.random.default_rng(7)
    n, kh, h = 4, 2, 16
    lens = [9, 14, 6]
    total = 1 + sum(lens)
    x_q = jnp.asarray(rng.normal(size=(1, total, n, h)), jnp.float32)  # token 0 is A
    x_k = jnp.asarray(rng.normal(size=(1, total, kh, h)), jnp.float32)
    x_v = jnp.asarray(rng.normal(size=(1, total, kh, h)), jnp.float32)
    pos = jnp.arange(total)[None]
    seg = jnp.asarray(np.concatenate([[0], np.repeat(np.arange(3), lens)]))[None]
    packed = _jit_bsa(mask=MaskSpec(anchor=True), implementation=implementation, block_q=16, block_k=16, **options)(
        _rotary(x_q, pos, h), _rotary(x_k, pos, h), x_v, pos, pos, dict(q_segments=seg, k_segments=seg))
    # BOS form: [A, doc0, A, doc1, A, doc2]; every A at position 0, the documents keep their positions
    starts = np.cumsum([1] + lens[:-1])
    order = np.concatenate([np.concatenate([[0], np.arange(s, s + m)]) for s, m in zip(starts, lens)])
    bos_pos = jnp.asarray(np.where(order == 0, 0, order))[None]
    bos_seg = jnp.asarray(np.concatenate([np.full(m + 1, d) for d, m in enumerate(lens)]))[None]
    take = lambda a: a[:, order]  # noqa: E731
    bos = _jit_bsa(mask=MaskSpec(), implementation=implementation, block_q=16, block_k=16, **options)(
        _rotary(take(x_q), bos_pos, h), _rotary(take(x_k), bos_pos, h), take(x_v), bos_pos, bos_pos,
        dict(q_segments=bos_seg, k_segments=bos_seg))
    doc = order != 0
    np.testing.assert_allclose(np.asarray(bos)[0, doc], np.asarray(packed)[0, order[doc]], atol=2e-6)
    # and the anchor changes something: without it the documents after the first do not see A
    plain = block_sparse_attention_reference(_rotary(x_q, pos, h), _rotary(x_k, pos, h), x_v, pos, pos,
                                             q_segments=seg, k_segments=seg)[0]
    assert float(jnp.abs(plain - packed)[0, 1 + lens[0]:].min()) > 0


# ------------------------------------------------------------------ every backend against the reference
CASES = {  # name: (b, t, s, n, kh, h, block_q, block_k, spec, docs, selection)
    "causal": (2, 96, 96, 4, 2, 32, 32, 32, MaskSpec(), 0, False),
    "causal, not a block multiple": (1, 75, 75, 2, 1, 16, 16, 32, MaskSpec(), 0, False),
    "sliding window": (1, 128, 128, 4, 1, 16, 16, 16, MaskSpec(window=40), 0, False),
    "sinks + local": (1, 128, 128, 2, 2, 16, 32, 16, MaskSpec(window=24, sinks=8), 0, False),
    "documents": (2, 100, 100, 4, 2, 16, 16, 32, MaskSpec(), 5, False),
    "documents + anchor": (2, 80, 80, 2, 1, 32, 16, 16, MaskSpec(anchor=True), 4, False),
    "selected blocks": (1, 128, 128, 4, 2, 16, 16, 16, MaskSpec(), 0, True),
    "chunk over a longer cache": (2, 40, 112, 4, 2, 16, 16, 16, MaskSpec(), 0, False),
}


# every mask rule and the partial/full/empty mix, without repeating a plain causal or window mask
GRADIENT_CASES = ["causal, not a block multiple", "sinks + local", "documents + anchor", "selected blocks",
                  "chunk over a longer cache"]


class BlockSparseAttentionBase:
    implementation: str
    options: dict = {}
    bf16_cases: tuple | None = None  # the cases run in bf16 too (None: all)
    gradient_cases: tuple | None = None  # the gradient cases run (None: all of GRADIENT_CASES)

    def _inputs(self, name, dtype):
        b, t, s, n, kh, h, bq, bk, spec, docs, selection = CASES[name]
        rng = np.random.default_rng(len(name))
        q, k, v = _qkv(rng, b, t, s, n, kh, h, dtype)
        kp = jnp.broadcast_to(jnp.arange(s), (b, s))
        qp = kp[:, s - t:]  # a chunk: the last t positions of the keys
        if b > 1:  # a ragged batch: row 1 shorter, right-padded
            kp = kp.at[1, s - 9:].set(-1)
            qp = qp.at[1, t - 9:].set(-1)
        kw = dict(mask=spec, block_q=bq, block_k=bk, backward_blocks=(bk, bq))  # the backward in other blocks
        if docs:
            seg = _segments(rng, b, s, docs)
            kw.update(q_segments=seg[:, s - t:], k_segments=seg)
        if selection:
            kw.update(block_mask=jnp.asarray(rng.random((b, kh, -(-t // 32), -(-s // 32))) < 0.4).at[:, :, :, 0].set(True),
                      mask_block=32)
        return q, k, v, qp, kp, kw, s

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
    @pytest.mark.parametrize("name", list(CASES))
    def test_forward_matches_the_reference(self, name, dtype):
        if dtype == jnp.bfloat16 and self.bf16_cases is not None and name not in self.bf16_cases:
            pytest.skip("bf16 runs on a few cases for this backend")
        q, k, v, qp, kp, kw, s = self._inputs(name, dtype)
        arrays, static = _split(kw)
        want, want_lse = _jit_bsa(implementation="reference", return_lse=True, **static)(q, k, v, qp, kp, arrays)
        got, lse = _jit_bsa(implementation=self.implementation, return_lse=True, **self.options, **static)(
            q, k, v, qp, kp, arrays)
        tol = TOL[dtype] * np.sqrt(s)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol)
        real = np.isfinite(np.asarray(want_lse))
        np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), real)
        np.testing.assert_allclose(np.asarray(lse)[real], np.asarray(want_lse)[real], atol=tol)

    @pytest.mark.parametrize("name", GRADIENT_CASES)
    def test_gradients_match_the_references_vjp(self, name):
        if self.gradient_cases is not None and name not in self.gradient_cases:
            pytest.skip("one gradient case for this backend")
        q, k, v, qp, kp, kw, s = self._inputs(name, jnp.float32)
        w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

        def loss(impl, options):
            return lambda q, k, v: jnp.sum(w * block_sparse_attention(q, k, v, qp, kp, implementation=impl,
                                                                      **options, **kw))
        # jitted: one compile of each backward instead of one per eager operation
        want = jax.jit(jax.grad(loss("reference", {}), argnums=(0, 1, 2)))(q, k, v)
        got = jax.jit(jax.grad(loss(self.implementation, self.options), argnums=(0, 1, 2)))(q, k, v)
        for name_, a, b in zip("qkv", got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=4 * TOL[jnp.float32] * np.sqrt(s),
                                       err_msg=f"d{name_}")


class TestPallasGpuInterpret(BlockSparseAttentionBase):
    implementation = "pallas_gpu"
    options = {"interpret": True}


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestPallasGpu(BlockSparseAttentionBase):
    implementation = "pallas_gpu"


class TestPallasTpuInterpret(BlockSparseAttentionBase):
    implementation = "pallas_tpu"
    options = {"interpret": True}
    # the TPU interpreter is slow; bf16 takes the kernel's other dot dtype, checked on two masks;
    # the backward is jax.vjp of the reference, so one case checks its wiring
    bf16_cases = ("causal", "documents + anchor")
    gradient_cases = ("documents + anchor",)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
class TestPallasTpu(BlockSparseAttentionBase):
    implementation = "pallas_tpu"


# ------------------------------------------------------------------ the Mosaic GPU (Hopper) forward
# Its own cases: bf16/fp16 only, head dims a multiple of 64, blocks of 128 x 64|128 (jax 0.11.2's
# Mosaic GPU interpreter rejects wgmma's accumulator, so it runs only on a GPU; lowered on the CPU).
MOSAIC_CASES = {  # name: (b, t, s, n, kh, h, block_k, spec, docs, selection)
    "causal, ragged batch": (2, 384, 384, 4, 2, 128, 128, MaskSpec(), 0, False),
    "causal, not a block multiple": (1, 300, 300, 4, 1, 64, 64, MaskSpec(), 0, False),
    "sinks + local": (1, 512, 512, 2, 2, 64, 128, MaskSpec(window=200, sinks=16), 0, False),
    "documents + anchor": (2, 512, 512, 8, 2, 128, 128, MaskSpec(anchor=True), 5, False),
    "selected blocks, non-causal": (1, 512, 512, 4, 2, 128, 128, MaskSpec(causal=False), 0, True),
    "chunk over a longer cache": (1, 256, 640, 4, 2, 128, 64, MaskSpec(), 0, False),
}


def _mosaic_inputs(name, dtype=jnp.bfloat16):
    b, t, s, n, kh, h, bk, spec, docs, selection = MOSAIC_CASES[name]
    rng = np.random.default_rng(len(name))
    q, k, v = _qkv(rng, b, t, s, n, kh, h, dtype)
    kp = jnp.broadcast_to(jnp.arange(s), (b, s))
    qp = kp[:, s - t:]
    if b > 1:
        kp = kp.at[1, s - 37:].set(-1)
        qp = qp.at[1, t - 37:].set(-1)
    kw = dict(mask=spec, block_k=bk)
    if docs:
        seg = _segments(rng, b, s, docs)
        kw.update(q_segments=seg[:, s - t:], k_segments=seg)
    if selection:
        kw.update(block_mask=jnp.asarray(rng.random((b, kh, -(-t // 128), -(-s // 128))) < 0.5), mask_block=128)
    return q, k, v, qp, kp, kw, s


def _most_mosaic_stages(q, block_k):
    from jaxkv.kernels.block_sparse_attention.mosaic_gpu import why_no_mosaic

    stages = 2
    while why_no_mosaic(q, 64, block_k, stages + 1) is None:
        stages += 1
    return stages


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestMosaicGpu:
    @pytest.fixture(autouse=True)
    def _hopper(self):
        from jaxkv.kernels.block_sparse_attention.api import _hopper

        if not _hopper():
            pytest.skip("mosaic_gpu needs a Hopper GPU")

    @pytest.mark.parametrize("options", [{}, {"programs": 5}, {"programs": 3, "stages": "most"}],
                             ids=["a CTA a tile", "5 persistent CTAs", "3 persistent CTAs, the most stages"])
    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
    @pytest.mark.parametrize("name", list(MOSAIC_CASES))
    def test_forward_matches_the_reference(self, name, dtype, options):
        if dtype == jnp.float16 and options:
            pytest.skip("the tile walk and the ring do not depend on the dtype: bf16 covers them")
        q, k, v, qp, kp, kw, s = _mosaic_inputs(name, dtype)
        arrays, static = _split(kw)
        if options.get("stages") == "most":  # the deepest K/V ring that fits (one Q buffer where two do not)
            options = dict(options, stages=_most_mosaic_stages(q, static["block_k"]))
        up = lambda x: x.astype(jnp.float32)  # noqa: E731
        want, want_lse = _jit_bsa(implementation="reference", return_lse=True, **static)(
            up(q), up(k), up(v), qp, kp, arrays)
        got, lse = _jit_bsa(implementation="mosaic_gpu", return_lse=True, **static, **options)(
            q, k, v, qp, kp, arrays)
        got, want = np.asarray(got, np.float32), np.asarray(want)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=TOL[jnp.bfloat16] * np.sqrt(s) / 4)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
        real = np.isfinite(np.asarray(want_lse))
        np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), real)
        np.testing.assert_allclose(np.asarray(lse)[real], np.asarray(want_lse)[real], atol=2e-2)

    @pytest.mark.parametrize("name", ["causal, not a block multiple", "documents + anchor"])
    def test_gradients_through_the_triton_backward(self, name):
        q, k, v, qp, kp, kw, s = _mosaic_inputs(name)
        w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

        def grads(impl, dtype):
            loss = lambda q, k, v: jnp.sum(w * block_sparse_attention(q, k, v, qp, kp, implementation=impl,  # noqa: E731
                                                                       **kw).astype(jnp.float32))
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q.astype(dtype), k.astype(dtype), v.astype(dtype))
        want = grads("reference", jnp.float32)
        got = grads("mosaic_gpu", jnp.bfloat16)
        for name_, a, b in zip("qkv", got, want):
            a, b = np.asarray(a, np.float32), np.asarray(b)
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2, f"d{name_}"


@pytest.mark.parametrize("block_k,options,q_buffers", [(128, {}, 1), (128, {"programs": 3}, 2),
                                                       (64, {"programs": 3, "stages": 5}, 1)],
                         ids=["a CTA a tile", "3 persistent CTAs, two Q buffers", "3 persistent CTAs, one Q buffer"])
def test_the_mosaic_gpu_forward_lowers_for_an_h200(block_k, options, q_buffers):
    """Pallas's Mosaic GPU lowering of the Hopper forward (documents + anchor, GQA 8/2, head dim
    128, bf16; one CTA a tile, and persistent CTAs with one or two Q buffers) and of a gradient
    through it (the Triton backward), exported for an H200 here; what only ptxas checks on the
    card is not covered."""
    from jaxkv.kernels.block_sparse_attention.api import _mosaic_attention, _pad_and_plan
    from jaxkv.kernels.block_sparse_attention.mosaic_gpu import MosaicConfig, _q_buffers, why_no_mosaic
    from jaxkv.kernels.block_sparse_attention.pallas_gpu import Config
    from tests.gpu_lowering import lower_for_gpu

    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 1, 500, 500, 8, 2, 128, jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(500), (1, 500))
    seg = _segments(rng, 1, 500, 3)
    spec = MaskSpec(anchor=True)
    q, k, v, qp, kp, qs, ks, plan = _pad_and_plan(q, k, v, pos, pos, seg, seg, None, spec, None, 128, block_k)
    bwd = block_plan(spec, qp, kp, block_q=64, block_k=64, q_segments=qs, k_segments=ks)
    mcfg = MosaicConfig(spec=spec, scale=128 ** -0.5, block_k=block_k, **options)
    assert why_no_mosaic(q, 64, block_k, mcfg.stages) is None and _q_buffers(mcfg, 128) == q_buffers
    tcfg = Config(spec=spec, scale=128 ** -0.5, block_q=64, block_k=64, num_warps=4, num_stages=3, interpret=False)

    def f(q, k, v):
        loss = lambda q, k, v: jnp.sum(_mosaic_attention(mcfg, tcfg, q, k, v, qp, qs, kp, ks, plan, bwd)[0]  # noqa: E731
                                       .astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    text = lower_for_gpu(f, q, k, v)
    assert "mosaic_gpu" in text and "jaxkv_block_sparse_dq" in text


def test_mosaic_gpu_refuses_what_it_cannot_run():
    from jaxkv.kernels.block_sparse_attention.mosaic_gpu import why_no_mosaic

    q = jnp.zeros((1, 128, 4, 128), jnp.bfloat16)
    assert why_no_mosaic(q, 64, 128, 2) is None
    assert "bf16 or fp16" in why_no_mosaic(q.astype(jnp.float32), 64, 128, 2)
    assert "head_dim" in why_no_mosaic(jnp.zeros((1, 128, 4, 96), jnp.bfloat16), 64, 128, 2)
    assert "block_k" in why_no_mosaic(q, 64, 96, 2)
    assert "shared memory" in why_no_mosaic(jnp.zeros((1, 128, 4, 256), jnp.bfloat16), 64, 256, 3)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="not gpu"):
            block_sparse_attention(q, q[:, :, :2], q[:, :, :2], jnp.arange(128)[None], jnp.arange(128)[None],
                                   implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="implementation"):
        block_sparse_attention(q, q, q, jnp.arange(128)[None], jnp.arange(128)[None], implementation="mosaic")
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="programs"):
            block_sparse_attention(q, q[:, :, :2], q[:, :, :2], jnp.arange(128)[None], jnp.arange(128)[None],
                                   implementation="mosaic_gpu", programs=bad)


@pytest.mark.parametrize("anchor", [False, True], ids=["causal", "documents + anchor"])
def test_the_tpu_kernel_lowers_for_the_tpu(anchor):
    """Pallas's Mosaic lowering of the TPU forward (1,024 tokens, blocks of 128, GQA 8/2, head
    dim 128, bf16; with documents and the anchor), run here by exporting for a TPU v5e; what only
    Mosaic's compiler on a TPU checks is not covered."""
    from jaxkv.kernels.block_sparse_attention.api import _pad_and_plan
    from jaxkv.kernels.block_sparse_attention.pallas_tpu import block_sparse_attention_pallas_tpu
    from tests.tpu_lowering import lower_for_tpu

    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 1, 1024, 1024, 8, 2, 128, jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(1024), (1, 1024))
    seg = _segments(rng, 1, 1024, 3) if anchor else None
    spec = MaskSpec(anchor=anchor)
    q, k, v, qp, kp, qs, ks, plan = _pad_and_plan(q, k, v, pos, pos, seg, seg, None, spec, None, 128, 128)
    text = lower_for_tpu(functools.partial(block_sparse_attention_pallas_tpu, mask=spec), q, k, v, qp, kp, plan,
                         q_segments=qs, k_segments=ks)
    assert "tpu_custom_call" in text and "jaxkv_block_sparse_attention_tpu" in text


# ------------------------------------------------------------------ dispatch and bad input
def test_bad_arguments_name_themselves():
    q, k = jnp.zeros((1, 32, 4, 16)), jnp.zeros((1, 32, 2, 16))
    pos = jnp.arange(32)[None]
    with pytest.raises(ValueError, match="k_positions"):
        block_sparse_attention(q, k, k, pos, pos[:, :16])
    with pytest.raises(ValueError, match="together"):
        block_sparse_attention(q, k, k, pos, pos, q_segments=pos)
    with pytest.raises(ValueError, match="block_mask"):
        block_sparse_attention(q, k, k, pos, pos, block_mask=jnp.ones((1, 3, 1, 1), bool), mask_block=32)
    with pytest.raises(ValueError, match="mask_block"):
        block_sparse_attention(q, k, k, pos, pos, block_mask=jnp.ones((1, 1, 1, 1), bool))
    with pytest.raises(ValueError, match="block_q"):
        block_sparse_attention(q, k, k, pos, pos, block_q=24, implementation="reference")
    with pytest.raises(ValueError, match="mask"):
        block_sparse_attention(q, k, k, pos, pos, mask="causal")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="pallas_gpu"):
            block_sparse_attention(q, k, k, pos, pos, implementation="pallas_gpu")
        with pytest.warns(UserWarning, match="reference"):
            block_sparse_attention(q, k, k, pos, pos)


def test_bench_prefill_on_a_tiny_shape():
    """`jaxkv bench prefill` runs its kernel rows (interpret mode on the CPU: a check of the bench,
    not a timing), each checked where it has a reference."""
    from jaxkv.bench import bench_prefill

    seen = []
    rows = bench_prefill(batch=1, num_heads=4, num_kv_heads=2, head_dim=16, lengths=(128,), densities=(0.5, 0.25),
                         documents=3, block_q=32, block_k=16, num_warps=4, mask_block=32, repeats=1, interpret=True,
                         progress=seen.append)
    assert seen == rows  # each row reported as it is measured
    names = [r["kernel"] for r in rows]
    assert names[0] == "causal forward, pallas_gpu"
    assert sum(n.startswith("block-sparse forward") for n in names) == 2
    assert names[-1].startswith("documents (3) forward + backward") and sum(rows[-1]["documents"]) == 128
    for r in rows:
        assert r["seconds"] > 0 and r["tflops"] > 0
        if r["max_abs_err"] is not None:
            assert r["max_abs_err"] < 3e-2, r
    sparse = [r for r in rows if r["kernel"].startswith("block-sparse")]
    assert sparse[0]["density"] > sparse[1]["density"] > 0


def test_bench_prefill_reads_its_mosaic_programs():
    """`--mosaic-programs`: one CTA a tile, one per multiprocessor, or a count; anything else is
    refused by name."""
    from jaxkv.bench import _mosaic_programs
    from jaxkv.errors import UserError

    assert _mosaic_programs("tiles,sms,132") == (None, "sms", 132)
    for bad in ("0", "tiles,-1", "many", ""):
        with pytest.raises(UserError, match="--mosaic-programs"):
            _mosaic_programs(bad)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the refusal is for other backends")
def test_the_gpu_benches_refuse_another_backend_by_name(capsys):
    from jaxkv.cli import main

    for what in ("prefill", "ssd", "kernels"):
        assert main(["bench", what]) == 2
        assert f"jaxkv bench {what} times GPU kernels; the backend here is cpu" in capsys.readouterr().err


def test_bench_arguments_are_checked_before_any_timing(tmp_path, capsys):
    from jaxkv.bench import _parse_heads
    from jaxkv.cli import main
    from jaxkv.errors import UserError

    assert _parse_heads("32/8") == (32, 8)
    for bad in ("0/0", "32/8/1", "32/5", "x/8", "32"):
        with pytest.raises(UserError, match="--heads must look like 32/8"):
            _parse_heads(bad)
    missing = tmp_path / "no-such-folder" / "rows.json"
    assert main(["bench", "decode", "--preset", "tiny", "--dtype", "float32", "--prompt-len", "8", "--new-tokens",
                 "2", "--batch", "1", "--repeats", "1", "--json", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and "does not exist" in err


@pytest.mark.parametrize("rows,heads,q_blocks", [(1, 4, 3), (2, 3, 5)])
def test_the_mosaic_gpu_programs_walk_every_tile_once(rows, heads, q_blocks):
    """The persistent walk's bookkeeping (run on the CPU; the kernel runs it per CTA): for any
    number of programs, the programs' tiles cover every (row, head, query block) exactly once,
    and each program meets the last query blocks first."""
    from jaxkv.kernels.block_sparse_attention.mosaic_gpu import tile_coords, tiles_of_program

    tiles = rows * heads * q_blocks
    for programs in (1, 2, 5, tiles - 1, tiles):
        if programs > tiles:
            continue
        seen = []
        for cta in range(programs):
            mine = int(tiles_of_program(jnp.int32(cta), tiles=tiles, programs=programs))
            assert mine == len(range(cta, tiles, programs))
            walk = [tuple(int(v) for v in tile_coords(jnp.int32(cta + i * programs), rows=rows, heads=heads,
                                                       q_blocks=q_blocks)) for i in range(mine)]
            assert [qi for _, _, qi in walk] == sorted((qi for _, _, qi in walk), reverse=True)
            seen += walk
        assert sorted(seen) == sorted((r, h, qi) for r in range(rows) for h in range(heads) for qi in range(q_blocks))
