"""Does distribution matching (DMD, as in Self-Forcing) lift the shipped student?

Fine-tunes a finished two-network student with the DMD gradient, then writes it where
``wan-distill eval --student`` reads it (BENCHMARKS.md, "Session 15"). Per generator step:

1. the student streams a batch of clips exactly as at inference (its 4-step sampler, its own
   finished chunks in the KV cache; no gradient), keeping every chunk's state at each step;
2. one exit step k is drawn (Self-Forcing's random exit); the network of k re-runs that step
   for every chunk in the teacher-forcing layout, with the rollout's chunks as clean context,
   and its x0 is the sample x (with gradient);
3. x is noised to sigma (drawn in one expert's range of the teacher's shifted schedule). The
   real score is the stage-A causal teacher of that range with CFG (the student's guidance, plus
   the teacher's high-noise offset); the fake score is a trainable copy of that expert, without
   CFG. The generator loss is ``0.5 * mse(x, sg(x - (x0_fake - x0_real) / |x - x0_real|))``;
4. the fake score takes ``--fake-ratio`` flow-matching steps on the detached samples.

``--warmup`` runs that many steps with the generator frozen (only the fake score learns).

    python tests/benchmarks/probe_dmd.py --home H --out OUT [--lr-gen 1e-5] [--warmup 100]
    wan-distill eval --config F --student OUT/students/shapes

``--home`` is a ``WAN_DISTILL_HOME`` of a finished ``wan-distill distill`` (its
``students/shapes``, ``runs/shapes/causal_teacher`` and latent cache, whose prompts are used).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from distill.ar_adaptation import read_causal_teacher  # noqa: E402
from distill.consistency import causal_cfg_velocity, per_frame, teacher_guidance  # noqa: E402
from distill.data.latents import LatentShardDataset  # noqa: E402
from distill.networks import load_causal_network  # noqa: E402
from student.checkpoint import load_student, save_moe_student  # noqa: E402
from student.sampler import student_sigmas  # noqa: E402
from teacher.schedule import shift_sigmas, sigmas_to_timesteps, unshift_sigmas  # noqa: E402

STEPS = 4          # the student's steps per chunk
U_RANGE = (0.02, 0.98)  # DMD noise levels, before the teacher's shift


def expert_of(t: int, boundary: float) -> str:
    return "high" if t >= boundary * 1000 else "low"


class NoiseLevels:
    """One expert per call (chosen by its share of U_RANGE), then per-chunk sigmas in its range
    of the teacher's shifted schedule."""

    def __init__(self, shift: float, boundary: float, rng: torch.Generator):
        self.shift, self.rng = shift, rng
        self.u_boundary = unshift_sigmas(boundary, shift)

    def draw(self, batch: int, chunks: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        lo, hi = U_RANGE
        p_high = (hi - self.u_boundary) / (hi - lo)
        name = "high" if float(torch.rand((), generator=self.rng)) < p_high else "low"
        a, b = (self.u_boundary, hi) if name == "high" else (lo, self.u_boundary - 1e-3)
        u = a + (b - a) * torch.rand((batch, chunks), generator=self.rng, dtype=torch.float64)
        sigma = shift_sigmas(u, self.shift)
        t = sigmas_to_timesteps(sigma.flatten(), 1000).view(batch, chunks)
        return name, sigma.float(), t


@torch.no_grad()
def rollout(student, shape, sigmas, timesteps, context, guidance, rng, chunk_frames):
    """Stream a batch as at inference. Returns the clip [B, C, F, H, W] and every chunk's state
    at each step [steps, B, C, F, H, W]."""
    batch, frames = context.shape[0], shape[1]
    cache = student.new_cache(batch, torch.device("cpu"))
    clip = torch.zeros((batch, *shape))
    states = torch.zeros((len(timesteps), batch, *shape))
    for c in range(0, frames, chunk_frames):
        x = torch.randn((batch, shape[0], chunk_frames, *shape[2:]), generator=rng)
        for i in range(len(timesteps)):
            states[i, :, :, c:c + chunk_frames] = x
            t = torch.full((batch,), int(timesteps[i]), dtype=torch.int64)
            v = student.forward_chunk(x, t, context, guidance, cache).float()
            x0 = x - float(sigmas[i]) * v
            if i + 1 < len(timesteps):
                s = float(sigmas[i + 1])
                x = (1 - s) * x0 + s * torch.randn(x.shape, generator=rng)
        clip[:, :, c:c + chunk_frames] = x0
        if c + chunk_frames < frames:
            student.append_chunk(x0, context, guidance, cache)
    return clip, states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="WAN_DISTILL_HOME of a finished job")
    parser.add_argument("--out", required=True, help="a home to write students/shapes into")
    parser.add_argument("--gen-steps", type=int, default=150, help="generator updates")
    parser.add_argument("--warmup", type=int, default=0, help="fake-score-only steps first")
    parser.add_argument("--fake-ratio", type=int, default=5, help="fake steps per step")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per step")
    parser.add_argument("--lr-gen", type=float, default=1e-5, help="student AdamW lr")
    parser.add_argument("--lr-fake", type=float, default=1e-4, help="fake score AdamW lr")
    parser.add_argument("--guidance", type=float, nargs=2, default=(1.0, 3.0), metavar=("LO", "HI"),
                        help="student guidance ~ U[lo, hi] per clip (the shipped range)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    home, out = Path(args.home).expanduser(), Path(args.out).expanduser()
    teacher_dir, student_dir = home / "runs/shapes/causal_teacher", home / "students/shapes"
    caches = sorted((home / "latents").glob("*")) if (home / "latents").is_dir() else []
    if not (teacher_dir.is_dir() and student_dir.is_dir() and caches):
        raise SystemExit(f"--home {home} lacks runs/shapes/causal_teacher, students/shapes or a "
                         f"latent cache; pass the WAN_DISTILL_HOME of a finished `wan-distill "
                         f"distill`")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher_config, expert_config = read_causal_teacher(teacher_dir)

    def expert(sub: str, trainable: bool):
        return load_causal_network(expert_config, teacher_dir / sub, device=torch.device("cpu"),
                                   mesh=None, trainable=trainable, dtype="fp32")

    subs = {"high": teacher_config.expert_high_dir, "low": teacher_config.expert_low_dir}
    real = {name: expert(sub, False) for name, sub in subs.items()}
    fake = {name: expert(sub, True) for name, sub in subs.items()}
    student, config = load_student(student_dir)
    student.requires_grad_(True)
    sampling, cf, batch = teacher_config.sampling, config.chunk_frames, args.batch_size
    offset = sampling.guidance_high - sampling.guidance_low
    sigmas = student_sigmas(STEPS, config.shift)
    timesteps = sigmas_to_timesteps(sigmas[:-1], 1000)
    data = LatentShardDataset(caches[0], None)
    shape = data[0]["latents"].shape
    gen_opt = {n: torch.optim.AdamW(getattr(student, n).parameters(), lr=args.lr_gen,
                                    betas=(0.0, 0.999), weight_decay=0) for n in ("high", "low")}
    fake_opt = {n: torch.optim.AdamW(fake[n].parameters(), lr=args.lr_fake, betas=(0.0, 0.999),
                                     weight_decay=0) for n in ("high", "low")}
    rng = torch.Generator().manual_seed(1)
    levels = NoiseLevels(sampling.shift, sampling.boundary, rng)
    lo, hi = args.guidance
    start, total = time.perf_counter(), args.warmup + args.gen_steps
    for step in range(total):
        index = torch.randint(0, len(data), (batch,), generator=rng)
        context = torch.stack([data[int(i)]["context"] for i in index])
        guidance = lo + (hi - lo) * torch.rand(batch, generator=rng)
        student.eval()
        clip, states = rollout(student, shape, sigmas, timesteps, context, guidance, rng, cf)
        chunks = clip.shape[2] // cf
        k = int(torch.randint(0, STEPS, (1,), generator=rng))
        gen_name = expert_of(int(timesteps[k]), sampling.boundary)
        network = getattr(student, gen_name)
        training = step >= args.warmup
        network.train(training)
        with torch.set_grad_enabled(training):
            t_k = torch.full((batch, chunks), int(timesteps[k]), dtype=torch.int64)
            v = network.forward_teacher_forcing(clip, states[k], t_k, context, guidance).float()
            x = states[k] - float(sigmas[k]) * v
        name, sigma, t = levels.draw(batch, chunks)
        eps = torch.randn(x.shape, generator=rng)
        s = per_frame(sigma, cf)
        with torch.no_grad():
            x_t = (1 - s) * x.detach() + s * eps
            v_real = causal_cfg_velocity(real[name].forward_teacher_forcing, clip, x_t, t, context,
                                         data.negative_context,
                                         teacher_guidance(guidance, name, offset))
            v_fake = fake[name].forward_teacher_forcing(clip, x_t, t, context).float()
            x0_real, x0_fake = x_t - s * v_real, x_t - s * v_fake
            scale = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
            grad = (x0_fake - x0_real) / scale.clamp_min(1e-4)
        if training:
            loss = 0.5 * F.mse_loss(x, (x - grad).detach())
            gen_opt[gen_name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            gen_opt[gen_name].step()
        network.eval()
        sample = x.detach()
        for _ in range(args.fake_ratio):
            name, sigma, t = levels.draw(batch, chunks)
            eps = torch.randn(sample.shape, generator=rng)
            s = per_frame(sigma, cf)
            v = fake[name].forward_teacher_forcing(clip, (1 - s) * sample + s * eps, t,
                                                   context).float()
            fake_loss = F.mse_loss(v, eps - sample)
            fake_opt[name].zero_grad(set_to_none=True)
            fake_loss.backward()
            torch.nn.utils.clip_grad_norm_(fake[name].parameters(), 1.0)
            fake_opt[name].step()
        if step % 10 == 0 or step == total - 1:
            print(f"step {step + 1}/{total} exit {k} ({gen_name}) |dmd grad| "
                  f"{float(grad.abs().mean()):.3f} fake loss {float(fake_loss.detach()):.4f} "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    student.requires_grad_(False)
    folder = save_moe_student(out / "students/shapes", student, config)
    print(f"DMD probe: {args.gen_steps} generator steps after {args.warmup} warm-up steps in "
          f"{time.perf_counter() - start:.0f}s -> {folder}")


if __name__ == "__main__":
    main()
