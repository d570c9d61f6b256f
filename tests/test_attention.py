import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.attention import attend_reference, visibility_mask


def test_mask_causal_padding_window_segments_hand_worked():
    q = jnp.array([[0, 1, 2, -1]])
    m = np.asarray(visibility_mask(q, q))[0, 0]
    assert m.tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [0, 0, 0, 0],  # padding query sees nothing
    ]
    m = np.asarray(visibility_mask(q, q, window=2))[0, 0]
    assert m[2].tolist() == [0, 1, 1, 0]
    seg = jnp.array([[0, 0, 1, 1]])
    m = np.asarray(visibility_mask(jnp.array([[0, 1, 0, 1]]), jnp.array([[0, 1, 0, 1]]),
                                   q_segments=seg, k_segments=seg))[0, 0]
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    with pytest.raises(ValueError, match="together"):
        visibility_mask(q, q, q_segments=seg)


def test_attend_matches_naive_loop_with_slots_out_of_order():
    rng = np.random.default_rng(0)
    b, t, k, g, h, s = 2, 3, 2, 2, 4, 5
    q = rng.normal(size=(b, t, k, g, h)).astype(np.float32)
    kk = rng.normal(size=(b, k, s, h)).astype(np.float32)
    vv = rng.normal(size=(b, k, s, h)).astype(np.float32)
    qpos = np.array([[5, 6, 7], [2, 3, -1]])
    kpos = np.array([[[3, 0, 7, 6, -1], [4, 1, 2, 7, 5]], [[0, 1, 2, 3, 4], [-1, -1, 0, 2, 3]]])
    out = np.asarray(attend_reference(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(vv),
                                      jnp.asarray(qpos), jnp.asarray(kpos)))
    for bi in range(b):
        for ti in range(t):
            if qpos[bi, ti] < 0:
                continue
            for ki in range(k):
                ok = (kpos[bi, ki] >= 0) & (kpos[bi, ki] <= qpos[bi, ti])
                for gi in range(g):
                    sc = kk[bi, ki, ok] @ q[bi, ti, ki, gi] / np.sqrt(h)
                    p = np.exp(sc - sc.max())
                    p /= p.sum()
                    np.testing.assert_allclose(out[bi, ti, ki, gi], p @ vv[bi, ki, ok], rtol=1e-5, atol=1e-6)


def _random_chunk(dtype, b=2, t=37, k=2, g=3, h=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, k, g, h)), dtype)
    kk = jnp.asarray(rng.normal(size=(b, t, k, h)), dtype)
    vv = jnp.asarray(rng.normal(size=(b, t, k, h)), dtype)
    positions = jnp.asarray(np.stack([np.r_[np.arange(20), np.arange(t - 20)],
                                      np.r_[np.arange(t - 5), -np.ones(5, int)]]), jnp.int32)
    segments = jnp.asarray(np.stack([np.repeat([0, 1], [20, t - 20]), np.zeros(t, int)]), jnp.int32)
    return q, kk, vv, positions, segments


