"""AlignIT's transform: per-token cross-attention K/V infusion.

A text-to-image generator reads its prompt through cross-attention: every cross-attention layer
projects the text encoder's output states to keys and values. Customization (textual inversion,
custom diffusion, DreamBooth) is meant to change what the *concept* token means, but it also moves
the K/V of the other tokens (a learned embedding changes every later token's state through the
encoder's causal self-attention; tuned ``W_k``/``W_v`` change every token's projection), and that
drift is what breaks prompt alignment. AlignIT keeps the concept's K/V from the customized model,
computed on a short prompt holding only the concept, and takes every other token's K/V from the
baseline model, per token, in every cross-attention layer.

The transform is written against a small interface, ``KVProvider``: something that names its
cross-attention layers and projects text states to a layer's K/V. Any generator with
cross-attention (a UNet, a DiT) provides one; the generator then consumes the returned per-layer
K/V in place of projecting the states itself.

    kv = align_kv(base, custom, base_states, custom_states, concept_map)
    # kv[layer] = (k [B, T, ...], v [B, T, ...]) for every layer of ``base.layers()``

``concept_map [B, T]`` gives, for each prompt position, the position in the concept-only prompt
whose customized state replaces it (``-1``: a non-concept token, from the baseline).
``concept_positions`` builds it from token ids. Pure and jittable (``align_kv_jit``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.errors import UserError
from jaxkv.typing import Array

__all__ = ["KVProvider", "LinearKV", "align_kv", "align_kv_jit", "concept_positions", "kv_drift"]


class KVProvider(Protocol):
    """A generator's cross-attention K/V: ``layers()`` names its cross-attention layers (a fixed
    order), ``project(layer, states)`` maps text states ``[B, T, D]`` to that layer's
    ``(k, v)``, each ``[B, T, ...]`` (token axis second)."""

    def layers(self) -> Sequence[str]: ...

    def project(self, layer: str, states: Array) -> tuple[Array, Array]: ...


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weights"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LinearKV:
    """The common provider: per layer a key and a value matrix, ``k = states @ wk`` and
    ``v = states @ wv`` (``wk``, ``wv``: ``[D, D_k]``, ``[D, D_v]``); custom diffusion tunes these,
    textual inversion and DreamBooth-style fine-tunes change the states (and DreamBooth them too).
    A pytree: it passes through ``jax.jit`` as an argument."""

    weights: Mapping[str, tuple[Array, Array]]

    def layers(self) -> Sequence[str]:
        return tuple(self.weights)

    def project(self, layer: str, states: Array) -> tuple[Array, Array]:
        wk, wv = self.weights[layer]
        return states @ wk, states @ wv


def _check(base: KVProvider, custom: KVProvider, base_states, custom_states, concept_map):
    if tuple(base.layers()) != tuple(custom.layers()):
        raise UserError(f"the customized model's cross-attention layers {tuple(custom.layers())} are not the "
                        f"baseline's {tuple(base.layers())}")
    if base_states.ndim != 3 or custom_states.ndim != 3:
        raise UserError(f"base_states and custom_states must be [B, T, D], got {base_states.shape} and "
                        f"{custom_states.shape}")
    if base_states.shape[0] != custom_states.shape[0] or base_states.shape[2] != custom_states.shape[2]:
        raise UserError(f"base_states {base_states.shape} and custom_states {custom_states.shape} must share the "
                        f"batch and the state width")
    if concept_map.shape != base_states.shape[:2]:
        raise UserError(f"concept_map must be [B, T] = {base_states.shape[:2]}, got {concept_map.shape}")


def align_kv(base: KVProvider, custom: KVProvider, base_states: Array, custom_states: Array,
             concept_map: Array) -> dict[str, tuple[Array, Array]]:
    """Per-layer cross-attention ``(k, v)`` for the prompt: at positions where ``concept_map``
    is ``>= 0`` the customized model's K/V of ``custom_states`` at that index (the concept-only
    prompt), elsewhere the baseline's K/V of ``base_states``."""
    concept_map = jnp.asarray(concept_map)
    _check(base, custom, base_states, custom_states, concept_map)
    is_concept = concept_map >= 0
    take = jnp.clip(concept_map, 0, custom_states.shape[1] - 1)
    out = {}
    for layer in base.layers():
        kb, vb = base.project(layer, base_states)
        kc, vc = custom.project(layer, custom_states)
        out[layer] = tuple(_splice(b, c, take, is_concept) for b, c in ((kb, kc), (vb, vc)))
    return out


