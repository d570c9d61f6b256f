"""ssd: every backend against the reference (the chunked form, itself tested against the
recurrence in test_mamba2.py) through one shared test base, forward and gradients (interpret
mode on the CPU, compiled under the gpu marker); the dispatch's errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.kernels.ssd import ssd, ssd_chunked, ssd_recurrent


def _case(rng, b, t, h, p, g, n, dtype, per_step_a=False, state=True):
    r = lambda *s: rng.normal(size=s)  # noqa: E731
    a = -np.exp(0.5 * r(h))
    if per_step_a:
        a = a[None, None] + 0.1 * r(b, t, h)
    return (jnp.asarray(r(b, t, h, p), dtype), jax.nn.softplus(jnp.asarray(r(b, t, h) - 1, jnp.float32)),
            jnp.asarray(a, jnp.float32), jnp.asarray(r(b, t, g, n), dtype), jnp.asarray(r(b, t, g, n), dtype),
            jnp.asarray(r(b, h, p, n), jnp.float32) if state else None)


def _weights(shape, seed):  # a fixed random projection: the loss reads every output element
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


CASES = [  # b, t, h, p, g, n, block_t, block_p
    (2, 40, 4, 32, 2, 16, 16, 16),  # T not a block multiple; two channel blocks; 2 heads per group
    (1, 64, 2, 16, 1, 32, 32, 32),  # block_p capped at P; one group
    (1, 17, 3, 16, 3, 16, 16, 16),  # one step past a block; a group per head
]


class SSDBase:
    implementation: str
    options: dict = {}
    kernel = False  # takes block_t
    forms = False  # takes block_p and split (the GPU kernel's fused and split forwards)

    def _fn(self, block_t, block_p, split=None, backward_heads=1):
        opts = dict(self.options)
        if self.kernel:
            opts["block_t"] = block_t
        if self.forms:
            opts.update(block_p=block_p, split=split, backward_heads=backward_heads)
        return functools.partial(ssd, chunk_size=16, implementation=self.implementation, **opts)

    @pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])  # the forward's two forms
    @pytest.mark.parametrize("b,t,h,p,g,n,block_t,block_p", CASES)
    def test_forward_matches_the_reference(self, b, t, h, p, g, n, block_t, block_p, split):
        if split and not self.forms:
            pytest.skip("one form only")
        args = _case(np.random.default_rng(t), b, t, h, p, g, n, jnp.float32, per_step_a=t == 17)
        y, final = jax.jit(self._fn(block_t, block_p, split))(*args)
        want_y, want_f = jax.jit(ssd_recurrent)(*args)  # the specification
        scale = float(jnp.abs(want_y).max())
        assert y.dtype == jnp.float32 and y.shape == want_y.shape and final.shape == want_f.shape
        np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), atol=1e-5 * max(1.0, scale))
        np.testing.assert_allclose(np.asarray(final), np.asarray(want_f), atol=1e-5 * max(1.0, float(jnp.abs(want_f).max())))

    def test_bf16_inputs_stay_close(self):
        args = _case(np.random.default_rng(3), 2, 48, 4, 32, 2, 32, jnp.bfloat16, state=False)
        y, final = jax.jit(self._fn(16, 32))(*args)
        want_y, want_f = jax.jit(ssd_recurrent)(*args)  # fp32 arithmetic on the bf16 values
        rel = lambda a, w: float(jnp.linalg.norm(a - w) / jnp.linalg.norm(w))  # noqa: E731
        assert rel(y, want_y) < 2e-2 and rel(final, want_f) < 2e-2

    @pytest.mark.parametrize("b,t,h,p,g,n,block_t,block_p,split,heads", [
        CASES[0] + (False, 1), CASES[0] + (False, 2), CASES[1] + (False, 1), CASES[2] + (True, 1),
        (1, 40, 6, 16, 2, 16, 16, 16, False, 3),  # three heads a backward program, summing their dB, dC
    ])
    def test_gradients_match_the_reference(self, b, t, h, p, g, n, block_t, block_p, split, heads):
        if heads > 1 and not self.forms:
            pytest.skip("the backward's heads a program are the GPU kernel's")
        args = _case(np.random.default_rng(t + 1), b, t, h, p, g, n, jnp.float32)
        wy, wf = _weights((b, t, h, p), 0), _weights((b, h, p, n), 1)

        def grads(fn):
            def loss(*a):
                y, f = fn(*a)
                return jnp.sum(y * wy) + jnp.sum(f * wf)
            return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)

        got = grads(self._fn(block_t, block_p, split, heads))
        want = grads(functools.partial(ssd_chunked, chunk_size=16))
        for name, a, w in zip(("x", "dt", "A", "B", "C", "initial_state"), got, want):
            assert a.shape == w.shape, name
            np.testing.assert_allclose(np.asarray(a), np.asarray(w), atol=2e-5 * max(1.0, float(jnp.abs(w).max())),
                                       err_msg=name)


class TestReference(SSDBase):
    implementation = "reference"


class TestPallasGpuInterpret(SSDBase):
    implementation = "pallas_gpu"
    options = {"interpret": True}
    kernel = forms = True


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestPallasGpu(SSDBase):
    implementation = "pallas_gpu"
    kernel = forms = True


class TestPallasTpuInterpret(SSDBase):
    implementation = "pallas_tpu"
    options = {"interpret": True}
    kernel = True


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
class TestPallasTpu(SSDBase):
    implementation = "pallas_tpu"
    kernel = True


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_the_tpu_kernel_lowers_for_the_tpu(device_kind, dtype):
    """Pallas's Mosaic lowering of the TPU kernels (forward; forward + backward), run here by
    exporting for the TPU (the tile
    rules, the ops' lowering rules); what only Mosaic's compiler on a TPU checks is not covered.
    A block that breaks the TPU's tiling is refused by the same lowering."""
    from jaxkv.kernels.ssd.pallas_tpu import ssd_pallas_tpu
    from tests.tpu_lowering import lower_for_tpu

    args = _case(np.random.default_rng(0), 2, 256, 4, 64, 2, 128, dtype)

    def lower(block_t, grad=False):
        fn = functools.partial(ssd_pallas_tpu, block_t=block_t)
        if grad:  # the forward keeping its states, and both backward kernels
            fn = jax.grad(lambda *a: jnp.sum(ssd_pallas_tpu(*a, block_t=block_t)[0]), argnums=(0, 1, 3, 4, 5))
        return lower_for_tpu(fn, *args, device_kind=device_kind)

    text = lower(128)
    assert "tpu_custom_call" in text and "jaxkv_ssd_fwd_tpu" in text
    text = lower(128, grad=True)
    assert "jaxkv_ssd_bwd_states_tpu" in text and "jaxkv_ssd_bwd_grads_tpu" in text
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        lower(64)  # the log-decay row's block [1, 64]: not a whole 128-lane tile


def test_bad_arguments_name_themselves():
    x, dt, a, b, c, s0 = _case(np.random.default_rng(0), 1, 8, 2, 16, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match="dt"):
        ssd(x, dt[:, :4], a, b, c)
    with pytest.raises(ValueError, match="A must"):
        ssd(x, dt, a[:1], b, c)
    with pytest.raises(ValueError, match="B and C"):
        ssd(x, dt, a, b, c[:, :4])
    with pytest.raises(ValueError, match="groups"):
        ssd(x[:, :, :1], dt[:, :, :1], a[:1], jnp.concatenate([b, b], 2), jnp.concatenate([c, c], 2))
    with pytest.raises(ValueError, match="initial_state"):
        ssd(x, dt, a, b, c, s0[:, :1])
    with pytest.raises(ValueError, match="implementation"):
        ssd(x, dt, a, b, c, implementation="cuda")
    with pytest.raises(ValueError, match="block_t"):
        ssd(x, dt, a, b, c, implementation="pallas_gpu", interpret=True, block_t=24)
    with pytest.raises(ValueError, match="kernel options"):
        ssd(x, dt, a, b, c, implementation="reference", block_t=16)
    x24, dt24, a24, b24, c24, _ = _case(np.random.default_rng(1), 1, 16, 1, 24, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"head_dim P \(24\) must be a multiple of block_p \(16\)"):
        ssd(x24, dt24, a24, b24, c24, implementation="pallas_gpu", interpret=True, block_p=16)  # not NaN channels
    for bad in (0, 2, True):  # 2 heads, one group: 2 divides; 1 head per group here
        with pytest.raises(ValueError, match="backward_heads"):
            ssd(x[:, :, :1], dt[:, :, :1], a[:1], b, c, implementation="pallas_gpu", interpret=True,
                backward_heads=bad)
    with pytest.raises(ValueError, match=r"\['block_p'\] are not the TPU kernel's"):
        ssd(x, dt, a, b, c, implementation="pallas_tpu", interpret=True, block_p=16)
    with pytest.raises(ValueError, match="multiple of 8"):
        ssd(x, dt, a, b, c, implementation="pallas_tpu", interpret=True, block_t=12)
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="pallas_tpu.*not tpu"):
            ssd(x, dt, a, b, c, implementation="pallas_tpu")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="pallas_gpu"):
            ssd(x, dt, a, b, c, implementation="pallas_gpu")
        with pytest.warns(UserWarning, match="reference"):
            ssd(x, dt, a, b, c)


