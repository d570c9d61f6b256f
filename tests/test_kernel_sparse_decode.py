"""sparse_decode: the reference against hand-worked cases and a numpy softmax, and every
backend against the reference through one shared test base (interpret mode on the CPU)."""
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxkv.kernels.sparse_decode import dense_blocks, dense_decode, sparse_decode, sparse_decode_reference

# absolute tolerance per dtype for unit-variance values, scaled by sqrt(keys attended) below
TOL = {jnp.float32: 2e-6, jnp.bfloat16: 2e-2}


def _case(rng, b, kh, g, h, s, bs, lengths, m, dtype):
    q = jnp.asarray(rng.normal(size=(b, kh, g, h)), dtype)
    k = jnp.asarray(rng.normal(size=(b, kh, s, h)), dtype)
    v = jnp.asarray(rng.normal(size=(b, kh, s, h)), dtype)
    n = s // bs
    idx = np.stack([np.stack([rng.permutation(n)[:m] for _ in range(kh)]) for _ in range(b)]).astype(np.int32)
    counts = rng.integers(0, m + 1, (b, kh)).astype(np.int32)
    counts[0, 0] = m  # at least one (row, head) with every listed block
    return q, k, v, jnp.asarray(lengths, jnp.int32), jnp.asarray(idx), jnp.asarray(counts)


def test_reference_hand_worked():
    """Equal scores: the output is the mean of the visible values; blocks not listed, slots past
    the length and padding entries of the list are not read; nothing visible gives 0 and -inf."""
    q = jnp.zeros((1, 1, 2, 2))
    k = jnp.ones((1, 1, 8, 2))
    v = jnp.arange(16.0).reshape(1, 1, 8, 2)
    idx = jnp.asarray([[[3, 1, 0]]])  # blocks of 2: slots 6-7, 2-3, (0-1: padding, count 2)
    out, lse = sparse_decode_reference(q, k, v, jnp.asarray([7]), idx, jnp.asarray([[2]]), block_size=2)
    # visible slots 2, 3, 6 (7 is past the length): values (4,5), (6,7), (12,13)
    np.testing.assert_allclose(np.asarray(out)[0, 0], [[22 / 3, 25 / 3]] * 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lse)[0, 0], [np.log(3)] * 2, rtol=1e-6)
    out, lse = sparse_decode_reference(q, k, v, jnp.asarray([7]), idx, jnp.asarray([[0]]), block_size=2)
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(lse) == -np.inf)


def test_reference_equals_a_numpy_softmax_over_the_chosen_slots():
    rng = np.random.default_rng(1)
    q, k, v, lengths, idx, counts = _case(rng, 2, 2, 3, 8, 48, 8, [40, 13], 4, jnp.float32)
    out, lse = sparse_decode_reference(q, k, v, lengths, idx, counts, block_size=8)
    for b in range(2):
        for h in range(2):
            slots = sorted(s for blk in np.asarray(idx)[b, h, :int(counts[b, h])] for s in range(blk * 8, blk * 8 + 8)
                           if s < int(lengths[b]))
            if not slots:
                assert np.all(np.asarray(lse)[b, h] == -np.inf)
                continue
            sc = np.asarray(q)[b, h] @ np.asarray(k)[b, h, slots].T / np.sqrt(8)
            p = np.exp(sc - sc.max(-1, keepdims=True))
            np.testing.assert_allclose(np.asarray(out)[b, h], (p / p.sum(-1, keepdims=True)) @ np.asarray(v)[b, h, slots],
                                       atol=1e-5)
            np.testing.assert_allclose(np.asarray(lse)[b, h], np.log(p.sum(-1)) + sc.max(-1), atol=1e-5)