def test_attend_dense_reference_is_attend_reference():
    from jaxkv.attention import attend_dense

    q, k, v, pos, seg = _random_chunk(jnp.float32)
    want = attend_reference(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), pos, pos,
                            window=7, q_segments=seg, k_segments=seg)
    got = attend_dense(q, k, v, pos, window=7, segment_ids=seg, implementation="reference")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="implementation must be one of"):
        attend_dense(q, k, v, pos, implementation="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            attend_dense(q, k, v, pos, implementation="cudnn")
        with pytest.raises(ValueError, match="pallas_gpu"):
            attend_dense(q, k, v, pos, segment_ids=seg, implementation="pallas_gpu")
        with pytest.raises(ValueError, match="mosaic_gpu.*not gpu"):
            attend_dense(q, k, v, pos, segment_ids=seg, implementation="mosaic_gpu")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("window", [None, 50])
def test_attend_dense_pallas_matches_reference_on_gpu(window):
    """The block-sparse kernel (the default for packed 16-bit rows on one GPU) equals the
    reference on packed, restarted and padded rows, and the default picks it."""
    from jaxkv.attention import _default_dense_implementation, attend_dense

    q, k, v, pos, seg = _random_chunk(jnp.bfloat16, t=128, h=64)
    want = attend_dense(q, k, v, pos, window=window, segment_ids=seg, implementation="reference")
    got = attend_dense(q, k, v, pos, window=window, segment_ids=seg, implementation="pallas_gpu")
    real = np.asarray(pos)[:, :, None, None, None] >= 0
    np.testing.assert_allclose(np.where(real, np.asarray(got, np.float32), 0),
                               np.where(real, np.asarray(want, np.float32), 0), atol=2e-2)
    assert _default_dense_implementation(jnp.bfloat16, True, 64) == "pallas_gpu"
    assert _default_dense_implementation(jnp.bfloat16, False, 64) == "cudnn"


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("window", [None, 50])
def test_attend_dense_mosaic_matches_reference_on_hopper(window):
    """The block-sparse kernel's Hopper forward through the model's attention: packed, restarted
    and padded rows (a length that is not a multiple of its 128-row tiles), forward and gradient."""
    from jaxkv.attention import attend_dense
    from jaxkv.kernels.block_sparse_attention.api import _hopper

    if not _hopper():
        pytest.skip("mosaic_gpu needs a Hopper GPU")
    q, k, v, pos, seg = _random_chunk(jnp.bfloat16, t=200, h=64)
    real = np.asarray(pos)[:, :, None, None, None] >= 0

    def run(impl, dtype):
        kk, vv = k.astype(dtype), v.astype(dtype)
        f = lambda q: attend_dense(q, kk, vv, pos, window=window, segment_ids=seg, implementation=impl)  # noqa: E731
        out, vjp = jax.vjp(f, q.astype(dtype))
        return out, vjp(jnp.broadcast_to(jnp.asarray(real, out.dtype), out.shape))[0]
    (want, dwant), (got, dgot) = run("reference", jnp.float32), run("mosaic_gpu", jnp.bfloat16)
    np.testing.assert_allclose(np.where(real, np.asarray(got, np.float32), 0),
                               np.where(real, np.asarray(want, np.float32), 0), atol=2e-2)
    dgot, dwant = np.asarray(dgot, np.float32), np.asarray(dwant, np.float32)
    assert np.linalg.norm(dgot - dwant) / np.linalg.norm(dwant) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_attend_dense_cudnn_matches_reference_on_gpu():
    from jaxkv.attention import attend_dense

    q, k, v, pos, seg = _random_chunk(jnp.bfloat16, t=128, h=64)
    want = attend_dense(q, k, v, pos, window=50, segment_ids=seg, implementation="reference")
    got = attend_dense(q, k, v, pos, window=50, segment_ids=seg, implementation="cudnn")
    real = np.asarray(pos)[:, :, None, None, None] >= 0
    np.testing.assert_allclose(np.where(real, np.asarray(got, np.float32), 0),
                               np.where(real, np.asarray(want, np.float32), 0), atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("window", [None, 50])
def test_attend_dense_cudnn_fused_and_masked_layouts_match_reference_on_gpu(window):
    """No segments: contiguous right-padded rows take cuDNN's fused causal mask, any other layout
    (here a row that restarts its positions) the explicit mask; both equal the reference."""
    from jaxkv.attention import attend_dense

    q, k, v, _, _ = _random_chunk(jnp.bfloat16, t=128, h=64)
    contiguous = jnp.asarray(np.stack([np.arange(128), np.r_[np.arange(100) + 7, -np.ones(28, int)]]), jnp.int32)
    restarted = jnp.asarray(np.stack([np.r_[np.arange(60), np.arange(68)], np.arange(128)]), jnp.int32)
    for pos in (contiguous, restarted):
        want = attend_dense(q, k, v, pos, window=window, implementation="reference")
        got = attend_dense(q, k, v, pos, window=window, implementation="cudnn")
        real = np.asarray(pos)[:, :, None, None, None] >= 0
        np.testing.assert_allclose(np.where(real, np.asarray(got, np.float32), 0),
                                   np.where(real, np.asarray(want, np.float32), 0), atol=2e-2)


def test_contiguous_layout_hand_worked():
    from jaxkv.attention import contiguous_layout

    def ok(rows):
        return bool(contiguous_layout(jnp.asarray(rows, jnp.int32)))

    assert ok([[0, 1, 2, 3], [5, 6, -1, -1]])
    assert ok([[-1, -1, -1, -1]])
    assert not ok([[0, 1, 3, 4]])  # a gap
    assert not ok([[-1, 0, 1, 2]])  # left padding
    assert not ok([[0, 1, -1, 2]])  # padding inside the row
    from jaxkv.attention import contiguous_rows

    rows = contiguous_rows(jnp.asarray([[0, 1, 2, 3], [0, 1, 3, 4], [-1, 0, 1, 2], [7, 8, -1, -1]], jnp.int32))
    assert np.asarray(rows).tolist() == [True, False, False, True]


@pytest.mark.parametrize("sinks,window,block,t", [(3, 5, 5, 23), (2, 4, 6, 17), (9, 4, 4, 30), (0, 8, 8, 8)])
def test_attend_sinks_window_equals_the_masked_reference(sinks, window, block, t):
    """Blocked Lambda attention (sinks + window) equals one masked pass over every key, for
    blocks of any size >= window, sinks inside or beyond the first block, padded rows."""
    from jaxkv.attention import _MASKED, attend_sinks_window

    rng = np.random.default_rng(t)
    b, kh, g, h = 2, 2, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, kh, g, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32)
    pos = jnp.asarray(np.stack([np.arange(t), np.where(np.arange(t) < t - 3, np.arange(t), -1)]), jnp.int32)
    got = attend_sinks_window(q, k, v, pos, sinks=sinks, window=window, block=block)
    mask = visibility_mask(pos, pos)
    qp, kp = pos[:, None, :, None], pos[:, None, None, :]
    mask &= (kp < sinks) | (qp - kp < window)
    s = jnp.einsum("BTKGH,BKSH->BKGTS", q, k.transpose(0, 2, 1, 3)) * h ** -0.5
    p = jax.nn.softmax(jnp.where(mask[:, :, None], s, _MASKED), axis=-1)
    want = jnp.einsum("BKGTS,BKSH->BTKGH", p, v.transpose(0, 2, 1, 3))
    real = np.asarray(pos)[:, :, None, None, None] >= 0
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=1e-5, atol=1e-5)
    # a layout the blocks cannot honour is refused as NaN, not answered wrongly
    bad = attend_sinks_window(q, k, v, pos[:, ::-1], sinks=sinks, window=window, block=block)
    assert np.isnan(np.asarray(bad)).all()
    mixed = attend_sinks_window(q, k, v, jnp.stack([pos[0], pos[1, ::-1]]), sinks=sinks, window=window, block=block)
    np.testing.assert_array_equal(np.asarray(mixed[0]), np.asarray(got[0]))  # only the bad row is lost
    assert np.isnan(np.asarray(mixed[1])).all()
    with pytest.raises(ValueError, match="implementation"):
        attend_sinks_window(q, k, v, pos, sinks=sinks, window=window, implementation="cudnn")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_attend_sinks_window_through_the_kernel_on_gpu():
    """bf16 on a GPU: the default is the block-sparse kernel; it equals the blocked jnp pass."""
    from jaxkv.attention import attend_sinks_window

    q, k, v, pos, _ = _random_chunk(jnp.bfloat16, t=256, h=64)
    pos = jnp.broadcast_to(jnp.arange(256), pos.shape).at[1, 240:].set(-1)
    want = attend_sinks_window(q, k, v, pos, sinks=16, window=64, implementation="reference")
    got = attend_sinks_window(q, k, v, pos, sinks=16, window=64)
    real = np.asarray(pos)[:, :, None, None, None] >= 0
    np.testing.assert_allclose(np.where(real, np.asarray(got, np.float32), 0),
                               np.where(real, np.asarray(want, np.float32), 0), atol=2e-2)


def test_positions_that_would_only_broadcast_are_refused():
    """One position for every query (or key) broadcasts silently to all of them; refused by
    name. A [B, 1, S] key layout (one row of positions for every KV head) is fine."""
    from jaxkv.attention import attend_reference, attend_with_lse
    from jaxkv.errors import UserError

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 3, 1, 1, 4)), jnp.float32)
    k = v = jnp.asarray(rng.normal(size=(1, 1, 5, 4)), jnp.float32)
    qp, kp = jnp.arange(3)[None] + 2, jnp.arange(5)[None]
    for fn in (attend_reference, attend_with_lse):
        with pytest.raises(UserError, match="q_positions must be"):
            fn(q, k, v, jnp.array([[1]]), kp)
        with pytest.raises(UserError, match="k_positions must be"):
            fn(q, k, v, qp, jnp.array([[0]]))
        fn(q, k, v, qp, kp[:, None])
    with pytest.raises(UserError, match="expected q"):
        attend_with_lse(q, k, v[:, :, :4], qp, kp)
