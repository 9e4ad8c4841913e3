"""Training batches that a resumed run continues exactly (``distill.data.resumable``)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from distill.data.resumable import ResumableBatches, resumable_loader


def sampler_batches(num_items: int, batch_size: int, seed: int, epochs: int) -> list[list[int]]:
    """The batches of ``epochs`` whole epochs, each epoch started at its first step."""
    per_epoch = num_items // batch_size
    return [batch for epoch in range(epochs) for batch in
            ResumableBatches(num_items, batch_size, seed, position=lambda e=epoch: e * per_epoch)]


def test_position_continues_mid_epoch():
    uninterrupted = sampler_batches(30, 4, seed=3, epochs=3)  # 7 batches per epoch
    assert len(uninterrupted) == 21 and uninterrupted[:7] != uninterrupted[7:14]
    for step in (0, 1, 6, 7, 9, 15):
        sampler = ResumableBatches(30, 4, 3, position=lambda s=step: s)
        epoch_end = (step // 7 + 1) * 7
        assert list(sampler) == uninterrupted[step:epoch_end], step
    # Every epoch is a permutation, cut into whole batches.
    first_epoch = sum(uninterrupted[:7], [])
    assert len(set(first_epoch)) == 28 and set(first_epoch) <= set(range(30))


def test_without_a_position_each_iteration_is_the_next_epoch():
    sampler = ResumableBatches(30, 4, 3)
    assert [b for _ in range(3) for b in sampler] == sampler_batches(30, 4, seed=3, epochs=3)


def test_ranks_split_every_epoch_evenly_and_disjointly():
    for epoch in range(3):
        shares = [ResumableBatches(11, 2, 5, rank=r, world_size=3, position=lambda e=epoch: e)
                  .epoch_order(epoch) for r in range(3)]
        assert [len(s) for s in shares] == [3, 3, 3]  # 11 // 3 items each, the rest dropped
        flat = [i for s in shares for i in s]
        assert len(set(flat)) == 9 and set(flat) <= set(range(11))
    # Epochs reshuffle.
    assert (ResumableBatches(11, 2, 5, rank=0, world_size=3).epoch_order(0)
            != ResumableBatches(11, 2, 5, rank=0, world_size=3).epoch_order(1))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="do not fill one batch of 8"):
        ResumableBatches(10, 8, 0, world_size=2)
    with pytest.raises(ValueError, match=r"rank=2 must lie in \[0, world_size=2\)"):
        ResumableBatches(10, 2, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        ResumableBatches(10, 0, 0)


class Recorder(L.LightningModule):
    """A linear regression that records the items of every batch it trains on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(3, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        index, x = batch
        self.seen.append(index.tolist())
        return (self.net(x) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


class Items(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.data = TensorDataset(torch.arange(10), torch.linspace(-1, 1, 30).reshape(10, 3))

    def train_dataloader(self):
        return resumable_loader(self.data, 3, seed=4, trainer=self.trainer)


class FormerItems(Items):
    """The loader the training stages used before (torch's seeded shuffle)."""

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=3, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(4))


def _fit(max_steps, tmp_path, ckpt_path=None, data=Items):
    module = Recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True,
                                                   every_n_train_steps=1, save_top_k=0)])
    trainer.fit(module, data(), ckpt_path=ckpt_path)
    return module


def test_one_process_keeps_the_order_lightning_drew_from_the_former_loader(tmp_path):
    # So the runs made before (the shipped teacher and student) reproduce. 10 items at batch 3:
    # 3 batches per epoch, 4 epochs and a bit.
    former = _fit(13, tmp_path / "former", data=FormerItems)
    assert former.seen == sampler_batches(10, 3, seed=4, epochs=5)[:13]
    assert _fit(13, tmp_path / "now").seen == former.seen


def test_lightning_run_interrupted_mid_epoch_resumes_where_it_stopped(tmp_path):
    # 10 items at batch 3: 3 batches per epoch; the interruption after 4 steps is mid-epoch.
    full = _fit(8, tmp_path / "full")
    first = _fit(4, tmp_path / "split")
    rest = _fit(8, tmp_path / "split", ckpt_path=str(tmp_path / "split" / "last.ckpt"))
    assert first.seen + rest.seen == full.seen
    assert len(full.seen) == 8 and len(first.seen) == 4
    for a, b in zip(full.parameters(), rest.parameters()):
        assert torch.equal(a, b)
