"""Text-to-video with the two-expert teacher: encode prompts, sample latents, decode.

Each stage is its own function so that distillation, evaluation and the CLI can reuse the piece
they need. Device policy (official single-GPU behaviour): only the active expert sits on the
accelerator; the other waits on the CPU and they swap once, at the boundary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from teacher.checkpoint import TeacherModels
from teacher.moe import two_expert_velocity
from teacher.solvers import SOLVER_NAMES as SOLVERS
from teacher.solvers import sample, solver_sigmas

# Clips per VAE decode call. Decoding many clips in one call is slower per clip: on the 2-core
# CPU, 48 shapes clips took 1.7x longer in one call than in calls of 8, at one thread and at two
# (tests/benchmarks/bench_decode_batch.py); it also bounds the decoder's activation memory. Each
# clip decodes on its own (no op mixes clips), so only the convolutions' float rounding can
# differ (at most one uint8 level).
DECODE_BATCH = 8


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. None fields take the teacher's sampling defaults."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    steps: int | None = None
    shift: float | None = None
    guidance_high: float | None = None
    guidance_low: float | None = None
    solver: str | None = None
    seed: int = 0


@dataclass
class GenerationResult:
    """A generated video and where the time went."""

    video: torch.Tensor  # uint8 [T, H, W, 3]
    fps: int
    timings: dict[str, float] = field(default_factory=dict)
    nfe: int = 0  # DiT forward passes (CFG counts two per step)


def resolve_request(models: TeacherModels, request: GenerationRequest) -> GenerationRequest:
    """Fill defaults from the teacher config and validate, before any heavy work."""
    s = models.config.sampling
    filled = GenerationRequest(
        prompt=request.prompt,
        negative_prompt=s.negative_prompt if request.negative_prompt is None else request.negative_prompt,
        width=request.width or s.width,
        height=request.height or s.height,
        frames=request.frames or s.frames,
        steps=s.steps if request.steps is None else request.steps,
        shift=s.shift if request.shift is None else request.shift,
        guidance_high=s.guidance_high if request.guidance_high is None else request.guidance_high,
        guidance_low=s.guidance_low if request.guidance_low is None else request.guidance_low,
        solver=request.solver or s.solver,
        seed=request.seed,
    )
    validate_request(filled, spatial_multiple=models.config.vae_stride[1] * models.config.dit.patch_size[1])
    return filled


def validate_request(r: GenerationRequest, spatial_multiple: int = 16) -> None:
    """Raise ValueError naming the bad value and the fix; fields left None are not checked yet."""
    if not r.prompt or not r.prompt.strip():
        raise ValueError("the prompt is empty; pass a description such as --prompt 'a red circle moving left'")
    for name, value in (("width", r.width), ("height", r.height)):
        if value is not None and (value <= 0 or value % spatial_multiple):
            raise ValueError(
                f"{name} {value} is not a positive multiple of {spatial_multiple} (VAE stride x "
                f"patch size); use e.g. --size 832*480"
            )
    if r.frames is not None and (r.frames < 1 or (r.frames - 1) % 4):
        raise ValueError(f"frames {r.frames} is not of the form 4k+1 the VAE needs; use e.g. 81 or 17")
    if r.steps is not None and r.steps < 1:
        raise ValueError(f"steps {r.steps} must be at least 1")
    if r.shift is not None and not r.shift > 0:
        raise ValueError(f"shift {r.shift} must be positive (the A14B default is 12)")
    if r.solver is not None and r.solver not in SOLVERS:
        raise ValueError(f"unknown solver {r.solver!r}; choose one of {list(SOLVERS)}")
    for name, value in (("guidance_high", r.guidance_high), ("guidance_low", r.guidance_low)):
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ValueError(f"{name} {value} must be a finite number >= 0 (1 disables CFG)")


@torch.no_grad()
def encode_text(tokenizer, text_encoder: torch.nn.Module, prompts: Sequence[str], text_len: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Prompts -> context [B, text_len, text_dim] in the encoder's dtype, on ``device``.

    Rows past each prompt's valid length (EOS included) are zeros, exactly what the official
    pipeline feeds the DiT after trimming T5's output and zero-padding it to text_len. An empty
    prompt is legitimate here (EOS alone, the shapes teacher's negative prompt); user prompts are
    checked for emptiness before (``validate_request``).
    """
    ids, mask = tokenizer(list(prompts), text_len=text_len, allow_empty=True)
    enc_device = next(text_encoder.parameters()).device
    ids, mask = ids.to(enc_device), mask.to(enc_device)
    hidden = text_encoder(ids, mask)
    return (hidden * mask.unsqueeze(-1).to(hidden.dtype)).to(device)


