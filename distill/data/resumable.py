"""Training batches that a resumed run continues exactly where the interrupted run stopped.

Lightning restores the step of a run from its checkpoint but restarts a plain DataLoader at the
beginning of an epoch with a freshly seeded shuffle, so a run interrupted mid-epoch trained on
other batches after its restart than an uninterrupted run would have (Lightning warns "your
dataloader is not resumable"). Here the batches are a pure function of (seed, epoch, rank), and
the position in them is read from the trainer's restored step whenever an epoch starts: one
optimizer step per batch, which every training stage of this project takes.

The order on one process is exactly the one that Lightning's loop drew from the loaders the
stages used before, ``DataLoader(shuffle=True, drop_last=True,
generator=torch.Generator().manual_seed(seed))``, so runs made with those (the shipped teacher
and student) reproduce; tests/test_resumable_batches.py checks it against such a run. On several
ranks every epoch's permutation is split the way ``DistributedSampler`` splits it (rank r takes
every world_size-th item from r, the same number on every rank), so a run's data order depends
on its world size, as with Lightning's sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableBatches(Sampler[list[int]]):
    """Shuffled batches of item indices whose epoch and position follow ``position()``.

    Args:
        num_items: dataset length.
        batch_size: items per batch on this rank (the last partial batch is dropped).
        seed: the shuffle's seed.
        rank, world_size: this process's share of every epoch.
        position: batches consumed so far (the trainer's global step); read at the start of
            every epoch, so a restored step resumes mid-epoch. None: every iteration starts the
            next epoch (not resumable; the order of an uninterrupted run all the same).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, position: Callable[[], int] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.position = rank, world_size, position
        self._epochs_started = 0  # the position when none is given
        self.batches_per_epoch = (num_items // world_size) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_items} items over {world_size} rank(s) do not fill one batch of "
                             f"{batch_size}; lower the batch size or add items")

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's items of ``epoch`` in batch order (before the partial batch is dropped)."""
        # The former loader's draws, epoch by epoch, from its one seeded generator: torch's
        # DataLoader draws its workers' base seed when an epoch's iterator starts, then its
        # RandomSampler the permutation. (The sampler would draw once more after its last item,
        # but Lightning stops after the last full batch and never asks for it.)
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            permutation = torch.randperm(self.num_items, generator=generator).tolist()
        share = self.num_items // self.world_size
        return permutation[self.rank:share * self.world_size:self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        if self.position is None:
            epoch, done = self._epochs_started, 0
            self._epochs_started += 1
        else:
            epoch, done = divmod(int(self.position()), self.batches_per_epoch)
        order, size = self.epoch_order(epoch), self.batch_size
        for b in range(done, self.batches_per_epoch):
            yield order[b * size:(b + 1) * size]


def resumable_loader(dataset: Dataset, batch_size: int, seed: int, trainer=None,
                     **loader_kwargs) -> DataLoader:
    """A DataLoader over ``ResumableBatches`` positioned by ``trainer`` (a Lightning Trainer:
    its rank, world size and global step; None: one process, each iteration the next epoch, not
    resumable: attach the trainer first, ``datamodule.trainer = trainer``, when building the
    loader outside ``fit``).

    The trainer must not insert its own sampler (``use_distributed_sampler=False``): the batches
    already hold this rank's share.
    """
    if trainer is None:
        sampler = ResumableBatches(len(dataset), batch_size, seed)
    else:
        sampler = ResumableBatches(len(dataset), batch_size, seed, rank=trainer.global_rank,
                                   world_size=trainer.world_size,
                                   position=lambda: trainer.global_step)
    return DataLoader(dataset, batch_sampler=sampler, **loader_kwargs)
