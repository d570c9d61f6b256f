"""quantized_decode: the reference against attention over the dequantized cache (numpy) and
against sparse_decode's reference on the same values; every backend against the reference
through one shared test base (interpret mode on the CPU, compiled under the gpu marker)."""
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxkv.cache.quant import dequantize, quantize
from jaxkv.kernels.quantized_decode import quantized_decode, quantized_decode_reference
from jaxkv.kernels.sparse_decode import dense_decode


def _case(rng, b, kh, g, h, s, bits, dtype, lengths, hidden=0.2):
    """Random q and a quantized cache; slots past a row's length and a share of the rest hidden."""
    q = jnp.asarray(rng.normal(size=(b, kh, g, h)), dtype)
    k = jnp.asarray(rng.normal(size=(b, kh, s, h)) * 2 + rng.normal(size=(1, 1, 1, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kh, s, h)), jnp.float32)
    qk, qv = quantize(k, bits), quantize(v, bits)
    pos = np.broadcast_to(np.arange(s), (b, kh, s)).copy()
    pos[np.broadcast_to(np.arange(s)[None, None, :] >= np.asarray(lengths)[:, None, None], pos.shape)] = -1
    pos[rng.random((b, kh, s)) < hidden] = -1
    args = (q, qk.codes, qk.scale[..., 0], qk.zero[..., 0], qv.codes, qv.scale[..., 0], qv.zero[..., 0],
            jnp.asarray(pos, jnp.int32))
    return args, dequantize(qk), dequantize(qv)


def test_reference_is_attention_over_the_dequantized_tokens():
    rng = np.random.default_rng(0)
    args, k, v = _case(rng, 2, 2, 3, 16, 40, 4, jnp.float32, [40, 17])
    out, lse = quantized_decode_reference(*args, bits=4)
    q, pos = np.asarray(args[0], np.float64), np.asarray(args[-1])
    s = np.einsum("bkgh,bksh->bkgs", q, np.asarray(k, np.float64)) / 4.0
    s = np.where(pos[:, :, None, :] >= 0, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    want = np.einsum("bkgs,bksh->bkgh", p / p.sum(-1, keepdims=True), np.asarray(v, np.float64))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), (m[..., 0] + np.log(p.sum(-1))), rtol=1e-6)


def test_reference_equals_dense_decode_on_the_same_values():
    """Every slot visible up to the length: quantized decode = dense decode over k, v dequantized."""
    rng = np.random.default_rng(1)
    args, k, v = _case(rng, 2, 2, 4, 32, 64, 2, jnp.float32, [64, 30], hidden=0.0)
    lengths = jnp.asarray([64, 30], jnp.int32)
    got, got_lse = quantized_decode_reference(*args, bits=2)
    want, want_lse = dense_decode(args[0], k, v, lengths, block_size=16, implementation="reference")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_lse), np.asarray(want_lse), rtol=1e-6)


class QuantizedDecodeBase:
    implementation: str
    options: dict = {}
    kernel = False  # takes block_size
    splits = False  # takes blocks_per_split (the GPU kernel's split-K)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
    @pytest.mark.parametrize("b,kh,g,h,s,bits,block,lengths,per_split", [
        (2, 2, 4, 64, 96, 4, 16, [96, 37], 2),     # ragged; splits of 2 blocks, the last short
        (1, 1, 1, 64, 64, 2, 32, [64], 1),         # one query head, 2-bit
        (3, 2, 8, 128, 128, 8, 64, [128, 5, 0], None),  # 8-bit, a row with nothing visible
        (2, 1, 4, 64, 64, 3, 16, [64, 50], 3),     # 3-bit (two codes a byte)
    ])
    def test_matches_the_reference(self, dtype, b, kh, g, h, s, bits, block, lengths, per_split):
        rng = np.random.default_rng(s + bits)
        args, _, _ = _case(rng, b, kh, g, h, s, bits, dtype, lengths)
        # jitted: one compile each instead of one per eager operation
        want, want_lse = jax.jit(functools.partial(quantized_decode_reference, bits=bits))(*args)
        opts = dict(self.options, **({"block_size": block} if self.kernel else {}),
                    **({"blocks_per_split": per_split} if self.splits else {}))
        got, got_lse = jax.jit(functools.partial(quantized_decode, bits=bits, implementation=self.implementation,
                                                 **opts))(*args)
        assert got.shape == want.shape and got.dtype == args[0].dtype
        # fp16 keeps 3 more mantissa bits than bf16: a kernel that rounds it to bf16 fails here
        tol, lse_tol = {jnp.float32: (2e-5, 2e-4), jnp.bfloat16: (3e-2, 3e-1), jnp.float16: (3e-3, 2e-3)}[dtype]
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
        np.testing.assert_allclose(np.asarray(got_lse), np.asarray(want_lse), atol=lse_tol, rtol=tol)
        if 0 in lengths:  # nothing visible: out 0, lse -inf
            row = lengths.index(0)
            assert not np.asarray(got)[row].any() and np.isneginf(np.asarray(got_lse)[row]).all()


