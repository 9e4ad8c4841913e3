"""Prompt adherence of a long stream, window by window, with the shapes-world oracle.

A live stream runs far past the 17 frames a clip is trained on, and its prompt can change
mid-stream. The standard evaluation judges only the first clip. Here a stream's frames are cut
into windows that follow the chunks: the first clip (frames 0-16, the first five latent frames),
then 16 frames (four latent frames) at a time. Each window is judged against the prompt in
effect at its first frame:

- colour and shape as in ``eval.oracle``;
- motion: the stream's first window needs the captioned direction, as a clip does. In a later
  window the object may be on its way back from a wall (the world reflects it there, so an
  endless "moving left" alternates left and right), so it needs motion along the captioned
  axis, either way. A stopped object fails.

Prompt switches must fall on a window's first frame, so no window mixes two prompts.
``appearance_by_chunk`` times a switch at a chunk's resolution (does the new colour and shape
show in each half second after it), and ``wall_contact`` tells an object that bounces off the
first wall it reaches, as the world's do, from one that stops there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from eval.oracle import judge, track
from eval.shapes_world import MOTION_VECTORS, NUM_FRAMES, OPPOSITE_MOTION, parse_caption

WINDOW_FRAMES = 16  # frames per window after the first clip: four latent frames
# The first wall contact: the object's box within this many pixels of the wall it heads to.
WALL_MARGIN_PX = 2
# Frames after the contact in which its way back from the wall is measured. The world's slowest
# object (1 px per frame) reaches the wall within 2 of them and comes back >= 4 px in the rest;
# a stopped one comes back ~0 (generated frames jitter by under a pixel).
FRAMES_AFTER_CONTACT = 6
REFLECTED_PX = 2.0  # pixels back from its closest approach that count as reflected


def stream_windows(num_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the judged windows; a partial last window is left out."""
    if num_frames < NUM_FRAMES:
        raise ValueError(f"a stream of {num_frames} frames is shorter than one clip; judge at "
                         f"least {NUM_FRAMES} frames")
    starts = range(NUM_FRAMES, num_frames - WINDOW_FRAMES + 1, WINDOW_FRAMES)
    return [(0, NUM_FRAMES)] + [(s, s + WINDOW_FRAMES) for s in starts]


@dataclass(frozen=True)
class WindowVerdict:
    """One window against the prompt in effect at its first frame."""

    start: int
    end: int
    prompt: str
    colour: bool
    shape: bool
    motion: bool  # the captioned direction (the stream's first window) or axis (later ones)
    direction: bool  # the captioned direction exactly, undoing reflections inside the window
    moving: bool  # the oracle found an object and measured motion
    speed: float  # median speed along the motion axis, pixels per frame (0 when not moving)

    @property
    def joint(self) -> bool:
        return self.colour and self.shape and self.motion


def judge_stream(frames: np.ndarray, schedule: Sequence[tuple[int, str]]) -> list[WindowVerdict]:
    """Judge every window of one stream.

    Args:
        frames: uint8 [T, H, W, 3], T >= 17.
        schedule: (first frame, prompt) of each prompt, the first at frame 0, in order; a switch
            must fall on a window start (17 + 16k).
    """
    windows = stream_windows(len(frames))
    starts = {start for start, _ in windows}
    switches = [frame for frame, _ in schedule]
    if not switches or switches[0] != 0:
        raise ValueError(f"the schedule must start with the prompt at frame 0, got {schedule!r}")
    if any(b <= a for a, b in zip(switches, switches[1:])):
        raise ValueError(f"schedule frames must increase, got {switches}")
    for frame in switches:
        if frame not in starts and frame < windows[-1][1]:
            raise ValueError(f"a prompt switch at frame {frame} falls inside a window; switch at "
                             f"a window start (frame 17 + 16k)")
    # Parsed up front: an unreadable prompt fails, naming it, before any window is judged.
    targets = [(frame, prompt, parse_caption(prompt)) for frame, prompt in schedule]
    verdicts = []
    for start, end in windows:
        _, prompt, target = [t for t in targets if t[0] <= start][-1]
        verdict = judge(frames[start:end])
        direction = verdict.motion == target.motion
        on_axis = verdict.motion in (target.motion, OPPOSITE_MOTION[target.motion])
        extent = frames.shape[1] if verdict.motion in ("up", "down") else frames.shape[2]
        verdicts.append(WindowVerdict(
            start=start, end=end, prompt=prompt, colour=verdict.colour == target.colour,
            shape=verdict.shape == target.shape, motion=direction if start == 0 else on_axis,
            direction=direction, moving=verdict.motion is not None,
            speed=abs(verdict.speed) * extent if verdict.motion is not None else 0.0))
    return verdicts


def window_rates(streams: Sequence[Sequence[WindowVerdict]]) -> list[dict]:
    """Per window index over streams of equal length: the fraction of streams right on each
    factor and jointly, moving, and the mean speed (pixels per frame)."""
    if not streams or len({len(s) for s in streams}) != 1:
        raise ValueError("window_rates needs streams with the same number of windows")
    rows = []
    for column in zip(*streams):
        n = len(column)
        rows.append({"start": column[0].start, "end": column[0].end, "n": n,
                     **{key: sum(getattr(v, key) for v in column) / n
                        for key in ("colour", "shape", "motion", "joint", "direction", "moving")},
                     "speed": sum(v.speed for v in column) / n})
    return rows


def appearance_by_chunk(frames: np.ndarray, start: int, prompt: str, chunk_frames: int = 4,
                        count: int = 8) -> list[tuple[bool, bool]]:
    """(colour right, shape right) of each of ``count`` chunks of ``chunk_frames`` frames from
    ``start``: how soon after a prompt switch the new object shows, at a chunk's resolution (a
    shapes latent chunk is 4 frames, half a second). A chunk the oracle finds no object in is
    wrong on both."""
    if start + count * chunk_frames > len(frames):
        raise ValueError(f"{count} chunks of {chunk_frames} frames from frame {start} run past "
                         f"the stream's {len(frames)} frames; ask for fewer chunks")
    target = parse_caption(prompt)
    verdicts = [judge(frames[a:a + chunk_frames])
                for a in range(start, start + count * chunk_frames, chunk_frames)]
    return [(v.colour == target.colour, v.shape == target.shape) for v in verdicts]


def wall_contact(frames: np.ndarray, motion: str) -> float | None:
    """How far the object comes back from the first wall it reaches, moving ``motion``.

    Returns the pixels between its closest approach to that wall and where it is
    ``FRAMES_AFTER_CONTACT`` frames after its box first came within ``WALL_MARGIN_PX`` of it
    (the world reflects it: >= ``REFLECTED_PX``; an object that stops there: about 0), or None
    when it never gets there with that many frames left, or the oracle loses it meanwhile.
    """
    dx, dy = MOTION_VECTORS[motion]
    axis, sign = (0, dx) if dx else (1, dy)
    extent = frames.shape[2] if axis == 0 else frames.shape[1]
    seen = track(frames)
    near = (seen.box[:, axis] <= WALL_MARGIN_PX if sign < 0 else
            seen.box[:, axis + 2] >= extent - 1 - WALL_MARGIN_PX)
    contacts = np.nonzero(near)[0]
    if len(contacts) == 0:
        return None
    k = contacts[0]
    end = k + FRAMES_AFTER_CONTACT
    if end >= len(seen.frames) or seen.frames[end] != seen.frames[k] + FRAMES_AFTER_CONTACT:
        return None
    toward_wall = seen.centroid[k:end + 1, axis] * sign  # grows as it nears the wall
    return float(toward_wall.max() - toward_wall[-1])
