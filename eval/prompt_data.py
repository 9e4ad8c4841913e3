"""The evaluation's inputs: prompts with their noise seeds, and the real videos FVD compares
against (a folder of video files, or clips rendered by the shapes world)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from eval.shapes_world import parse_caption, render, sample_spec

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")


class PromptDataset(Dataset):
    """Prompt i with its noise seed; items are {"index", "prompt", "seed"}."""

    def __init__(self, prompts: Sequence[str], noise_seed: int):
        self.prompts, self.noise_seed = list(prompts), int(noise_seed)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "prompt": self.prompts[i], "seed": self.noise_seed + i}


def collate_prompts(items: list[dict]) -> dict:
    return {key: [item[key] for item in items] for key in ("index", "prompt", "seed")}


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts_file {path} does not exist; give a text file with one "
                                f"prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts_file {path} holds no prompt")
    return prompts


def real_video_files(folder: str | os.PathLike) -> list[Path]:
    """The video files of ``folder`` (recursively), sorted by path."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"real_videos_dir {root} does not exist; give a folder of real "
                                f"videos ({', '.join(VIDEO_SUFFIXES)}) for FVD")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"real_videos_dir {root} holds no video file ({', '.join(VIDEO_SUFFIXES)})")
    return files


def shapes_real_videos(indices: Sequence[int], prompts: Sequence[str], real_seed: int
                       ) -> torch.Tensor:
    """Real clips of the shapes world with the prompts' factors: uint8 [B, 17, 64, 64, 3]."""
    clips = [render(sample_spec(real_seed + int(i), parse_caption(p)))
             for i, p in zip(indices, prompts)]
    return torch.from_numpy(np.stack(clips))
