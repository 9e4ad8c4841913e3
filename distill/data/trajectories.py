"""Causal-teacher trajectories for the ODE initialisation, generated once and stored as shards.

A distributed Lightning ``trainer.predict`` run over the items of a latent cache (their prompt
contexts; the clean latents are not used): each rank samples the stage-A causal teacher for its
batches (``distill.ode_init.causal_teacher_trajectories``), one safetensors shard per batch,
written atomically; a killed run resumes with the missing batches (``distill.data.
predict_shards``):

    states    [b, K, C, F, H, W]  the trajectory at the student's K sigmas (per chunk)
    ends      [b, C, F, H, W]     where it ends (sigma 0)
    guidance  [b]                 the student guidance scale it was sampled with
    index     int64 [b]           the item's index in the latent cache

Noise and guidance of item i come from generators seeded by (seed, i) alone, so the shards do
not depend on the batch size or the number of ranks. ``manifest.json``, written last, marks the
folder complete; the contexts are read back from the latent cache by index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from distill.ar_adaptation import read_causal_teacher
from distill.data.latents import LatentShardDataset
from distill.data.predict_shards import ShardWriter, run_sharded_predict
from distill.data.resumable import resumable_loader
from distill.networks import FrozenExperts, load_causal_network
from distill.ode_init import TrajectoryGrid, causal_teacher_trajectories
from teacher.weight_files import CheckpointError, write_text_atomic

MANIFEST_FILE = "manifest.json"
SHARD_FORMAT = "wan-distill-trajectories-v1"


def item_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of item ``index``'s noise and guidance (rank- and batch-invariant)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


def trajectories_complete(folder: str | os.PathLike) -> bool:
    """True if ``folder`` holds finished trajectories (its manifest)."""
    return (Path(folder) / MANIFEST_FILE).is_file()


class _CacheItems(Dataset):
    """The latent cache's items reduced to (context, latent shape, index)."""

    def __init__(self, cache: LatentShardDataset, num_items: int | None):
        self.cache = cache
        self.count = len(cache) if num_items is None else min(int(num_items), len(cache))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        item = self.cache[i]
        return {"context": item["context"], "shape": torch.tensor(item["latents"].shape),
                "index": item["index"]}


def _collate(items: list[dict]) -> dict:
    return {"context": torch.stack([it["context"] for it in items]),
            "shape": items[0]["shape"],
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64)}