class SparseDecodeBase:
    """Every backend subclasses this with its ``implementation`` and options."""

    implementation: str
    options: dict = {}
    kernel = False  # takes kernel options (split sizes)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("b,kh,g,h,s,bs,lengths,m,per", [
        (2, 2, 4, 32, 96, 16, [70, 5], 3, 1),     # ragged lengths, not block multiples; split per block
        (1, 1, 1, 16, 64, 16, [64], 4, 3),         # one query head; splits of 3 blocks (the last short)
        (3, 2, 8, 64, 128, 32, [128, 33, 1], 4, 2),
    ])
    def test_matches_the_reference(self, dtype, b, kh, g, h, s, bs, lengths, m, per):
        rng = np.random.default_rng(b * 100 + g)
        q, k, v, lengths, idx, counts = _case(rng, b, kh, g, h, s, bs, lengths, m, dtype)
        # jitted: one compile each instead of one per eager operation
        want = jax.jit(functools.partial(sparse_decode_reference, block_size=bs))(q, k, v, lengths, idx, counts)
        got = jax.jit(functools.partial(sparse_decode, block_size=bs, implementation=self.implementation, **self.options,
                                        **({"blocks_per_split": per} if self.kernel else {})))(
            q, k, v, lengths, idx, counts)
        tol = TOL[dtype] * np.sqrt(m * bs)
        np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), atol=tol)
        assert got[0].dtype == q.dtype
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=tol)  # -inf where empty


    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_a_slot_mask_leaves_slots_of_listed_blocks_out(self, dtype):
        """``kv_mask``: the reference equals attention over the slots that are listed, real and
        masked in (numpy); every backend equals the reference, and a mask of all True changes
        nothing."""
        rng = np.random.default_rng(11)
        q, k, v, lengths, idx, counts = _case(rng, 2, 2, 4, 32, 96, 16, [90, 40], 4, dtype)
        mask = jnp.asarray(rng.random((2, 2, 96)) < 0.6)
        call = functools.partial(sparse_decode, block_size=16, implementation=self.implementation, **self.options)
        ref = jax.jit(functools.partial(sparse_decode_reference, block_size=16))
        want = ref(q, k, v, lengths, idx, counts, kv_mask=mask)
        got = jax.jit(call)(q, k, v, lengths, idx, counts, kv_mask=mask)
        tol = TOL[dtype] * np.sqrt(64)
        np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), atol=tol)
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=tol)
        unmasked = ref(q, k, v, lengths, idx, counts)
        assert not np.allclose(np.asarray(want[0], np.float32), np.asarray(unmasked[0], np.float32), atol=tol)
        np.testing.assert_array_equal(np.asarray(ref(q, k, v, lengths, idx, counts, kv_mask=jnp.ones(mask.shape, bool))[0]),
                                      np.asarray(unmasked[0]))
        if dtype == jnp.float32:  # the reference against numpy, slot by slot
            qn, kn, vn, mn = (np.asarray(x) for x in (q, k, v, mask))
            for b in range(2):
                for h in range(2):
                    slots = [s for blk in np.asarray(idx)[b, h, :int(counts[b, h])] for s in range(blk * 16, blk * 16 + 16)
                             if s < int(lengths[b]) and mn[b, h, s]]
                    if not slots:
                        assert np.all(np.asarray(want[1])[b, h] == -np.inf)
                        continue
                    sc = qn[b, h] @ kn[b, h, sorted(slots)].T / np.sqrt(32)
                    p = np.exp(sc - sc.max(-1, keepdims=True))
                    np.testing.assert_allclose(np.asarray(want[0])[b, h],
                                               (p / p.sum(-1, keepdims=True)) @ vn[b, h, sorted(slots)], atol=1e-5)

    @pytest.mark.parametrize("case", ["counts above M", "no block listed", "negative padding", "fp32 q, bf16 cache"])
    def test_edge_cases_agree_with_the_reference(self, case):
        """Counts above the list's length count as its length; an empty list (M = 0) sees nothing
        (0, -inf); padding entries of any value are never attended, even where a head lists no
        block; fp32 queries over a bf16 cache."""
        rng = np.random.default_rng(5)
        q, k, v, lengths, idx, counts = _case(rng, 2, 2, 2, 16, 64, 16, [64, 40], 3, jnp.float32)
        if case == "counts above M":
            counts = jnp.full_like(counts, 4)
        elif case == "no block listed":
            idx, counts = idx[..., :0], jnp.zeros_like(counts)
        elif case == "negative padding":
            idx = jnp.where(jnp.arange(3) < jnp.asarray([[1, 0], [2, 0]])[..., None], idx, -1)
            counts = jnp.asarray([[1, 0], [2, 0]], jnp.int32)
        else:
            k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
        call = functools.partial(sparse_decode, block_size=16, implementation=self.implementation, **self.options,
                                 **({"blocks_per_split": 2} if self.kernel else {}))
        got = jax.jit(call)(q, k, v, lengths, idx, counts)
        want = jax.jit(functools.partial(sparse_decode_reference, block_size=16))(
            q, k, v, lengths, idx, jnp.minimum(counts, idx.shape[-1]))
        assert got[0].dtype == q.dtype and got[0].shape == q.shape and got[1].shape == q.shape[:3]
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-5)
        if case == "counts above M":  # the reference itself: as if the counts were M
            np.testing.assert_array_equal(np.asarray(sparse_decode_reference(q, k, v, lengths, idx, counts, block_size=16)[1]),
                                          np.asarray(want[1]))
        if case in ("no block listed", "negative padding"):
            assert np.all(np.asarray(want[1])[:, 1] == -np.inf) and np.all(np.asarray(got[0])[:, 1] == 0)

    def test_dense_decode_equals_attention_over_every_real_slot(self):
        rng = np.random.default_rng(7)
        q, k, v, lengths, _, _ = _case(rng, 2, 2, 4, 32, 64, 16, [64, 21], 1, jnp.float32)
        out, _ = jax.jit(functools.partial(dense_decode, block_size=16, implementation=self.implementation,
                                           **self.options))(q, k, v, lengths)
        sc = jnp.einsum("bkgh,bksh->bkgs", q, k, precision="highest") / np.sqrt(32)  # not TF32 on a GPU
        sc = jnp.where(jnp.arange(64)[None, None, None] < lengths[:, None, None, None], sc, -jnp.inf)
        want = jnp.einsum("bkgs,bksh->bkgh", jax.nn.softmax(sc, -1), v, precision="highest")
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


