"""Few-step sampling of the causal student: pure functions of (model, tensors, schedule).

Per chunk, multistep consistency sampling (Self-Forcing's chunk loop,
shared/reference/distill-anchors.md §2.2)::

    x = noise
    for i in range(steps):
        x0 = x - sigma_i * v_student(x, t_i)            # the x0 parameterisation
        if sigma_{i+1} > 0:
            x = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * fresh_noise

then the chunk's x0 is appended to the KV cache as clean context for the next chunk (deferred:
the next chunk's first step computes its K/V in the same pass, see
``CausalWanModel.append_chunk``).

Determinism: every sample of a batch draws its noise from its own ``torch.Generator`` on the CPU
(then moves it to the model's device), so the same prompt and seed give the same video at any
batch size and on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from teacher.schedule import euler_sigmas, sigmas_to_timesteps
from student.config import StudentConfig
from student.kv_cache import KVCache
from student.moe import MoECache, MoEStudent


class ChunkModel(Protocol):
    """What the sampler needs from a student (``CausalWanModel`` satisfies it)."""

    def new_cache(self, batch_size: int, device=None) -> KVCache: ...

    def forward_chunk(self, x_chunk, t, context, guidance, cache) -> torch.Tensor: ...

    def append_chunk(self, x0_chunk, context, guidance, cache, *, defer=False) -> None: ...


def student_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The student's sigma list: float64 [steps + 1], ``shift(linspace(1, 0, steps + 1))``.

    Starts at pure noise (sigma 1, model timestep 1000) and ends at 0. At 4 steps and shift 5 it
    is [1, 0.9375, 0.8333, 0.625, 0], Self-Forcing's warped [1000, 750, 500, 250].
    """
    return euler_sigmas(steps, shift)


def sampling_sigmas(config: StudentConfig, steps: int) -> torch.Tensor:
    """The sigma list a student samples with at ``steps`` steps (float64 [steps + 1]): the
    config's tuned grid of that length (``StudentConfig.sampling_grids``) with the final 0, else
    ``student_sigmas(steps, config.shift)``, the grid it was trained on."""
    for grid in config.sampling_grids:
        if len(grid) == steps:
            return torch.tensor([*grid, 0.0], dtype=torch.float64)
    return student_sigmas(steps, config.shift)


def draw_noise(shape: Sequence[int], generators: Sequence[torch.Generator] | None,
               batch_size: int, device: torch.device | str) -> torch.Tensor:
    """Standard normal noise [B, *shape] fp32 on ``device``.

    With ``generators`` (one CPU generator per sample) each sample's noise comes from its own
    stream, independent of the batch; None draws from torch's global RNG (not batch-invariant).
    """
    if generators is None:
        return torch.randn((batch_size, *shape), dtype=torch.float32).to(device)
    if len(generators) != batch_size:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch_size}; pass one "
                         f"per sample")
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32)
                        for g in generators]).to(device)


def _check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of >= 2 values (steps + 1, last 0), got "
                         f"{getattr(sigmas, 'shape', type(sigmas).__name__)}; use student_sigmas()")
    s = sigmas.detach().to(torch.float64).cpu()
    if bool((s[1:] >= s[:-1]).any()) or float(s[0]) > 1 or float(s[-1]) < 0:
        raise ValueError(f"sigmas {s.tolist()} must decrease strictly within [1, 0]")
    return s


def sample_chunk(
    model: ChunkModel,
    x_noise_chunk: torch.Tensor,
    sigmas: torch.Tensor,
    context: torch.Tensor,
    guidance: torch.Tensor | float | None,
    cache: KVCache,
    generators: Sequence[torch.Generator] | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Denoise one chunk in ``len(sigmas) - 1`` student steps (multistep consistency sampling).

    Args:
        model: the student (``forward_chunk`` against ``cache``).
        x_noise_chunk: [B, C, chunk_frames, H, W] the chunk's starting noise (at sigmas[0]).
        sigmas: float [steps + 1] strictly decreasing (``student_sigmas``); the model runs at
            t = trunc(sigma_i * num_train_timesteps) for i < steps.
        context: [B, L, text_dim] prompt features (the same tensor for every call of a stream,
            so the cross-attention K/V stay cached).
        guidance: float [B], a scalar or None.
        cache: the stream's KV cache (read only here; the caller appends the result).
        generators: one CPU generator per sample for the re-noising noise (None: global RNG).
    Returns:
        x0 [B, C, chunk_frames, H, W] float32, the clean chunk.
    """
    s = _check_sigmas(sigmas)
    timesteps = sigmas_to_timesteps(s[:-1], num_train_timesteps)
    x = x_noise_chunk.float()
    batch, device = x.shape[0], x.device
    x0 = x
    for i in range(len(s) - 1):
        t = torch.full((batch,), int(timesteps[i]), dtype=torch.int64, device=device)
        v = model.forward_chunk(x, t, context, guidance, cache).float()
        x0 = x - float(s[i]) * v
        sigma_next = float(s[i + 1])
        if sigma_next > 0:
            noise = draw_noise(x.shape[1:], generators, batch, device)
            x = (1.0 - sigma_next) * x0 + sigma_next * noise
    return x0


def stream_cache(model: ChunkModel, sigmas: torch.Tensor, batch_size: int, device=None,
                 num_train_timesteps: int = 1000, **policy) -> KVCache | MoECache:
    """A fresh KV cache for streams sampled at ``sigmas`` (``policy``: sink and window).

    A two-network student gets caches only for the networks these steps run: at 1 step it runs
    only the high-noise one, and appending every chunk to the low-noise one as well would cost a
    pass per chunk for K/V that nothing reads.
    """
    if isinstance(model, MoEStudent):
        timesteps = sigmas_to_timesteps(_check_sigmas(sigmas)[:-1], num_train_timesteps)
        return model.new_cache(batch_size, device, timesteps=timesteps, **policy)
    return model.new_cache(batch_size, device, **policy)


@torch.no_grad()
def generate(
    model: ChunkModel,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    context: torch.Tensor,
    guidance: torch.Tensor | float | None,
    chunk_frames: int,
    generators: Sequence[torch.Generator] | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Generate a whole clip chunk by chunk with a fresh KV cache.

    Args:
        noise: [B, C, F, H, W] starting noise of every chunk (e.g. ``teacher.pipeline.
            initial_noise`` with per-sample seeds); F a multiple of ``chunk_frames``.
        generators: per-sample CPU generators for the re-noising (see ``sample_chunk``); seed
            them per sample for batch-size-independent results.
        Others: as ``sample_chunk``.
    Returns:
        latents [B, C, F, H, W] float32.
    """
    if noise.ndim != 5 or noise.shape[2] == 0 or noise.shape[2] % chunk_frames:
        raise ValueError(f"noise has shape {list(noise.shape)}; expected [B, C, F, H, W] with F a "
                         f"positive multiple of chunk_frames={chunk_frames}")
    batch, frames = noise.shape[0], noise.shape[2]
    cache = stream_cache(model, sigmas, batch, noise.device, num_train_timesteps)
    chunks = []
    for start in range(0, frames, chunk_frames):
        x0 = sample_chunk(model, noise[:, :, start:start + chunk_frames], sigmas, context,
                          guidance, cache, generators, num_train_timesteps)
        chunks.append(x0)
        if start + chunk_frames < frames:  # the last chunk's K/V would never be read
            model.append_chunk(x0, context, guidance, cache, defer=True)
    return torch.cat(chunks, dim=2)
