"""Dimension letters used in shapes, einsum strings and docstrings across jaxkv.

    B batch            T query length (new tokens)     S key length (cache slots)
    D model width      F FFN width                     V vocabulary
    N query heads      K KV heads                      G query heads per KV head (N = K*G)
    H head dim         L layers

Einsum strings are written in these capitals, e.g. ``'BTKGH,BKSH->BKGTS'``.
Mamba-2 modules keep the letters of their paper.

Conventions that hold everywhere:
  * A position of -1 marks padding (in inputs) or an empty slot (in caches); attention masks
    are derived from positions, never from slot indices.
  * Caches are head-major, ``[B, K, S, H]``: one KV head's tokens are contiguous, the layout a
    decode kernel streams.
"""

from __future__ import annotations

from typing import TypeAlias

import jax

Array: TypeAlias = jax.Array
PRNGKey: TypeAlias = jax.Array
DType: TypeAlias = "jax.typing.DTypeLike"

__all__ = ["Array", "PRNGKey", "DType"]
