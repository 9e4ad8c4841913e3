"""Stage 1 of teacher training: the Wan VAE as a LightningModule, and how well it reconstructs.

The VAE is trained with identity latent normalisation (raw mu is what the KL term and the
decoder see); the per-channel statistics the teacher ships with are measured afterwards on the
encoded world (``distill.teacher_training.latents``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import lightning as L
import torch
from torch import nn

from distill.teacher_training.settings import VAEPhase, VAEStageConfig
from distill.teacher_training.vae_losses import (
    edge_l1,
    foreground_weights,
    gaussian_kl,
    psnr,
    weighted_l1,
)
from eval.oracle import accuracy
from teacher.config import VAEConfig
from teacher.pipeline import video_to_uint8
from teacher.vae import WanVAE
from teacher.vae_blocks import AttentionBlock, CausalConv3d, Resample


def identity_normalised(config: VAEConfig) -> VAEConfig:
    """``config`` with latents_mean 0 and latents_std 1: encode returns raw mu (for training)."""
    return replace(config, latents_mean=(0.0,) * config.z_dim, latents_std=(1.0,) * config.z_dim)


@torch.no_grad()
def init_vae_for_training(vae: WanVAE) -> WanVAE:
    """Initialise a WanVAE for training from scratch: an image autoencoder inflated to video.

    - Every convolution: Kaiming-normal (fan-in, ReLU gain), zero bias. PyTorch's default
      (std ~ 1/sqrt(3 * fan_in)) shrinks activations by ~0.6 at each convolution outside a
      residual branch; over the ~10 of them between pixels and latent the latent then says almost
      nothing about the input and the loss settles on the all-black frame (measured on one batch
      of 8 frames: weighted L1 stuck at 0.49, versus 0.18 after 80 steps with this init).
    - Causal 3x3x3 convolutions: only the newest temporal tap is non-zero (Kaiming over its 3x3
      fan-in). A still frame only ever meets that tap (the past is zero padding), so still-frame
      training shapes exactly the weights a video needs first, and the past taps start from zero
      instead of adding noise from random weights when video training begins.
    - Temporal resampling: the downsampling ``time_conv`` copies the newest frame of its window and
      the upsampling one copies the frame into both output frames (identity on the newest tap).
      At the start of video training the VAE therefore codes each 4-frame group by its last frame
      and repeats it, instead of scrambling time.
    - Attention output projections stay zero (the official init): each block starts as identity.
    """
    for module in vae.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    time_convs = {id(m.time_conv) for m in vae.modules() if isinstance(m, Resample) and hasattr(m, "time_conv")}
    for module in vae.modules():
        if id(module) in time_convs:
            weight = module.weight  # [C_out, C, 3, 1, 1]; C_out = C (down) or 2C (up, two halves)
            weight.zero_()
            channels = weight.shape[1]
            eye = torch.eye(channels, dtype=weight.dtype)
            for half in range(weight.shape[0] // channels):
                weight[half * channels: (half + 1) * channels, :, -1, 0, 0] = eye
        elif isinstance(module, CausalConv3d) and module.kernel_size[0] == 3:
            module.weight[:, :, :-1].zero_()
            nn.init.kaiming_normal_(module.weight[:, :, -1], nonlinearity="relu")
        elif isinstance(module, AttentionBlock):
            nn.init.zeros_(module.proj.weight)
    return vae


def warmup_cosine(step: int, total: int, warmup: int, final_fraction: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine to ``final_fraction``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def phase_at(phases: tuple[VAEPhase, ...], step: int) -> VAEPhase:
    """The phase that training step ``step`` (0-based) belongs to; the last one past the end."""
    end = 0
    for phase in phases:
        end += phase.steps
        if step < end:
            return phase
    return phases[-1]


class VAETrainingModule(L.LightningModule):
    """Trains ``WanVAE`` on shapes-world clips.

    Batches come from ``ShapesWorldDataModule`` with ``video`` [B, 3, T, 64, 64] in [-1, 1], B and T
    at least the largest phase's. Each step takes the first ``batch_size`` clips of the current
    phase: their first ``frames`` frames, or for still-frame phases (frames == 1) one random frame
    of each. Loss = foreground-weighted L1 + edge_weight * edge L1 + kl_weight * KL, on a latent
    sampled with the reparameterisation trick.
    """

    def __init__(self, vae_config: VAEConfig, stage: VAEStageConfig):
        super().__init__()
        self.save_hyperparameters({"vae_config": asdict(vae_config), "stage": asdict(stage)})
        self.stage = stage
        self.vae = init_vae_for_training(WanVAE(**asdict(identity_normalised(vae_config))))

    def select_clips(self, video: torch.Tensor, phase: VAEPhase) -> torch.Tensor:
        """The part of a data batch [B, 3, T, H, W] that the phase trains on."""
        if video.shape[0] < phase.batch_size or video.shape[2] < phase.frames:
            raise ValueError(
                f"batch video {list(video.shape)} is smaller than VAE phase {phase}; make the data "
                f"module's batch_size and num_frames the largest of the phases'")
        video = video[: phase.batch_size]
        if phase.frames == 1:
            index = torch.randint(0, video.shape[2], (video.shape[0],), device=video.device)
            return video[torch.arange(video.shape[0], device=video.device), :, index].unsqueeze(2)
        return video[:, :, : phase.frames]

    def losses(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """All loss terms for clips [B, 3, T, H, W]; ``loss`` is their weighted sum."""
        s = self.stage
        mu, log_var = self.vae.encode_moments(target)
        z = mu + self.stage.posterior_noise * torch.randn_like(mu) * (0.5 * log_var).exp()
        output = self.vae.decode(z, clamp=False)
        weights = foreground_weights(target, s.foreground_weight, s.foreground_dilation,
                                     s.boundary_weight)
        terms = {
            "l1": weighted_l1(output, target, weights),
            "edge": edge_l1(output, target, weights),
            "kl": gaussian_kl(mu, log_var),
        }
        terms["loss"] = terms["l1"] + s.edge_weight * terms["edge"] + s.kl_weight * terms["kl"]
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        phase = phase_at(self.stage.phases, self.global_step)
        terms = self.losses(self.select_clips(batch["video"], phase))
        self.log_dict({f"vae/{k}": v for k, v in terms.items()}, prog_bar=True, on_step=True)
        self.log("vae/frames", float(phase.frames), prog_bar=True, on_step=True)
        return terms["loss"]

    def configure_optimizers(self):
        s = self.stage
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=s.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, s.steps, s.warmup_steps, s.final_lr_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def reconstruction_report(vae: WanVAE, videos: torch.Tensor, targets: list, batch_size: int = 8) -> dict:
    """How well ``vae`` reconstructs clips: PSNR and the oracle on the reconstructions.

    Args:
        vae: any WanVAE (its own latent normalisation cancels between encode and decode).
        videos: [N, 3, T, H, W] in [-1, 1], T = 4k+1.
        targets: N captions / Factors / ClipSpecs for the oracle.
    Returns:
        {"psnr", "psnr_foreground" (dB, pixels of the object and a 2-px ring), "oracle" (the
        ``eval.oracle.accuracy`` dict of the reconstructions), "oracle_source" (the same on the
        input clips: what the oracle can reach at all)}.
    """
    was_training = vae.training
    vae.eval()
    outputs = torch.cat([vae.decode(vae.encode(videos[i: i + batch_size]))
                         for i in range(0, len(videos), batch_size)])
    vae.train(was_training)
    mask = foreground_weights(videos, 1.0, 2) > 1.0
    to_numpy = lambda v: video_to_uint8(v).numpy()  # noqa: E731
    return {
        "psnr": psnr(outputs, videos),
        "psnr_foreground": psnr(outputs, videos, mask),
        "oracle": accuracy(list(to_numpy(outputs)), targets),
        "oracle_source": accuracy(list(to_numpy(videos)), targets),
    }


def stack_clips(dataset, count: int) -> tuple[torch.Tensor, list]:
    """The first ``count`` items of a ShapesWorldDataset as (video [N,3,T,H,W], captions)."""
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    return torch.stack([it["video"] for it in items]), [it["caption"] for it in items]