class TrajectoryModule(L.LightningModule):
    """``trainer.predict`` module: prompt contexts -> causal-teacher trajectories.

    The causal teacher is loaded in ``configure_model`` (each rank a full copy, no gradients)
    and kept outside the module registry: nothing here is trained or checkpointed.
    """

    def __init__(self, causal_teacher_dir: str, grid: TrajectoryGrid, context_neg: torch.Tensor,
                 guidance_range: tuple[float, float], seed: int, teacher_dtype: str = "fp32",
                 store_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.causal_teacher_dir, self.grid, self.seed = causal_teacher_dir, grid, seed
        self.context_neg, self.guidance_range = context_neg, guidance_range
        self.teacher_dtype, self.store_dtype = teacher_dtype, store_dtype
        self.teacher_config, self.expert_config = read_causal_teacher(causal_teacher_dir)
        self._teacher: FrozenExperts | None = None

    def configure_model(self) -> None:
        if self._teacher is None:
            device = self.trainer.strategy.root_device
            root = Path(self.causal_teacher_dir)
            self._teacher = FrozenExperts(*[
                load_causal_network(self.expert_config, root / sub, device=device, mesh=None,
                                    trainable=False, dtype=self.teacher_dtype)
                for sub in (self.teacher_config.expert_high_dir, self.teacher_config.expert_low_dir)])

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        shape = tuple(int(v) for v in batch["shape"])
        lo, hi = self.guidance_range
        noise, guidance = [], []
        for index in batch["index"].tolist():
            gen = item_generator(self.seed, index)
            noise.append(torch.randn(shape, generator=gen))
            guidance.append(lo + (hi - lo) * float(torch.rand((), generator=gen)))
        sampling = self.teacher_config.sampling
        dtype = next(self._teacher.expert_low.parameters()).dtype
        context = batch["context"].to(self.device, dtype)
        states, ends = causal_teacher_trajectories(
            self._teacher, torch.stack(noise).to(self.device), context,
            self.context_neg.to(self.device, dtype), torch.tensor(guidance, device=self.device),
            self.grid, boundary=sampling.boundary,
            guidance_offset=sampling.guidance_high - sampling.guidance_low,
            chunk_frames=self.expert_config.chunk_frames,
            num_train_timesteps=sampling.num_train_timesteps)
        return {"states": states.to(self.store_dtype), "ends": ends.to(self.store_dtype),
                "guidance": torch.tensor(guidance, dtype=torch.float32), "index": batch["index"]}


def trajectory_shard_writer(folder: str | os.PathLike) -> ShardWriter:
    """The writer of trajectory shards (see the module docstring for their contents)."""
    return ShardWriter(folder, SHARD_FORMAT, _shard_tensors)


def _shard_tensors(prediction: dict) -> dict[str, torch.Tensor]:
    tensors = {k: prediction[k] for k in ("states", "ends", "guidance")}
    tensors["index"] = prediction["index"].to(torch.int64)
    return tensors


def build_trajectories(folder: str | os.PathLike, latent_cache: str | os.PathLike,
                       causal_teacher_dir: str, grid: TrajectoryGrid, *, num_items: int | None,
                       guidance_range: tuple[float, float], seed: int, batch_size: int,
                       teacher_dtype: str = "fp32", store_dtype: torch.dtype = torch.float32,
                       num_frames: int | None = None, trainer_kwargs: dict | None = None) -> Path:
    """Sample the causal teacher for the first ``num_items`` items of ``latent_cache`` (None:
    all) into ``folder``; reuses a complete folder (the caller names it after its settings) and
    the shards of an interrupted attempt (``distill.data.predict_shards``)."""
    folder = Path(folder)
    if trajectories_complete(folder):
        return folder
    cache = LatentShardDataset(latent_cache, num_frames)
    items = _CacheItems(cache, num_items)
    module = TrajectoryModule(causal_teacher_dir, grid, cache.negative_context, guidance_range,
                              seed, teacher_dtype, store_dtype)
    # no_grad instead of inference_mode: the KV cache reuses a prompt's cross-attention K/V by
    # the context's version counter, which inference tensors do not have.
    trainer = run_sharded_predict(folder, module, items, batch_size=batch_size, collate_fn=_collate,
                                  writer=trajectory_shard_writer(folder),
                                  trainer_kwargs={**(trainer_kwargs or {}), "inference_mode": False})
    if trainer.is_global_zero:
        manifest = {"format": SHARD_FORMAT, "latent_cache": str(Path(latent_cache).resolve()),
                    "num_items": len(items), "sigmas": grid.sigmas[grid.keep].tolist()}
        write_text_atomic(json.dumps(manifest, indent=2), folder / MANIFEST_FILE)
    trainer.strategy.barrier("trajectories-manifest")
    return folder


class TrajectoryDataset(Dataset):
    """Trajectory shards joined with their prompt contexts from the latent cache.

    Items: {"states" float32 [K, C, F, H, W], "ends" float32 [C, F, H, W], "guidance" float32
    scalar, "context" float32 [L, D], "index" int}; one per cache index (the padding repeats a
    DistributedSampler adds are dropped), in index order.
    """

    def __init__(self, folder: str | os.PathLike, latent_cache: str | os.PathLike,
                 num_frames: int | None = None):
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST_FILE
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.folder} is not a complete trajectory folder (no "
                                    f"{MANIFEST_FILE}); build it with build_trajectories")
        rows: dict[int, dict[str, torch.Tensor]] = {}
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                if (f.metadata() or {}).get("format") != SHARD_FORMAT:
                    raise CheckpointError(f"{shard} is not a {SHARD_FORMAT} shard; delete "
                                          f"{self.folder} to rebuild it")
                tensors = {k: f.get_tensor(k) for k in ("states", "ends", "guidance", "index")}
            for row, index in enumerate(tensors["index"].tolist()):
                rows.setdefault(int(index), {k: tensors[k][row] for k in ("states", "ends", "guidance")})
        if not rows:
            raise FileNotFoundError(f"{self.folder} holds no shard-*.safetensors")
        cache = LatentShardDataset(latent_cache, num_frames)
        position = {index: i for i, index in enumerate(cache.indices)}
        self.indices = sorted(rows)
        missing = [i for i in self.indices if i not in position]
        if missing:
            raise ValueError(f"trajectory items {missing[:5]} are not in the latent cache "
                             f"{latent_cache}; the trajectories belong to another cache")
        self.rows = [rows[i] for i in self.indices]
        self.contexts = [cache[position[i]]["context"] for i in self.indices]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"states": row["states"].float(), "ends": row["ends"].float(),
                "guidance": row["guidance"].float(), "context": self.contexts[i],
                "index": self.indices[i]}


class TrajectoryDataModule(L.LightningDataModule):
    """Shuffled training batches of a ``TrajectoryDataset`` (seeded; last partial batch dropped;
    each rank its share; resumable mid-epoch: ``distill.data.resumable``)."""

    def __init__(self, folder: str, latent_cache: str, batch_size: int, seed: int = 0,
                 num_frames: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"ode_init.batch_size={batch_size} must be >= 1")
        self.folder, self.latent_cache, self.batch_size = folder, latent_cache, batch_size
        self.seed, self.num_frames = seed, num_frames
        self.dataset: TrajectoryDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = TrajectoryDataset(self.folder, self.latent_cache, self.num_frames)
            if len(self.dataset) < self.batch_size:
                raise ValueError(f"{self.folder} holds {len(self.dataset)} trajectories, fewer "
                                 f"than ode_init.batch_size={self.batch_size}")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return resumable_loader(self.dataset, self.batch_size, self.seed, self.trainer)

