"""page_select: the reference against a numpy oracle (Quest's bound, top pages, ascending), and
every backend against the reference through one shared test base (interpret mode on the CPU,
compiled under the gpu marker); the GPU kernel's Triton lowering for an H200, without one."""
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxkv.kernels.page_select import page_select, page_select_reference, physical_scores


def _case(rng, b, kh, g, h, logical, empty=0, dtype=jnp.bfloat16, tokens=4):
    """q and per-logical-page key min/max from random keys; the last ``empty`` pages of each row
    hold no key (+inf / -inf)."""
    q = jnp.asarray(rng.normal(size=(b, kh, g, h)), jnp.float32)
    k = rng.normal(size=(b, kh, logical, tokens, h)) + rng.normal(size=(1, 1, logical, 1, h))
    lo, hi = k.min(3), k.max(3)
    if empty:
        lo[:, :, -empty:], hi[:, :, -empty:] = np.inf, -np.inf
    return q, jnp.asarray(lo, dtype), jnp.asarray(hi, dtype)


def _oracle(q, lo, hi, group, count):
    q, lo, hi = (np.asarray(x, np.float64) for x in (q, lo, hi))
    b, kh, n, h = lo.shape
    out = np.full((b, kh, count), -1)
    for i in range(b):
        for j in range(kh):
            bound = np.full(n, -np.inf)
            for p in range(n):
                if np.isinf(lo[i, j, p]).all():
                    continue
                l, u = np.where(np.isinf(lo[i, j, p]), 0, lo[i, j, p]), np.where(np.isinf(hi[i, j, p]), 0, hi[i, j, p])
                bound[p] = max(np.sum(np.maximum(qq * l, qq * u)) for qq in q[i, j])
            phys = bound.reshape(-1, group).max(1)
            order = sorted(range(len(phys)), key=lambda p: (-phys[p], p))  # ties: the lower page
            chosen = sorted(p for p in order[:count] if phys[p] > -np.inf)
            out[i, j, :len(chosen)] = chosen
    return out


def test_reference_is_the_top_pages_by_quests_bound_ascending():
    rng = np.random.default_rng(0)
    q, lo, hi = _case(rng, 2, 2, 3, 16, 24, empty=5, dtype=jnp.float32)
    for group, count in [(1, 6), (4, 3), (2, 20)]:  # the last: more pages asked than hold keys
        got = np.asarray(page_select_reference(q, lo, hi, group=group, count=count))
        np.testing.assert_array_equal(got, _oracle(q, lo, hi, group, count))


class PageSelectBase:
    implementation: str
    options: dict = {}
    kernel = False  # takes the scoring kernel's tiling

    def select(self, q, lo, hi, **kw):
        return jax.jit(functools.partial(page_select, implementation=self.implementation, **self.options, **kw))(
            q, lo, hi)

    @pytest.mark.parametrize("b,kh,g,h,logical,group,count,empty", [
        (2, 2, 4, 16, 64, 4, 5, 3),      # LServe's 4 logical pages a physical page
        (1, 3, 3, 32, 40, 2, 8, 0),      # 3 query heads a KV head; 20 pages, not a power of two
        (2, 1, 1, 16, 12, 1, 20, 4),     # more pages asked than hold keys: -1 after them
        (1, 2, 8, 64, 96, 3, 7, 10),     # 3 logical pages a physical page (strided)
        (3, 2, 2, 16, 7, 1, 3, 7),       # every page empty: all -1
    ])
    def test_matches_the_reference(self, b, kh, g, h, logical, group, count, empty):
        rng = np.random.default_rng(logical + count)
        q, lo, hi = _case(rng, b, kh, g, h, logical, empty)
        want = page_select_reference(q, lo, hi, group=group, count=count)
        got = self.select(q, lo, hi, group=group, count=count)
        assert got.shape == (b, kh, count) and got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    def test_ties_go_to_the_lower_page(self):
        """Pages of equal bound (copied bounds): the kernel's bisection keeps the ties the
        reference's top_k keeps."""
        rng = np.random.default_rng(3)
        q, lo, hi = _case(rng, 1, 2, 2, 16, 32)
        lo = lo.at[:, :, 16:].set(lo[:, :, :16])  # pages 16.. repeat pages 0..
        hi = hi.at[:, :, 16:].set(hi[:, :, :16])
        for count in (1, 5, 17, 31):
            want = page_select_reference(q, lo, hi, group=1, count=count)
            np.testing.assert_array_equal(np.asarray(self.select(q, lo, hi, group=1, count=count)),
                                          np.asarray(want))

    def test_negative_bounds(self):
        """Every bound below zero (the int keys of negative floats run backwards)."""
        rng = np.random.default_rng(4)
        q, lo, hi = _case(rng, 2, 1, 2, 16, 24)
        lo, hi = lo - 50.0, hi - 50.0
        q = jnp.abs(q)
        scores = physical_scores(q, lo, hi, group=2)
        assert (np.asarray(scores) < 0).all()
        want = page_select_reference(q, lo, hi, group=2, count=4)
        np.testing.assert_array_equal(np.asarray(self.select(q, lo, hi, group=2, count=4)), np.asarray(want))


    @pytest.mark.parametrize("chunk,group", [(2, 1), (4, 4), (8, 3)])
    def test_scoring_chunks(self, chunk, group):
        """The scoring kernel at ``chunk`` physical pages a program."""
        if not self.kernel:
            pytest.skip("the reference has no tiling")
        rng = np.random.default_rng(chunk * 10 + group)
        q, lo, hi = _case(rng, 2, 2, 4, 32, 32 * group, empty=group * 3)
        want = page_select_reference(q, lo, hi, group=group, count=9)
        got = self.select(q, lo, hi, group=group, count=9, chunk=chunk)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


    @pytest.mark.parametrize("q_dtype,group", [(jnp.float32, 1), (jnp.bfloat16, 4), (jnp.bfloat16, 3)])
    def test_scoring_on_the_tensor_cores(self, q_dtype, group):
        """``scoring='dots'``: the bound as two products, max(q, 0) hi + min(q, 0) lo."""
        if not self.kernel:
            pytest.skip("the reference has one scoring")
        rng = np.random.default_rng(group)
        q, lo, hi = _case(rng, 2, 2, 3, 32, 64 * group, empty=group * 5)
        q = q.astype(q_dtype)
        want = page_select_reference(q, lo, hi, group=group, count=12)
        got = self.select(q, lo, hi, group=group, count=12, scoring="dots", chunk=16)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