class TestReference(SparseDecodeBase):
    implementation = "reference"


class GpuMergeBase:
    """The GPU kernel's two split merges (its Pallas kernel, the default; jnp) give one result,
    over a partials buffer with more splits than were written (3 of 4)."""

    options: dict = {}

    @pytest.mark.parametrize("g", [3, 4])
    def test_the_pallas_merge_equals_the_jnp_one(self, g):
        rng = np.random.default_rng(g)
        q, k, v, lengths, idx, counts = _case(rng, 2, 2, g, 32, 96, 16, [96, 20], 6, jnp.bfloat16)
        run = lambda merge: jax.jit(functools.partial(  # noqa: E731
            sparse_decode, block_size=16, implementation="pallas_gpu", blocks_per_split=2, merge=merge,
            **self.options))(q, k, v, lengths, idx, counts)
        (o1, l1), (o2, l2) = run("pallas"), run("jnp")
        assert o1.dtype == o2.dtype == jnp.bfloat16 and o1.shape == o2.shape == q.shape
        np.testing.assert_allclose(np.asarray(o1, np.float32), np.asarray(o2, np.float32), atol=1e-2)
        np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), rtol=1e-6)
        with pytest.raises(ValueError, match="merge"):
            run("xla")


class TestGpuMergeInterpret(GpuMergeBase):
    options = {"interpret": True}


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestGpuMerge(GpuMergeBase):
    pass


class TestPallasGpuInterpret(SparseDecodeBase):
    implementation = "pallas_gpu"
    options = {"interpret": True}
    kernel = True


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestPallasGpu(SparseDecodeBase):
    implementation = "pallas_gpu"
    kernel = True


class TestPallasTpuInterpret(SparseDecodeBase):
    implementation = "pallas_tpu"
    options = {"interpret": True}


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
class TestPallasTpu(SparseDecodeBase):
    implementation = "pallas_tpu"


