"""Frozen training configurations; invariants are checked where they are built."""

from __future__ import annotations

import dataclasses
import math

from jaxkv.errors import UserError

__all__ = ["ATTENTION_MODES", "OptimConfig", "DataConfig", "TrainConfig", "TrainConfigError", "positive_ints"]


class TrainConfigError(UserError):
    """A bad training setting; the message names the field."""


def positive_ints(obj, *names):
    """Raise ``TrainConfigError`` naming the first of ``obj``'s fields ``names`` that is not a positive int."""
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise TrainConfigError(f"{name} must be a positive integer, got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with global-norm clipping and a warmup + cosine or warmup-stable-decay schedule.

    ``schedule='cosine'``: linear warmup to ``lr`` over ``warmup_steps``, cosine decay to
    ``lr * min_lr_ratio`` at ``total_steps``. ``schedule='wsd'``: warmup, constant ``lr``, then a
    linear decay to ``lr * min_lr_ratio`` over the last ``decay_fraction`` of the steps.
    """

    lr: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self):
        for name in ("lr", "min_lr_ratio", "decay_fraction", "weight_decay", "b1", "b2", "eps", "clip_norm"):
            value = getattr(self, name)
            if name == "clip_norm" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TrainConfigError(f"{name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise TrainConfigError(f"lr must be > 0, got {self.lr}")
        if not self.eps > 0:
            raise TrainConfigError(f"eps must be > 0, got {self.eps}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise TrainConfigError(f"schedule must be 'cosine', 'wsd' or 'constant', got {self.schedule!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise TrainConfigError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        positive_ints(self, "total_steps")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise TrainConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.weight_decay < 0:
            raise TrainConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise TrainConfigError(f"b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise TrainConfigError(f"clip_norm must be > 0 or None, got {self.clip_norm}")


# How packed documents attend (AnchorAttention's four modes, and the anchor's kernel-friendly form):
#   full        every token sees the whole row before it (across documents), continuous positions;
#   intra       a document mask (segment ids), continuous positions;
#   reset       a document mask, positions restarting at 0 in each document;
#   anchor      a document mask plus one shared anchor token (the BOS) at the row's start, position 0,
#               that every document sees; continuous positions;
#   anchor-bos  the same attention written with plain segment ids: a BOS copy at rotary position 0
#               starts every document's segment (each copy sees only itself, so all carry the
#               anchor's K/V); continuous positions counted without the copies.
ATTENTION_MODES = ("full", "intra", "reset", "anchor", "anchor-bos")
_POSITIONS = {"full": "continuous", "intra": "continuous", "reset": "document", "anchor": "continuous",
              "anchor-bos": "continuous"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Packing: ``seq_len`` tokens a row; ``attention`` one of ``ATTENTION_MODES`` (above);
    ``position_mode`` 'document' restarts positions at each document, 'continuous' counts across
    the row. Give either (the other follows: 'reset' <-> 'document', 'intra' <-> 'continuous') or
    both, agreeing; neither: 'reset'. ``split_documents``: a document that does not fit the rest
    of a row continues in the next row (True), or starts a new row, the rest of the row padded
    (False: for tasks whose answer needs the whole document in view; a document longer than
    ``seq_len`` is then an error)."""

    seq_len: int = 512
    position_mode: str | None = None
    split_documents: bool = True
    attention: str | None = None

    def __post_init__(self):
        positive_ints(self, "seq_len")
        if self.position_mode not in (None, "document", "continuous"):
            raise TrainConfigError(f"position_mode must be 'document' or 'continuous', got {self.position_mode!r}")
        if self.attention not in (None, *ATTENTION_MODES):
            raise TrainConfigError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        attention = self.attention or {"continuous": "intra"}.get(self.position_mode, "reset")
        if self.position_mode not in (None, _POSITIONS[attention]):
            raise TrainConfigError(f"attention={attention!r} uses {_POSITIONS[attention]} positions, "
                                   f"not position_mode={self.position_mode!r}")
        object.__setattr__(self, "attention", attention)
        object.__setattr__(self, "position_mode", _POSITIONS[attention])
        if attention in ("anchor", "anchor-bos") and self.seq_len < 2:  # the anchor takes a slot of every row
            raise TrainConfigError(f"seq_len must be at least 2 with attention={attention!r} (the anchor takes "
                                   f"a slot), got {self.seq_len}")
        if not isinstance(self.split_documents, bool):
            raise TrainConfigError(f"split_documents must be a bool, got {self.split_documents!r}")


REMAT_CHOICES = ("none", "full", "dots")  # TrainConfig.remat; "none" keeps every activation


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One run: ``batch_size`` rows a step (split into ``grad_accum`` micro-batches), ``steps``
    steps, a checkpoint every ``save_every`` steps keeping the last ``keep``."""

    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    seed: int = 0
    save_every: int = 100
    keep: int = 3
    log_every: int = 1
    compute_dtype: str = "bfloat16"
    mesh: tuple[int, ...] = (1, 1, 1)  # data, fsdp, tensor[, context]
    remat: str = "none"  # each layer's rematerialisation: none | full | dots (models.llama.REMAT_POLICIES)

    def __post_init__(self):
        positive_ints(self, "batch_size", "grad_accum", "steps", "save_every", "keep", "log_every")
        if self.batch_size % self.grad_accum:
            raise TrainConfigError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise TrainConfigError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if len(self.mesh) not in (3, 4) or any(not isinstance(m, int) or m <= 0 for m in self.mesh):
            raise TrainConfigError(f"mesh must be three or four positive integers (data, fsdp, tensor[, context]), "
                                   f"got {self.mesh!r}")
        object.__setattr__(self, "mesh", tuple(self.mesh))
        rows, split = self.batch_size // self.grad_accum, self.mesh[0] * self.mesh[1]
        if rows % split:
            raise TrainConfigError(f"a micro-batch of {rows} rows (batch_size {self.batch_size} / grad_accum "
                                   f"{self.grad_accum}) does not split over the mesh's data x fsdp = {split} "
                                   "devices; make it a multiple")
        if self.remat not in REMAT_CHOICES:
            raise TrainConfigError(f"remat must be one of {REMAT_CHOICES}, got {self.remat!r}")

    def check_seq_len(self, seq_len: int) -> None:
        """Rows of ``seq_len`` tokens split over the mesh's context axis."""
        context = self.mesh[3] if len(self.mesh) == 4 else 1
        if seq_len % context:
            raise TrainConfigError(f"seq_len ({seq_len}) does not split over the mesh's context axis of {context} "
                                   "devices; make it a multiple")
