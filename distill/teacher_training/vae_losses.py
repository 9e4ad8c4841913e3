"""Losses and measures of the VAE stage, as pure functions of tensors.

Videos are [B, 3, T, H, W] in [-1, 1]. The shapes world is one small object on black, so a
per-pixel mean is dominated by background: every reconstruction term here is a weighted mean
with the object (and a thin ring around it) weighted up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A pixel belongs to the object when its brightest channel exceeds this level in [-1, 1]
# (about 13/255): above the renderer's black and its faintest anti-aliased edge pixels.
FOREGROUND_LEVEL = -0.9


def foreground_weights(target: torch.Tensor, foreground_weight: float, dilation: int,
                       boundary_weight: float = 0.0) -> torch.Tensor:
    """Per-pixel weights [B, 1, T, H, W] from the object mask of ``target``.

    1 on background, + foreground_weight on the object dilated by ``dilation`` pixels (the ring
    just outside the object is where a blurry decoder leaves a halo that rounds corners), and
    + boundary_weight on the band within ``dilation`` pixels of the outline, inside or outside:
    the outline is what the oracle's fill ratio (shape) measures, while the flat interior is easy.
    """
    if target.ndim != 5 or target.shape[1] != 3:
        raise ValueError(f"target must be video [B, 3, T, H, W], got shape {list(target.shape)}")
    mask = (target.amax(dim=1, keepdim=True) > FOREGROUND_LEVEL).to(target.dtype)
    if dilation <= 0:
        return 1.0 + foreground_weight * mask
    k = 2 * dilation + 1
    grow = lambda m: F.max_pool3d(m, kernel_size=(1, k, k), stride=1, padding=(0, dilation, dilation))  # noqa: E731
    dilated = grow(mask)
    eroded = 1.0 - grow(1.0 - mask)
    return 1.0 + foreground_weight * dilated + boundary_weight * (dilated - eroded)


def weighted_l1(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * |output - target|) / sum(w), averaged over channels; a scalar."""
    return (weights * (output - target).abs()).mean(dim=1, keepdim=True).sum() / weights.sum()


def edge_l1(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted L1 between horizontal and vertical finite differences of output and target.

    A blurred edge has smaller differences than the sharp one, so this term penalises exactly
    the softening that turns squares and triangles into blobs.
    """
    total = output.new_zeros(())
    for dim in (-1, -2):
        d_out, d_tgt = output.diff(dim=dim), target.diff(dim=dim)
        n = d_out.shape[dim]
        w = torch.maximum(weights.narrow(dim, 0, n), weights.narrow(dim, 1, n))
        total = total + weighted_l1(d_out, d_tgt, w)
    return total / 2


def gaussian_kl(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Mean per latent element of KL(N(mu, exp(log_var)) || N(0, 1)); a scalar."""
    return 0.5 * (mu.square() + log_var.exp() - 1.0 - log_var).mean()


def psnr(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2), over all pixels or where ``mask`` [B,1,T,H,W] is set."""
    err = (output.float() - target.float()).square().mean(dim=1, keepdim=True)
    if mask is not None:
        mask = mask.expand_as(err).bool()
        if not mask.any():
            raise ValueError("psnr: the mask selects no pixel")
        err = err[mask]
    mse = float(err.mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(4.0 / mse)).item()