def test_a_slot_mask_must_be_bool():
    """Backends read a mask's bytes differently (int8, int32): anything but bool is refused by name."""
    q, k, v, lengths, idx, counts = _case(np.random.default_rng(0), 1, 1, 1, 16, 32, 16, [32], 2, jnp.float32)
    with pytest.raises(ValueError, match="kv_mask must be bool, got int32"):
        sparse_decode(q, k, v, lengths, idx, counts, block_size=16, implementation="reference",
                      kv_mask=jnp.ones((1, 1, 32), jnp.int32))


def test_the_gpu_kernels_lower_for_an_h200():
    """Pallas's Triton lowering of the decode kernel and its split merge at the bench's shape
    (GQA 4, head dim 128, 64 blocks of 64 a KV head), exported for the card on the CPU."""
    from jaxkv.kernels.sparse_decode.pallas_gpu import sparse_decode_pallas_gpu
    from tests.gpu_lowering import lower_for_gpu

    spec = jax.ShapeDtypeStruct
    text = lower_for_gpu(functools.partial(sparse_decode_pallas_gpu, block_size=64),
                         spec((4, 8, 4, 128), jnp.bfloat16), spec((4, 8, 8192, 128), jnp.bfloat16),
                         spec((4, 8, 8192, 128), jnp.bfloat16), spec((4,), jnp.int32), spec((4, 8, 64), jnp.int32),
                         spec((4, 8), jnp.int32))
    assert "jaxkv_sparse_decode" in text and "jaxkv_merge_splits" in text
    # fp32 queries over a bf16 cache (an fp32 model with a bf16 cache): one dtype in each dot
    text = lower_for_gpu(functools.partial(sparse_decode_pallas_gpu, block_size=16),
                         spec((2, 2, 2, 16), jnp.float32), spec((2, 2, 64, 16), jnp.bfloat16),
                         spec((2, 2, 64, 16), jnp.bfloat16), spec((2,), jnp.int32), spec((2, 2, 4), jnp.int32),
                         spec((2, 2), jnp.int32))
    assert "jaxkv_sparse_decode" in text
    masked = lower_for_gpu(lambda q, k, v, n, i, c, m: sparse_decode_pallas_gpu(q, k, v, n, i, c, block_size=64, kv_mask=m),
                           spec((4, 8, 4, 128), jnp.bfloat16), spec((4, 8, 8192, 128), jnp.bfloat16),
                           spec((4, 8, 8192, 128), jnp.bfloat16), spec((4,), jnp.int32), spec((4, 8, 64), jnp.int32),
                           spec((4, 8), jnp.int32), spec((4, 8, 8192), jnp.bool_))  # with a slot mask (int8 loads)
    assert "jaxkv_sparse_decode" in masked


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_the_tpu_kernel_lowers_for_the_tpu(dtype):
    """Pallas's Mosaic lowering of the TPU kernel at a decode shape (GQA 4, head dim 128, blocks
    of 64 slots listed per (row, KV head)), run here by exporting for a TPU v5e; what only
    Mosaic's compiler on a TPU checks is not covered."""
    from jaxkv.kernels.sparse_decode.pallas_tpu import sparse_decode_pallas_tpu
    from tests.tpu_lowering import lower_for_tpu

    q, k, v, lengths, idx, counts = _case(np.random.default_rng(0), 2, 2, 4, 128, 512, 64, [500, 77], 4, dtype)
    text = lower_for_tpu(functools.partial(sparse_decode_pallas_tpu, block_size=64), q, k, v, lengths, idx, counts)
    assert "tpu_custom_call" in text and "jaxkv_sparse_decode_tpu" in text
    mask = jnp.asarray(np.random.default_rng(1).random((2, 2, 512)) < 0.5)
    masked = lower_for_tpu(lambda *a: sparse_decode_pallas_tpu(*a[:6], block_size=64, kv_mask=a[6]),
                           q, k, v, lengths, idx, counts, mask)  # each listed block's mask row beside its keys
    assert "jaxkv_sparse_decode_tpu" in masked


