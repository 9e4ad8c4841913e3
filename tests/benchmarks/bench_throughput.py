"""Seconds per 17-frame clip at several batch sizes: the teacher's default sampler, its own
4-step baseline and the shipped 4-step student (tiny decoder and VAE), side by side in one run.

    python tests/benchmarks/bench_throughput.py --batches 1 8 32 64 --threads 1

At batch 1 (latency, what `stream` waits for) a shapes-size student pass is mostly
per-operation overhead; a batch spreads that overhead over its clips, so the ratio between the
samplers moves toward their ratio of work. For each batch size, every system makes ``--rounds``
batches after one warm-up batch, in rotated order (``eval.latency.side_by_side``); round r uses
prompts r*B .. r*B+B-1 of the evaluation's list and noise seeds equal to the prompt index.
Prints one markdown row per batch size: the median seconds per clip and the speed-up over the
teacher's default sampler at that batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from eval.latency import side_by_side  # noqa: E402
from eval.shapes_world import eval_prompts  # noqa: E402
from eval.systems import StudentSystem, TeacherSystem  # noqa: E402
from student.tiny_decoder_checkpoint import TINY_DECODER_FOLDER, load_tiny_decoder  # noqa: E402
from tests.benchmarks.shipped_models import add_model_args, load_shipped  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="measured batches per system")
    add_model_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models, student, config = load_shipped(args, experts=True)
    tiny = load_tiny_decoder(Path(args.teacher_dir) / TINY_DECODER_FOLDER, models.vae)
    systems = {
        "teacher UniPC 40 (default)": TeacherSystem(models),
        "teacher UniPC 4": TeacherSystem(models, steps=4),
        "student 4 steps, tiny decoder": StudentSystem(student, config, models, decoder=tiny),
        "student 4 steps, VAE": StudentSystem(student, config, models),
    }
    reference = next(iter(systems))
    prompts = eval_prompts(max(args.batches) * (args.rounds + 1), seed=0)
    print(f"seconds per clip (median of {args.rounds} batches), {args.threads} thread(s); "
          f"in brackets: speed-up over the {reference}")
    print("| batch | " + " | ".join(systems) + " |")
    print("|---|" + "---|" * len(systems))
    for batch in args.batches:
        def run(system):
            def one(r: int) -> float:
                first = r * batch
                out = system.generate(prompts[first:first + batch],
                                      list(range(first, first + batch)))
                return out.seconds / batch
            return one

        per_clip = side_by_side({name: run(s) for name, s in systems.items()}, warmup=1,
                                repeats=args.rounds)
        medians = {name: statistics.median(v) for name, v in per_clip.items()}
        cells = [f"{medians[name] * 1000:.1f} ms ({medians[reference] / medians[name]:.1f}x)"
                 for name in systems]
        print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