class TestReference(QuantizedDecodeBase):
    implementation = "reference"


class TestPallasGpuInterpret(QuantizedDecodeBase):
    implementation = "pallas_gpu"
    options = {"interpret": True}
    kernel = splits = True


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestPallasGpu(QuantizedDecodeBase):
    implementation = "pallas_gpu"  # the PTX unpack at 2-4 bits with a 16-bit query
    kernel = splits = True


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestPallasGpuShiftUnpack(QuantizedDecodeBase):
    implementation = "pallas_gpu"
    options = {"unpack": "shift"}
    kernel = splits = True


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_ptx_unpack_gives_the_shift_unpacks_bits(bits, dtype):
    """Both unpacks feed the same exact small integers to the same dots: identical outputs."""
    from jaxkv.kernels.quantized_decode.pallas_gpu import quantized_decode_pallas_gpu

    args, _, _ = _case(np.random.default_rng(bits), 2, 2, 4, 128, 512, bits, dtype, [512, 300])
    run = {u: jax.jit(functools.partial(quantized_decode_pallas_gpu, bits=bits, unpack=u))(*args)
           for u in ("ptx", "shift")}
    np.testing.assert_array_equal(np.asarray(run["ptx"][0], np.float32), np.asarray(run["shift"][0], np.float32))
    np.testing.assert_array_equal(np.asarray(run["ptx"][1]), np.asarray(run["shift"][1]))


@pytest.mark.parametrize("bits", [2, 4])
def test_the_gpu_kernel_lowers_for_an_h200(bits):
    """Pallas's Triton lowering at the bench's shape (GQA 4, head dim 128, blocks of 64),
    exported for the card on the CPU."""
    from jaxkv.kernels.quantized_decode.pallas_gpu import quantized_decode_pallas_gpu
    from tests.gpu_lowering import lower_for_gpu

    args, _, _ = _case(np.random.default_rng(0), 2, 2, 4, 128, 512, bits, jnp.bfloat16, [512, 100])
    text = lower_for_gpu(functools.partial(quantized_decode_pallas_gpu, bits=bits), *args)
    assert "jaxkv_quantized_decode" in text


class TestPallasTpuInterpret(QuantizedDecodeBase):
    implementation = "pallas_tpu"
    options = {"interpret": True}
    kernel = True


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
class TestPallasTpu(QuantizedDecodeBase):
    implementation = "pallas_tpu"
    kernel = True


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_tpu_kernel_lowers_for_the_tpu(bits):
    """Pallas's Mosaic lowering of the TPU kernel at a decode shape (GQA 4, head dim 128, 512
    slots in blocks of 128), run here by exporting for a TPU v5e; what only Mosaic's compiler
    on a TPU checks is not covered."""
    from jaxkv.kernels.quantized_decode.pallas_tpu import quantized_decode_pallas_tpu
    from tests.tpu_lowering import lower_for_tpu

    args, _, _ = _case(np.random.default_rng(0), 2, 2, 4, 128, 512, bits, jnp.bfloat16, [512, 100])
    text = lower_for_tpu(functools.partial(quantized_decode_pallas_tpu, bits=bits, block_size=128), *args)
    assert "tpu_custom_call" in text and "jaxkv_quantized_decode_tpu" in text


def test_bad_arguments_name_themselves():
    rng = np.random.default_rng(2)
    args, _, _ = _case(rng, 1, 2, 2, 32, 32, 4, jnp.float32, [32])
    with pytest.raises(ValueError, match="bits must be one of"):
        quantized_decode(*args, bits=5, implementation="reference")
    with pytest.raises(ValueError, match="k_codes must be"):
        quantized_decode(*args, bits=2, implementation="reference")  # 4-bit codes read as 2-bit
    bad = list(args)
    bad[2] = bad[2][:, :, :5]
    with pytest.raises(ValueError, match="k_scale must be"):
        quantized_decode(*bad, bits=4, implementation="reference")
    with pytest.raises(ValueError, match="block_size .* must divide"):
        quantized_decode(*args, bits=4, implementation="pallas_gpu", interpret=True, block_size=64)
    odd, _, _ = _case(rng, 1, 1, 2, 6, 32, 2, jnp.float32, [32])  # 6 channels: a byte and a half of 2-bit codes
    with pytest.raises(ValueError, match=r"head_dim \(6\) must be a multiple of 4"):
        quantized_decode(*odd, bits=2, implementation="pallas_gpu", interpret=True, block_size=16)
    quantized_decode(*odd, bits=2, implementation="pallas_tpu", interpret=True, block_size=16)  # pads: fine
    with pytest.raises(ValueError, match=r"\['blocks_per_split'\] are not the TPU kernel's"):
        quantized_decode(*args, bits=4, implementation="pallas_tpu", interpret=True, block_size=16,
                         blocks_per_split=2)
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="pallas_tpu.*not tpu"):
            quantized_decode(*args, bits=4, implementation="pallas_tpu")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cannot run"):
            quantized_decode(*args, bits=4, implementation="pallas_gpu")
        with pytest.warns(UserWarning, match="using the jnp reference"):
            quantized_decode(*args, bits=4)