def test_bad_arguments_name_themselves():
    q, k = jnp.zeros((1, 2, 4, 16)), jnp.zeros((1, 2, 32, 16))
    lengths, idx, counts = jnp.asarray([3]), jnp.zeros((1, 2, 2), jnp.int32), jnp.ones((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="block_size"):
        sparse_decode(q, k, k, lengths, idx, counts, block_size=12)
    with pytest.raises(ValueError, match="lengths"):
        sparse_decode(q, k, k, jnp.asarray([3, 4]), idx, counts, block_size=16)
    with pytest.raises(ValueError, match="block_counts"):
        sparse_decode(q, k, k, lengths, idx, counts[:, :1], block_size=16)
    with pytest.raises(ValueError, match="kv_mask"):
        sparse_decode(q, k, k, lengths, idx, counts, block_size=16, kv_mask=jnp.ones((1, 2, 16), bool))
    with pytest.raises(ValueError, match="implementation"):
        sparse_decode(q, k, k, lengths, idx, counts, block_size=16, implementation="cuda")
    with pytest.raises(ValueError, match=r"\['num_warps'\] are not the TPU kernel's"):
        sparse_decode(q, k, k, lengths, idx, counts, block_size=16, implementation="pallas_tpu", interpret=True,
                      num_warps=4)
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="pallas_tpu.*not tpu"):
            sparse_decode(q, k, k, lengths, idx, counts, block_size=16, implementation="pallas_tpu")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="pallas_gpu"):
            sparse_decode(q, k, k, lengths, idx, counts, block_size=16, implementation="pallas_gpu")
        with pytest.warns(UserWarning, match="reference"):
            sparse_decode(q, k, k, lengths, idx, counts, block_size=16)
    from unittest import mock

    from jaxkv.kernels.sparse_decode import api

    with mock.patch.object(api.jax, "default_backend", return_value="gpu"):  # a head dim tl.dot cannot take
        with pytest.raises(ValueError, match=r"head_dim \(8\) .* powers of two >= 16"):
            sparse_decode(q[..., :8], k[..., :8], k[..., :8], lengths, idx, counts, block_size=16,
                          implementation="pallas_gpu")


def test_dense_blocks_cover_each_rows_length():
    idx, counts = dense_blocks(jnp.asarray([0, 1, 16, 17, 64]), num_kv_heads=2, num_slots=64, block_size=16)
    assert idx.shape == (5, 2, 4)
    np.testing.assert_array_equal(np.asarray(counts), [[0, 0], [1, 1], [1, 1], [2, 2], [4, 4]])


def test_bench_kernels_on_a_tiny_shape():
    """`jaxkv bench kernels` end to end (interpret mode): every row's kernel output agrees with
    the reference it is timed against."""
    from jaxkv.bench import bench_kernels

    rows = bench_kernels(batch=1, num_heads=4, num_kv_heads=2, head_dim=16, context=256, budget=64, block_size=16,
                         repeats=1, interpret=True)
    names = [r["kernel"] for r in rows]
    assert names[0] == "dense decode, pallas_gpu" and any(n.startswith("sparse decode 64 tokens +") for n in names)
    assert any(n.startswith("centroid scores") and n.endswith("pallas_gpu") for n in names)
    assert {"quantized decode INT4, pallas_gpu", "quantized decode INT2, pallas_gpu"} <= set(names)
    for r in rows:
        assert r["seconds"] > 0 and r["kv_bytes"] > 0 and r["kernel_seconds"] is None  # no GPU: no kernel time
        if r["max_abs_err"] is not None:
            assert r["max_abs_err"] < 2e-2, r
    assert any(n.startswith("selection alone") and "page_select pallas_gpu" in n for n in names)


