"""The cache-policy contract, and the registry of policies by name.

A policy is a frozen dataclass of hyper-parameters plus pure functions. It works at two levels.

**Model level** (the object ``make_policy`` returns and ``init_cache`` takes):

  ``for_layer(layer)``      the policy of one layer (default: itself). Layers may differ, e.g.
                            per-head splits that change static shapes, or merged layer pairs;
  ``layer_params(layer)``   that layer's *traced* parameter pytree (calibration artifacts,
                            learned projections), kept apart from the model's params and from
                            the bytes of the cache (default: None);
  ``after_prefill(cache)``  a hook that sees the whole ``ModelCache`` once the prompt is in
                            (cross-layer merging, building an index; default: unchanged).

**Layer level** (each ``for_layer`` result), over one layer's state; ``layer`` is the
``LayerSpec`` (index, model config), ``params`` that layer's traced parameters:

  ``capacity(max_len)``                 slots a layer needs for sequences of ``max_len`` tokens;
  ``state_index(layer)``                the layer whose state this one reads and updates
                                        (default: its own). A state may serve several layers
                                        (MiniCache's merged pairs): the sharing layers run in
                                        order on the one state, and their own entries in
                                        ``ModelCache.layers`` are None (``init`` returns None);
  ``init(*, batch, max_len, dtype, layer)``   the empty state (fixed shapes from here on);
  ``prefill_attend(q, k, v, positions, *, layer, packing=None, implementation=None)``   attention
                                        over the prompt itself (default: dense causal, the model's
                                        sliding window applied); ``packing`` (a prepacked prefill,
                                        ``jaxkv.prepack.PackedLayout``): rows hold several prompts,
                                        each attending only within itself (the default: by the
                                        layout's segment ids, never a dense mask); ``implementation``
                                        names the attention kernel (``attend_dense``'s);
  ``prefill(state, *, q, k, v, positions, layer, params)``   store the prompt's K/V (post-RoPE;
                                        ``q`` is given to methods that score tokens by queries);
                                        a policy whose ``wants_layer_input`` is True also gets
                                        ``inputs=LayerInput`` here and in ``append``: the attention
                                        block's normed input ``x`` (what the K/V projections read)
                                        and the model's RoPE, for methods that store something
                                        other than K/V (CSKV's pre-RoPE low-rank latent);
  ``append(state, *, q, k, v, positions, phase, layer, params) -> (out, state)``   add a chunk
                                        to a prefilled cache and attend over it: ``phase`` is
                                        ``EXTEND`` (``T > 1``: a question after a reused
                                        context) or ``DECODE`` (``T == 1``);
  ``nbytes(state)``                     bytes of the arrays the state keeps;
  ``attended_keys(state)``              ``[B]`` (token, KV head) pairs the last append attended
                                        (what query-aware methods save; default: filled slots);
  ``expected_nbytes(*, batch, max_len, dtype, layer)``   the same count worked out from the
                                        policy's own parameters (the conformance test holds
                                        ``nbytes`` to it, so no array is kept unaccounted);
  ``from_budget(budget, context_len, **named)``  (class method) the policy sized to keep
                                        about ``budget`` of a prompt, the ``named`` fields kept
                                        as given: how ``jaxkv eval`` sweeps.

Phases (``Phase``): the first forward over an empty cache is ``PREFILL``; later forwards are
``EXTEND`` or ``DECODE`` by their length (static, from ``ModelCache.prefilled`` and the shape).

``full`` is the reference: every other policy at a budget that keeps everything must equal it,
which ``tests/test_policy_conformance.py`` checks for every registered policy.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.attention import attend_dense, attend_reference
from jaxkv.cache.kv import KVCache, ModelCache, tree_nbytes
from jaxkv.errors import UserError
from jaxkv.typing import Array

__all__ = ["Phase", "LayerSpec", "LayerInput", "CachePolicy", "register_policy", "make_policy", "parse_policy_spec",
           "split_policy_list", "check_ints", "check_shares", "check_decode_kernel", "kernel_block", "kernel_options",
           "DECODE_KERNELS", "available_policies", "init_cache"]

_REGISTRY: dict[str, type["CachePolicy"]] = {}


class Phase(enum.Enum):
    """What a forward over a cache does: the first pass over the prompt, a multi-token chunk
    appended to a prefilled cache, or one new token."""

    PREFILL = "prefill"
    EXTEND = "extend"
    DECODE = "decode"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Which layer a policy serves: its index and the model's config (static, hashable)."""

    index: int
    config: Any  # LlamaConfig; Any keeps the cache package free of a model import

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def sliding_window(self) -> int | None:
        """The model's attention window (Mistral), applied on top of what a policy keeps."""
        return self.config.sliding_window