def _run_ptx(program: str, word: int) -> tuple[int, int]:
    """The subset of PTX that ``ptx_program`` writes, run on one 32-bit input word: ``($0, $1)``."""
    import re

    regs, out = {"$2": word}, {}

    def val(x):
        return regs[x] if x in regs else int(x, 0)

    def halves(w, dtype):
        return np.array([w & 0xFFFF, w >> 16], np.uint16).view(dtype).astype(np.float64)

    for line in program.split("\n"):
        op, _, rest = line.strip().rstrip(";").partition(" ")
        a = [x.strip() for x in rest.split(",")] if rest else []
        if op in ("{", "}", ".reg"):
            continue
        if op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "prmt.b32":
            pool = val(a[1]).to_bytes(4, "little") + val(a[2]).to_bytes(4, "little")
            regs[a[0]] = int.from_bytes(bytes(pool[(val(a[3]) >> 4 * i) & 7] for i in range(4)), "little")
        elif op == "shr.b32":
            regs[a[0]] = val(a[1]) >> val(a[2])
        elif op == "lop3.b32":
            assert val(a[4]) == 0xEA  # (a & b) | c
            regs[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif (m := re.fullmatch(r"fma\.rn\.(bf16|f16)x2", op)):
            import ml_dtypes

            dt = ml_dtypes.bfloat16 if m.group(1) == "bf16" else np.float16
            r = halves(val(a[1]), dt) * halves(val(a[2]), dt) + halves(val(a[3]), dt)
            bits16 = r.astype(dt).view(np.uint16).astype(np.int64)
            (out if a[0] in ("$0", "$1") else regs)[a[0]] = int(bits16[0]) | int(bits16[1]) << 16
        else:
            raise AssertionError(f"unexpected instruction {line!r}")
    return out["$0"], out["$1"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_ptx_unpack_programs_give_every_code_of_every_byte(bits, dtype):
    """The GPU kernel's inline PTX (run here by an emulator of its five instructions): for every
    byte value at each of the four byte positions, code ``i`` comes out as the 16-bit float of
    ``(byte >> i * bits) & mask`` in the half the packing puts it in."""
    from jaxkv.kernels.quantized_decode.pallas_gpu import ptx_program

    np_dt = np.dtype(jnp.dtype(dtype))
    rng = np.random.default_rng(bits)
    words = [v * 0x01010101 for v in range(256)] + list(rng.integers(0, 2 ** 32, 200, dtype=np.uint64))
    for i in range(8 // bits):
        program = ptx_program(bits, dtype, i)
        for w in words:
            w = int(w)
            lo, hi = _run_ptx(program, w)
            got = np.array([lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16], np.uint16).view(np_dt)
            want = [(w >> 8 * k) >> i * bits & (1 << bits) - 1 for k in range(4)]
            np.testing.assert_array_equal(got.astype(np.float64), want, err_msg=f"code {i} of {w:#010x}")


def test_the_unpack_option_is_checked_by_name():
    from jaxkv.kernels.quantized_decode.pallas_gpu import quantized_decode_pallas_gpu

    args, _, _ = _case(np.random.default_rng(3), 1, 1, 2, 64, 64, 4, jnp.bfloat16, [64])
    with pytest.raises(ValueError, match="unpack must be"):
        quantized_decode_pallas_gpu(*args, bits=4, unpack="fast", interpret=True)
    with pytest.raises(ValueError, match=r"unpack='ptx' needs a compiled kernel"):
        quantized_decode_pallas_gpu(*args, bits=4, unpack="ptx", interpret=True)
    eight, _, _ = _case(np.random.default_rng(3), 1, 1, 2, 64, 64, 8, jnp.bfloat16, [64])
    with pytest.raises(ValueError, match=r"bits of 2-4 \(got 8\)"):
        quantized_decode_pallas_gpu(*eight, bits=8, unpack="ptx")
