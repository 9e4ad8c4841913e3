"""VAE decode time on the CPU: the blocks' CPU paths vs the plain PyTorch operations they replace.

``CausalConv3d`` runs a Conv3d as one Conv2d per temporal tap on the CPU, and ``ChannelRMSNorm``
writes F.normalize's channel norm out as a sum (teacher/vae_blocks.py says why). This script
decodes the same latents both ways, in alternating rounds in one process, and prints the median
times and the largest difference between the two videos:

    python tests/benchmarks/bench_vae_decode.py                 # shipped shapes VAE, 17 frames
    python tests/benchmarks/bench_vae_decode.py --threads 2

"plain" swaps the two methods for ``nn.Conv3d.forward`` on the padded input and
``F.normalize(x, dim=1)`` for the duration of its rounds (a benchmark-only patch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from teacher.checkpoint import load_teacher  # noqa: E402
from teacher.pipeline import latent_shape  # noqa: E402
from teacher.vae_blocks import CausalConv3d, ChannelRMSNorm  # noqa: E402


@contextmanager
def plain_ops():
    """The official operations: nn.Conv3d on every CausalConv3d, F.normalize in every norm."""
    def plain_norm(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma
    with mock.patch.object(CausalConv3d, "_conv_by_frames", nn.Conv3d.forward), \
            mock.patch.object(ChannelRMSNorm, "forward", plain_norm):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-dir", default=str(ROOT / "teacher/weights/shapes"))
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = load_teacher(Path(args.teacher_dir))
    cfg = models.config.sampling
    vae = models.vae
    latents = torch.randn(1, *latent_shape(models, args.frames, cfg.height, cfg.width),
                          generator=torch.Generator().manual_seed(0))

    def whole():
        return vae.decode(latents)

    def streaming():
        cache = vae.new_decode_cache()
        return torch.cat([vae.decode_chunk(latents[:, :, i:i + 1], cache)
                          for i in range(latents.shape[2])], dim=2)

    times = {(kind, path): [] for kind in ("whole", "streaming") for path in ("plain", "project")}
    outputs = {}
    with torch.no_grad():
        for round_index in range(args.rounds + 1):  # round 0 warms up
            for path in ("plain", "project") if round_index % 2 else ("project", "plain"):
                for kind, fn in (("whole", whole), ("streaming", streaming)):
                    with plain_ops() if path == "plain" else nullcontext():
                        start = time.perf_counter()
                        outputs[kind, path] = fn()
                        elapsed = time.perf_counter() - start
                    if round_index:
                        times[kind, path].append(elapsed)
    print(f"VAE decode of {args.frames} frames {cfg.width}x{cfg.height}, batch 1, "
          f"{args.threads} thread(s), median of {args.rounds} rounds:")
    for kind in ("whole", "streaming"):
        plain = statistics.median(times[kind, "plain"])
        project = statistics.median(times[kind, "project"])
        diff = (outputs[kind, "plain"] - outputs[kind, "project"]).abs().max().item()
        print(f"  {kind:9s}: plain ops {plain * 1e3:7.1f} ms, project {project * 1e3:7.1f} ms, "
              f"{plain / project:4.1f}x faster; max |difference| {diff:.2e} (video in [-1, 1])")


if __name__ == "__main__":
    main()
