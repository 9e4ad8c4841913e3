"""The streaming engine interface: what a live generator hands the server, chunk by chunk.

The server (``student/server``) is written against this file only, so any engine that satisfies
``StreamEngine`` (the causal student, or a test fake) plugs in unchanged.

Timing model: an engine produces video at ``fps`` frames per second of *video time*; frame ``i``
(global index since the last ``start``/``reset``) has timestamp ``i / fps`` seconds. Wall-clock
speed is whatever the hardware gives and is reported through ``FrameChunk.gen_seconds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class FrameChunk:
    """One chunk of decoded frames, as produced by one ``StreamEngine.next_chunk`` call.

    Attributes:
        frames: uint8 [n, H, W, 3] RGB, C-contiguous, on the CPU (n >= 1).
        first_frame_index: global index of ``frames[0]`` since the last start/reset (>= 0);
            indices of consecutive chunks are contiguous.
        timestamps: float64 [n], seconds of video time, ``(first_frame_index + k) / fps``.
        prompt_version: the prompt version every frame of this chunk was generated with (a chunk
            never mixes versions: prompt changes apply at chunk boundaries).
        gen_seconds: wall-clock seconds the engine spent producing this chunk, everything
            included (denoising, VAE decode, device-to-host copy), so FPS derived from it is honest.
    """

    frames: np.ndarray
    first_frame_index: int
    timestamps: np.ndarray
    prompt_version: int
    gen_seconds: float

    def __post_init__(self) -> None:
        f = self.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
            raise ValueError("FrameChunk.frames must be a uint8 numpy array [n,H,W,3], got "
                             f"{type(f).__name__} {getattr(f, 'dtype', None)} "
                             f"{list(getattr(f, 'shape', []))}; convert with "
                             "(x.clamp(0,1)*255).round().to(torch.uint8).cpu().numpy()")
        if f.shape[0] < 1:
            raise ValueError("FrameChunk.frames is empty; return None from next_chunk instead")
        ts = self.timestamps
        if not isinstance(ts, np.ndarray) or ts.shape != (f.shape[0],):
            raise ValueError(f"FrameChunk.timestamps must be a numpy array of shape [{f.shape[0]}] "
                             f"(one per frame), got {list(getattr(ts, 'shape', []))}")
        if self.first_frame_index < 0 or self.prompt_version < 0:
            raise ValueError(f"FrameChunk indices must be >= 0, got first_frame_index="
                             f"{self.first_frame_index}, prompt_version={self.prompt_version}")
        if not self.gen_seconds >= 0.0:
            raise ValueError(f"FrameChunk.gen_seconds must be >= 0, got {self.gen_seconds}")

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])


def frame_timestamps(first_frame_index: int, n_frames: int, fps: float) -> np.ndarray:
    """float64 [n_frames] video-time seconds ``(first_frame_index + k) / fps``."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return (first_frame_index + np.arange(n_frames, dtype=np.float64)) / float(fps)


@runtime_checkable
class StreamEngine(Protocol):
    """A live, chunk-by-chunk video generator for ONE session.

    The server creates one engine per session through a factory (engines may share model weights
    behind the factory) and calls every method from a single worker thread, so implementations
    need no locking. Controls (``set_*``, ``pause``, ``resume``, ``reset``) never interrupt a chunk:
    they take effect at the next chunk boundary, i.e. at the next ``next_chunk`` call.

    Attributes:
        fps: video frames per second of video time (timestamps are ``index / fps``).
        width, height: frame size in pixels (frames are uint8 [n, height, width, 3]).
    """

    fps: float
    width: int
    height: int

    def start(self, prompt: str, seed: int = 0, guidance: float | None = None) -> None:
        """(Re)start a stream from scratch: caches cleared, frame index 0, prompt_version 0.
        ``guidance=None`` means the engine's default guidance scale."""
        ...

    def set_prompt(self, prompt: str) -> None:
        """Switch the prompt; prompt_version increases by one from the next chunk on."""
        ...

    def set_seed(self, seed: int) -> None:
        """Use ``seed`` for the noise of the chunks generated from the next one on."""
        ...

    def set_guidance(self, g: float | None) -> None:
        """Set the guidance scale from the next chunk on (None = the engine's default)."""
        ...

    def pause(self) -> None:
        """Stop producing: ``next_chunk`` returns None until ``resume``; all state is kept."""
        ...

    def resume(self) -> None:
        """Continue producing where the stream paused (frame indices continue)."""
        ...

    def reset(self) -> None:
        """Restart the video with the current prompt, seed and guidance: caches cleared, frame
        index back to 0; prompt_version is kept."""
        ...

    def next_chunk(self) -> FrameChunk | None:
        """Generate the next chunk (blocking), or None while paused. Raises before ``start``."""
        ...

    def stats(self) -> dict[str, float | int | str]:
        """Engine-side numbers for /metrics (e.g. chunks, frames, mean gen seconds, device)."""
        ...
