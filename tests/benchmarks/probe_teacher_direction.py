"""Where does a shapes teacher decide the direction of motion, and does it read the direction word?

Two probes of a trained teacher folder (BENCHMARKS.md, "Shapes teacher"):

1. The conditional mean. From pure noise (sigma = 1) the flow-matching optimum of expert_high is
   x0 = E[x0 | caption]. Decoded, its centre of brightness should drift along the captioned
   direction as the data's per-direction mean latent does (clips rendered here and encoded with
   the teacher's own VAE), and its colour should be the captioned colour.
2. The direction swap. Real clips noised to sigma and denoised in one step with the true caption,
   the swapped direction (left<->right, up<->down) and the empty caption: the oracle's motion
   accuracy against the TRUE direction says whether the noisy video or the text decides motion.

    python tests/benchmarks/probe_teacher_direction.py [--teacher DIR] [--sigmas 0.5,0.8,0.9,0.95]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from eval.oracle import accuracy  # noqa: E402
from eval.shapes_world import MOTIONS, Factors, caption, render, sample_spec  # noqa: E402
from teacher.checkpoint import load_teacher  # noqa: E402
from teacher.pipeline import encode_prompts, video_to_uint8  # noqa: E402

SWAP = {"left": "right", "right": "left", "up": "down", "down": "up"}
GRID_Y, GRID_X = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")


def drift(video: torch.Tensor) -> tuple[float, float]:
    """Mean (dx, dy) in pixels of the centre of brightness from the first to the last frame;
    video [B, 3, T, 64, 64] in [-1, 1]."""
    w = video.clamp(-1, 1).add(1).div(2).mean(1)
    mass = w.sum((-1, -2)) + 1e-6
    cx, cy = (w * GRID_X).sum((-1, -2)) / mass, (w * GRID_Y).sum((-1, -2)) / mass
    return float((cx[:, -1] - cx[:, 0]).mean()), float((cy[:, -1] - cy[:, 0]).mean())


def clips(factors: list[Factors], seed: int) -> torch.Tensor:
    """Rendered clips [B, 3, 17, 64, 64] in [-1, 1]."""
    videos = [render(sample_spec(np.random.default_rng([seed, i]), f)) for i, f in enumerate(factors)]
    return torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


@torch.no_grad()
def conditional_mean(models, n: int = 16) -> None:
    noise = torch.randn((n, models.config.dit.in_dim, 5, 16, 16), generator=torch.Generator().manual_seed(0))
    t = torch.full((n,), models.config.sampling.num_train_timesteps - 1)
    print("1. E[x0 | caption] at sigma 1 (expert_high) vs the data's mean latent, drift in px")
    for motion in MOTIONS:
        factors = [Factors("square", "white", motion)] * n
        data = drift(models.vae.decode(models.vae.encode(clips(factors, 7)).mean(0, keepdim=True)))
        context = encode_prompts(models, [caption(factors[0])] * n)
        x0 = noise - models.expert_high(noise, t, context)
        model = drift(models.vae.decode(x0))
        print(f"   {motion:5s}  data dx {data[0]:+6.1f} dy {data[1]:+6.1f}   "
              f"teacher dx {model[0]:+6.1f} dy {model[1]:+6.1f}")
    for colour in ("red", "green", "blue"):
        context = encode_prompts(models, [caption(Factors("circle", colour, "left"))] * n)
        rgb = models.vae.decode(noise - models.expert_high(noise, t, context)).add(1).div(2).mean((0, 2, 3, 4))
        print(f"   {colour:5s}  teacher mean RGB {rgb[0]:.3f} {rgb[1]:.3f} {rgb[2]:.3f}")


@torch.no_grad()
def swap_test(models, sigmas: list[float], n: int = 32) -> None:
    rng = np.random.default_rng(5)
    factors = [sample_spec(rng).factors for _ in range(n)]
    true = [caption(f) for f in factors]
    swapped = [caption(Factors(f.shape, f.colour, SWAP[f.motion])) for f in factors]
    z = models.vae.encode(clips(factors, 5))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    boundary = models.config.sampling.boundary * models.config.sampling.num_train_timesteps
    print("2. one-step denoising of real clips: motion accuracy against the TRUE direction")
    for sigma in sigmas:
        t = int(sigma * models.config.sampling.num_train_timesteps)
        expert = models.expert_high if t >= boundary else models.expert_low
        x_t = (1 - sigma) * z + sigma * noise
        row = []
        for name, captions in (("true", true), ("swapped", swapped), ("empty", [""] * n)):
            x0 = x_t - sigma * expert(x_t, torch.full((n,), t), encode_prompts(models, captions))
            videos = list(video_to_uint8(models.vae.decode(x0)).numpy())
            row.append(f"{name} {accuracy(videos, true)['motion']:.0%}")
        print(f"   sigma {sigma:.2f} ({'high' if t >= boundary else 'low'}):  " + "   ".join(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(ROOT / "teacher" / "weights" / "shapes"))
    ap.add_argument("--sigmas", default="0.5,0.8,0.9,0.95")
    args = ap.parse_args()
    torch.manual_seed(0)
    models = load_teacher(args.teacher)
    conditional_mean(models)
    swap_test(models, [float(s) for s in args.sigmas.split(",")])


if __name__ == "__main__":
    main()
