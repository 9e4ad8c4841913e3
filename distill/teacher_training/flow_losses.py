"""Flow matching for the two-expert teacher, as pure functions of tensors.

Forward process (reference ``wan22-a14b.md`` §3.1): x_sigma = (1 - sigma) * x0 + sigma * eps; the
network predicts the velocity v = eps - x0 from x_sigma and the integer timestep
t = trunc(sigma * 1000), exactly what the samplers feed it. Each expert trains only on its own
side of the boundary: expert_high on t >= boundary * 1000, expert_low below.
"""

from __future__ import annotations

import torch

from teacher.schedule import shift_sigmas, unshift_sigmas


def expert_sigma_range(expert: str, boundary: float) -> tuple[float, float]:
    """[low, high) of the noise levels an expert is trained on (sigma in [0, 1))."""
    if expert == "high":
        return boundary, 1.0
    if expert == "low":
        return 0.0, boundary
    raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")


def sample_expert_timesteps(
    n: int, expert: str, boundary: float, shift: float, num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels for ``n`` training samples of one expert.

    u is uniform over the expert's range mapped back through the shift, and sigma = shift(u): with
    shift 1 sigma is uniform, with shift > 1 it leans towards high noise like the sampling grid.
    Returns (sigma float32 [n], t int64 [n]) with t = trunc(sigma * N) clamped into the expert's
    integer range, so float rounding never hands a sample to the wrong expert.
    """
    low, high = expert_sigma_range(expert, boundary)
    u_low, u_high = unshift_sigmas(low, shift), unshift_sigmas(high, shift)
    u = u_low + (u_high - u_low) * torch.rand(n, generator=generator, dtype=torch.float64)
    sigma = shift_sigmas(u, shift).clamp(0.0, 1.0 - 1e-6)
    t_boundary = int(round(boundary * num_train_timesteps))
    t_min, t_max = (t_boundary, num_train_timesteps - 1) if expert == "high" else (0, t_boundary - 1)
    t = (sigma * num_train_timesteps).to(torch.int64).clamp(t_min, t_max)
    return sigma.float(), t


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) * x0 + sigma * noise, with sigma [B] broadcast over [B, C, F, H, W]."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise


def flow_matching_loss(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error of the predicted velocity against eps - x0; [B]."""
    return (velocity.float() - (noise - x0).float()).square().flatten(1).mean(dim=1)
