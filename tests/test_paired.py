"""Paired PSNR / SSIM (eval.paired, torchmetrics) against an independent numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from eval.paired import paired_psnr_ssim

# float32 frames inside eval.paired; the numpy reference is float64.
PSNR_TOL_DB = 1e-4
SSIM_TOL = 1e-4


def numpy_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 frames [H, W, 3] on the 0..255 scale."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def numpy_ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM (Wang et al. 2004) of two uint8 frames [H, W, 3] with torchmetrics' border
    convention: Gaussian-weighted statistics of a window centred on EVERY pixel, the frame
    mirror-padded (without repeating the edge pixel) by half a window, per channel, averaged.
    (skimage instead averages only the windows that lie inside the frame.)"""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    half = size // 2
    for ch in range(3):
        pad = lambda v: np.pad(v[..., ch].astype(np.float64), half, mode="reflect")  # noqa: E731
        p = sliding_window_view(pad(a), (size, size))
        q = sliding_window_view(pad(b), (size, size))
        mu_p, mu_q = (p * w).sum((-1, -2)), (q * w).sum((-1, -2))
        var_p = (p * p * w).sum((-1, -2)) - mu_p ** 2
        var_q = (q * q * w).sum((-1, -2)) - mu_q ** 2
        cov = (p * q * w).sum((-1, -2)) - mu_p * mu_q
        ssim_map = ((2 * mu_p * mu_q + c1) * (2 * cov + c2)) / (
            (mu_p ** 2 + mu_q ** 2 + c1) * (var_p + var_q + c2))
        values.append(ssim_map.mean())
    return float(np.mean(values))


def _videos(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint8 video sets [2, 3, 24, 32, 3]: bright squares on black plus noise, the second a
    shifted, noisier copy (structured content, not pure noise, so SSIM is far from 0 and 1)."""
    rng = np.random.default_rng(seed)
    a = np.zeros((2, 3, 24, 32, 3), dtype=np.float64)
    for n in range(2):
        for t in range(3):
            y, x = 4 + 2 * t, 6 + 3 * n + t
            a[n, t, y:y + 10, x:x + 12] = rng.uniform(80, 255, size=3)
    b = np.roll(a, 1, axis=3) + rng.normal(0, 12, size=a.shape)
    a = a + rng.normal(0, 4, size=a.shape)
    to_u8 = lambda v: torch.from_numpy(np.clip(np.rint(v), 0, 255).astype(np.uint8))  # noqa: E731
    return to_u8(a), to_u8(b)


def test_psnr_ssim_match_numpy_per_frame_then_per_video():
    a, b = _videos()
    result = paired_psnr_ssim(a, b)
    assert result.psnr.shape == (2,) and result.ssim.shape == (2,)
    assert result.psnr.dtype == torch.float64
    for n in range(2):
        frames_a, frames_b = a[n].numpy(), b[n].numpy()
        psnr = np.mean([numpy_psnr(frames_a[t], frames_b[t]) for t in range(3)])
        ssim = np.mean([numpy_ssim(frames_a[t], frames_b[t]) for t in range(3)])
        assert abs(float(result.psnr[n]) - psnr) < PSNR_TOL_DB
        assert abs(float(result.ssim[n]) - ssim) < SSIM_TOL
    # Structured content: neither trivially similar nor unrelated.
    assert 0.2 < float(result.ssim.min()) and float(result.ssim.max()) < 0.95


def test_identical_videos_give_infinite_psnr_and_unit_ssim():
    a, _ = _videos(1)
    result = paired_psnr_ssim(a, a.clone())
    assert torch.isinf(result.psnr).all() and (result.psnr > 0).all()
    assert torch.allclose(result.ssim, torch.ones(2, dtype=torch.float64), atol=1e-6)


def test_result_does_not_depend_on_frames_per_batch():
    a, b = _videos(2)
    one = paired_psnr_ssim(a, b, frames_per_batch=1)
    many = paired_psnr_ssim(a, b, frames_per_batch=64)
    assert torch.allclose(one.psnr, many.psnr, rtol=0, atol=1e-6)
    assert torch.allclose(one.ssim, many.ssim, rtol=0, atol=1e-7)


def test_pairing_is_by_index():
    a, b = _videos(3)
    swapped = paired_psnr_ssim(a.flip(0), b.flip(0))
    straight = paired_psnr_ssim(a, b)
    assert torch.allclose(swapped.psnr, straight.psnr.flip(0), atol=1e-9)


@pytest.mark.parametrize("bad, message", [
    (lambda a: a.float(), "uint8"),
    (lambda a: a[:, :2], "differ in shape"),
    (lambda a: a[..., :2], "uint8 videos"),
])
def test_bad_inputs_are_rejected(bad, message):
    a, b = _videos()
    with pytest.raises(ValueError, match=message):
        paired_psnr_ssim(bad(a), b)


def test_frames_smaller_than_the_ssim_window_are_rejected():
    a = torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="11x11"):
        paired_psnr_ssim(a, a)
