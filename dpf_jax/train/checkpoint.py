"""Orbax checkpoints: the latest state (for resumption) and the best by validation metric.

Layout under a workdir:
  checkpoints/latest/<step>/   the newest two states (a crash while writing keeps the older)
  checkpoints/best/<step>/     the state with the lowest validation metric so far
Each checkpoint holds the whole `TrainState` plus a small JSON `meta` (epoch, metric, config).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def run_meta(step: int, epoch: int, best_metric: float, best_epoch: int, steps_per_epoch: int, config) -> dict:
    """The JSON `meta` saved with a state (read back by resumption checks and reports)."""
    return {"step": int(step), "epoch": epoch, "best_metric": best_metric, "best_epoch": best_epoch,
            "mode": config.mode, "steps_per_epoch": steps_per_epoch,
            "config": json.loads(config.to_json_best_effort())}


class SaveClock:
    """Whether an epoch end writes the latest state: every epoch when `every_secs` is 0, else
    once `every_secs` have passed since the last write, and always after the last epoch.

    (An Orbax save costs ~0.5-2 s; at every epoch of a 500-epoch fine-tuning with ~12 steps per
    epoch that would be most of the run. A better validation model is staged in the
    `Checkpointer` meanwhile, and SIGTERM / Ctrl-C save at once.)"""

    def __init__(self, every_secs: float, epochs: int):
        self.every_secs, self.epochs = every_secs, epochs
        self.last = time.time()

    def due(self, epoch: int) -> bool:
        return not self.every_secs or epoch + 1 == self.epochs or time.time() - self.last >= self.every_secs

    def saved(self) -> None:
        self.last = time.time()


def _manager(directory: Path, max_to_keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


class Checkpointer:
    def __init__(self, workdir: str | os.PathLike):
        root = Path(workdir) / "checkpoints"
        self.latest = _manager(root / "latest", 2)
        self.best = _manager(root / "best", 1)
        self._staged_best = None  # (host state, meta) of a best model not yet on disk

    @staticmethod
    def _save(manager, step: int, state, meta: dict):
        # A step is saved at most once: the state of a step is a pure function of (seed, step),
        # so a second save (epoch end after a periodic save, a resumed epoch) holds nothing new.
        if int(step) in manager.all_steps():
            return
        manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)

    def stage_best(self, state, meta: dict):
        """Keeps a host copy of a new best-validation state for the next `save_latest`: a save
        costs ~0.5-2 s, too much for every improving epoch of a long fine-tuning."""
        self._staged_best = (jax.device_get(state), meta)

    def save_latest(self, state, meta: dict):
        """Writes a staged best model first, to the end, then the latest state: a latest
        checkpoint never refers (by its best_metric) to a best model that is not on disk."""
        if self._staged_best is not None:
            best_state, best_meta = self._staged_best
            self._save(self.best, int(best_state.step), best_state, best_meta)
            self.best.wait_until_finished()
            self._staged_best = None
        self._save(self.latest, int(jax.device_get(state.step)), state, meta)

    def wait(self):
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def restore(self, which: str, template, step: int | None = None) -> tuple[Any, dict] | None:
        """Restores `which` ("latest" or "best") into the structure of `template` (its newest
        step, or `step`); None if absent."""
        manager = self.latest if which == "latest" else self.best
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def read_meta(self, which: str, step: int | None = None) -> dict | None:
        """The JSON meta of `which` (newest step, or `step`) without its state: resumption
        checks run on it before a restore that a changed state layout would break."""
        manager = self.latest if which == "latest" else self.best
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def close(self):
        self.wait()
        self.latest.close()
        self.best.close()


def find_checkpoint_dir(path: str | os.PathLike) -> tuple[Path, int]:
    """Resolves a workdir, a checkpoints/{best,latest} folder or a step folder to (manager dir, step)."""
    p = Path(path)
    candidates = [p / "checkpoints" / "best", p / "checkpoints" / "latest", p]
    for c in candidates:
        if c.is_dir():
            steps = sorted(int(d.name) for d in c.iterdir() if d.is_dir() and d.name.isdigit())
            if steps:
                return c, steps[-1]
    if p.is_dir() and p.name.isdigit() and (p / "state").exists():
        return p.parent, int(p.name)
    raise FileNotFoundError(f"no Orbax checkpoint found under {p} (looked in checkpoints/best, "
                            "checkpoints/latest and the folder itself)")


def load_raw_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[dict, dict]:
    """A checkpoint's state as nested dicts of host numpy arrays (no template), and its meta.

    `path`: a workdir, a checkpoints/<which> folder or a step folder (see `find_checkpoint_dir`);
    with `step`, `path` is the Orbax manager folder. Every array is restored as numpy whatever
    devices saved it, so a checkpoint written on 8 GPUs (or 4 fake CPU devices) loads on one
    device, where Orbax's sharding-preserving restore fails with "Topology mismatch".
    """
    if step is None:
        directory, step = find_checkpoint_dir(path)
    else:
        directory = Path(path)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns about metadata files it does not need
    try:
        md = ocp.PyTreeCheckpointer().metadata((directory / str(step) / "state").absolute())
        tree = getattr(md, "item_metadata", md)
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        with ocp.CheckpointManager(directory.absolute()) as manager:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(restore_args=restore_args), meta=ocp.args.JsonRestore()))
    finally:
        absl_logger.setLevel(level)
    state = jax.tree_util.tree_map(np.asarray, dict(restored["state"]))
    return state, dict(restored["meta"])