def test_kernel_ratios_read_the_goals_off_the_rows():
    """The bench's ratio lines, from hand-made rows: cuDNN / (sparse + selection), the same with
    the selection reused over 4 steps, a quantized row's speed-up against its bytes saved."""
    from jaxkv.bench import kernel_ratios

    def r(name, us, mib, kernel_us=None):
        return {"kernel": name, "seconds": us * 1e-6, "kernel_seconds": kernel_us and kernel_us * 1e-6,
                "kv_bytes": mib * 2**20}

    rows = [r("dense decode, pallas_gpu", 500, 2048, 480), r("dense decode, cuDNN (sequence-major)", 520, 2048, 480),
            r("quantized decode INT4, pallas_gpu", 250, 512), r("sparse decode 4096 tokens, pallas_gpu", 30, 64, 24),
            r("sparse decode 4096 tokens + selection, pallas_gpu", 50, 96, 40),
            r("selection alone (64-token pages), page_select pallas_gpu", 20, 32, 16)]
    lines = kernel_ratios(rows)
    assert "loop time: cuDNN dense / (sparse + selection) = 10.4x; with the selection reused over 4 steps " \
           "(sparse + selection / 4) 14.9x" in lines
    assert "kernel time: cuDNN dense / (sparse + selection) = 12.0x; with the selection reused over 4 steps " \
           "(sparse + selection / 4) 17.1x" in lines
    assert any(line.startswith("loop time: quantized decode INT4 2.00x") and "4.00x fewer bytes (ratio 0.50" in line
               for line in lines)
    assert not any(line.startswith("kernel time: quantized") for line in lines)  # no kernel time in that row


@pytest.mark.parametrize("name,settings", [("full", {}), ("full", {"kv_bits": 4}),
                                           ("mikv", {"important": 0.3, "recent": 1, "bits": 4}),
                                           ("lserve", {"page": 16, "logical_page": 4, "token_budget": 16, "reuse": 2})],
                         ids=["full", "full+mikv", "mikv", "lserve"])
def test_decode_steps_through_the_kernels_as_without_them(parity_models, name, settings):
    """POLICY[decode_kernel=...]: a prefill, then decode steps of a ragged batch (one row ends
    early) through the dispatch; the logits equal the policy's own jnp path. `full` goes through
    dense_decode; in INT4 storage (`full+mikv`) through quantized_decode over the packed codes;
    `mikv` sends its low tier through quantized_decode and merges its full-precision tier;
    `lserve` attends its chosen pages (one page of the two, plus the newest) through sparse_decode."""
    from jaxkv.cache import init_cache, make_policy
    from jaxkv.models.llama import forward

    config, params, e = parity_models["llama3"]
    if name == "lserve":  # KV head 0 of every layer paged, the rest streaming
        settings = {**settings, "heads": tuple((0,) for _ in range(config.num_layers))}
    seq = jnp.asarray(np.concatenate([e["prompt_a"], e["greedy_a"]]))[None][:, :20]
    seq = jnp.concatenate([seq, seq[:, ::-1]], axis=0)
    n = seq.shape[1]
    pos = jnp.broadcast_to(jnp.arange(n), seq.shape)
    pos = pos.at[1, 17:].set(-1)  # row 1 stops after 17 tokens
    step = jax.jit(forward, static_argnames=("config",))

    def run(policy):
        cache = init_cache(config, policy, batch=2, max_len=32, dtype=jnp.float32)
        out, cache = forward(params, seq[:, :12], pos[:, :12], cache, config=config)
        outs = [out]
        for t in range(12, n):
            out, cache = step(params, seq[:, t:t + 1], pos[:, t:t + 1], cache, config=config)
            outs.append(out)
        return np.asarray(jnp.concatenate(outs, axis=1))

    want = run(make_policy(name, **settings))
    real = np.asarray(pos) >= 0
    for kernel in ({"decode_kernel": "reference"}, {"decode_kernel": "pallas_gpu", "kernel_interpret": True},
                   {"decode_kernel": "pallas_tpu", "kernel_interpret": True}):
        got = run(make_policy(name, **settings, **kernel))
        np.testing.assert_allclose(got[real], want[real], atol=2e-5, err_msg=kernel["decode_kernel"])
    with pytest.raises(Exception, match="decode_kernel"):
        make_policy(name, **settings, decode_kernel="cudnn")