@dataclasses.dataclass(frozen=True)
class LayerInput:
    """What a policy with ``wants_layer_input`` sees beside q/k/v: ``x [B, T, D]``, the attention
    block's normed input (the K/V projections' input), and the model's RoPE as ``inv_freq [H/2]``
    (``rope`` rotates keys at any positions, e.g. rebuilt old keys at attention time)."""

    x: Array
    inv_freq: Any  # numpy [H/2], static per model

    def rope(self, k: Array, positions: Array) -> Array:
        """``k [B, S, heads, H]`` rotated to ``positions [B, S]`` (the model's own RoPE)."""
        from jaxkv.models.layers import apply_rope, rope_angles

        cos, sin = rope_angles(positions, self.inv_freq)
        return apply_rope(k, cos, sin)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CachePolicy:
    """Base class of every policy; see the module docstring for the contract.

    A subclass sets ``name`` and implements ``capacity``, ``prefill`` and ``append`` (plus
    ``init``/``nbytes``/``expected_nbytes`` when it keeps something other than one ``KVCache``).
    """

    name: ClassVar[str] = ""
    # True: prefill/append also get ``inputs=LayerInput`` (see the module docstring)
    wants_layer_input: ClassVar[bool] = False
    # How kept tokens are stored (the second concern): None = the cache dtype; 2/3/4/8 = MiKV's
    # per-token packed codes (``jaxkv.cache.storage``). ``KEEP+mikv`` names set it.
    kv_bits: int | None = None

    def __post_init__(self):
        if self.kv_bits is not None and (isinstance(self.kv_bits, bool) or not isinstance(self.kv_bits, int)
                                       or self.kv_bits not in (2, 3, 4, 8)):
            raise UserError(f"{self.name}: the storage's bits must be 2, 3, 4 or 8, got {self.kv_bits!r}")
        budget, context = getattr(self, "budget", None), getattr(self, "context_len", None)  # from_budget's sizing
        if (budget is None) != (context is None):
            raise UserError(f"{self.name}: budget and context_len size the policy together: give both or neither "
                            f"(got budget={budget!r}, context_len={context!r})")
        if budget is not None:
            self.check_budget(budget, context)

    def __init_subclass__(cls, **kwargs):
        """Every policy's own ``from_budget`` checks its arguments first (``check_budget``), so no
        policy, registered now or later, sizes itself from a budget outside (0, 1]."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("from_budget")
        if isinstance(own, classmethod):
            sized = own.__func__

            @functools.wraps(sized)
            def from_budget(klass, budget, context_len, **named):
                klass.check_budget(budget, context_len)
                return sized(klass, budget, context_len, **named)

            cls.from_budget = classmethod(from_budget)

    @classmethod
    def check_budget(cls, budget, context_len) -> None:
        """``from_budget``'s arguments: ``budget`` a number in (0, 1], ``context_len`` a positive
        integer; a UserError naming the argument otherwise."""
        if isinstance(budget, bool) or not isinstance(budget, (int, float, np.floating, np.integer)) \
                or not math.isfinite(budget) or not 0 < budget <= 1:
            raise UserError(f"{cls.name}: budget must be a number in (0, 1], got {budget!r}")
        if isinstance(context_len, bool) or not isinstance(context_len, (int, np.integer)) or context_len < 1:
            raise UserError(f"{cls.name}: context_len must be a positive integer, got {context_len!r}")

    @property
    def quantized(self) -> bool:
        """True when the policy rounds what it keeps to low-bit codes."""
        return self.kv_bits is not None

    @property
    def kv_storage(self):
        from jaxkv.cache.storage import DenseStorage, QuantizedStorage

        return DenseStorage() if self.kv_bits is None else QuantizedStorage(bits=self.kv_bits)

    def new_kv(self, *, batch: int, num_kv_heads: int, slots: int, head_dim: int, dtype):
        """An empty slot array (``KVCache`` or ``QuantizedKV``) in this policy's storage."""
        return self.kv_storage.new_kv(batch=batch, num_kv_heads=num_kv_heads, slots=slots,
                                      head_dim=head_dim, dtype=dtype)

    def kv_slot_bytes(self, head_dim: int, dtype) -> int:
        """Bytes one slot of one KV head takes in this policy's storage (K, V, position)."""
        return self.kv_storage.slot_bytes(head_dim, dtype)

    # ------------------------------------------------------------------ model level
    def for_layer(self, layer: LayerSpec) -> "CachePolicy":
        return self

    def layer_params(self, layer: LayerSpec) -> Any:
        return None

    def after_prefill(self, cache: ModelCache) -> ModelCache:
        return cache

    def prepare(self, params: dict, config) -> "CachePolicy":
        """The policy ready for this model: a method that needs model-dependent artifacts
        (calibration) loads them here, checking they belong to the model, or computes them when
        it can (data-free calibration). ``generate`` and the harness call it once per model."""
        return self

    @classmethod
    def from_budget(cls, budget: float, context_len: int, **named) -> "CachePolicy":
        """The policy sized to keep about ``budget`` (a fraction in (0, 1]) of a
        ``context_len``-token prompt: how ``jaxkv eval`` sweeps budgets. ``named`` fields (a
        method's ``[key=value]``) are kept as given; the budget sizes the others around them."""
        raise NotImplementedError(f"cache policy {cls.name!r} does not define from_budget")

    # ------------------------------------------------------------------ layer level
    def capacity(self, max_len: int) -> int:
        raise NotImplementedError

    def state_index(self, layer: LayerSpec) -> int:
        return layer.index

    def init(self, *, batch: int, max_len: int, dtype, layer: LayerSpec) -> Any:
        return self.new_kv(batch=batch, num_kv_heads=layer.num_kv_heads, slots=self.capacity(max_len),
                           head_dim=layer.head_dim, dtype=dtype)

    def prefill_attend(self, q: Array, k: Array, v: Array, positions: Array, *, layer: LayerSpec, packing=None,
                       implementation: str | None = None) -> Array:
        """Attention of the prompt over itself: ``q [B,T,K,G,H]``, ``k, v [B,T,K,H]``; with
        ``packing``, within each packed prompt (segment ids)."""
        return attend_dense(q, k, v, positions, window=layer.sliding_window,
                            segment_ids=None if packing is None else packing.segment_ids,
                            implementation=implementation)

    def prefill(self, state: Any, *, q: Array, k: Array, v: Array, positions: Array,
                layer: LayerSpec, params: Any = None) -> Any:
        raise NotImplementedError

    def append(self, state: Any, *, q: Array, k: Array, v: Array, positions: Array, phase: Phase,
               layer: LayerSpec, params: Any = None) -> tuple[Array, Any]:
        raise NotImplementedError

    def nbytes(self, state: Any) -> int:
        return tree_nbytes(state)

    def attended_keys(self, state: Any) -> Array | None:
        """``[B]``: the (token, KV head) pairs this layer's last append attended over, summed over
        its heads; None where the policy does not say. Methods that save reads rather than bytes
        (LServe, Squeezed Attention) are measured by it (``jaxkv eval``'s ``attended_fraction``).
        The default counts the filled slots of a single slot array."""
        positions = getattr(state, "positions", None)
        if positions is None:
            return None
        return jnp.sum(positions >= 0, axis=(1, 2)).astype(jnp.float32)

    def expected_nbytes(self, *, batch: int, max_len: int, dtype, layer: LayerSpec) -> int:
        """One slot array of ``capacity(max_len)`` slots per KV head in this policy's storage."""
        return batch * layer.num_kv_heads * self.capacity(max_len) * self.kv_slot_bytes(layer.head_dim, dtype)

    # ------------------------------------------------------------------ helpers for subclasses
    @staticmethod
    def attend(state: KVCache, q: Array, positions: Array, layer: LayerSpec) -> Array:
        """Attention of ``q [B,T,K,G,H]`` over the slots of ``state`` (masked by position and
        the model's sliding window)."""
        return attend_reference(q, state.k, state.v, positions, state.positions, window=layer.sliding_window)


