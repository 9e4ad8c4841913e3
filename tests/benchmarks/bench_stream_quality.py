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
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from eval.long_streams import (check_stream_settings, stream_frames, stream_long,  # noqa: E402
                               wall_counts)
from eval.shapes_world import (NUM_FRAMES, eval_prompts, parse_caption, render,  # noqa: E402
                               sample_spec)
from eval.stream_quality import REFLECTED_PX, wall_contact  # noqa: E402
from student.engine import StudentStreamEngine  # noqa: E402
from student.live import load_engine_factory  # noqa: E402
from teacher.checkpoint import load_teacher  # noqa: E402
from teacher.pipeline import GenerationRequest, generate  # noqa: E402
from tests.benchmarks.probe_causal_teacher import causal_teacher_videos, load_causal_teacher  # noqa: E402
from tests.benchmarks.shipped_models import add_model_args  # noqa: E402

def wall_summary(name: str, counts: dict) -> dict:
    """Print one row of ``eval.long_streams.wall_counts``: how many clips reached a wall and
    how many of those came back; returns it with the system's name."""
    reached, back = counts["reached_wall"], counts["came_back"]
    share = f"{back / reached:.1%}" if reached else "-"
    median = f"{counts['median_px_back']:.1f}" if reached else "-"
    print(f"| {name} | {reached} / {counts['streams']} | {back} ({share}) | {median} |")
    return {"system": name, **counts}


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
    return [wall_summary(name, wall_counts([wall_contact(v, m) for v, m in zip(videos, motions)]))
            for name, videos in clips.items()]


def appearance_rates(rows: list[dict], switch_frame: int, fps: float) -> list[dict]:
    """Print ``stream_long``'s "after_switch" rows: per 4-frame chunk after the switch, the share
    of streams whose chunk shows the new colour, the new shape, and both."""
    print(f"\nswitch: the new object, chunk by chunk after the switch at frame {switch_frame}")
    print("| seconds after the switch | new colour | new shape | both |")
    print("|---|---|---|---|")
    for row in rows:
        k = row["chunk"]
        print(f"| {4 * k / fps:.1f}-{4 * (k + 1) / fps:.1f} | {row['colour']:.1%} | "
              f"{row['shape']:.1%} | {row['both']:.1%} |")
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
        check_stream_settings(num_frames, args.switch_frame
                              if {"switch", "guidance"} & set(args.parts) else None)
    except ValueError as err:
        raise SystemExit(f"--seconds {args.seconds:g} / --switch-frame: {err}") from None
    prompts = eval_prompts(args.prompts, seed=0)
    results, start = {}, time.perf_counter()
    for part in args.parts:
        if part == "walls":
            results[part] = walls(prompts, engine, args.teacher_dir, args.causal_teacher)
            continue
        found = stream_long(engine, prompts, list(range(len(prompts))), num_frames,
                            switch_frame=None if part == "long" else args.switch_frame,
                            switch_guidance=args.switch_guidance if part == "guidance" else None)
        results[part] = found["windows"]
        print_rows(f"{part}: {len(prompts)} streams of {num_frames} frames"
                   + (f", switch at frame {args.switch_frame}" if part == "switch" else "")
                   + (f", guidance {args.switch_guidance:g} from frame {args.switch_frame}"
                      if part == "guidance" else ""),
                   results[part], engine.fps)
        if part == "switch":
            results["switch_appearance"] = appearance_rates(found["after_switch"],
                                                            args.switch_frame, engine.fps)
        if part == "long":
            print("\nthe first wall an object reaches in the whole stream")
            print(f"| system | reached a wall | came back >= {REFLECTED_PX:g} px | median px back |")
            print("|---|---|---|---|")
            results["long_walls"] = wall_summary("student (whole stream)", found["walls"])
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": results}, indent=1))
    summary = [f"{part}: first clip {rows[0]['joint']:.1%} joint, last window "
               f"{rows[-1]['joint']:.1%}, moving {rows[-1]['moving']:.1%}"
               for part, rows in results.items() if part in ("long", "switch", "guidance")]
    if "walls" in results:
        summary.append("reflected at the first wall: " + ", ".join(
            f"{row['system'].split(' ')[0]} {row['came_back']}/{row['reached_wall']}"
            for row in results["walls"]))
    summary = "; ".join(summary)
    print(f"\n{summary} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
