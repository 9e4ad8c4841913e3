"""Checkpoints appear whole or not at all (``distill.checkpointing``)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distill.checkpointing import (
    PREVIOUS_SUFFIX,
    STAGING_SUFFIX,
    AtomicCheckpoint,
    move_into_place,
    resume_checkpoint,
)


def test_a_file_replaces_the_previous_one(tmp_path):
    final, staged = tmp_path / "last.ckpt", tmp_path / f"last.ckpt{STAGING_SUFFIX}"
    final.write_text("old")
    staged.write_text("new")
    move_into_place(staged, final)
    assert final.read_text() == "new" and not staged.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_folder_replaces_the_previous_one(tmp_path):
    final, staged = tmp_path / "last.ckpt", tmp_path / f"last.ckpt{STAGING_SUFFIX}"
    final.mkdir()
    (final / "__0_0.distcp").write_text("old shard")
    (final / "stale").write_text("only in the old checkpoint")
    staged.mkdir()
    (staged / "__0_0.distcp").write_text("new shard")
    move_into_place(staged, final)
    assert sorted(p.name for p in final.iterdir()) == ["__0_0.distcp"]
    assert (final / "__0_0.distcp").read_text() == "new shard"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # The first checkpoint of a run has nothing to replace.
    first = tmp_path / "first"
    (tmp_path / "new").mkdir()
    move_into_place(tmp_path / "new", first)
    assert first.is_dir() and not (tmp_path / "new").exists()


def test_resume_takes_the_complete_checkpoint_wherever_the_kill_fell(tmp_path):
    final = tmp_path / "last.ckpt"
    previous = tmp_path / f"last.ckpt{PREVIOUS_SUFFIX}"
    staged = tmp_path / f"last.ckpt{STAGING_SUFFIX}"
    assert resume_checkpoint(final) is None
    staged.mkdir()  # killed while writing the first checkpoint: nothing to resume
    assert resume_checkpoint(final) is None
    previous.mkdir()  # killed between the two renames of a folder swap
    assert resume_checkpoint(final) == str(previous)
    final.mkdir()  # killed before the previous one was deleted
    assert resume_checkpoint(final) == str(final)


class SimulatedKill(Exception):
    """The process dying at this point (Lightning turns a real KeyboardInterrupt into an exit)."""


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.net(x) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    saves = []

    def save_then_die_on_the_third(self, filepath, weights_only=False, storage_options=None):
        saves.append(filepath)
        if len(saves) == 3:
            with open(filepath, "wb") as f:
                f.write(b"half a checkpoint")
            raise SimulatedKill("killed while writing")
        original(self, filepath, weights_only, storage_options)

    original = L.Trainer.save_checkpoint
    monkeypatch.setattr(L.Trainer, "save_checkpoint", save_then_die_on_the_third)
    folder = tmp_path / "checkpoints"
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[AtomicCheckpoint(dirpath=folder, save_last=True, save_top_k=0,
                                                    every_n_train_steps=1)])
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)
    with pytest.raises(SimulatedKill):
        trainer.fit(Regression(), data)
    assert all(path.endswith(STAGING_SUFFIX) for path in saves)
    resume = resume_checkpoint(folder / "last.ckpt")
    assert resume == str(folder / "last.ckpt")
    assert torch.load(resume, weights_only=False)["global_step"] == 2  # the last complete one
    # The restarted run resumes from it, and its first save clears the half-written file.
    monkeypatch.setattr(L.Trainer, "save_checkpoint", original)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[AtomicCheckpoint(dirpath=folder, save_last=True, save_top_k=0,
                                                    every_n_train_steps=1)])
    trainer.fit(Regression(), data, ckpt_path=resume)
    assert trainer.global_step == 4
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    # Resumed with another checkpoint interval, it still overwrites last.ckpt (no last-v1.ckpt
    # beside a stale last.ckpt for the next restart to pick).
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[AtomicCheckpoint(dirpath=folder, save_last=True, save_top_k=0,
                                                    every_n_train_steps=2)])
    trainer.fit(Regression(), data, ckpt_path=resume_checkpoint(folder / "last.ckpt"))
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 6


def test_a_fit_that_ends_between_periodic_checkpoints_saves_its_last_step(tmp_path):
    """Without the end-of-training save, last.ckpt stays at step 4 of 5 and a second run of the
    finished stage resumes there and trains step 5 again."""
    folder = tmp_path / "checkpoints"
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)

    def fit(max_steps: int, ckpt_path=None) -> L.Trainer:
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[AtomicCheckpoint(dirpath=folder, save_last=True,
                                                        save_top_k=0, every_n_train_steps=2)])
        trainer.fit(Regression(), data, ckpt_path=ckpt_path)
        return trainer

    fit(5)
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 5
    stamp = (folder / "last.ckpt").stat().st_mtime_ns
    # Run again when finished: nothing to train, and the checkpoint is left as it is.
    again = fit(5, resume_checkpoint(folder / "last.ckpt"))
    assert again.global_step == 5
    assert (folder / "last.ckpt").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