def test_bench_ssd_on_a_tiny_shape():
    """`jaxkv bench ssd` end to end (interpret mode): the kernel row agrees with the reference it
    is timed against and both rows carry their timings."""
    from jaxkv.bench_mamba import bench_ssd

    seen = []
    rows = bench_ssd(batch=1, length=48, heads=2, head_dim=16, state=16, configs=((16, 16, 4, True, 2),),
                     interpret=True, progress=seen.append)
    assert [r["kernel"] for r in rows] == [False, True] and seen == rows
    for r in rows:
        assert r["forward_s"] > 0 and r["forward_backward_s"] > 0 and r["io_bytes"] > 0
        assert r["max_rel_err_vs_reference"] < 1e-2, r  # bf16 inputs, bf16 dots in the kernel


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_the_model_runs_the_kernel_as_the_reference():
    """A Mamba-2 forward (fp32) through the kernel equals the one through the reference."""
    from jaxkv.models import mamba2

    config = mamba2.Mamba2Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, head_dim=16,
                                 state_size=16, n_groups=2, chunk_size=16)
    params = mamba2.init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 40)), jnp.int32)
    run = jax.jit(mamba2.forward, static_argnames=("config", "ssd_implementation"))
    got, gs = run(params, tokens, config=config, ssd_implementation="pallas_gpu")
    want, ws = run(params, tokens, config=config, ssd_implementation="reference")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
    np.testing.assert_allclose(np.asarray(gs.layers[1].ssm), np.asarray(ws.layers[1].ssm), atol=1e-4)


@pytest.mark.parametrize("heads", [1, 3], ids=["a head a program", "3 heads a program"])
def test_the_gpu_backward_lowers_for_an_h200(heads):
    """Pallas's Triton lowering of the forward and backward (6 heads in 2 groups, bf16), exported
    for an H200 on any machine; ``heads`` > 1 walks a group's heads with a dynamic head index."""
    from jaxkv.kernels.ssd.pallas_gpu import ssd_pallas_gpu
    from tests.gpu_lowering import lower_for_gpu

    args = _case(np.random.default_rng(0), 2, 128, 6, 64, 2, 64, jnp.bfloat16)

    def f(x, dt, a, b, c, s0):
        loss = lambda *z: jnp.sum(ssd_pallas_gpu(*z, backward_heads=heads)[0])  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(x, dt, a, b, c, s0)
    text = lower_for_gpu(f, *args)
    assert "jaxkv_ssd_bwd_grads" in text and "jaxkv_ssd_fwd" in text
