"""HF checkpoints: safetensors (single file or sharded with an index) <-> jaxkv params.

A checkpoint folder holds ``config.json``, the weights (``model.safetensors`` or
``model.safetensors.index.json`` + shards) and, optionally, ``tokenizer.json``.

Loading checks everything before it builds anything: the config, the set of tensor names
(missing and unexpected ones), every shape and dtype. Any problem raises one
``CheckpointError`` naming the file and tensor; no partial parameter tree is ever returned.
Pickle checkpoints (``*.bin``, ``*.pt``) are refused: unpickling runs arbitrary code.

Saving writes into a temporary folder beside the target and renames it into place, so a
crash leaves either the old folder or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxkv.config import ConfigError, LlamaConfig
from jaxkv.models.llama import abstract_params

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "load_tokenizer", "hf_name_map"]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

_FLOAT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved; the message names the file or tensor."""


def hf_name_map(config: LlamaConfig) -> dict[str, tuple[tuple, bool]]:
    """HF tensor name -> (path in the params tree, transpose?) for every parameter.

    jaxkv keeps transformers' ``[out, in]`` layout, so nothing is transposed today; the flag
    stays for formats that need it."""
    names: dict[str, tuple[tuple, bool]] = {
        "model.embed_tokens.weight": (("embed", "embedding"), False),
        "model.norm.weight": (("norm", "weight"), False),
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), False)
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."
        names[pre + "input_layernorm.weight"] = (("layers", i, "attn_norm", "weight"), False)
        names[pre + "post_attention_layernorm.weight"] = (("layers", i, "mlp_norm", "weight"), False)
        for p in "qkvo":
            names[pre + f"self_attn.{p}_proj.weight"] = (("layers", i, "attn", p, "kernel"), False)
        for p in "qkv" if config.qkv_bias else "":
            names[pre + f"self_attn.{p}_proj.bias"] = (("layers", i, "attn", p, "bias"), False)
        if config.o_bias:
            names[pre + "self_attn.o_proj.bias"] = (("layers", i, "attn", "o", "bias"), False)
        for p in ("gate", "up", "down"):
            names[pre + f"mlp.{p}_proj.weight"] = (("layers", i, "mlp", p, "kernel"), False)
    return names


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = folder / INDEX_FILE
    single = folder / SINGLE_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = {name: folder / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise CheckpointError(f"{index} lists the shard {f.name!r}, which does not exist")
        return files
    if single.exists():
        return {}  # names are read from the file header
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle checkpoints ({', '.join(pickles)}); jaxkv loads safetensors "
            "only, since unpickling runs arbitrary code. Convert with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{folder} has no {SINGLE_FILE} and no {INDEX_FILE}")


def load_checkpoint(path: str | os.PathLike, *, dtype=None) -> tuple[LlamaConfig, dict]:
    """Load ``(config, params)`` from an HF checkpoint folder.

    ``dtype`` casts every parameter (e.g. ``jnp.bfloat16``); by default the stored dtype is kept.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {os.fspath(path)!r} does not exist or is not a folder")
    try:
        config = LlamaConfig.from_json(folder / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {e}") from None
    files = _weight_files(folder)
    if not files:
        files = {name: folder / SINGLE_FILE for name in _header_names(folder / SINGLE_FILE)}

    expected = hf_name_map(config)
    abstract = abstract_params(config)
    present = set(files)
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store it anyway; it is not used
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder}: tensor {missing[0]!r} is missing{more}")
    unexpected = sorted(present - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{folder}: unexpected tensor {unexpected[0]!r} for {config.family} "
                              f"with {config.num_layers} layers{more}")

    # Pass 1: headers only. Shapes and dtypes of every tensor, before reading any data.
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for f, names in by_file.items():
        with _open(f) as st:
            available = set(st.keys())
            for name in names:
                if name not in available:
                    raise CheckpointError(f"{f.name}: the index says it holds {name!r}, but it does not")
                sl = st.get_slice(name)
                tdtype, shape = sl.get_dtype(), tuple(sl.get_shape())
                if tdtype not in _FLOAT_DTYPES:
                    raise CheckpointError(f"{f.name}: tensor {name!r} has dtype {tdtype}; "
                                          f"expected one of {sorted(_FLOAT_DTYPES)}")
                tree_path, transpose = expected[name]
                want = tuple(_get(abstract, tree_path).shape)
                if transpose:
                    want = want[::-1]
                if shape != want:
                    raise CheckpointError(f"{f.name}: tensor {name!r} has shape {list(shape)}, "
                                          f"config.json implies {list(want)}")

    # Pass 2: read, transpose, cast.
    params: dict[str, Any] = {}
    for f, names in by_file.items():
        with _open(f) as st:
            for name in names:
                array = st.get_tensor(name)
                tree_path, transpose = expected[name]
                if transpose:
                    array = array.T
                out = jnp.asarray(array, dtype=dtype if dtype is not None else array.dtype)
                _set(params, tree_path, out)
    return config, params


def _open(f: Path):
    try:
        return safe_open(os.fspath(f), framework="numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from None


def _header_names(f: Path) -> list[str]:
    with _open(f) as st:
        return list(st.keys())


def save_checkpoint(path: str | os.PathLike, config: LlamaConfig, params: dict, *,
                    max_shard_bytes: int | None = None, tokenizer=None,
                    overwrite: bool = False) -> Path:
    """Write an HF checkpoint folder (config.json, safetensors, optional tokenizer.json).

    Shards with an index when the weights exceed ``max_shard_bytes``. Refuses to replace an
    existing non-empty folder unless ``overwrite``; the write is atomic (temp folder + rename).
    """
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise CheckpointError(f"{target} already exists and is not empty (pass overwrite=True)")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    names = hf_name_map(config)
    abstract = abstract_params(config)
    tensors: dict[str, np.ndarray] = {}
    for name, (tree_path, transpose) in names.items():
        try:
            value = _get(params, tree_path)
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(f"params has no entry {'/'.join(map(str, tree_path))} (for {name})") from None
        want = tuple(_get(abstract, tree_path).shape)
        if tuple(value.shape) != want:
            raise CheckpointError(f"params {'/'.join(map(str, tree_path))} has shape {list(value.shape)}, "
                                  f"config implies {list(want)}")
        array = np.asarray(jax.device_get(value))
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)

    # Group tensors into shards in a stable order.
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors, key=_natural_key):
        nbytes = tensors[name].nbytes
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_hf(), indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], os.fspath(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            n = len(shards)
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(shard, os.fspath(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                     "weight_map": dict(sorted(weight_map.items(), key=lambda kv: _natural_key(kv[0])))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(os.fspath(tmp / TOKENIZER_FILE))
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def load_tokenizer(path: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` of a checkpoint folder (or a ``tokenizer.json`` path)."""
    from tokenizers import Tokenizer

    p = Path(path)
    f = p / TOKENIZER_FILE if p.is_dir() else p
    if not f.exists():
        raise CheckpointError(f"no tokenizer at {os.fspath(f)!r} (expected {TOKENIZER_FILE})")
    try:
        return Tokenizer.from_file(os.fspath(f))
    except Exception as e:  # the tokenizers library raises a bare Exception on parse errors
        raise CheckpointError(f"{f} is not a valid tokenizer.json ({e})") from None
