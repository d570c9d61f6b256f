"""KV-cache state and policies. Importing this package registers the built-in policies."""

from jaxkv.cache.kv import KVCache, ModelCache, tree_nbytes
from jaxkv.cache.policy import (CachePolicy, LayerSpec, Phase, available_policies, init_cache, make_policy,
                                register_policy)
from jaxkv.cache.full import FullCache
from jaxkv.cache.streaming import StreamingCache
from jaxkv.cache.razor import RazorCache
from jaxkv.cache.mikv import MiKVCache
from jaxkv.cache.minicache import MiniCache
from jaxkv.cache.lserve import LServeCache
from jaxkv.cache.squeezed import SqueezedCache
from jaxkv.cache.cskv import CSKVCache

__all__ = [
    "KVCache", "ModelCache", "tree_nbytes", "CachePolicy", "LayerSpec", "Phase", "available_policies", "init_cache",
    "make_policy", "register_policy", "FullCache", "StreamingCache", "RazorCache", "MiKVCache", "MiniCache",
    "LServeCache", "SqueezedCache", "CSKVCache",
]
