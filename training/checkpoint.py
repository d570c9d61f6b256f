"""A run folder: ``run.json`` (what was trained), ``checkpoints/<step>`` (orbax), metrics,
``hf/`` (the final weights as an HF checkpoint).

Saves are synchronous and atomic (orbax writes a temporary folder and renames it), keep the
last ``keep``, and restore the whole ``TrainState`` (model, optimizer, step, rng). The data
position is the step itself (``jaxkv.training.data.Batches``), so a resumed run continues
exactly. A folder that holds anything but a jaxkv run, or a run of a different configuration
(the data's fingerprint included), raises ``RunDirError`` and is never written to.

Every saved checkpoint's files are hashed (SHA-256) into ``checksums.json``; a restore verifies
them first, so a damaged or truncated checkpoint is refused in one line, naming the file,
before any of it is read. A checkpoint orbax finished (renamed into place) whose hashes were not
recorded, because the process stopped in between, is hashed when the run resumes, with a
warning. While a run holds the folder it holds an exclusive lock on
``.lock`` (``fcntl.flock``, released when the process ends, even by ``kill -9``): a second run on
the same folder is refused. A folder that holds only what a run leaves in its first seconds (the
lock, an empty ``checkpoints/``) counts as empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxkv.errors import UserError
from jaxkv.fileio import read_json_object, write_text_atomic

__all__ = ["RunDirError", "RunDir", "read_checkpoint", "saved_steps", "verify_checkpoint"]

RUN_FILE = "run.json"
CKPT_DIR = "checkpoints"
CHECKSUM_FILE = "checksums.json"
LOCK_FILE = ".lock"


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _checkpoint_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _hash_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _only_startup_leftovers(path: Path) -> bool:
    """True when ``path`` holds nothing but the lock and an empty checkpoints folder: what an
    interrupted first start leaves."""
    for p in path.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.name == CKPT_DIR and p.is_dir() and not any(c.name.isdigit() for c in p.iterdir()):
            continue
        return False
    return True


def _never_saved(path: Path) -> bool:
    """True when the run in ``path`` stopped before its first checkpoint (its settings were
    recorded, nothing was trained that could be resumed): a corrected rerun may start afresh."""
    ckpt = path / CKPT_DIR
    return not (path / "hf").exists() and not (ckpt.is_dir() and any(c.name.isdigit() for c in ckpt.iterdir()))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class RunDirError(UserError):
    """A run folder that cannot be used; the message names the folder and the reason."""


def _read_checksums(run: Path) -> dict:
    f = Path(run) / CHECKSUM_FILE
    if not f.exists():
        return {}
    return read_json_object(f, RunDirError)


def verify_checkpoint(run: str | os.PathLike, step: int) -> None:
    """Check checkpoint ``step`` of the run folder ``run`` against the hashes taken when it was
    saved; ``RunDirError`` names the missing or changed file."""
    folder = Path(run) / CKPT_DIR / str(step)
    want = _read_checksums(Path(run)).get(str(step))
    if want is None:
        raise RunDirError(f"checkpoint {folder} has no recorded checksums ({CHECKSUM_FILE}); it cannot "
                          "be verified, so it is not restored; choose another --out")
    have = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for name in sorted(set(want) | have):
        if name not in have:
            raise RunDirError(f"checkpoint {folder} is damaged: {name} is missing")
        if name not in want or _hash_file(folder / name) != want[name]:
            raise RunDirError(f"checkpoint {folder} is damaged: {name} differs from what was saved "
                              "(checksum mismatch)")


def saved_steps(run: str | os.PathLike) -> list[int]:
    """The steps of the checkpoints a run folder holds with recorded checksums, in order."""
    folder = Path(run) / CKPT_DIR
    sums = _read_checksums(Path(run))
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and p.name in sums) \
        if folder.is_dir() else []


def read_checkpoint(run: str | os.PathLike, step: int, abstract_state):
    """Checkpoint ``step`` of the run folder ``run``, read-only (no lock, nothing written; the
    run may still be training), verified, into the structure of ``abstract_state``."""
    verify_checkpoint(run, step)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns that a read-only manager is read-only
    try:
        manager = ocp.CheckpointManager(Path(run, CKPT_DIR).absolute(),
                                        options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    finally:
        absl.setLevel(level)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax raises many types for damaged or mismatched data
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunDirError(f"checkpoint {Path(run) / CKPT_DIR / str(step)} cannot be restored "
                          f"({type(e).__name__}: {first[:300]})") from None
    finally:
        manager.close()


class RunDir:
    """Open (or create) the run folder ``path`` for a run described by ``meta`` (JSON-able).

    ``meta`` keys listed in ``may_change`` (e.g. the number of steps) may differ on resume.
    """

    def __init__(self, path: str | os.PathLike, meta: dict, *, keep: int,
                 may_change: tuple[str, ...] = ("steps",)):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} exists and is not a folder")
        run_file = self.path / RUN_FILE
        self._lock = None
        if self.path.exists() and any(self.path.iterdir()) and not (
                not run_file.exists() and _only_startup_leftovers(self.path)) and not (
                run_file.exists() and _never_saved(self.path)):
            if not run_file.exists():
                foreign = sorted(p.name for p in self.path.iterdir())[:3]
                raise RunDirError(f"{self.path} is not empty and is not a jaxkv run (it holds "
                                  f"{', '.join(foreign)}); choose another --out")
            old = read_json_object(run_file, RunDirError)
            old, new = _flatten(old), _flatten(json.loads(json.dumps(meta)))
            if "data.position_mode" in old and "data.attention" not in old:  # a run from before the modes
                old["data.attention"] = {"document": "reset", "continuous": "intra"}.get(old["data.position_mode"])
            for key in sorted(set(old) | set(new)):
                if key in may_change:
                    continue
                if key == "data_fingerprint" and old.get(key) != new.get(key):
                    raise RunDirError(f"{self.path} holds a run trained on other data: the documents given "
                                      "now differ from those it started with (a data file was edited, "
                                      "added or removed); restore the data or choose another --out")
                if key == "optim.total_steps" and key not in old:  # runs from before it was recorded
                    continue
                if old.get(key) != new.get(key):
                    raise RunDirError(f"{self.path} holds a run with a different {key!r} "
                                      f"({old.get(key)!r} there, {new.get(key)!r} now); "
                                      "resume with the same settings or choose another --out")
        self.meta = meta
        if jax.process_index() == 0:
            self._take_lock()
        self.manager = ocp.CheckpointManager(
            (self.path / CKPT_DIR).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def write_meta(self) -> None:
        """Record the run's settings (atomically). Called once the run is known to start, so a
        failed restore leaves the folder as it was."""
        if jax.process_index() == 0:
            write_text_atomic(self.path / RUN_FILE, json.dumps(self.meta, indent=2, sort_keys=True) + "\n")

    def _take_lock(self) -> None:
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / LOCK_FILE, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"{self.path} is in use by another jaxkv run ({holder}); wait for it to "
                              "finish or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        self._lock = f

    def latest_step(self) -> int | None:
        """The newest checkpoint. One that orbax finished (renamed into place) but whose hashes
        were never recorded (the process stopped in between) is hashed now, with a warning: a
        checkpoint orbax did not finish is never listed."""
        latest = self.manager.latest_step()
        if latest is not None and jax.process_index() == 0 and str(latest) not in self._checksums():
            import warnings

            warnings.warn(f"checkpoint {self.path / CKPT_DIR / str(latest)} was saved but its checksums were not "
                          "recorded (the run stopped in between); recording them now", stacklevel=2)
            self._record_checksums(latest)
        return latest

    def _checksums(self) -> dict:
        return _read_checksums(self.path)

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            self._record_checksums(step)

    def _record_checksums(self, step: int) -> None:
        kept = {str(s) for s in self.manager.all_steps()}
        sums = {k: v for k, v in self._checksums().items() if k in kept}
        sums[str(step)] = _checkpoint_hashes(self.path / CKPT_DIR / str(step))
        write_text_atomic(self.path / CHECKSUM_FILE, json.dumps(sums, indent=1, sort_keys=True) + "\n")

    def verify(self, step: int) -> None:
        """Check checkpoint ``step``'s files against the hashes taken when it was saved."""
        verify_checkpoint(self.path, step)

    def restore(self, step: int, abstract_state):
        """Verify, then restore ``step`` into the structure, dtypes and shardings of ``abstract_state``."""
        self.verify(step)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax raises many types for damaged or mismatched data
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunDirError(f"checkpoint {self.path / CKPT_DIR / str(step)} cannot be restored "
                              f"({type(e).__name__}: {first[:300]})") from None

    def close(self):
        self.manager.close()
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None
