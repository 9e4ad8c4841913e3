"""Why do long streams stop at the first wall? The models continue the world's own frames.

Each clip is a shapes-world clip whose object first reaches a wall and turns back between
frames 9 and 11, inside latent frame 3. Its first ``--context`` latent frames, encoded by the
teacher's VAE, go into the KV caches as clean context (teacher forcing at inference), and the
model samples the remaining latent frames against them. ``eval.stream_quality.wall_contact``
then asks whether the decoded object comes back from the wall, as the world's object does. With
the world's frames as context, a failure cannot be blamed on the model's own earlier frames.

Sources: the stage-A causal teacher (Euler 8 per chunk, CFG per expert, as the ODE
initialisation samples it) at each ``--guidance`` low-noise scale, its high-noise expert at that
scale plus each ``--offset`` (the teacher's own gap is 2); and the shipped student at each
``--student-guidance`` (its high-noise network was taught with the teacher's high expert at
g + 2). Rows "free-running" sample every latent frame, as a stream's first clip does.

    python tests/benchmarks/probe_wall_reflection.py --causal-teacher ~/.cache/wan-distill/runs/shapes/causal_teacher
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from distill.ode_init import causal_teacher_chunk, trajectory_grid  # noqa: E402
from eval.shapes_world import NUM_FRAMES, caption, direction_at, render, sample_spec  # noqa: E402
from eval.stream_quality import FRAMES_AFTER_CONTACT, REFLECTED_PX, wall_contact  # noqa: E402
from eval.systems import seeded_noise  # noqa: E402
from student.sampler import sample_chunk, sampling_sigmas, stream_cache, student_sigmas  # noqa: E402
from teacher.pipeline import decode_latents, encode_prompts  # noqa: E402
from tests.benchmarks.probe_causal_teacher import load_causal_teacher  # noqa: E402
from tests.benchmarks.shipped_models import add_model_args  # noqa: E402

FRAMES = NUM_FRAMES  # the clip every model here was trained on: 5 latent frames
FIRST_TURN = (9, 11)  # frames where the world's object first turns back (latent frame 3)


def turning_clips(count: int, seed: int) -> list:
    """``count`` world clips whose first reflection falls on a frame in FIRST_TURN."""
    rng, specs = np.random.default_rng(seed), []
    while len(specs) < count:
        spec = sample_spec(rng)
        turns = [f for f in range(1, FRAMES) if direction_at(spec, f) != spec.motion]
        if turns and FIRST_TURN[0] <= turns[0] <= FIRST_TURN[1]:
            specs.append(spec)
    return specs


def continue_clips(sample_latent_frame, append, clean: torch.Tensor, context_frames: int
                   ) -> torch.Tensor:
    """Latent frames [0, context_frames) of ``clean`` [B, C, F, H, W], then the model's own:
    ``sample_latent_frame(f)`` makes frame f against the cache, ``append(x)`` adds a finished
    latent frame (given or made) to it."""
    out = clean.clone()
    frames = clean.shape[2]
    for f in range(frames):
        if f >= context_frames:
            out[:, :, f:f + 1] = sample_latent_frame(f)
        if f + 1 < frames:
            append(out[:, :, f:f + 1])
    return out


def reflection_counts(videos, specs) -> tuple[int, int]:
    """(objects that reached a wall in time to be judged, those that came back from it)."""
    contacts = [wall_contact(video, spec.motion) for video, spec in zip(videos, specs)]
    reached = [c for c in contacts if c is not None]
    return len(reached), sum(c >= REFLECTED_PX for c in reached)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--causal-teacher", required=True, help="a run's causal_teacher folder")
    add_model_args(parser)
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--seed", type=int, default=123, help="seed of the world clips")
    parser.add_argument("--context", type=int, default=3,
                        help="world latent frames given as context (1-4)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5])
    parser.add_argument("--offset", type=float, nargs="+", default=[0.0, 2.0],
                        help="the high-noise expert's scale above --guidance (the teacher's: 2)")
    parser.add_argument("--student-guidance", type=float, nargs="*", default=[1.0, 1.5])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not 1 <= args.context <= 4:
        raise SystemExit(f"--context {args.context} must be 1-4: a clip has 5 latent frames and "
                         f"at least one must be sampled")
    torch.set_num_threads(args.threads)
    models, experts, teacher_config, _ = load_causal_teacher(
        Path(args.causal_teacher).expanduser(), Path(args.teacher_dir))
    sampling = teacher_config.sampling
    specs = turning_clips(args.clips, args.seed)
    videos = np.stack([render(spec, FRAMES) for spec in specs])
    prompts = [caption(spec) for spec in specs]
    batch = len(specs)
    rows = [("the world", "", "", *reflection_counts(videos, specs))]
    with torch.no_grad():
        pixels = torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        clean = torch.cat([models.vae.encode(part) for part in pixels.split(16)])
        rows.append(("VAE round trip", "", "", *reflection_counts(
            decode_latents(models, clean).numpy(), specs)))
        text = encode_prompts(models, prompts, "cpu")
        contexts = torch.cat([text, encode_prompts(models, [sampling.negative_prompt], "cpu")
                              .expand_as(text)])
        noise, _ = seeded_noise(clean.shape[1:], list(range(batch)))
        grid = trajectory_grid(8, sampling.shift, student_sigmas(4, sampling.shift))

        def causal_teacher(guidance: float, offset: float, context_frames: int):
            caches = {name: experts.expert(name).new_cache(2 * batch, "cpu", window_chunks=None)
                      for name in ("high", "low")}
            scales = torch.full((batch,), guidance)

            def sample(f):
                return causal_teacher_chunk(
                    experts, noise[:, :, f:f + 1], contexts, scales, grid, caches,
                    boundary=sampling.boundary, guidance_offset=offset,
                    num_train_timesteps=sampling.num_train_timesteps)[1]

            def append(x):
                for name, cache in caches.items():
                    experts.expert(name).append_chunk(torch.cat([x, x]), contexts, None, cache)

            return continue_clips(sample, append, clean, context_frames)

        for guidance in args.guidance:
            for offset in args.offset:
                for label, frames in ((f"{args.context} world latent frames", args.context),
                                      ("free-running", 0)):
                    made = decode_latents(models, causal_teacher(guidance, offset, frames))
                    rows.append((f"causal teacher, {label}", f"{guidance:g}",
                                 f"{guidance + offset:g}",
                                 *reflection_counts(made.numpy(), specs)))
                    print(rows[-1], flush=True)

        if args.student_guidance:
            from student.checkpoint import load_student
            student, config = load_student(args.student)
            student.eval()
            sigmas = sampling_sigmas(config, config.steps)
            for guidance in args.student_guidance:
                for label, frames in ((f"{args.context} world latent frames", args.context),
                                      ("free-running", 0)):
                    _, generators = seeded_noise(clean.shape[1:], list(range(batch)))
                    cache = stream_cache(student, sigmas, batch, "cpu",
                                         config.num_train_timesteps)

                    def sample(f, guidance=guidance, cache=cache, generators=generators):
                        return sample_chunk(student, noise[:, :, f:f + 1], sigmas, text,
                                            guidance, cache, generators,
                                            config.num_train_timesteps)

                    def append(x, guidance=guidance, cache=cache):
                        student.append_chunk(x, text, guidance, cache)

                    made = decode_latents(models, continue_clips(sample, append, clean, frames))
                    rows.append((f"student, {label}", f"{guidance:g}", f"{guidance + 2:g} (taught)",
                                 *reflection_counts(made.numpy(), specs)))
                    print(rows[-1], flush=True)

    print(f"\n{batch} world clips turning back at frames {FIRST_TURN[0]}-{FIRST_TURN[1]} "
          f"(seed {args.seed}); came back = >= {REFLECTED_PX:g} px from the wall "
          f"{FRAMES_AFTER_CONTACT} frames after reaching it")
    print("| source | low-noise scale | high-noise scale | reached a wall | came back |")
    print("|---|---|---|---|---|")
    for source, low, high, reached, back in rows:
        share = f" ({back / reached:.0%})" if reached else ""
        print(f"| {source} | {low} | {high} | {reached} | {back}{share} |")


if __name__ == "__main__":
    main()
