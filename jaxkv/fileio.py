"""Writing files without losing anyone's data.

Every file jaxkv writes goes through ``atomic_path``: the content is written to a temporary file
with a unique name beside the target (``.NAME.<random>.tmp``, made with ``O_EXCL`` so it can
never be somebody's file) and renamed over the target only once complete. A crash or Ctrl-C
leaves the old file or the new one, never half of one, and touches no other file.
``check_output_path`` validates a path a command will write to *before* the command's work
starts, so a typo costs seconds, not a whole evaluation.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from jaxkv.errors import UserError

__all__ = ["atomic_path", "write_text_atomic", "check_output_path", "replace_folder", "read_json_object",
           "save_figure"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; rename it to ``path`` when the block ends
    without an exception, delete it otherwise. ``suffix`` keeps an extension writers look at
    (``.png`` for matplotlib)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give the usual permissions
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_text(obj, **kwargs) -> str:
    """``json.dumps`` that writes standard JSON: NaN and infinite floats (a diverged loss, a metric
    with no sample) become ``null`` instead of the ``NaN`` / ``Infinity`` tokens JSON has not."""
    import json
    import math

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def check_output_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` if a file can be written there: its folder exists and is writable, and the path is
    not a folder. Raises ``UserError`` naming ``what`` (e.g. ``--json``) otherwise."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {os.fspath(path)!r} is a folder; give a file name")
    parent = p.parent
    if not parent.is_dir():
        raise UserError(f"{what} {os.fspath(path)!r}: the folder {os.fspath(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{what} {os.fspath(path)!r}: the folder {os.fspath(parent)!r} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{what} {os.fspath(path)!r} exists and is not writable")
    return p


def replace_folder(new: Path, target: Path) -> None:
    """Move the complete folder ``new`` to ``target``, replacing what is there (the caller has
    checked that it owns it): the old folder is renamed aside first, so a crash leaves the old
    or the new folder under ``target`` (or the old one beside it, under a unique name)."""
    import shutil

    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    old.rmdir()
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def read_json_object(path: Path, error: type[Exception], what: str | None = None) -> dict:
    """The JSON object in ``path``; ``error`` (naming ``what``, default the path) if the file is
    not UTF-8 JSON or holds anything but an object."""
    import json

    what = what or os.fspath(path)
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} is corrupt ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{what} is corrupt (it holds a JSON {type(data).__name__}, not an object)")
    return data


def save_figure(fig, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically and close it, whatever happens."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
