"""Prompt adherence over long streams and after a prompt switch, window by window.

    python tests/benchmarks/bench_stream_quality.py --prompts 200 --seconds 30

Streams the shipped student as ``wan-distill stream`` does (``StudentStreamEngine``, the tiny
decoder when the teacher folder has one, one CPU thread) for each of the standard evaluation
prompts (noise seed i for prompt i), and judges every window of each stream with the oracle
(``eval.stream_quality``: the first clip, then 16 frames at a time). Parts:

- ``long``: one prompt for the whole stream;
- ``switch``: the prompt changes at ``--switch-frame`` to one that differs in colour, shape and
  motion (the next colour and shape of the world's lists; left -> right, right -> up, up -> down,
  down -> left, so half of the switches reverse the motion and half turn it), same language;
  the cached chunks keep their K/V, or with ``--recache`` are re-cached with the new prompt;
- ``guidance``: the prompt stays and the guidance scale changes at ``--switch-frame`` to
  ``--switch-guidance`` (kept or re-cached K/V, as for a prompt);
- ``walls``: what the object does at the first wall it reaches within a 17-frame clip
  (``eval.stream_quality.wall_contact``), for the world's own clip of each prompt (seed i), the
  teacher's default sampler (seed i), the stage-A causal teacher the student learns from (with
  ``--causal-teacher DIR``: Euler 8, guidance 2, as the ODE initialisation samples it) and the
  student's stream; ``long`` also reports it over whole streams.

Prints a table per part (window, then the share of streams right on colour, shape, motion and
jointly, moving at all, and the mean speed in pixels per frame; the world moves at 1-2.5) and a
closing summary; ``--out FILE`` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from eval.shapes_world import (COLOURS, NUM_FRAMES, SHAPES, Factors, caption,  # noqa: E402
                               caption_lang, eval_prompts, parse_caption, render, sample_spec)
from eval.stream_quality import (REFLECTED_PX, appearance_by_chunk, judge_stream,  # noqa: E402
                                 stream_windows, wall_contact, window_rates)
from student.engine import StudentStreamEngine  # noqa: E402
from student.live import load_engine_factory  # noqa: E402
from teacher.checkpoint import load_teacher  # noqa: E402
from teacher.pipeline import GenerationRequest, generate  # noqa: E402
from tests.benchmarks.probe_causal_teacher import causal_teacher_videos, load_causal_teacher  # noqa: E402
from tests.benchmarks.shipped_models import add_model_args  # noqa: E402

NEXT_MOTION = {"left": "right", "right": "up", "up": "down", "down": "left"}


def switched_prompt(prompt: str) -> str:
    """The prompt a stream switches to: every factor different, the same language."""
    f = parse_caption(prompt)
    new = Factors(SHAPES[(SHAPES.index(f.shape) + 1) % len(SHAPES)],
                  COLOURS[(COLOURS.index(f.colour) + 1) % len(COLOURS)], NEXT_MOTION[f.motion])
    return caption(new, caption_lang(prompt))


def stream_frames(engine, prompt: str, seed: int, num_frames: int,
                  switch: tuple[int, Callable] | None) -> np.ndarray:
    """The first ``num_frames`` frames of one stream; ``switch``: (frame, a change applied to
    the engine there), at a chunk boundary."""
    engine.start(prompt, seed=seed)
    chunks, made = [], 0
    while made < num_frames:
        if switch is not None and made == switch[0]:
            switch[1](engine)
        chunk = engine.next_chunk()
        chunks.append(chunk.frames)
        made += len(chunk.frames)
        if switch is not None and made > switch[0] > made - len(chunk.frames):
            raise ValueError(f"--switch-frame {switch[0]} is not a chunk boundary")
    return np.concatenate(chunks)[:num_frames]


def wall_summary(name: str, backs: list[float | None]) -> dict:
    """Print and return how many clips reached a wall and how many of those came back."""
    reached = [b for b in backs if b is not None]
    reflected = sum(b >= REFLECTED_PX for b in reached)
    row = {"system": name, "clips": len(backs), "reached_wall": len(reached),
           "reflected": reflected,
           "median_px_back": float(np.median(reached)) if reached else None}
    share = f"{reflected / len(reached):.1%}" if reached else "-"
    median = f"{row['median_px_back']:.1f}" if reached else "-"
    print(f"| {name} | {len(reached)} / {len(backs)} | {reflected} ({share}) | {median} |")
    return row


def walls(prompts: list[str], engine, teacher_dir: str, causal_teacher: Path | None) -> list[dict]:
    """The first wall contact within a 17-frame clip: the world, the teacher, the causal
    teacher (if given), the student."""
    parts = load_teacher(teacher_dir, experts=True)
    clips: dict[str, list] = {"world (its own clip)": [], "teacher (default sampler)": [],
                              "student (stream)": []}
    for i, prompt in enumerate(tqdm(prompts, desc="walls", unit="prompt")):
        clips["world (its own clip)"].append(render(sample_spec(i, parse_caption(prompt)),
                                                    NUM_FRAMES))
        clips["teacher (default sampler)"].append(
            generate(parts, GenerationRequest(prompt=prompt, seed=i)).video.numpy())
        clips["student (stream)"].append(stream_frames(engine, prompt, i, NUM_FRAMES, None))
    if causal_teacher is not None:
        loaded = load_causal_teacher(causal_teacher, Path(teacher_dir))
        clips["causal teacher (stage A, Euler 8)"] = causal_teacher_videos(
            loaded, prompts, list(range(len(prompts))), steps=8, guidance=2.0)
    print("\nwalls: the first wall an object reaches in a 17-frame clip")
    print(f"| system | reached a wall | came back >= {REFLECTED_PX:g} px | median px back |")
    print("|---|---|---|---|")
    motions = [parse_caption(p).motion for p in prompts]
    return [wall_summary(name, [wall_contact(v, m) for v, m in zip(videos, motions)])
            for name, videos in clips.items()]


def appearance_rates(appearance: list[list[tuple[bool, bool]]], switch_frame: int,
                     fps: float) -> list[dict]:
    """Print and return, per 4-frame chunk after the switch, the share of streams whose chunk
    shows the new colour, the new shape, and both."""
    print(f"\nswitch: the new object, chunk by chunk after the switch at frame {switch_frame}")
    print("| seconds after the switch | new colour | new shape | both |")
    print("|---|---|---|---|")
    rows = []
    for k, column in enumerate(zip(*appearance)):
        n = len(column)
        row = {"chunk": k, "colour": sum(c for c, _ in column) / n,
               "shape": sum(s for _, s in column) / n, "both": sum(c and s for c, s in column) / n}
        print(f"| {4 * k / fps:.1f}-{4 * (k + 1) / fps:.1f} | {row['colour']:.1%} | "
              f"{row['shape']:.1%} | {row['both']:.1%} |")
        rows.append(row)
    return rows


def print_rows(title: str, rows: list[dict], fps: float) -> None:
    print(f"\n{title}")
    print("| seconds | colour | shape | motion | joint | moving | speed px/frame |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['start'] / fps:.1f}-{r['end'] / fps:.1f} | {r['colour']:.1%} | "
              f"{r['shape']:.1%} | {r['motion']:.1%} | {r['joint']:.1%} | {r['moving']:.1%} | "
              f"{r['speed']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--switch-frame", type=int, default=65,
                        help="frame of the switch: a window start, 17 + 16k (65: 8.1 s)")
    parser.add_argument("--parts", nargs="+", choices=["long", "switch", "guidance", "walls"],
                        default=["long", "switch", "walls"])
    parser.add_argument("--switch-guidance", type=float, default=3.0,
                        help="guidance: the scale set at --switch-frame (the prompt stays)")
    add_model_args(parser)
    parser.add_argument("--decoder", default="auto")
    parser.add_argument("--sink", type=int, default=None, help="sink chunks (default: the student's)")
    parser.add_argument("--window", type=int, default=None,
                        help="window chunks (default: the student's)")
    parser.add_argument("--recache", action="store_true",
                        help="on the switch, recompute the cached K/V with the new prompt")
    parser.add_argument("--causal-teacher", type=Path, default=None,
                        help="walls: also a run's causal_teacher folder (stage A)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = load_engine_factory(args.student, args.teacher_dir, decoder=args.decoder,
                                 recache=args.recache)()
    if args.sink is not None or args.window is not None:
        policy = replace(engine.config,
                         sink_chunks=engine.config.sink_chunks if args.sink is None else args.sink,
                         window_chunks=(engine.config.window_chunks if args.window is None
                                        else args.window))
        engine = StudentStreamEngine(engine.student, policy, engine.text_encoder, engine.tokenizer,
                                     engine.vae, width=engine.width, height=engine.height,
                                     fps=engine.fps, recache=args.recache)
    print(f"cache: sink {engine.config.sink_chunks} chunks, window {engine.config.window_chunks}, "
          f"{'recache' if engine.recache else 'no recache'} on a switch")
    num_frames = int(round(args.seconds * engine.fps)) + 1
    # Bad settings fail here, not after the first stream.
    try:
        starts = [start for start, _ in stream_windows(num_frames)]
    except ValueError as err:
        raise SystemExit(f"--seconds {args.seconds}: {err}") from None
    if {"switch", "guidance"} & set(args.parts) and (
            args.switch_frame not in starts[1:] or args.switch_frame + 32 > num_frames):
        raise SystemExit(f"--switch-frame {args.switch_frame} must be a window start (17 + 16k) "
                         f"with 32 frames after it in the {num_frames}-frame streams; e.g. 65")
    prompts = eval_prompts(args.prompts, seed=0)
    results, start = {}, time.perf_counter()
    for part in args.parts:
        if part == "walls":
            results[part] = walls(prompts, engine, args.teacher_dir, args.causal_teacher)
            continue
        streams, backs, appearance = [], [], []
        for i, prompt in enumerate(tqdm(prompts, desc=part, unit="stream")):
            schedule, switch = [(0, prompt)], None
            if part == "switch":
                schedule.append((args.switch_frame, switched_prompt(prompt)))
                switch = (args.switch_frame, lambda e, new=schedule[1][1]: e.set_prompt(new))
            elif part == "guidance":
                switch = (args.switch_frame, lambda e: e.set_guidance(args.switch_guidance))
            frames = stream_frames(engine, prompt, i, num_frames, switch)
            streams.append(judge_stream(frames, schedule))
            backs.append(wall_contact(frames, parse_caption(prompt).motion))
            if part == "switch":
                appearance.append(appearance_by_chunk(frames, *schedule[1]))
        results[part] = window_rates(streams)
        print_rows(f"{part}: {len(prompts)} streams of {num_frames} frames"
                   + (f", switch at frame {args.switch_frame}" if part == "switch" else "")
                   + (f", guidance {args.switch_guidance:g} from frame {args.switch_frame}"
                      if part == "guidance" else ""),
                   results[part], engine.fps)
        if part == "switch":
            results["switch_appearance"] = appearance_rates(appearance, args.switch_frame,
                                                            engine.fps)
        if part == "long":
            print("\nthe first wall an object reaches in the whole stream")
            print(f"| system | reached a wall | came back >= {REFLECTED_PX:g} px | median px back |")
            print("|---|---|---|---|")
            results["long_walls"] = wall_summary("student (whole stream)", backs)
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": results}, indent=1))
    summary = [f"{part}: first clip {rows[0]['joint']:.1%} joint, last window "
               f"{rows[-1]['joint']:.1%}, moving {rows[-1]['moving']:.1%}"
               for part, rows in results.items() if part in ("long", "switch", "guidance")]
    if "walls" in results:
        summary.append("reflected at the first wall: " + ", ".join(
            f"{row['system'].split(' ')[0]} {row['reflected']}/{row['reached_wall']}"
            for row in results["walls"]))
    summary = "; ".join(summary)
    print(f"\n{summary} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
