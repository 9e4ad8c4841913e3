"""Writing videos to MP4 with imageio (ffmpeg), atomically or frame by frame."""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch

from teacher.weight_files import atomic_destination


def _frames_array(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T,H,W,3], got {arr.dtype} {list(arr.shape)}")
    return arr


def open_mp4_writer(path: str | os.PathLike, fps: int):
    """An imageio writer for H.264 MP4 that keeps the frame size as is (no macro-block resize)."""
    return imageio.get_writer(str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264",
                              quality=8, pixelformat="yuv420p", macro_block_size=1)


def write_mp4(path: str | os.PathLike, frames: torch.Tensor | np.ndarray, fps: int) -> Path:
    """Write uint8 frames [T,H,W,3] to ``path``; a crash never leaves a half-written file there."""
    arr = _frames_array(frames)
    path = Path(path)
    if arr.shape[1] % 2 or arr.shape[2] % 2:
        raise ValueError(f"H.264 with yuv420p needs even sizes, got {arr.shape[2]}x{arr.shape[1]}")
    with atomic_destination(path, suffix=".mp4") as tmp:
        with open_mp4_writer(str(tmp), fps) as writer:
            for frame in arr:
                writer.append_data(frame)
    return path


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a video file -> (uint8 frames [T,H,W,3], fps)."""
    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        fps = float(reader.get_meta_data().get("fps", 0.0))
        frames = np.stack([np.asarray(f)[..., :3] for f in reader])
    finally:
        reader.close()
    return frames, fps
