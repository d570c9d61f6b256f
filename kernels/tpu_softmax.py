"""The online softmax the Mosaic TPU attention kernels share: running max, sum and output of a
block of query rows in VMEM scratch, updated one key block at a time and finished at the last."""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["softmax_init", "softmax_step", "softmax_finish"]


def softmax_init(m_scr, l_scr, acc_scr) -> None:
    """Empty: max -inf, sum and output 0."""
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)


def softmax_step(s, v, m_scr, l_scr, acc_scr, *, dtype, precision) -> None:
    """Fold in one key block: scores ``s [rows, keys]`` (fp32, -inf where hidden) and values
    ``v [keys, H]``; the product in ``dtype`` with fp32 accumulation. A block where nothing is
    visible adds nothing (no NaN from ``-inf - -inf``)."""
    m_old = m_scr[...]
    m_new = jnp.maximum(m_old, jnp.max(s, axis=1, keepdims=True))
    safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_old - safe)
    p = jnp.exp(s - safe)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_scr[...] = alpha * acc_scr[...] + jax.lax.dot_general(
        p.astype(dtype), v.astype(dtype), (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32)
    m_scr[...] = m_new


def softmax_finish(o_ref, lse_ref, m_scr, l_scr, acc_scr) -> None:
    """Write the normalised output and the log-sum-exp ``[rows, 1]``; a row that saw no key gets
    out 0 and lse -inf."""
    l = l_scr[...]
    ok = l > 0
    o_ref[...] = jnp.where(ok, acc_scr[...] / jnp.where(ok, l, 1.0), 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m_scr[...] + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)
