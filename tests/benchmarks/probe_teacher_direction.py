"""Where does a shapes teacher decide the direction of motion, and does it read the direction word?

Two probes of a trained teacher folder (BENCHMARKS.md, "Shapes teacher"):

1. The conditional mean. From pure noise (sigma = 1) the flow-matching optimum of expert_high is
   x0 = E[x0 | caption]. Decoded, its centre of brightness should drift along the captioned
   direction as the data's per-direction mean latent does (clips rendered here and encoded with
   the teacher's own VAE), and its colour should be the captioned colour.
2. The direction swap. Real clips noised to sigma and denoised in one step with the true caption,
   the swapped direction (left<->right, up<->down) and the empty caption: the oracle's motion
   accuracy against the TRUE direction says whether the noisy video or the text decides motion.
3. High-noise sampling alone. From pure noise down to the expert boundary with expert_high only
   (Euler on the sampler's shifted grid, its CFG), then one x0 prediction: does the centre of
   brightness move the captioned way over the first half of the clip (chance: 25%)? Below the
   boundary the noisy clip fixes the motion (probe 2), so this is where direction is decided;
   it is also the cheap yardstick for training experiments (64 clips, ~25 s).

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
from eval.shapes_world import MOTIONS, OPPOSITE_MOTION, Factors, caption, render, sample_spec  # noqa: E402
from teacher.checkpoint import load_teacher  # noqa: E402
from teacher.pipeline import encode_prompts, video_to_uint8  # noqa: E402
from teacher.schedule import shift_sigmas, unshift_sigmas  # noqa: E402

GRID_Y, GRID_X = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")


def centres(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of brightness per frame, (cx, cy) [B, T] in pixels; video [B, 3, T, 64, 64] in [-1, 1]."""
    w = video.clamp(-1, 1).add(1).div(2).mean(1)
    mass = w.sum((-1, -2)) + 1e-6
    return (w * GRID_X).sum((-1, -2)) / mass, (w * GRID_Y).sum((-1, -2)) / mass


def drift(video: torch.Tensor) -> tuple[float, float]:
    """Mean (dx, dy) in pixels of the centre of brightness from the first to the last frame;
    video [B, 3, T, 64, 64] in [-1, 1]."""
    cx, cy = centres(video)
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
    swapped = [caption(Factors(f.shape, f.colour, OPPOSITE_MOTION[f.motion])) for f in factors]
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


def first_half_direction(video: torch.Tensor) -> list[str]:
    """The dominant direction of the centre of brightness from frame 0 to frame 8 (before any
    reflection in a world clip), per clip."""
    cx, cy = centres(video)
    dx, dy = (cx[:, 8] - cx[:, 0]).tolist(), (cy[:, 8] - cy[:, 0]).tolist()
    return [("right" if a > 0 else "left") if abs(a) >= abs(b) else ("down" if b > 0 else "up")
            for a, b in zip(dx, dy)]


@torch.no_grad()
def high_noise_sampling(models, n: int = 64, steps: int = 12) -> None:
    s = models.config.sampling
    rng = np.random.default_rng(123)
    factors = [sample_spec(rng).factors for _ in range(n)]
    prompts = [caption(f, "en" if i % 2 == 0 else "zh") for i, f in enumerate(factors)]
    cond, uncond = encode_prompts(models, prompts), encode_prompts(models, [s.negative_prompt] * n)
    # The sampler's grid: u uniform from 1 to the boundary's u, sigma = shift(u).
    u_end = unshift_sigmas(s.boundary, s.shift)
    sigmas = shift_sigmas(torch.linspace(1.0, u_end, steps + 1, dtype=torch.float64), s.shift).tolist()
    x = torch.randn((n, models.config.dit.in_dim, 5, 16, 16), generator=torch.Generator().manual_seed(7))

    def velocity(x, sigma):
        t = torch.full((n,), min(int(sigma * s.num_train_timesteps), s.num_train_timesteps - 1))
        v_cond, v_uncond = models.expert_high(x, t, cond), models.expert_high(x, t, uncond)
        return v_uncond + s.guidance_high * (v_cond - v_uncond)

    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i])
    video = models.vae.decode(x - sigmas[-1] * velocity(x, sigmas[-1]))
    hits = [d == f.motion for d, f in zip(first_half_direction(video), factors)]
    print(f"3. high-noise sampling to the boundary (sigma {sigmas[-1]:.3f}), {n} prompts: first-half "
          f"drift in the captioned direction {np.mean(hits):.0%} (chance 25%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(ROOT / "teacher" / "weights" / "shapes"))
    ap.add_argument("--sigmas", default="0.5,0.8,0.9,0.95")
    args = ap.parse_args()
    torch.manual_seed(0)
    models = load_teacher(args.teacher)
    conditional_mean(models)
    swap_test(models, [float(s) for s in args.sigmas.split(",")])
    high_noise_sampling(models)


if __name__ == "__main__":
    main()
