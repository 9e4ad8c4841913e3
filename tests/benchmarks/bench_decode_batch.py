"""VAE decode of many clips: one call for all of them against calls of ``DECODE_BATCH`` clips
(what ``teacher.pipeline.decode_latents`` does), alternating in one process.

    python tests/benchmarks/bench_decode_batch.py --clips 48 --threads 1
    python tests/benchmarks/bench_decode_batch.py --clips 48 --threads 2

Decodes the same random latents (the shipped shapes VAE, 17 frames) both ways for ``--rounds``
rounds, in alternating order (``eval.latency.side_by_side``), and prints the median
milliseconds per clip of each and the largest uint8 difference between the two videos.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from eval.latency import side_by_side  # noqa: E402
from student.paths import embedded_teacher_dir  # noqa: E402
from teacher.checkpoint import load_teacher  # noqa: E402
from teacher.pipeline import DECODE_BATCH, decode_latents, latent_shape, video_to_uint8  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--teacher-dir", default=str(embedded_teacher_dir()))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = load_teacher(args.teacher_dir, experts=False)
    s = models.config.sampling
    latents = torch.randn(args.clips, *latent_shape(models, s.frames, s.height, s.width),
                          generator=torch.Generator().manual_seed(0))
    ways = {"one call": lambda: video_to_uint8(models.vae.decode(latents)),
            f"calls of {DECODE_BATCH}": lambda: decode_latents(models, latents)}
    videos = {}

    def timed(name: str):
        def run(r: int) -> float:
            start = time.perf_counter()
            videos[name] = ways[name]()
            return time.perf_counter() - start
        return run

    with torch.no_grad():
        decode_latents(models, latents[:DECODE_BATCH])  # warm-up at the smaller shape
        seconds = side_by_side({name: timed(name) for name in ways}, warmup=0,
                               repeats=args.rounds)
    a, b = videos.values()
    print(f"{args.clips} clips, {args.threads} thread(s), median of {args.rounds} rounds: "
          + ", ".join(f"{name} {statistics.median(v) / args.clips * 1000:.1f} ms/clip"
                      for name, v in seconds.items())
          + f"; largest uint8 difference {int((a.int() - b.int()).abs().max())}")


if __name__ == "__main__":
    main()
