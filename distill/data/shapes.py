"""Training and validation data from the embedded shapes world (``eval.shapes_world``).

Every sample is a pure function of (seed, split, index): no worker, rank or epoch state enters
it, so any DataLoader worker on any rank produces the same clip for the same index, and a run
is reproducible at any num_workers. Caption dropout for classifier-free guidance is not done
here: the trainer owns it.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distill.data.resumable import resumable_loader
from eval.shapes_world import LANGS, caption, render, sample_spec

# Per-split stream ids in the seed sequence, so train and validation never share a clip.
_SPLIT_STREAMS = {"train": 0, "val": 1}


def video_to_tensor(video: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1] (the VAE's input layout)."""
    return torch.from_numpy(video).permute(3, 0, 1, 2).to(torch.float32) / 127.5 - 1.0


class ShapesWorldDataset(Dataset):
    """A map-style view of ``num_samples`` clips of the shapes world.

    Sample i is drawn from ``np.random.default_rng([seed, split_stream, i])``: its factors,
    geometry and caption language. Items are dicts:
      video: float32 [3, num_frames, 64, 64] in [-1, 1]
      caption: str (English or Chinese template)
      lang: "en" | "zh"
      factors: {"shape", "colour", "motion"} -> str
      index: int
    The default collate turns a batch into video [B, 3, T, 64, 64], lists of captions and
    languages, and a dict of lists of factors.
    """

    def __init__(
        self,
        num_samples: int,
        num_frames: int = 17,
        seed: int = 0,
        languages: Sequence[str] = LANGS,
        language_weights: Sequence[float] | None = None,
        split: str = "train",
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1")
        if num_frames < 1 or (num_frames - 1) % 4 != 0:
            raise ValueError(
                f"num_frames={num_frames} must be 1 + 4k (the Wan VAE compresses time by 4 "
                "after the first frame); use e.g. 5, 17 or 33"
            )
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split={split!r} must be one of {list(_SPLIT_STREAMS)}")
        self.languages, self.language_probs = _language_probs(languages, language_weights)
        self.num_samples = int(num_samples)
        self.num_frames = int(num_frames)
        self.seed = int(seed)
        self.split = split

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, _SPLIT_STREAMS[self.split], int(index)])
        spec = sample_spec(rng)
        lang = self.languages[int(rng.choice(len(self.languages), p=self.language_probs))]
        return {
            "video": video_to_tensor(render(spec, self.num_frames)),
            "caption": caption(spec, lang),
            "lang": lang,
            "factors": {"shape": spec.shape, "colour": spec.colour, "motion": spec.motion},
            "index": int(index),
        }


def _language_probs(
    languages: Sequence[str], weights: Sequence[float] | None
) -> tuple[tuple[str, ...], np.ndarray]:
    languages = tuple(languages)
    if not languages or any(lang not in LANGS for lang in languages):
        raise ValueError(f"languages={languages!r} must be a non-empty subset of {list(LANGS)}")
    if len(set(languages)) != len(languages):
        raise ValueError(f"languages={languages!r} lists a language twice")
    if weights is None:
        weights = [1.0] * len(languages)
    probs = np.asarray(weights, dtype=np.float64)
    if probs.shape != (len(languages),) or (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(
            f"language_weights={weights!r} must be {len(languages)} non-negative numbers "
            f"(one per language in {languages}) with a positive sum"
        )
    return languages, probs / probs.sum()


class ShapesWorldDataModule(L.LightningDataModule):
    """LightningDataModule over the shapes world.

    Training: ``num_train`` clips (a virtual length; the world is unlimited, so make it as large
    as the run needs), reshuffled each epoch by a generator seeded from ``seed``, and a resumed
    run continues mid-epoch (``distill.data.resumable``). Validation: a
    fixed set of ``num_val`` clips from a separate stream, in order. Languages are mixed per
    sample with ``language_weights`` (uniform when None).
    """

    def __init__(
        self,
        batch_size: int = 8,
        num_frames: int = 17,
        languages: Sequence[str] = LANGS,
        language_weights: Sequence[float] | None = None,
        seed: int = 0,
        num_train: int = 100_000,
        num_val: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if num_train < batch_size:
            raise ValueError(
                f"num_train={num_train} is smaller than batch_size={batch_size}; training drops "
                "the last partial batch, so raise num_train"
            )
        self.save_hyperparameters()
        common = dict(
            num_frames=num_frames, seed=seed, languages=languages,
            language_weights=language_weights,
        )
        # Building the datasets renders nothing, so it is done here rather than in setup():
        # the module is usable (and validated) straight after construction.
        self.train_set = ShapesWorldDataset(num_train, split="train", **common)
        self.val_set = ShapesWorldDataset(num_val, split="val", **common)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        # Resumable mid-epoch, in the order of the seeded shuffle (distill.data.resumable).
        return resumable_loader(self.train_set, self.batch_size, self.seed, self.trainer,
                                num_workers=self.num_workers,
                                persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        # In order, every clip (no partial batch dropped).
        return DataLoader(self.val_set, batch_size=self.batch_size,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
