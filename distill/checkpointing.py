"""Checkpoints that appear whole or not at all, and the one a restarted run resumes from.

Lightning writes a single-file checkpoint through a temporary file, but a sharded one
(ModelParallelStrategy: a folder of per-rank shards plus metadata) in place, over the previous
one: a run killed while writing it (preemption on a cluster, where shards of a 14B student take
minutes) leaves old and new shards mixed in ``last.ckpt``. ``AtomicCheckpoint`` writes every
checkpoint beside its final path, waits for all ranks, then moves it into place on rank 0: a
file by an atomic rename, a folder by renaming the previous one aside, the new one in, and then
deleting the previous one. ``resume_checkpoint`` picks the complete checkpoint whichever moment
the run was killed at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from weakref import proxy

from lightning.pytorch.callbacks import ModelCheckpoint

STAGING_SUFFIX = ".partial"  # a checkpoint being written
PREVIOUS_SUFFIX = ".previous"  # the checkpoint being replaced, while a folder is swapped in


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def move_into_place(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Replace ``final`` by the complete checkpoint ``staged`` (a file or a folder).

    A file replaces atomically. A folder cannot, so the previous one is first renamed to
    ``final + PREVIOUS_SUFFIX`` and deleted only after the new one is in place: at every moment
    one complete checkpoint exists under one of the two names.
    """
    staged, final = Path(staged), Path(final)
    previous = Path(f"{final}{PREVIOUS_SUFFIX}")
    if staged.is_file() and not final.is_dir():
        os.replace(staged, final)
        return
    _remove(previous)
    if final.exists() or final.is_symlink():
        os.replace(final, previous)
    os.replace(staged, final)
    _remove(previous)


def resume_checkpoint(path: str | os.PathLike) -> str | None:
    """The checkpoint to resume from for the final path ``path`` (e.g. ``.../last.ckpt``): it,
    or the previous one if the run was killed between the two renames of a folder swap; None if
    neither exists (a staged, possibly incomplete checkpoint is never used)."""
    path = Path(path)
    for candidate in (path, Path(f"{path}{PREVIOUS_SUFFIX}")):
        if candidate.exists():
            return str(candidate)
    return None


class AtomicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose checkpoints are written beside their path and moved into
    place once every rank has written its part (see the module doc).

    ``last.ckpt`` is always overwritten: ModelCheckpoint's version counter would otherwise write
    ``last-v1.ckpt`` beside it whenever the callback's settings differ from the run being
    resumed (say a new checkpoint interval), and a later restart would resume from the stale
    ``last.ckpt``.

    With ``save_last``, a fit that trained past its last periodic checkpoint also saves
    ``last.ckpt`` when it ends: ModelCheckpoint saves at the end only if it never saved, so
    running a finished stage again resumed from the last periodic checkpoint and repeated the
    steps after it.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        self._fit_start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._fit_start_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        trained = trainer.global_step > self._fit_start_step
        if self.save_last and trained and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        staged = f"{filepath}{STAGING_SUFFIX}"
        if trainer.is_global_zero:
            _remove(Path(staged))  # left by a run killed while writing
        trainer.strategy.barrier("atomic_checkpoint_start")
        trainer.save_checkpoint(staged, self.save_weights_only)
        trainer.strategy.barrier("atomic_checkpoint_written")
        if trainer.is_global_zero:
            move_into_place(staged, filepath)
        trainer.strategy.barrier("atomic_checkpoint_moved")
        # What ModelCheckpoint._save_checkpoint records after saving.
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
