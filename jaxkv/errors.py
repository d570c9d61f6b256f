"""The error type for mistakes in what a caller hands jaxkv.

``UserError`` (a ``ValueError``) covers bad arguments, bad or damaged files and unsupported
models: the message names the argument, file, field or tensor at fault. Every jaxkv error of
that kind derives from it (``ConfigError``, ``CheckpointError``, the training and run-folder
errors), so ``except UserError`` catches them all. The ``jaxkv`` command prints a ``UserError``
in one line; anything else is a bug in jaxkv and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A mistake in the input (argument, file, model); the message says which and why."""