def _splice(base, custom, take, is_concept):
    picked = jnp.take_along_axis(custom, take.reshape(take.shape + (1,) * (custom.ndim - 2)), axis=1)
    mask = is_concept.reshape(is_concept.shape + (1,) * (base.ndim - 2))
    return jnp.where(mask, picked.astype(base.dtype), base)


align_kv_jit = jax.jit(align_kv)
align_kv_jit.__doc__ = """``align_kv`` jit-compiled; the providers are arguments, so they must be pytrees (``LinearKV``
is; a provider holding its weights in a Flax module can be wrapped the same way)."""


def concept_positions(prompt_ids: Sequence[Sequence[int]], concept_ids: Sequence[Sequence[int]],
                      concept_tokens: Sequence[int]) -> np.ndarray:
    """``concept_map [B, T]``: for each prompt position holding one of ``concept_tokens`` (the
    token ids that stand for the concept, e.g. a textual-inversion token or "sks" and the class
    word), the position of the same token in that row's concept-only prompt; -1 elsewhere. Rows
    of ``prompt_ids`` are padded to one length with -1 (never a concept)."""
    concept_tokens = set(int(t) for t in concept_tokens)
    if not concept_tokens:
        raise UserError("concept_tokens must name at least one token id")
    if len(prompt_ids) != len(concept_ids):
        raise UserError(f"prompt_ids has {len(prompt_ids)} rows, concept_ids {len(concept_ids)}: one concept-only "
                        f"prompt per prompt")
    t = max(len(p) for p in prompt_ids)
    out = np.full((len(prompt_ids), t), -1, np.int32)
    for b, (p, c) in enumerate(zip(prompt_ids, concept_ids)):
        where = {}
        for j, tok in enumerate(c):
            if int(tok) in concept_tokens:
                where.setdefault(int(tok), []).append(j)
        seen: dict[int, int] = {}
        for i, tok in enumerate(p):
            tok = int(tok)
            if tok in concept_tokens:
                if tok not in where:
                    raise UserError(f"row {b}: concept token {tok} is in the prompt but not in its concept-only prompt")
                k = seen.get(tok, 0)
                out[b, i] = where[tok][min(k, len(where[tok]) - 1)]
                seen[tok] = k + 1
    return out


def kv_drift(base: KVProvider, custom: KVProvider, base_states: Array, custom_states: Array,
             mask: Array | None = None) -> dict[str, Array]:
    """The paper's analysis: per layer, the per-token relative distance ``|kv_c - kv_b| / |kv_b|``
    between the customized and the baseline model's K/V of the *same* prompt (``custom_states``
    from the customized encoder on it), keys and values concatenated: ``[B, T]`` per layer; with
    ``mask [B, T]`` (e.g. the non-concept tokens) positions outside it are 0."""
    _check(base, custom, base_states, custom_states, jnp.zeros(base_states.shape[:2], jnp.int32))
    out = {}
    for layer in base.layers():
        kb, vb = base.project(layer, base_states)
        kc, vc = custom.project(layer, custom_states)
        b = jnp.concatenate([kb.reshape(kb.shape[:2] + (-1,)), vb.reshape(vb.shape[:2] + (-1,))], -1)
        c = jnp.concatenate([kc.reshape(kc.shape[:2] + (-1,)), vc.reshape(vc.shape[:2] + (-1,))], -1)
        d = jnp.linalg.norm(c - b, axis=-1) / jnp.maximum(jnp.linalg.norm(b, axis=-1), 1e-12)
        out[layer] = d if mask is None else jnp.where(mask, d, 0.0)
    return out
