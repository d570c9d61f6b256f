"""Calibration artifacts: what a method measures on a model once and reuses.

A calibration file is safetensors: the method's tensors plus metadata ``jaxkv_calibration``
(JSON: ``method``, ``settings``, ``model`` fingerprint, jaxkv version). ``jaxkv calibrate METHOD
--model M --out FILE`` writes one; a policy loads it with ``--cache-arg calibration=FILE`` and
refuses it for another model (the fingerprint covers the architecture and the embedding
weights) or another method.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from jaxkv.errors import UserError
from jaxkv.fileio import atomic_path

__all__ = ["CalibrationError", "model_fingerprint", "save_calibration", "load_calibration", "calibrate",
           "CALIBRATED_METHODS"]

CALIBRATED_METHODS = ("razor", "cskv")

META_KEY = "jaxkv_calibration"


class CalibrationError(UserError):
    """A calibration file that is unreadable or belongs to another model or method."""


FORMAT = 2  # 2: the fingerprint samples every weight tensor (1: the embeddings only)
_SAMPLE = 1 << 16  # values hashed per tensor at most: every k-th, the last one too


def model_fingerprint(config, params) -> str:
    """A short hash of the architecture and of every weight tensor: its path, shape and a strided
    sample of up to 65,536 of its values (every one for smaller tensors), so a model whose
    layers were fine-tuned or edited has another fingerprint, at the cost of a small read per
    tensor. The values are hashed at bfloat16 precision, so one model loaded in float32 or
    bfloat16 has one fingerprint (a calibration made at one dtype serves the other)."""
    import jax
    import jax.numpy as jnp

    h = hashlib.sha256(json.dumps(config.to_hf(), sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = jnp.ravel(jnp.asarray(leaf))
        step = max(1, -(-x.size // _SAMPLE))
        sample = jnp.concatenate([x[::step], x[-1:]]).astype(jnp.bfloat16)
        h.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}".encode())
        h.update(np.ascontiguousarray(np.asarray(sample).view(np.uint16)).tobytes())
    return h.hexdigest()[:32]


def save_calibration(path: str | os.PathLike, *, method: str, tensors: dict[str, np.ndarray],
                     settings: dict, fingerprint: str) -> Path:
    """Write a calibration file atomically."""
    from safetensors.numpy import save_file

    from jaxkv import __version__

    meta = {"method": method, "settings": settings, "model": fingerprint, "jaxkv": __version__, "format": FORMAT}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.fspath(tmp),
                  metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    return Path(path)


def load_calibration(path: str | os.PathLike, *, method: str, fingerprint: str | None = None,
                     required: tuple[str, ...] = ()) -> tuple[dict[str, np.ndarray], dict]:
    """``(tensors, metadata)`` of a calibration file for ``method``; with ``fingerprint``, refuse
    a file made on another model; ``required``: tensor names the file must hold, finite."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"calibration file {os.fspath(path)!r} does not exist")
    try:
        with safe_open(os.fspath(p), framework="numpy") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types on damaged files
        raise CalibrationError(f"{p} is not a readable calibration file ({e})") from None
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise CalibrationError(f"{p} is not a jaxkv calibration file (no {META_KEY} metadata)")
    if meta.get("method") != method:
        raise CalibrationError(f"{p} calibrates {meta.get('method')!r}, not {method!r}")
    if not isinstance(meta.get("format", 1), int) or meta.get("format", 1) > FORMAT:
        raise CalibrationError(f"{p} is of calibration format {meta.get('format')!r}, made by a newer jaxkv "
                               f"({meta.get('jaxkv')}); this one reads formats up to {FORMAT}")
    if fingerprint is not None and meta.get("format", 1) < 2:
        raise CalibrationError(f"{p} was made by an earlier jaxkv ({meta.get('jaxkv')}) whose model fingerprint "
                               f"covered the embeddings only; calibrate again with `jaxkv calibrate {method}`")
    for name in required:
        if name not in tensors:
            raise CalibrationError(f"{p} lacks the tensor {name!r} that {method} needs")
        if not np.all(np.isfinite(tensors[name])):
            raise CalibrationError(f"{p}: the tensor {name!r} holds NaN or infinite values")
    if fingerprint is not None and meta.get("model") != fingerprint:
        raise CalibrationError(f"{p} was calibrated on another model (fingerprint {meta.get('model')}, "
                               f"this model's is {fingerprint}); calibrate this model with "
                               f"`jaxkv calibrate {method} --model ...`")
    return tensors, meta


def calibrate(method: str, params: dict, config, out: str | os.PathLike, *, tokenizer=None, text: str | None = None,
              text_name: str = "user text", **settings) -> Path:
    """Run ``method``'s calibration on the model and write its file (``jaxkv calibrate``).

    ``razor``: data-free head scores (``n_tokens``, ``seed``). ``cskv``: ASVD's activation
    statistics (mean |x| of each layer's attention input) over ``n_tokens`` of ``text`` (recorded
    as ``text_name``) in ``seq_len``-token chunks; needs the ``tokenizer``."""
    if method == "razor":
        from jaxkv.cache.razor import head_scores

        settings = {"n_tokens": 512, "seed": 0, **settings}
        echo, induction = head_scores(params, config, **settings)
        tensors = {"echo": echo.astype(np.float32), "induction": induction.astype(np.float32)}
    elif method == "cskv":
        from jaxkv.cache.cskv import activation_scales, calibration_chunks

        if tokenizer is None or text is None:
            raise UserError("cskv calibration needs the model's tokenizer and a calibration text")
        settings = {"n_tokens": 8192, "seq_len": 512, **settings}
        settings.pop("seed", None)
        chunks = calibration_chunks(tokenizer, n_tokens=settings["n_tokens"], seq_len=settings["seq_len"], text=text)
        tensors = {"scale": activation_scales(params, config, chunks)}
        settings["tokens_used"] = int(chunks.size)
        settings["text"] = text_name
    else:
        raise UserError(f"unknown method to calibrate {method!r}; methods with a calibration: "
                        f"{', '.join(CALIBRATED_METHODS)}")
    return save_calibration(out, method=method, tensors=tensors, settings=settings,
                            fingerprint=model_fingerprint(config, params))
