"""``jaxkv convert``: a GGUF file written as an HF checkpoint folder.

The folder holds ``config.json``, ``model.safetensors`` (the dequantized weights in the chosen
dtype, q/k rows in transformers' order), ``tokenizer.json`` (built from the GGUF metadata) and
``tokenizer_config.json`` (BOS/EOS token strings and the chat template), so transformers and
jaxkv both load it. It is written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["convert_gguf"]


def convert_gguf(file: str | os.PathLike, out: str | os.PathLike, *, dtype="bfloat16",
                 overwrite: bool = False) -> Path:
    """Convert the GGUF ``file`` into the HF checkpoint folder ``out``; returns ``out``."""
    from jaxkv.checkpoints import CheckpointError, check_float_dtype, save_checkpoint
    from jaxkv.gguf_io import is_gguf, read_gguf

    if not is_gguf(file):
        raise CheckpointError(f"{os.fspath(file)!r} is not a GGUF file")
    dtype = check_float_dtype(dtype)
    model = read_gguf(file)
    tokenizer = model.tokenizer()
    params = model.params(dtype)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": model.special_token("tokenizer.ggml.bos_token_id"),
        "eos_token": model.special_token("tokenizer.ggml.eos_token_id"),
        "unk_token": model.special_token("tokenizer.ggml.unknown_token_id"),
        "pad_token": model.special_token("tokenizer.ggml.padding_token_id"),
        "model_max_length": model.config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    tokenizer_config = {k: v for k, v in tokenizer_config.items() if v is not None}
    if model.chat_template is not None:
        tokenizer_config["chat_template"] = model.chat_template
    return save_checkpoint(out, model.config, params, tokenizer=tokenizer, overwrite=overwrite,
                           extra_files={"tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n"})
