"""jaxkv: long-context and KV-cache methods for JAX/Flax language models.

The curated public API; submodules hold the rest (``jaxkv.cache``, ``jaxkv.models.llama``,
``jaxkv.attention``, ``jaxkv.checkpoints``, ``jaxkv.generate``).
"""

from jaxkv.cache import (
    CachePolicy,
    KVCache,
    ModelCache,
    available_policies,
    init_cache,
    make_policy,
    register_policy,
)
from jaxkv.checkpoints import CheckpointError, load_checkpoint, load_tokenizer, save_checkpoint
from jaxkv.config import ConfigError, LlamaConfig, RopeScaling, preset
from jaxkv.generate import GenerationResult, generate
from jaxkv.models.llama import forward, init_params

__version__ = "0.1.0"

__all__ = [
    "CachePolicy", "KVCache", "ModelCache", "available_policies", "init_cache", "make_policy",
    "register_policy", "CheckpointError", "load_checkpoint", "load_tokenizer", "save_checkpoint",
    "ConfigError", "LlamaConfig", "RopeScaling", "preset", "GenerationResult", "generate",
    "forward", "init_params",
]
