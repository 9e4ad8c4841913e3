"""TEST-ONLY stand-in for a ``StreamEngine``: procedural frames with machine-readable content.

Each frame is black with a moving square whose colour encodes the prompt version, and a barcode
in the top 16 rows: two rows of 16 black/white 8x8 cells (aligned to JPEG blocks, so they survive
q>=60 compression exactly). Row 0 holds the engine frame index (16 bits), row 1 the session tag
(``seed & 0xFF``, 8 bits) and the prompt version (8 bits), most significant bit first. Tests read
them back with ``decode_barcode`` to prove ordering, isolation between sessions and prompt
switches at chunk boundaries. It honours the Protocol's boundary rule: controls are stored and
applied at the start of the next ``next_chunk`` call.
"""

from __future__ import annotations

import time

import numpy as np

from student.stream_types import FrameChunk, frame_timestamps

CELL = 8
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255],
                    [255, 0, 255]], dtype=np.uint8)


def _bits(value: int, n: int) -> list[int]:
    return [(value >> (n - 1 - i)) & 1 for i in range(n)]


def draw_barcode(frame: np.ndarray, frame_index: int, tag: int, prompt_version: int) -> None:
    """Write the 32-bit barcode into ``frame`` uint8 [H, W>=128, 3] in place."""
    rows = [_bits(frame_index & 0xFFFF, 16), _bits(tag & 0xFF, 8) + _bits(prompt_version & 0xFF, 8)]
    for r, bits in enumerate(rows):
        for c, bit in enumerate(bits):
            frame[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = 255 * bit


def decode_barcode(frame: np.ndarray) -> tuple[int, int, int]:
    """uint8 [H, W, 3] (possibly JPEG-decoded) -> (frame_index, tag, prompt_version)."""
    luma = frame[:2 * CELL, :16 * CELL].astype(np.float32).mean(axis=2)
    # Average the inner 4x4 of each cell: JPEG ringing lives at the cell edges.
    cells = luma.reshape(2, CELL, 16, CELL)[:, 2:6, :, 2:6].mean(axis=(1, 3)) > 127.5
    value = [int("".join("1" if b else "0" for b in row), 2) for row in cells]
    return value[0], value[1] >> 8, value[1] & 0xFF


class FakeEngine:
    """Implements ``student.stream_types.StreamEngine`` with cheap procedural frames.

    Args:
        width, height: frame size (width >= 128 for the barcode; even for recording).
        fps: video frames per second.
        chunk_frames: frames per chunk after the first.
        first_chunk_frames: frames of the first chunk after start/reset (the Wan VAE gives
            fewer there); defaults to ``chunk_frames``.
        delay_s: sleep per chunk, standing in for generation time.
        fail_at_chunk: raise RuntimeError when producing this chunk number (counted from 0 since
            start), to test error isolation.
    """

    def __init__(self, width: int = 128, height: int = 96, fps: float = 16.0,
                 chunk_frames: int = 4, first_chunk_frames: int | None = None,
                 delay_s: float = 0.0, fail_at_chunk: int | None = None):
        if width < 16 * CELL or height < 3 * CELL:
            raise ValueError(f"FakeEngine needs at least {16 * CELL}x{3 * CELL}, got "
                             f"{width}x{height}")
        self.width, self.height, self.fps = width, height, fps
        self.chunk_frames = chunk_frames
        self.first_chunk_frames = first_chunk_frames or chunk_frames
        self.delay_s = delay_s
        self.fail_at_chunk = fail_at_chunk
        self.calls: dict[str, int] = {}
        self._started = False
        self._pending: dict[str, object] = {}
        self._paused = False
        self._prompt = ""
        self._seed = 0
        self._guidance: float | None = None
        self._prompt_version = 0
        self._index = 0
        self._chunks = 0

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    # Controls: stored now, applied at the next chunk boundary.
    def start(self, prompt: str, seed: int = 0, guidance: float | None = None) -> None:
        self._count("start")
        self._started = True
        self._pending.clear()
        self._paused = False
        self._prompt, self._seed, self._guidance = prompt, seed, guidance
        self._prompt_version = 0
        self._index = 0
        self._chunks = 0

    def set_prompt(self, prompt: str) -> None:
        self._count("set_prompt")
        self._pending["prompt"] = prompt
        self._pending["prompt_bumps"] = int(self._pending.get("prompt_bumps", 0)) + 1

    def set_seed(self, seed: int) -> None:
        self._count("set_seed")
        self._pending["seed"] = seed

    def set_guidance(self, g: float | None) -> None:
        self._count("set_guidance")
        self._pending["guidance"] = g

    def pause(self) -> None:
        self._count("pause")
        self._pending["paused"] = True

    def resume(self) -> None:
        self._count("resume")
        self._pending["paused"] = False

    def reset(self) -> None:
        self._count("reset")
        self._pending["reset"] = True

    def _apply_pending(self) -> None:
        p, self._pending = self._pending, {}
        if "prompt" in p:
            self._prompt = str(p["prompt"])
            self._prompt_version += int(p["prompt_bumps"])
        if "seed" in p:
            self._seed = int(p["seed"])
        if "guidance" in p:
            self._guidance = p["guidance"]
        if "paused" in p:
            self._paused = bool(p["paused"])
        if p.get("reset"):
            self._index = 0
            self._chunks = 0

    def next_chunk(self) -> FrameChunk | None:
        if not self._started:
            raise RuntimeError("FakeEngine.next_chunk called before start()")
        self._count("next_chunk")
        self._apply_pending()
        if self._paused:
            return None
        if self.fail_at_chunk is not None and self._chunks == self.fail_at_chunk:
            raise RuntimeError(f"FakeEngine: injected failure at chunk {self._chunks}")
        t0 = time.perf_counter()
        n = self.first_chunk_frames if self._index == 0 else self.chunk_frames
        frames = np.zeros((n, self.height, self.width, 3), dtype=np.uint8)
        side = 24
        span_x, span_y = self.width - side, self.height - 2 * CELL - side
        for k in range(n):
            i = self._index + k
            # Bouncing motion: a triangle wave of the frame index, seeded start offset.
            x = abs((3 * i + 7 * self._seed) % (2 * span_x) - span_x)
            y = 2 * CELL + abs((2 * i + 5 * self._seed) % (2 * span_y) - span_y)
            frames[k, y:y + side, x:x + side] = PALETTE[self._prompt_version % len(PALETTE)]
            draw_barcode(frames[k], i, self._seed, self._prompt_version)
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        chunk = FrameChunk(frames=frames, first_frame_index=self._index,
                           timestamps=frame_timestamps(self._index, n, self.fps),
                           prompt_version=self._prompt_version,
                           gen_seconds=time.perf_counter() - t0)
        self._index += n
        self._chunks += 1
        return chunk

    def stats(self) -> dict[str, float | int | str]:
        return {"chunks": self._chunks, "frames": self._index, "device": "cpu-fake"}
