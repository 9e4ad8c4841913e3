"""Per-session MP4 recording that stays playable however the session ends.

The file is a *fragmented* MP4 (``frag_keyframe+empty_moov``) with a keyframe every second of
video: the header is written first and every GOP is a self-contained fragment flushed to disk as
soon as it is encoded. So a session that ends abruptly (client gone, server killed, even ffmpeg
killed) leaves a file whose complete fragments play; a normal end (``close``) writes the rest.
ffmpeg encodes in its own process, so appending costs the caller only a pipe write.

Frames are recorded as generated, independent of what the client received or dropped. A sidecar
``<name>.json`` holds the prompt timeline (recorded frame index -> prompt version and text).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import imageio.v2 as imageio
import numpy as np


def _open_fragmented_mp4(path: Path, fps: float, gop: int):
    # Same codec settings as teacher/video_io.open_mp4_writer (H.264, yuv420p, no resize), plus
    # fragmenting and zerolatency: x264's lookahead would otherwise hold frames back in ffmpeg.
    return imageio.get_writer(
        str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
        pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error",
        output_params=["-movflags", "frag_keyframe+empty_moov+default_base_moof",
                       "-g", str(gop), "-tune", "zerolatency", "-flush_packets", "1"])


class Mp4Recorder:
    """Append uint8 frames [n,H,W,3] chunk by chunk to ``path``; thread-safe; ``close`` is
    idempotent and may run on another thread than ``append``."""

    def __init__(self, path: str | os.PathLike, fps: float, width: int, height: int):
        if width % 2 or height % 2:
            raise ValueError(f"recording needs even frame sizes for H.264 yuv420p, got "
                             f"{width}x{height}; use an engine size divisible by 2")
        if fps <= 0:
            raise ValueError(f"recording fps must be > 0, got {fps}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps, self.width, self.height = float(fps), int(width), int(height)
        self.frames_written = 0
        self._timeline: list[dict] = []
        self._lock = threading.Lock()
        self._writer = _open_fragmented_mp4(self.path, self.fps, gop=max(1, round(self.fps)))

    @property
    def closed(self) -> bool:
        return self._writer is None

    def append(self, frames: np.ndarray, prompt_version: int, prompt: str) -> None:
        """Write frames uint8 [n, height, width, 3]; a no-op after ``close``."""
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"recording expects uint8 [n,{self.height},{self.width},3], got "
                             f"{frames.dtype} {list(frames.shape)}")
        with self._lock:
            if self._writer is None:
                return
            if not self._timeline or self._timeline[-1]["prompt_version"] != prompt_version:
                self._timeline.append({"frame": self.frames_written,
                                       "prompt_version": int(prompt_version), "prompt": prompt})
            for frame in frames:
                self._writer.append_data(frame)
            self.frames_written += int(frames.shape[0])

    def close(self) -> Path:
        """Finish the file (and write the sidecar timeline); returns the MP4 path."""
        with self._lock:
            writer, self._writer = self._writer, None
            if writer is None:
                return self.path
            try:
                writer.close()
            finally:
                sidecar = self.path.with_suffix(".json")
                sidecar.write_text(json.dumps({"fps": self.fps, "frames": self.frames_written,
                                               "width": self.width, "height": self.height,
                                               "prompts": self._timeline}, indent=1))
        return self.path
