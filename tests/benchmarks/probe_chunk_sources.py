"""Where does the student lose accuracy: in the first chunk, or in the chunks that continue it?

Each clip is made chunk by chunk, and a pattern says who makes each chunk: ``S`` the student
(its 4-step sampler, as in streaming), ``T`` the stage-A causal teacher (Euler 8, CFG per expert,
as the ODE initialisation samples its trajectories). Every finished chunk, whoever made it,
becomes the clean context of the next chunk for both models (their KV caches). The last letter
repeats, so ``TS`` is the teacher's first chunk continued by the student. The shapes oracle
judges the decoded clips (BENCHMARKS.md, "Session 12").

    python tests/benchmarks/probe_chunk_sources.py --home ~/.cache/wan-distill S T TS ST
    python tests/benchmarks/probe_chunk_sources.py --home H --num-prompts 600 --prompt-seed 2 S TS

``--home`` is a ``WAN_DISTILL_HOME`` of a finished ``wan-distill distill`` (its
``students/shapes`` and ``runs/shapes/causal_teacher``). Prompt i uses noise seed i, as
``wan-distill eval`` does, so ``S`` reproduces the evaluation's 4-step student exactly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from distill.ar_adaptation import read_causal_teacher  # noqa: E402
from distill.networks import FrozenExperts, load_causal_network  # noqa: E402
from distill.ode_init import causal_teacher_chunk, trajectory_grid  # noqa: E402
from eval.oracle import accuracy  # noqa: E402
from eval.shapes_world import eval_prompts  # noqa: E402
from eval.systems import seeded_noise  # noqa: E402
from student.checkpoint import load_student  # noqa: E402
from student.sampler import sample_chunk, student_sigmas  # noqa: E402
from teacher.checkpoint import load_teacher  # noqa: E402
from teacher.pipeline import decode_latents, encode_prompts, latent_shape  # noqa: E402

TEACHER_STEPS = 8  # the causal teacher's Euler steps per chunk, as in the ODE stage


@torch.no_grad()
def make_clips(pattern: str, student, config, experts: FrozenExperts, sampling,
               context: torch.Tensor, negative: torch.Tensor, noise: torch.Tensor,
               generators, guidance: float) -> torch.Tensor:
    """Latents [B, C, F, H, W] of one batch, each chunk made by the model ``pattern`` names."""
    batch, frames, cf = noise.shape[0], noise.shape[2], config.chunk_frames
    contexts = torch.cat([context, negative.expand_as(context)])
    caches = {name: experts.expert(name).new_cache(2 * batch, noise.device, window_chunks=None)
              for name in ("high", "low")}
    student_cache = student.new_cache(batch, noise.device)
    sigmas = student_sigmas(config.steps, config.shift)
    grid = trajectory_grid(TEACHER_STEPS, sampling.shift, sigmas)  # the ODE stage's grid
    chunks = []
    for c in range(frames // cf):
        chunk_noise = noise[:, :, c * cf:(c + 1) * cf]
        if pattern[min(c, len(pattern) - 1)] == "T":
            _, x = causal_teacher_chunk(
                experts, chunk_noise, contexts, torch.full((batch,), guidance), grid, caches,
                boundary=sampling.boundary,
                guidance_offset=sampling.guidance_high - sampling.guidance_low,
                num_train_timesteps=sampling.num_train_timesteps)
        else:
            x = sample_chunk(student, chunk_noise, sigmas, context, guidance, student_cache,
                             generators, config.num_train_timesteps)
        chunks.append(x)
        if (c + 1) * cf < frames:  # the finished chunk is both models' context
            for name, cache in caches.items():
                experts.expert(name).append_chunk(torch.cat([x, x]), contexts, None, cache)
            student.append_chunk(x, context, guidance, student_cache)
    return torch.cat(chunks, dim=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="+", help="who makes each chunk: S student, T teacher")
    parser.add_argument("--home", required=True, help="the WAN_DISTILL_HOME of a distill run")
    parser.add_argument("--teacher", default=str(ROOT / "teacher/weights/shapes"))
    parser.add_argument("--guidance", type=float, default=None,
                        help="the student's scale (default: its own); the teacher's experts run "
                             "it and it + the teacher's high-low gap")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--prompt-seed", type=int, default=0, help="0: the evaluation's prompts")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bad = [p for p in args.patterns if not p or set(p) - {"S", "T"}]
    if bad:
        raise SystemExit(f"patterns {bad} must be made of S (student) and T (teacher), e.g. TS")
    torch.set_num_threads(args.threads)
    home = Path(args.home).expanduser()
    student_dir, causal_dir = home / "students/shapes", home / "runs/shapes/causal_teacher"
    for folder in (student_dir, causal_dir):
        if not folder.is_dir():
            raise SystemExit(f"{folder} is missing; pass the --home of a finished "
                             f"`wan-distill distill`")
    models = load_teacher(Path(args.teacher))
    student, config = load_student(student_dir)
    teacher_config, expert_config = read_causal_teacher(causal_dir)
    experts = FrozenExperts(*[
        load_causal_network(expert_config, causal_dir / sub, device=torch.device("cpu"),
                            mesh=None, trainable=False, dtype="fp32")
        for sub in (teacher_config.expert_high_dir, teacher_config.expert_low_dir)])
    sampling = teacher_config.sampling
    guidance = config.guidance_default if args.guidance is None else args.guidance
    prompts = eval_prompts(args.num_prompts, args.prompt_seed)
    shape = latent_shape(models, sampling.frames, sampling.height, sampling.width)
    negative = encode_prompts(models, [sampling.negative_prompt], "cpu")
    for pattern in args.patterns:
        start, videos = time.perf_counter(), []
        for first in range(0, len(prompts), args.batch_size):
            texts = prompts[first:first + args.batch_size]
            noise, generators = seeded_noise(shape, range(first, first + len(texts)))
            latents = make_clips(pattern, student, config, experts, sampling,
                                 encode_prompts(models, texts, "cpu"), negative, noise,
                                 generators, guidance)
            with torch.no_grad():
                videos.extend(decode_latents(models, latents).numpy())
        acc = accuracy(videos, prompts)
        print(f"{pattern}: joint {acc['joint']:.1%} (shape {acc['shape']:.1%}, motion "
              f"{acc['motion']:.1%}, no motion {acc['no_motion']}), N={len(prompts)}, "
              f"guidance {guidance:g}, {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
