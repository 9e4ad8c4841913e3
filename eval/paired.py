"""Paired pixel distances between two systems' videos of the same prompt and initial noise.

The paired protocol (eval-metrics.md 2.5 and 6(c)): the student and the teacher sample the same
prompt from the same initial noise, and their videos are compared frame by frame. It measures
fidelity to the teacher, not realism. PSNR and SSIM come from torchmetrics' functional API,
computed per frame on the 0..255 scale (``data_range=255``), then averaged over the frames of
each video; SSIM uses torchmetrics' defaults (11x11 Gaussian window, sigma 1.5, k1 0.01,
k2 0.03, per channel) and its border convention: the SSIM map is averaged over all H x W
positions, the windows at the border reaching into a mirror image of the frame (skimage
averages only the windows inside the frame, so its values differ near the borders).

Frames are compared in float32. SSIM's variances are differences of large second moments
(E[x^2] ~ 6e4 for bright pixels), so float32 loses some digits: against float64, the largest
per-frame SSIM difference measured was 3.5e-5 (a bright square shifted by 2 px on black, the
worst case of the shapes world) and 2e-7 on noise, far below the 3 decimals reported; float64
grouped convolutions are ~20x slower on the CPU (8 s vs 0.4 s per 100 frames of 64x64).

A frame pair that is identical has infinite PSNR, and a video with one such frame has an
infinite mean; that is the honest value and reports print it as "inf".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

DATA_RANGE = 255.0


@dataclass(frozen=True)
class PairedDistances:
    """Per-video means over frames: ``psnr`` float [N] in dB, ``ssim`` float [N] in [-1, 1]."""

    psnr: torch.Tensor
    ssim: torch.Tensor


def _check_pair(videos_a: torch.Tensor, videos_b: torch.Tensor) -> None:
    for name, v in (("videos_a", videos_a), ("videos_b", videos_b)):
        if not isinstance(v, torch.Tensor) or v.dtype != torch.uint8 or v.ndim != 5 \
                or v.shape[-1] != 3:
            raise ValueError(
                f"{name} must be uint8 videos [N, T, H, W, 3], got "
                f"{getattr(v, 'dtype', type(v).__name__)} {list(getattr(v, 'shape', []))}; "
                "convert [-1, 1] floats with teacher.pipeline.video_to_uint8")
    if videos_a.shape != videos_b.shape:
        raise ValueError(f"paired videos differ in shape: {list(videos_a.shape)} vs "
                         f"{list(videos_b.shape)}; pair videos of the same prompt, size and length")
    if videos_a.shape[0] == 0 or videos_a.shape[1] == 0:
        raise ValueError(f"paired videos are empty: shape {list(videos_a.shape)}")
    if min(videos_a.shape[2:4]) < 11:
        raise ValueError(f"frames of {videos_a.shape[3]}x{videos_a.shape[2]} are smaller than "
                         "SSIM's 11x11 window")


def _frames(videos: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [n, T, H, W, 3] -> float32 [n*T, 3, H, W] on the 0..255 scale."""
    return videos.to(device).flatten(0, 1).permute(0, 3, 1, 2).to(torch.float32)


@torch.no_grad()
def paired_psnr_ssim(videos_a: torch.Tensor, videos_b: torch.Tensor,
                     device: torch.device | str | None = None,
                     frames_per_batch: int = 64) -> PairedDistances:
    """PSNR and SSIM of ``videos_a`` against ``videos_b``, per frame, averaged per video.

    Args:
        videos_a, videos_b: uint8 [N, T, H, W, 3] (the pair of video i is a[i], b[i]); H, W >= 11.
        device: where to compute (default: where ``videos_a`` is).
        frames_per_batch: frames per torchmetrics call (bounds memory for large videos).
    Returns:
        ``PairedDistances`` with float64 [N] tensors on the CPU.
    """
    _check_pair(videos_a, videos_b)
    if frames_per_batch < 1:
        raise ValueError(f"frames_per_batch must be >= 1, got {frames_per_batch}")
    device = torch.device(device) if device is not None else videos_a.device
    n, t = videos_a.shape[:2]
    videos_per_batch = max(1, frames_per_batch // t)
    psnr, ssim = [], []
    for start in range(0, n, videos_per_batch):
        a = _frames(videos_a[start: start + videos_per_batch], device)
        b = _frames(videos_b[start: start + videos_per_batch], device)
        psnr.append(peak_signal_noise_ratio(a, b, data_range=DATA_RANGE, reduction="none",
                                            dim=(1, 2, 3)).cpu())
        ssim.append(structural_similarity_index_measure(a, b, data_range=DATA_RANGE,
                                                        reduction="none").cpu())
    # Means over frames in float64 (the per-frame values are float32).
    return PairedDistances(psnr=torch.cat(psnr).double().view(n, t).mean(dim=1),
                           ssim=torch.cat(ssim).double().view(n, t).mean(dim=1))
