"""The cache-policy protocol and the registry of policies by name.

A policy is a frozen dataclass of hyper-parameters plus pure functions over one layer's state:

  ``capacity(max_len)``   slots a layer needs for sequences of up to ``max_len`` tokens;
  ``init(...)``           the empty state (fixed shapes from here on);
  ``prefill(state, ...)`` compress the prompt's K/V after dense prefill attention (``q`` is given
                          for methods that score tokens with observation-window queries);
  ``decode(state, ...)``  append the new tokens and attend over the cache; returns (out, state);
  ``nbytes(state)``       bytes of the arrays the state keeps.

``full`` is the reference: every other policy at a budget that keeps everything must equal it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jaxkv.attention import attend_reference
from jaxkv.cache.kv import KVCache, ModelCache, tree_nbytes
from jaxkv.typing import Array
from jaxkv.errors import UserError

__all__ = ["CachePolicy", "register_policy", "make_policy", "available_policies", "init_cache"]

_REGISTRY: dict[str, type["CachePolicy"]] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CachePolicy:
    """Base class. Subclasses set ``name`` and override ``capacity``/``slots_for``/``prefill_keep``
    or the whole of ``prefill``/``decode`` when they keep something other than plain KV slots."""

    name: ClassVar[str] = ""

    def capacity(self, max_len: int) -> int:
        raise NotImplementedError

    @classmethod
    def from_budget(cls, budget: float, context_len: int) -> "CachePolicy":
        """The policy with its default hyper-parameters sized to keep about ``budget`` (a
        fraction in (0, 1]) of a ``context_len``-token prompt: how ``jaxkv eval`` sweeps budgets."""
        raise NotImplementedError(f"cache policy {cls.name!r} does not define from_budget")

    def init(self, *, batch: int, num_kv_heads: int, head_dim: int, max_len: int, dtype) -> Any:
        return KVCache.empty(batch=batch, num_kv_heads=num_kv_heads, slots=self.capacity(max_len),
                             head_dim=head_dim, dtype=dtype)

    def prefill(self, state: Any, *, q: Array, k: Array, v: Array, positions: Array) -> Any:
        raise NotImplementedError

    def decode(self, state: Any, *, q: Array, k: Array, v: Array, positions: Array,
               window: int | None = None) -> tuple[Array, Any]:
        raise NotImplementedError

    def nbytes(self, state: Any) -> int:
        return tree_nbytes(state)

    @staticmethod
    def attend(state: KVCache, q: Array, positions: Array, window: int | None) -> Array:
        """Attention of ``q [B,T,K,G,H]`` over the slots of ``state`` (masked by position)."""
        return attend_reference(q, state.k, state.v, positions, state.positions, window=window)


def register_policy(cls: type[CachePolicy]) -> type[CachePolicy]:
    """Class decorator: make a policy constructible by its ``name`` (``make_policy``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a cache policy named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(name: str, **params: Any) -> CachePolicy:
    """Construct the policy registered as ``name`` with hyper-parameters ``params``.

    Raises UserError for an unknown name (listing the known ones) or an unknown parameter
    (listing the accepted ones); the policy itself validates the values.
    """
    if isinstance(name, CachePolicy):
        if params:
            raise UserError("pass either a policy object or a name with parameters, not both")
        return name
    if name not in _REGISTRY:
        raise UserError(f"unknown cache policy {name!r}; known policies: {', '.join(available_policies())}")
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise UserError(
            f"cache policy {name!r} has no parameter {unknown[0]!r}; "
            f"its parameters: {', '.join(sorted(fields)) or '(none)'}"
        )
    return cls(**params)


def init_cache(config, policy: CachePolicy | str, *, batch: int, max_len: int, dtype) -> ModelCache:
    """An empty ``ModelCache`` for ``config`` holding sequences of up to ``max_len`` tokens."""
    policy = make_policy(policy)
    if batch <= 0:
        raise UserError(f"batch must be positive, got {batch}")
    if max_len <= 0:
        raise UserError(f"max_len must be positive, got {max_len}")
    layers = tuple(
        policy.init(batch=batch, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                    max_len=max_len, dtype=dtype)
        for _ in range(config.num_layers)
    )
    return ModelCache(layers=layers, policy=policy, prefilled=False)

