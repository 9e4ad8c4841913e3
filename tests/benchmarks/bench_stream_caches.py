"""The two-network student's 17-frame clip with a KV cache for both networks against a cache for
only the networks its steps run (``student.sampler.stream_cache``, what ``eval``, ``stream``
and ``serve`` make), side by side in one process at one CPU thread, at 1, 2 and 4 steps.

    python tests/benchmarks/bench_stream_caches.py --rounds 20

At 1 step the student runs only its high-noise network; with both caches, every deferred append
also flushed the previous chunk into the low-noise network's cache, a pass per chunk whose K/V
nothing read. At 2 and 4 steps both networks run, so both ways make the same cache (a control).
Each round makes one clip both ways in alternating order, from one prompt and seed per round,
with the tiny decoder; prints the median per way and whether the frames are identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from eval.shapes_world import eval_prompts  # noqa: E402
from student.moe import MoEStudent  # noqa: E402
from student.sampler import sampling_sigmas, stream_cache  # noqa: E402
from student.tiny_decoder_checkpoint import TINY_DECODER_FOLDER, load_tiny_decoder  # noqa: E402
from teacher.schedule import sigmas_to_timesteps  # noqa: E402
from tests.benchmarks.bench_deferred_append import make_clip  # noqa: E402
from tests.benchmarks.shipped_models import add_model_args, load_shipped  # noqa: E402


def clip(student, config, parts, decoder, sigmas, prompt: str, seed: int, only_run: bool):
    """One clip with deferred appends into a cache for the networks run, or for both."""
    policy = {"sink_chunks": config.sink_chunks, "window_chunks": config.window_chunks}
    if only_run:
        def new_cache():
            return stream_cache(student, sigmas, 1, None, config.num_train_timesteps, **policy)
    else:
        def new_cache():
            return student.new_cache(1, **policy)
    return make_clip(student, config, parts, decoder, prompt, seed, True, sigmas=sigmas,
                     new_cache=new_cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    add_model_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts, student, config = load_shipped(args)
    if not isinstance(student, MoEStudent):
        raise SystemExit(f"{args.student} holds one network; this compares two-network caches")
    student.eval()
    decoder = load_tiny_decoder(Path(args.teacher_dir) / TINY_DECODER_FOLDER, parts.vae)
    prompts = eval_prompts(args.rounds, seed=0)
    print(f"ms per clip, median of {args.rounds} (one thread, tiny decoder)")
    print("| steps | networks run | caches for both networks | caches for the networks run "
          "| frames identical |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for steps in args.steps:
            sigmas = sampling_sigmas(config, steps)
            clip(student, config, parts, decoder, sigmas, prompts[0], 0, True)  # warm-up
            seconds, identical = {False: [], True: []}, True
            for r in range(args.rounds):
                videos = {}
                for only_run in ((False, True) if r % 2 == 0 else (True, False)):
                    s, videos[only_run] = clip(student, config, parts, decoder, sigmas,
                                               prompts[r], r, only_run)
                    seconds[only_run].append(s)
                identical &= torch.equal(videos[True], videos[False])
            run = ", ".join(student.networks_run_at(
                sigmas_to_timesteps(sigmas[:-1], config.num_train_timesteps)))
            both, only = (statistics.median(seconds[k]) * 1000 for k in (False, True))
            print(f"| {steps} | {run} | {both:.1f} | {only:.1f} ({both / only:.2f}x) | "
                  f"{'yes' if identical else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
