"""Long streams of the student, as ``wan-distill stream`` makes them, judged window by window.

A clip evaluation judges a stream's first 17 frames. A live stream runs on, and its prompt may
change. ``stream_long`` streams each prompt for a given number of frames through a
``StudentStreamEngine`` (optionally switching to ``switched_prompt`` at a window start), and
``eval.stream_quality`` judges it: the share of streams right per 2-s window, whether the
object comes back from the first wall it reaches (the world reflects it), and after a switch,
when the new colour and shape appear. Used by ``wan-distill eval --streams N`` and by
``tests/benchmarks/bench_stream_quality.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from eval.shapes_world import (
    COLOURS,
    NUM_FRAMES,
    SHAPES,
    Factors,
    caption,
    caption_lang,
    parse_caption,
)
from eval.stream_quality import (
    REFLECTED_PX,
    WINDOW_FRAMES,
    appearance_by_chunk,
    judge_stream,
    stream_windows,
    wall_contact,
    window_rates,
)

# Where a switched stream's motion goes: half of the switches reverse it, half turn it.
NEXT_MOTION = {"left": "right", "right": "up", "up": "down", "down": "left"}
# Frames a switched stream must run on after the switch: appearance_by_chunk's default chunks.
APPEARANCE_CHUNK_FRAMES, APPEARANCE_CHUNKS = 4, 8
FRAMES_AFTER_SWITCH = APPEARANCE_CHUNK_FRAMES * APPEARANCE_CHUNKS


def switched_prompt(prompt: str) -> str:
    """The prompt a stream switches to: every factor different, the same language (the next
    colour and shape of the world's lists, NEXT_MOTION's motion)."""
    f = parse_caption(prompt)
    new = Factors(SHAPES[(SHAPES.index(f.shape) + 1) % len(SHAPES)],
                  COLOURS[(COLOURS.index(f.colour) + 1) % len(COLOURS)], NEXT_MOTION[f.motion])
    return caption(new, caption_lang(prompt))


def check_stream_settings(num_frames: int, switch_frame: int | None) -> None:
    """Fail, naming the fix, on a stream length the windows cannot cover or a switch that is
    not a window start with FRAMES_AFTER_SWITCH frames after it."""
    starts = [start for start, _ in stream_windows(num_frames)]
    if len(starts) < 2:
        raise ValueError(f"{num_frames}-frame streams hold only the first clip; stream at least "
                         f"{NUM_FRAMES + WINDOW_FRAMES} frames (the first clip and one 2-s window)")
    if switch_frame is not None and (switch_frame not in starts[1:]
                                     or switch_frame + FRAMES_AFTER_SWITCH > num_frames):
        raise ValueError(f"switch frame {switch_frame} must be a window start (17 + 16k) with "
                         f"{FRAMES_AFTER_SWITCH} frames after it in {num_frames}-frame streams; "
                         f"e.g. 65")


def stream_frames(engine, prompt: str, seed: int, num_frames: int,
                  switch: tuple[int, Callable] | None = None,
                  guidance: float | None = None) -> np.ndarray:
    """The first ``num_frames`` uint8 frames [T, H, W, 3] of one stream of ``engine`` (a
    ``StudentStreamEngine``); ``switch``: (frame, a change applied to the engine there), at a
    chunk boundary."""
    engine.start(prompt, seed=seed, guidance=guidance)
    chunks, made = [], 0
    while made < num_frames:
        if switch is not None and made == switch[0]:
            switch[1](engine)
        chunk = engine.next_chunk()
        chunks.append(chunk.frames)
        made += len(chunk.frames)
        if switch is not None and made > switch[0] > made - len(chunk.frames):
            raise ValueError(f"switch frame {switch[0]} is not a chunk boundary")
    return np.concatenate(chunks)[:num_frames]


def wall_counts(backs: Sequence[float | None]) -> dict:
    """How many objects reached a wall (``wall_contact`` not None) and came back from it."""
    reached = [b for b in backs if b is not None]
    return {"streams": len(backs), "reached_wall": len(reached),
            "came_back": sum(b >= REFLECTED_PX for b in reached),
            "median_px_back": float(np.median(reached)) if reached else None}


def stream_long(engine, prompts: Sequence[str], seeds: Sequence[int], num_frames: int, *,
                switch_frame: int | None = None, guidance: float | None = None,
                switch_guidance: float | None = None, progress: bool = True) -> dict:
    """Stream every prompt for ``num_frames`` frames and judge the streams.

    Prompt i streams from noise seed ``seeds[i]`` at ``guidance`` (None: the student's
    default). At ``switch_frame`` it switches to ``switched_prompt``, or with
    ``switch_guidance`` keeps its prompt and changes the guidance scale to that. Returns
    {"windows": ``window_rates`` rows (start, end, colour, shape, motion, joint, moving, speed),
    "walls": ``wall_counts`` of the first wall each object reaches, and after a prompt switch
    "after_switch": per 4-frame chunk after it, the shares showing the new colour, shape and
    both}.
    """
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"{len(prompts)} prompts and {len(seeds)} seeds: pass one seed per "
                         f"prompt, at least one")
    if switch_guidance is not None and switch_frame is None:
        raise ValueError("switch_guidance needs switch_frame: the frame where the scale changes")
    check_stream_settings(num_frames, switch_frame)
    new_prompt = switch_frame is not None and switch_guidance is None
    verdicts, backs, appearance = [], [], []
    for prompt, seed in tqdm(list(zip(prompts, seeds)), desc="long streams", unit="stream",
                             disable=not progress):
        schedule, switch = [(0, prompt)], None
        if new_prompt:
            schedule.append((switch_frame, switched_prompt(prompt)))
            switch = (switch_frame, lambda e, new=schedule[1][1]: e.set_prompt(new))
        elif switch_frame is not None:
            switch = (switch_frame, lambda e: e.set_guidance(switch_guidance))
        frames = stream_frames(engine, prompt, int(seed), num_frames, switch, guidance)
        verdicts.append(judge_stream(frames, schedule))
        backs.append(wall_contact(frames, parse_caption(prompt).motion))
        if new_prompt:
            appearance.append(appearance_by_chunk(frames, *schedule[1], APPEARANCE_CHUNK_FRAMES,
                                                  APPEARANCE_CHUNKS))
    result = {"windows": window_rates(verdicts), "walls": wall_counts(backs)}
    if new_prompt:
        result["after_switch"] = [
            {"chunk": k, "colour": float(np.mean([c for c, _ in column])),
             "shape": float(np.mean([s for _, s in column])),
             "both": float(np.mean([c and s for c, s in column]))}
            for k, column in enumerate(zip(*appearance))]
    return result
