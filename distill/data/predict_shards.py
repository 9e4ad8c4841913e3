"""Distributed predict runs that write one shard per batch and resume where a killed run stopped.

The latent cache and the ODE trajectories are built by ``trainer.predict`` runs whose batches
each become a safetensors shard. At real size these runs can take hours (the teacher's VAE over a
video folder, the causal teacher sampled for thousands of prompts), so a run that is killed
keeps its finished shards and the next attempt computes only the missing ones.

Batches are contiguous ranges of dataset positions, ``[0, b), [b, 2b), ...``, and batch j goes
to rank ``j % world_size``. A shard is named after its range (``shard-0000016-0000032``), so a
shard on disk says which items it holds whatever the number of ranks that wrote it, and a batch
holds the same items on any number of ranks. On one process these are the batches of a plain
``DataLoader(shuffle=False)``: caches built before this module reproduce.

Shards are written atomically (temp file + rename), so one that exists is whole. Shards of
another batch size or of the former naming (``shard-r<rank>-b<batch>``) are removed and their
items computed again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from teacher.weight_files import save_safetensors_atomic

SHARD_GLOB = "shard-*.safetensors"


def shard_name(start: int, stop: int) -> str:
    """The file name of the shard holding dataset positions ``[start, stop)``."""
    return f"shard-{start:07d}-{stop:07d}.safetensors"


def batch_ranges(num_items: int, batch_size: int) -> list[tuple[int, int]]:
    """Every batch's ``[start, stop)`` range of dataset positions (the last one may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    return [(start, min(start + batch_size, num_items)) for start in range(0, num_items, batch_size)]


def remove_foreign_shards(folder: Path, ranges: list[tuple[int, int]]) -> None:
    """Delete the shards that are not of ``ranges`` (another batch size, the former naming), and
    temp files that a killed write left behind. Only while no rank writes (a temp file is a
    write in progress then)."""
    wanted = {shard_name(*r) for r in ranges}
    for path in folder.glob(SHARD_GLOB):
        if path.name not in wanted:
            path.unlink(missing_ok=True)
    for path in folder.glob(".shard-*"):
        path.unlink(missing_ok=True)


def pending_ranges(folder: Path, ranges: list[tuple[int, int]], rank: int,
                   world_size: int) -> list[tuple[int, int]]:
    """This rank's batch ranges whose shard is not in ``folder`` yet."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    return [r for j, r in enumerate(ranges)
            if j % world_size == rank and not (folder / shard_name(*r)).is_file()]


class _RangeBatches(Dataset):
    """Item k: the collated batch of ``dataset`` positions ``ranges[k]``, plus its shard name."""

    def __init__(self, dataset: Dataset, ranges: list[tuple[int, int]], collate_fn: Callable):
        self.dataset, self.ranges, self.collate_fn = dataset, ranges, collate_fn

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, k: int) -> dict:
        start, stop = self.ranges[k]
        batch = self.collate_fn([self.dataset[i] for i in range(start, stop)])
        batch["shard"] = shard_name(start, stop)
        return batch


def _the_only_item(items: list[dict]) -> dict:
    return items[0]


class ShardedPredictData(L.LightningDataModule):
    """The predict batches of this rank that have no shard in ``folder`` yet.

    Built in ``predict_dataloader``, where the trainer knows its rank and world size; rank 0
    first removes what ``remove_foreign_shards`` removes. The trainer must not insert its own
    sampler (``use_distributed_sampler=False``).
    """

    def __init__(self, dataset: Dataset, batch_size: int, collate_fn: Callable, folder: Path,
                 num_workers: int = 0):
        super().__init__()
        self.dataset, self.collate_fn, self.folder = dataset, collate_fn, Path(folder)
        self.num_workers = num_workers
        self.ranges = batch_ranges(len(dataset), batch_size)

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer.is_global_zero:
            remove_foreign_shards(self.folder, self.ranges)
        trainer.strategy.barrier("shards-cleaned")
        mine = pending_ranges(self.folder, self.ranges, trainer.global_rank, trainer.world_size)
        # One range per loader batch: a plain batch of 1 that Lightning's predict loop can track.
        return DataLoader(_RangeBatches(self.dataset, mine, self.collate_fn), batch_size=1,
                          collate_fn=_the_only_item, num_workers=self.num_workers)


class ShardWriter(BasePredictionWriter):
    """Writes each predict batch to its shard: ``to_tensors(prediction)`` gives the tensors,
    ``metadata(prediction)`` the extra metadata (``format`` is added)."""

    def __init__(self, folder: str | os.PathLike, shard_format: str,
                 to_tensors: Callable[[dict], dict], metadata: Callable[[dict], dict] | None = None):
        super().__init__(write_interval="batch")
        self.folder, self.shard_format = Path(folder), shard_format
        self.to_tensors, self.metadata = to_tensors, metadata

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        metadata = {**(self.metadata(prediction) if self.metadata else {}),
                    "format": self.shard_format}
        save_safetensors_atomic(self.to_tensors(prediction), self.folder / batch["shard"],
                                metadata=metadata)


def run_sharded_predict(folder: str | os.PathLike, module: L.LightningModule, dataset: Dataset,
                        *, batch_size: int, collate_fn: Callable, writer: ShardWriter,
                        trainer_kwargs: dict | None = None, num_workers: int = 0) -> L.Trainer:
    """Predict every batch of ``dataset`` that has no shard in ``folder`` yet; returns the
    trainer after a barrier (every rank's shards are written). ``trainer_kwargs`` go to
    ``L.Trainer`` (accelerator, devices, strategy, ...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = ShardedPredictData(dataset, batch_size, collate_fn, folder, num_workers)
    kwargs = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
              **(trainer_kwargs or {}), "use_distributed_sampler": False}
    trainer = L.Trainer(callbacks=[writer], **kwargs)
    trainer.predict(module, datamodule=data, return_predictions=False)
    trainer.strategy.barrier("sharded-predict")
    return trainer