def check_ints(method: str, policy: Any, lows: dict[str, int]) -> None:
    """Every field in ``lows`` an integer (not a bool) at least its low bound, else a UserError
    naming it."""
    for f, low in lows.items():
        value = getattr(policy, f)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"{method}: {f} must be an integer >= {low}, got {value!r}")


def check_shares(method: str, policy: Any, fields: Sequence[str], *, zero_ok: bool = True) -> None:
    """Every field a number in [0, 1] (``(0, 1]`` unless ``zero_ok``), else a UserError naming it."""
    import math

    for f in fields:
        value = getattr(policy, f)
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value) \
            and (0 <= value if zero_ok else 0 < value) and value <= 1
        if not ok:
            raise UserError(f"{method}: {f} must be a number in {'[0' if zero_ok else '(0'}, 1], got {value!r}")


def register_policy(cls: type[CachePolicy]) -> type[CachePolicy]:
    """Class decorator: make a policy constructible by its ``name`` (``make_policy``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a cache policy named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


DECODE_KERNELS = ("pallas_gpu", "pallas_tpu", "reference")


def check_decode_kernel(name: str, decode_kernel, kernel_interpret) -> None:
    """The ``decode_kernel`` / ``kernel_interpret`` settings a policy that decodes through
    ``jaxkv.kernels`` takes: None (jnp attention) or one of ``DECODE_KERNELS``."""
    if decode_kernel not in (None,) + DECODE_KERNELS:
        raise UserError(f"{name}: decode_kernel must be one of {', '.join(DECODE_KERNELS)}, got {decode_kernel!r}")
    if not isinstance(kernel_interpret, bool):
        raise UserError(f"{name}: kernel_interpret must be true or false, got {kernel_interpret!r}")


def kernel_options(decode_kernel: str | None, kernel_interpret: bool) -> dict:
    """The options a policy passes a kernel dispatch: ``interpret`` for a Pallas kernel run in
    its interpreter."""
    return {"interpret": True} if kernel_interpret and decode_kernel in ("pallas_gpu", "pallas_tpu") else {}


def kernel_block(name: str, decode_kernel: str, slots: int) -> int:
    """The KV block a decode kernel walks a cache of ``slots`` slots in: 64, 32 or 16 (the TPU
    kernels: 128 first, the lane tile their per-token rows need on a TPU)."""
    sizes = (128, 64, 32, 16) if decode_kernel == "pallas_tpu" else (64, 32, 16)
    block = next((b for b in sizes if slots % b == 0), None)
    if block is None:
        raise UserError(f"{name}[decode_kernel={decode_kernel}]: the cache's {slots} slots must be a "
                        "multiple of 16 (init_cache(max_len=...))")
    return block


STORAGES = {"mikv": 4}  # a storage name usable after "+" -> its default bits
COMPOSABLE = ("full", "streaming", "razor", "minicache", "lserve")  # policies whose kept tokens a storage may hold


def available_policies() -> list[str]:
    """Registered policies (names starting with ``_`` are internal) and the compositions
    ``KEEP+STORE``."""
    names = [n for n in _REGISTRY if not n.startswith("_")]
    names += [f"{k}+{s}" for k in COMPOSABLE if k in _REGISTRY for s in STORAGES]
    return sorted(names)


def split_policy_list(text: str, *, keep_empty: bool = False) -> list[str]:
    """A comma-separated list of policies; commas inside ``NAME[key=value,...]`` stay with it.
    Empty entries are dropped, or kept (as "") with ``keep_empty``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if keep_empty or p.strip()]


