"""The shipped student's oracle accuracy on sampling sigma grids of your choice, one prompt set.

    python tests/benchmarks/probe_sampling_grid.py --num-prompts 600 --prompt-seed 1 \
        --noise-seed 10000 --grids 1,0.9,0.75,0.5 1,0.88,0.55,0.35 1,0.65

Each grid is the sigmas of the steps (from 1, strictly decreasing, the final 0 implied), so its
length is the step count. Every grid streams the same prompts (``eval.shapes_world.
eval_prompts``) from the same noise (seed ``noise_seed + i`` for prompt i) in batches, as
``wan-distill eval``'s student systems do, and prints one markdown row per grid: joint, shape
and motion accuracy and the clips whose object the oracle saw holding still. How the shapes
student's ``sampling_grids`` were chosen (prompt seed 1, never an evaluation set) and confirmed:
BENCHMARKS.md, session 19.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from eval.oracle import accuracy  # noqa: E402
from eval.shapes_world import eval_prompts  # noqa: E402
from eval.systems import StudentSystem  # noqa: E402
from student.tiny_decoder_checkpoint import TINY_DECODER_FOLDER, load_tiny_decoder  # noqa: E402
from tests.benchmarks.shipped_models import add_model_args, load_shipped  # noqa: E402


def parse_grid(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid {text!r} is not comma-separated numbers, e.g. "
                                         f"1,0.88,0.55,0.35") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", type=parse_grid, nargs="+", required=True)
    parser.add_argument("--num-prompts", type=int, default=600)
    parser.add_argument("--prompt-seed", type=int, default=1)
    parser.add_argument("--noise-seed", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--decoder", choices=("tiny", "vae"), default="tiny")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale (default: the student's)")
    add_model_args(parser)
    args = parser.parse_args()
    models, student, config = load_shipped(args, experts=True)
    decoder = (load_tiny_decoder(Path(args.teacher_dir) / TINY_DECODER_FOLDER, models.vae)
               if args.decoder == "tiny" else None)
    prompts = eval_prompts(args.num_prompts, seed=args.prompt_seed)
    print(f"{args.num_prompts} prompts (prompt seed {args.prompt_seed}, noise seeds "
          f"{args.noise_seed}+i), decoder {args.decoder}, guidance "
          f"{config.guidance_default if args.guidance is None else args.guidance}")
    print("| sigmas | joint | shape | motion | held still |")
    print("|---|---|---|---|---|")
    for grid in args.grids:
        # The grid is the config's own for its step count (validated like a shipped one).
        system = StudentSystem(student, replace(config, sampling_grids=(grid,)), models,
                               steps=len(grid), guidance=args.guidance, decoder=decoder)
        videos = []
        for first in range(0, len(prompts), args.batch_size):
            batch = prompts[first:first + args.batch_size]
            seeds = [args.noise_seed + first + i for i in range(len(batch))]
            videos.extend(system.generate(batch, seeds).videos.numpy())
        acc = accuracy(videos, prompts)
        print(f"| {', '.join(f'{s:g}' for s in grid)} | {acc['joint']:.1%} | {acc['shape']:.1%} "
              f"| {acc['motion']:.1%} | {acc['no_motion']} |", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
