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
from jaxkv.checkpoints import (CheckpointError, load_chat_template, load_checkpoint, load_tokenizer,
                               resolve_model, save_checkpoint)
from jaxkv.errors import UserError
from jaxkv.config import ConfigError, LlamaConfig, RopeScaling, preset
from jaxkv.generate import GenerationResult, generate
from jaxkv.models.llama import forward, init_params

__version__ = "0.1.0"

__all__ = [
    "CachePolicy", "KVCache", "ModelCache", "available_policies", "init_cache", "make_policy",
    "register_policy", "CheckpointError", "load_checkpoint", "load_tokenizer", "load_chat_template",
    "resolve_model", "save_checkpoint", "UserError",
    "ConfigError", "LlamaConfig", "RopeScaling", "preset", "GenerationResult", "generate",
    "forward", "init_params",
]
