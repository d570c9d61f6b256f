"""A run folder: ``run.json`` (what was trained), ``checkpoints/<step>`` (orbax), metrics,
``hf/`` (the final weights as an HF checkpoint).

Saves are synchronous and atomic (orbax writes a temporary folder and renames it), keep the
last ``keep``, and restore the whole ``TrainState`` (model, optimizer, step, rng). The data
position is the step itself (``jaxkv.training.data.Batches``), so a resumed run continues
exactly. A folder that holds anything but a jaxkv run, or a run of a different configuration,
raises ``RunDirError`` and is never written to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxkv.errors import UserError

__all__ = ["RunDirError", "RunDir"]

RUN_FILE = "run.json"
CKPT_DIR = "checkpoints"


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
        if self.path.exists() and any(self.path.iterdir()):
            if not run_file.exists():
                foreign = sorted(p.name for p in self.path.iterdir())[:3]
                raise RunDirError(f"{self.path} is not empty and is not a jaxkv run (it holds "
                                  f"{', '.join(foreign)}); choose another --out")
            try:
                old = json.loads(run_file.read_text())
            except json.JSONDecodeError as e:
                raise RunDirError(f"{run_file} is corrupt ({e})") from None
            old, new = _flatten(old), _flatten(json.loads(json.dumps(meta)))
            for key in sorted(set(old) | set(new)):
                if key in may_change:
                    continue
                if old.get(key) != new.get(key):
                    raise RunDirError(f"{self.path} holds a run with a different {key!r} "
                                      f"({old.get(key)!r} there, {new.get(key)!r} now); "
                                      "resume with the same settings or choose another --out")
        self.meta = meta
        self.manager = ocp.CheckpointManager(
            (self.path / CKPT_DIR).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def write_meta(self) -> None:
        """Record the run's settings (atomically). Called once the run is known to start, so a
        failed restore leaves the folder as it was."""
        if jax.process_index() == 0:
            tmp = self.path / (RUN_FILE + ".tmp")
            tmp.write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.path / RUN_FILE)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        """Restore ``step`` into the structure, dtypes and shardings of ``abstract_state``."""
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax raises many types for damaged or mismatched data
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunDirError(f"checkpoint {self.path / CKPT_DIR / str(step)} cannot be restored "
                              f"({type(e).__name__}: {first[:300]})") from None

    def close(self):
        self.manager.close()
