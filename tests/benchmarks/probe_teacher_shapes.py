"""Where does a shapes teacher lose the square? Real square clips, noised and sampled back.

Real square clips (encoded with the teacher's VAE) are noised to sigma0 and sampled down to 0 with
the teacher's own expert switch and per-expert CFG (Euler on the sampler's shifted grid): the
oracle's shape accuracy says from which noise level the teacher still keeps a square it is given.
The same start with the caption's shape swapped to "circle" says whether the experts read the
shape word there (BENCHMARKS.md, "Shapes teacher").

    python tests/benchmarks/probe_teacher_shapes.py [--teacher DIR] [--sigmas 0.3,0.5,0.7,0.85,1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_teacher_direction import clips  # noqa: E402

from eval.oracle import accuracy  # noqa: E402
from eval.shapes_world import Factors, caption, sample_spec  # noqa: E402
from teacher.checkpoint import load_teacher  # noqa: E402
from teacher.pipeline import encode_prompts, video_to_uint8  # noqa: E402
from teacher.schedule import shift_sigmas, unshift_sigmas  # noqa: E402


@torch.no_grad()
def sample_from(models, z: torch.Tensor, noise: torch.Tensor, sigma0: float, captions: list[str],
                steps: int = 20) -> list[np.ndarray]:
    """Euler from (1 - sigma0) z + sigma0 noise down to 0 with the teacher's routing and CFG."""
    s, n = models.config.sampling, z.shape[0]
    cond, uncond = encode_prompts(models, captions), encode_prompts(models, [s.negative_prompt] * n)
    u0 = unshift_sigmas(sigma0, s.shift)
    sigmas = shift_sigmas(torch.linspace(u0, 0.0, steps + 1, dtype=torch.float64), s.shift).tolist()
    x = (1 - sigmas[0]) * z + sigmas[0] * noise
    for i in range(steps):
        t = min(int(sigmas[i] * s.num_train_timesteps), s.num_train_timesteps - 1)
        high = t >= s.boundary * s.num_train_timesteps
        expert = models.expert_high if high else models.expert_low
        scale = s.guidance_high if high else s.guidance_low
        timestep = torch.full((n,), t)
        v_cond, v_uncond = expert(x, timestep, cond), expert(x, timestep, uncond)
        x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + scale * (v_cond - v_uncond))
    return list(video_to_uint8(models.vae.decode(x)).numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(ROOT / "teacher" / "weights" / "shapes"))
    ap.add_argument("--sigmas", default="0.3,0.5,0.7,0.85,1")
    ap.add_argument("--clips", type=int, default=32)
    args = ap.parse_args()
    models = load_teacher(args.teacher)
    rng = np.random.default_rng(11)
    factors = [Factors("square", sample_spec(rng).factors.colour, sample_spec(rng).factors.motion)
               for _ in range(args.clips)]
    with torch.no_grad():
        z = models.vae.encode(clips(factors, 3))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    true = [caption(f) for f in factors]
    as_circle = [caption(Factors("circle", f.colour, f.motion)) for f in factors]
    print(f"{args.clips} real square clips noised to sigma0, sampled to 0 (Euler 20, teacher CFG):")
    for sigma0 in (float(v) for v in args.sigmas.split(",")):
        kept = accuracy(sample_from(models, z, noise, sigma0, true), true)
        swapped = accuracy(sample_from(models, z, noise, sigma0, as_circle), true)
        print(f"  sigma0 {sigma0:.2f}: caption 'square' -> square {kept['shape']:.0%} (motion "
              f"{kept['motion']:.0%});  caption 'circle' -> square {swapped['shape']:.0%}",
              flush=True)


if __name__ == "__main__":
    main()