def parse_policy_spec(spec: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME[key=value,...]`` as (name, parameters); a value is read as JSON where it
    parses (``0.5``, ``3``, ``true``) and kept as a string otherwise (``merge=average``)."""
    import json

    if not isinstance(spec, str):
        raise UserError(f"a cache policy is named by a string, got {spec!r}")
    if "[" not in spec and "]" not in spec:
        return spec, {}
    name, _, rest = spec.partition("[")
    if not name or not rest.endswith("]") or "[" in rest[:-1] or "]" in rest[:-1]:
        raise UserError(f"a policy with parameters looks like NAME[key=value,...], got {spec!r}")
    params: dict = {}
    for item in filter(None, (x.strip() for x in rest[:-1].split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{spec}: a parameter must look like key=value, got {item!r}")
        key = key.strip()
        if key in params:
            raise UserError(f"{spec}: parameter {key!r} given twice")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw.strip()
    return name, params


def make_policy(name: str | CachePolicy, **params: Any) -> CachePolicy:
    """Construct the policy registered as ``name`` with hyper-parameters ``params``.

    ``name`` may carry parameters itself: ``minicache[merge=average]`` (``parse_policy_spec``).

    ``KEEP+STORE`` composes: ``razor+mikv`` is ``razor`` storing what it keeps in MiKV's packed
    format (``bits``, default 4, becomes the policy's ``kv_bits``).
    Raises UserError for an unknown name (listing the known ones) or an unknown parameter
    (listing the accepted ones); the policy itself validates the values.
    """
    if isinstance(name, CachePolicy):
        if params:
            raise UserError("pass either a policy object or a name with parameters, not both")
        return name
    name, inline = parse_policy_spec(name)
    twice = sorted(set(inline) & set(params))
    if twice:
        raise UserError(f"cache policy parameter {twice[0]!r} given both in the name and as an argument")
    params = {**inline, **params}
    if "+" in name:
        keep, _, store = name.partition("+")
        if keep not in COMPOSABLE or store not in STORAGES or keep not in _REGISTRY:
            raise UserError(f"unknown cache policy {name!r}; known policies: {', '.join(available_policies())}")
        if "kv_bits" in params:
            raise UserError(f"{name}: give the storage's bits as bits=..., not kv_bits")
        return make_policy(keep, kv_bits=params.pop("bits", STORAGES[store]), **params)
    if name not in _REGISTRY or name.startswith("_"):
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


def _check_kernel_backend(policy) -> None:
    """A decode kernel named for another backend fails at a decode step, after the prefill: say so
    when the cache is made (``kernel_interpret`` runs it in its interpreter on any backend)."""
    kernel = getattr(policy, "decode_kernel", None)
    want = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}.get(kernel)
    if want is not None and not getattr(policy, "kernel_interpret", False) and jax.default_backend() != want:
        raise UserError(f"{policy.name}: decode_kernel={kernel} runs on a {want.upper()}; the backend here is "
                        f"{jax.default_backend()} (decode_kernel=reference runs the same path in jnp, "
                        "kernel_interpret=true the kernel in its interpreter)")


def init_cache(config, policy: CachePolicy | str | Sequence[CachePolicy], *, batch: int, max_len: int,
               dtype) -> ModelCache:
    """An empty ``ModelCache`` for ``config`` holding sequences of up to ``max_len`` tokens.

    ``policy`` is a policy (or its registered name), whose ``for_layer`` gives each layer's; or
    a sequence of one policy per layer."""
    for name, value in (("batch", batch), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise UserError(f"dtype must be a floating dtype for keys and values, got {jnp.dtype(dtype)}")
    batch, max_len = int(batch), int(max_len)
    specs = tuple(LayerSpec(i, config) for i in range(config.num_layers))
    if isinstance(policy, (list, tuple)):
        if len(policy) != config.num_layers:
            raise UserError(f"init_cache got {len(policy)} policies for {config.num_layers} layers")
        per_layer = tuple(make_policy(p) for p in policy)
        for s, p in zip(specs, per_layer):
            if type(p.for_layer(s)) is not type(p):  # its layers are other objects, made for the whole model
                raise UserError(f"init_cache: the policy for layer {s.index} ({p.name!r}) is a model-level method "
                                "(its layers come from for_layer, with hooks over the whole model); give it as "
                                "the model's policy, not in a per-layer list")
        method = None
    else:
        method = make_policy(policy)
        per_layer = tuple(method.for_layer(s) for s in specs)
    for p in per_layer + ((method,) if method is not None else ()):
        _check_kernel_backend(p)
    layers = tuple(p.init(batch=batch, max_len=max_len, dtype=dtype, layer=s) for p, s in zip(per_layer, specs))
    params = tuple(None if method is None else method.layer_params(s) for s in specs)
    return ModelCache(layers=layers, params=params, policies=per_layer, method=method, prefilled=False,
                      max_len=int(max_len))