def encode_prompts(models: TeacherModels, prompts: Sequence[str],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """``encode_text`` with a teacher's tokenizer, encoder and text_len."""
    return encode_text(models.tokenizer, models.text_encoder, prompts,
                       models.config.dit.text_len, device)


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """Per-sample noise [B, *shape] fp32, drawn on the CPU from each sample's own seed.

    One generator per sample makes the same prompt and seed give the same video at any batch
    size and on any device.
    """
    return torch.stack([
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
        for s in seeds
    ])


def latent_shape(models: TeacherModels, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """[C, F_lat, H/8, W/8] for a video of ``frames`` x ``height`` x ``width``."""
    st, sh, sw = models.config.vae_stride
    return (models.config.dit.in_dim, (frames - 1) // st + 1, height // sh, width // sw)


class ExpertPlacement:
    """Keeps only the active expert on ``device`` (the other on ``offload_device``)."""

    def __init__(self, models: TeacherModels, device: torch.device | str,
                 offload_device: torch.device | str | None = "cpu"):
        self.models, self.device, self.offload_device = models, torch.device(device), offload_device
        self.swaps = 0

    def __call__(self, which: str):
        expert = self.models.expert_high if which == "high" else self.models.expert_low
        other = self.models.expert_low if which == "high" else self.models.expert_high
        if self.offload_device is not None and _device_of(other) != torch.device(self.offload_device):
            other.to(self.offload_device)
        if _device_of(expert) != self.device:
            expert.to(self.device)
            self.swaps += 1
        return expert


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def sample_latents(
    models: TeacherModels,
    context_pos: torch.Tensor,
    context_neg: torch.Tensor,
    noise: torch.Tensor,
    request: GenerationRequest,
    device: torch.device | str = "cpu",
    offload: bool = True,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Run the teacher's ODE from ``noise`` [B,C,F,H,W] to latents; returns (latents, NFE).

    ``request`` must be resolved (``resolve_request``). The expert and its guidance scale are
    chosen per step from the integer timestep, identically for every sample.
    """
    cfg = models.config.sampling
    placement = ExpertPlacement(models, device, "cpu" if offload else None)
    sigmas = solver_sigmas(request.solver, request.steps, request.shift, cfg.num_train_timesteps)
    nfe = 0

    def denoiser(x: torch.Tensor, sigma: float, t: int) -> torch.Tensor:
        nonlocal nfe
        v, which = two_expert_velocity(
            lambda *a: placement("high")(*a), lambda *a: placement("low")(*a), x, int(t),
            context_pos, context_neg, boundary=cfg.boundary, guidance_high=request.guidance_high,
            guidance_low=request.guidance_low, num_train_timesteps=cfg.num_train_timesteps)
        g = request.guidance_high if which == "high" else request.guidance_low
        nfe += 1 if g == 1 else 2
        return v.float()

    def callback(i, t, sigma, x):
        if on_step is not None:
            on_step(i, int(t), float(sigma))

    latents = sample(request.solver, denoiser, noise.to(device), sigmas, callback=callback,
                     num_train_timesteps=cfg.num_train_timesteps)
    return latents, nfe


@torch.no_grad()
def decode_latents(models: TeacherModels, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B,C,F,H,W] -> uint8 video [B, T, H, W, 3] (VAE in fp32, as officially), decoded
    ``DECODE_BATCH`` clips at a time."""
    vae = models.vae
    device = _device_of(vae)
    return torch.cat([video_to_uint8(vae.decode(part.to(device, torch.float32)))
                      for part in latents.split(DECODE_BATCH)])


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[B,3,T,H,W] in [-1,1] -> uint8 [B,T,H,W,3] (round to nearest, as image writers expect)."""
    x = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu()


@torch.no_grad()
def generate(models: TeacherModels, request: GenerationRequest, device: torch.device | str = "cpu",
             offload: bool = True, text_encoder_on_cpu: bool = False,
             on_step: Callable[[int, int, float], None] | None = None) -> GenerationResult:
    """Prompt -> video with the teacher's defaults for every field the request leaves None.

    With ``offload`` (the official single-GPU behaviour) the text encoder visits the device only
    to encode, one expert at a time sits there while denoising, and both experts leave before the
    VAE decodes. ``text_encoder_on_cpu`` encodes on the CPU (official ``--t5_cpu``).
    """
    r = resolve_request(models, request)
    device = torch.device(device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    models.text_encoder.to("cpu" if text_encoder_on_cpu else device)
    ctx = encode_prompts(models, [r.prompt, r.negative_prompt], device)
    if offload:
        models.text_encoder.to("cpu")
    timings["text_encoder_s"] = time.perf_counter() - t0
    noise = initial_noise(latent_shape(models, r.frames, r.height, r.width), [r.seed])
    t1 = time.perf_counter()
    latents, nfe = sample_latents(models, ctx[:1], ctx[1:], noise, r, device, offload, on_step)
    timings["denoise_s"] = time.perf_counter() - t1
    timings["step_s"] = timings["denoise_s"] / r.steps
    t2 = time.perf_counter()
    if offload:
        models.expert_high.to("cpu"), models.expert_low.to("cpu")
    models.vae.to(device)
    video = decode_latents(models, latents)[0]
    timings["vae_decode_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    return GenerationResult(video=video, fps=models.config.sampling.fps, timings=timings, nfe=nfe)
