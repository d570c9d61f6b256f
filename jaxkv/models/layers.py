"""Building blocks of Llama-family models, as Flax NNX modules.

Parameters are stored in ``param_dtype`` and cast to the dtype of the activations they meet
(the compute dtype). Linear kernels are ``[out, in]`` as in transformers, applied as
``x @ kernel.T``: at decode (one row of x) XLA reads an ``[out, in]`` weight once in a fused
kernel, while ``[in, out]`` cost 2.5x more time per layer on an H200 (BENCHMARKS.md). RMSNorm and RoPE run in fp32 whatever the compute dtype:
RoPE angles of large positions lose whole radians in bf16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkv.config import RopeScaling
from jaxkv.typing import Array

__all__ = ["Linear", "RMSNorm", "MLP", "rope_inv_freq", "rope_angles", "apply_rope"]


class Linear(nnx.Module):
    """``y = x @ kernel.T (+ bias)``, kernel ``[d_out, d_in]``."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool = False, param_dtype=jnp.float32,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        self.kernel = nnx.Param(init_std * jax.random.normal(rngs.params(), (d_out, d_in), param_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if bias else None

    def __call__(self, x: Array) -> Array:
        y = x @ self.kernel[...].astype(x.dtype).T
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32 and cast back before the gain (as transformers does)."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * h.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d: int, f: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.gate = Linear(d, f, param_dtype=param_dtype, rngs=rngs)
        self.up = Linear(d, f, param_dtype=param_dtype, rngs=rngs)
        self.down = Linear(f, d, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """RoPE inverse frequencies ``[H/2]`` (float32), with Llama-3.1 scaling when given.

    Llama-3.1 scaling, per frequency with wavelength ``w = 2*pi/f``:
      w < orig/high_freq_factor  -> unchanged;
      w > orig/low_freq_factor   -> f / factor;
      otherwise                   -> (1 - a) * f / factor + a * f,
                                    a = (orig/w - low_freq_factor) / (high_freq_factor - low_freq_factor).
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    if scaling is None:
        return inv
    orig = scaling.original_max_position_embeddings
    low_wavelen = orig / scaling.low_freq_factor
    high_wavelen = orig / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * inv / scaling.factor + smooth * inv
    out = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(mid, smoothed, out).astype(np.float32)


def rope_angles(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """``cos, sin: [..., H]`` in fp32 for integer ``positions [...]`` (halves repeated)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x [B, T, heads, H]`` by ``cos, sin [B, T, H]`` (rotate-half layout), in fp32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
