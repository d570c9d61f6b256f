"""centroid_scores: the reference against Squeezed's own cluster weights and a hand-worked case;
every backend against the reference through one shared test base (interpret mode on the CPU)."""
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxkv.cache.squeezed import cluster_weights
from jaxkv.kernels.centroid_scores import centroid_scores, centroid_scores_reference


def _case(rng, b, kh, g, h, c, dtype, empty=0.2):
    q = jnp.asarray(rng.normal(size=(b, kh, g, h)), dtype)
    cent = jnp.asarray(rng.normal(size=(b, kh, c, h)), jnp.float32)
    counts = rng.integers(1, 9, (b, kh, c)).astype(np.float32)
    counts[rng.random((b, kh, c)) < empty] = 0  # clusters without keys
    return q, cent, jnp.asarray(counts)


def test_reference_hand_worked():
    """Equal scores: a key's weight is 1 / (keys in non-empty clusters); an empty cluster gets 0."""
    q = jnp.zeros((1, 1, 2, 4))
    cent = jnp.ones((1, 1, 3, 4))
    counts = jnp.asarray([[[2.0, 0.0, 3.0]]])
    w, kept = centroid_scores_reference(q, cent, counts, jnp.asarray([0.1]))
    np.testing.assert_allclose(np.asarray(w)[0, 0], [0.2, 0.0, 0.2], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(kept)[0, 0], [True, False, True])


def test_reference_equals_squeezeds_cluster_weights():
    rng = np.random.default_rng(0)
    q, cent, counts = _case(rng, 2, 3, 4, 16, 37, jnp.float32)
    w, _ = centroid_scores_reference(q, cent, counts, jnp.zeros((2,)))
    want = cluster_weights(q[:, None], cent, counts, jnp.ones((2, 1), bool))  # [B, T=1, K, G, H]
    np.testing.assert_allclose(np.asarray(w), np.asarray(want), rtol=1e-5, atol=1e-8)


class CentroidScoresBase:
    implementation: str
    options: dict = {}
    kernel = False

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("b,kh,g,h,c,block_c", [
        (2, 2, 4, 32, 100, 32),  # clusters not a block multiple
        (1, 3, 1, 16, 64, 16),   # one query head
        (3, 1, 8, 64, 20, 64),   # fewer clusters than one block: the last block overlaps the one before
        (1, 2, 4, 32, 10, 64),   # fewer clusters than the smallest block (padded)
    ])
    def test_matches_the_reference(self, dtype, b, kh, g, h, c, block_c):
        rng = np.random.default_rng(c + g)
        q, cent, counts = _case(rng, b, kh, g, h, c, dtype)
        reference = jax.jit(centroid_scores_reference)  # jitted: one compile each, not one per eager op
        want_w, _ = reference(q, cent, counts, jnp.zeros((b,)))
        thr = jnp.asarray(np.quantile(np.asarray(want_w).reshape(b, -1), 0.7, axis=1), jnp.float32)
        want_w, want_k = reference(q, cent, counts, thr)
        got_w, got_k = jax.jit(functools.partial(centroid_scores, implementation=self.implementation, **self.options,
                                                 **({"block_c": block_c} if self.kernel else {})))(q, cent, counts, thr)
        np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=1e-5, atol=1e-7)
        close = np.isclose(np.asarray(want_w), np.asarray(thr)[:, None, None], rtol=1e-5)  # ties at the threshold
        np.testing.assert_array_equal(np.asarray(got_k)[~close], np.asarray(want_k)[~close])
        assert 0.1 < float(np.mean(np.asarray(got_k))) < 0.9  # the threshold splits them


class TestReference(CentroidScoresBase):
    implementation = "reference"


class TestPallasGpuInterpret(CentroidScoresBase):
    implementation = "pallas_gpu"
    options = {"interpret": True}
    kernel = True


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestPallasGpu(CentroidScoresBase):
    implementation = "pallas_gpu"
    kernel = True


class TestPallasTpuInterpret(CentroidScoresBase):
    implementation = "pallas_tpu"
    options = {"interpret": True}
    kernel = True


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
class TestPallasTpu(CentroidScoresBase):
    implementation = "pallas_tpu"
    kernel = True


def test_the_tpu_kernel_lowers_for_the_tpu():
    """Pallas's Mosaic lowering of the TPU kernel (6,553 clusters a head, blocks of 512), run here
    by exporting for a TPU v5e; what only Mosaic's compiler on a TPU checks is not covered."""
    from jaxkv.kernels.centroid_scores.pallas_tpu import centroid_scores_pallas_tpu
    from tests.tpu_lowering import lower_for_tpu

    q, cent, counts = _case(np.random.default_rng(0), 2, 2, 4, 128, 6553, jnp.bfloat16)
    text = lower_for_tpu(centroid_scores_pallas_tpu, q, cent, counts, jnp.zeros((2,)))
    assert "tpu_custom_call" in text and "jaxkv_centroid_scores_tpu" in text


def test_bad_arguments_name_themselves():
    q, cent, counts = jnp.zeros((1, 2, 4, 16)), jnp.zeros((1, 2, 8, 16)), jnp.ones((1, 2, 8))
    with pytest.raises(ValueError, match="counts"):
        centroid_scores(q, cent, counts[:, :, :4], jnp.zeros((1,)))
    with pytest.raises(ValueError, match="threshold"):
        centroid_scores(q, cent, counts, jnp.zeros((2,)))
    with pytest.raises(ValueError, match="centroids"):
        centroid_scores(q, cent[:, :1], counts, jnp.zeros((1,)))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="pallas_gpu"):
            centroid_scores(q, cent, counts, jnp.zeros((1,)), implementation="pallas_gpu")
    with pytest.raises(ValueError, match=r"\['num_warps'\] are not the TPU kernel's"):
        centroid_scores(q, cent, counts, jnp.zeros((1,)), implementation="pallas_tpu", interpret=True, num_warps=4)
    with pytest.raises(ValueError, match="block_c"):
        centroid_scores(q, cent, counts, jnp.zeros((1,)), implementation="pallas_tpu", interpret=True, block_c=12)
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="pallas_tpu.*not tpu"):
            centroid_scores(q, cent, counts, jnp.zeros((1,)), implementation="pallas_tpu")
