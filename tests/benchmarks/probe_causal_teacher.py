"""How good is the stage-A causal teacher? Its own videos, judged by the oracle.

The causal teacher (``<run_dir>/causal_teacher``, written by stage A of ``wan-distill distill``)
samples the evaluation's prompts chunk by chunk exactly as the ODE initialisation samples its
trajectories (``distill.ode_init.causal_teacher_trajectories``: Euler, CFG per expert, its own
finished chunks in the KV caches), and the shapes oracle judges the decoded videos. Its accuracy
is the ceiling of what the student can learn from those trajectories (BENCHMARKS.md, "Against
the run-6 teacher (session 10)").

    python tests/benchmarks/probe_causal_teacher.py --causal-teacher ~/.cache/wan-distill/runs/shapes/causal_teacher
    python tests/benchmarks/probe_causal_teacher.py --causal-teacher DIR --guidance 1.5 2 --steps 8
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
from distill.ode_init import causal_teacher_trajectories, trajectory_grid  # noqa: E402
from eval.oracle import accuracy  # noqa: E402
from eval.shapes_world import eval_prompts  # noqa: E402
from eval.systems import seeded_noise  # noqa: E402
from student.sampler import student_sigmas  # noqa: E402
from teacher.checkpoint import load_teacher  # noqa: E402
from teacher.pipeline import decode_latents, encode_prompts, latent_shape  # noqa: E402


def load_causal_teacher(folder: Path, teacher_dir: Path):
    """(teacher parts for text and decoding, the causal teacher's frozen experts, its config and
    its experts' config) of a run's ``causal_teacher`` folder."""
    if not folder.is_dir():
        raise SystemExit(f"--causal-teacher {folder} is not a folder; pass <run_dir>/causal_teacher "
                         f"of a `wan-distill distill` run")
    models = load_teacher(teacher_dir)
    teacher_config, expert_config = read_causal_teacher(folder)
    experts = FrozenExperts(*[
        load_causal_network(expert_config, folder / sub, device=torch.device("cpu"), mesh=None,
                            trainable=False, dtype="fp32")
        for sub in (teacher_config.expert_high_dir, teacher_config.expert_low_dir)])
    return models, experts, teacher_config, expert_config


def causal_teacher_videos(loaded, prompts: list[str], noise_seeds: list[int], steps: int,
                          guidance: float, batch_size: int = 50) -> list:
    """uint8 videos [T, H, W, 3] of the causal teacher, sampled as the ODE initialisation samples
    its trajectories (Euler ``steps`` per chunk on its grid, CFG per expert)."""
    models, experts, teacher_config, expert_config = loaded
    sampling = teacher_config.sampling
    # The same grid as the ODE initialisation's (it must hold the student's 4 sigmas).
    grid = trajectory_grid(steps, sampling.shift, student_sigmas(4, sampling.shift))
    shape = latent_shape(models, sampling.frames, sampling.height, sampling.width)
    negative = encode_prompts(models, [sampling.negative_prompt], "cpu")
    videos = []
    for first in range(0, len(prompts), batch_size):
        texts = prompts[first:first + batch_size]
        noise, _ = seeded_noise(shape, noise_seeds[first:first + batch_size])
        _, ends = causal_teacher_trajectories(
            experts, noise, encode_prompts(models, texts, "cpu"), negative,
            torch.full((noise.shape[0],), guidance), grid, boundary=sampling.boundary,
            guidance_offset=sampling.guidance_high - sampling.guidance_low,
            chunk_frames=expert_config.chunk_frames,
            num_train_timesteps=sampling.num_train_timesteps)
        with torch.no_grad():
            videos.extend(decode_latents(models, ends).numpy())
    return videos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--causal-teacher", required=True, help="a run's causal_teacher folder")
    parser.add_argument("--teacher", default=str(ROOT / "teacher/weights/shapes"),
                        help="the teacher whose text encoder and VAE it shares")
    parser.add_argument("--steps", type=int, default=8, help="Euler steps per chunk")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5, 2.0],
                        help="low-noise CFG scales (the high-noise expert adds the teacher's gap)")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--prompt-seed", type=int, default=0, help="0: the evaluation's prompts")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.steps < 4 or args.steps % 4:
        raise SystemExit(f"--steps {args.steps} must be a positive multiple of 4: the trajectory "
                         f"grid holds the student's 4 sigmas, as in the ODE initialisation")
    torch.set_num_threads(args.threads)
    loaded = load_causal_teacher(Path(args.causal_teacher).expanduser(), Path(args.teacher))
    prompts = eval_prompts(args.num_prompts, args.prompt_seed)
    seeds = [args.noise_seed + i for i in range(len(prompts))]
    for guidance in args.guidance:
        start = time.perf_counter()
        videos = causal_teacher_videos(loaded, prompts, seeds, args.steps, guidance,
                                       args.batch_size)
        acc = accuracy(videos, prompts)
        print(f"causal teacher, Euler {args.steps}, guidance {guidance:g}, N={len(prompts)}: "
              f"joint {acc['joint']:.1%} (colour {acc['colour']:.1%}, shape {acc['shape']:.1%}, "
              f"motion {acc['motion']:.1%}) in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