class TestReference(PageSelectBase):
    implementation = "reference"


class TestPallasGpuInterpret(PageSelectBase):
    implementation = "pallas_gpu"
    options = {"interpret": True}
    kernel = True


class TestPallasTpuInterpret(PageSelectBase):
    implementation = "pallas_tpu"
    options = {"interpret": True}


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
class TestPallasTpu(PageSelectBase):
    implementation = "pallas_tpu"


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestPallasGpu(PageSelectBase):
    implementation = "pallas_gpu"
    kernel = True


def test_the_gpu_kernels_lower_for_an_h200():
    """Pallas's Triton lowering of both kernels at LServe's 128k decode shape (8,192 logical
    pages of 16 tokens, 4 a physical page, 64 chosen), run here by exporting for the card."""
    from jaxkv.kernels.page_select.pallas_gpu import page_select_pallas_gpu
    from tests.gpu_lowering import lower_for_gpu

    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    text = lower_for_gpu(functools.partial(page_select_pallas_gpu, group=4, count=64),
                         spec(4, 8, 4, 128), spec(4, 8, 8192, 128), spec(4, 8, 8192, 128))
    assert "jaxkv_page_scores" in text and "jaxkv_page_select" in text
    text = lower_for_gpu(functools.partial(page_select_pallas_gpu, group=4, count=64, scoring="dots"),
                         spec(4, 8, 4, 128), spec(4, 8, 8192, 128), spec(4, 8, 8192, 128))
    assert "jaxkv_page_scores" in text


@pytest.mark.parametrize("h,logical", [(128, 8192), (64, 200)])  # the second padded to lane tiles
def test_the_tpu_kernel_lowers_for_the_tpu(h, logical):
    """Pallas's Mosaic lowering of the scoring kernel at LServe's 128k decode shape (8,192
    logical pages, head dim 128) and at a page count that is no lane-tile multiple."""
    from jaxkv.kernels.page_select.pallas_tpu import page_select_pallas_tpu
    from tests.tpu_lowering import lower_for_tpu

    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    text = lower_for_tpu(functools.partial(page_select_pallas_tpu, group=4, count=64),
                         spec(2, 8, 4, h), spec(2, 8, logical, h), spec(2, 8, logical, h))
    assert "tpu_custom_call" in text and "jaxkv_page_scores_tpu" in text


def test_bad_arguments_name_themselves():
    q, lo, hi = _case(np.random.default_rng(5), 1, 2, 2, 16, 8)
    with pytest.raises(ValueError, match="group"):
        page_select(q, lo, hi, group=3, count=2, implementation="reference")
    with pytest.raises(ValueError, match="count"):
        page_select(q, lo, hi, group=2, count=0, implementation="reference")
    with pytest.raises(ValueError, match="kmin"):
        page_select(q, lo[:, :1], hi[:, :1], group=2, count=2, implementation="reference")
    with pytest.raises(ValueError, match="not tpu"):
        page_select(q, lo, hi, group=2, count=2, implementation="pallas_tpu")  # no TPU here, no interpret
    with pytest.raises(ValueError, match="kernel options"):
        page_select(q, lo, hi, group=2, count=2, implementation="pallas_tpu", interpret=True, chunk=2)
    from jaxkv.kernels.page_select.pallas_gpu import default_chunk, page_select_pallas_gpu

    with pytest.raises(ValueError, match="chunk"):
        page_select_pallas_gpu(q, lo, hi, group=2, count=2, chunk=8, interpret=True)  # 4 pages
    assert default_chunk(2048, 1) == 64 and default_chunk(2048, 4) == 16 and default_chunk(20, 1) == 4
    with pytest.raises(ValueError, match="scoring"):
        page_select_pallas_gpu(q, lo, hi, group=2, count=2, scoring="mxu", interpret=True)
    with pytest.raises(ValueError, match="chunk >= 16"):
        page_select_pallas_gpu(q, lo, hi, group=2, count=2, scoring="dots", interpret=True)  # 4 pages
    with pytest.raises(ValueError, match="cannot run"):
        page_select(q, lo, hi, group=2, count=2, implementation="pallas_gpu")  # the CPU: no GPU
