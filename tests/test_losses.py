"""distill.losses against hand-computed values on toy tensors."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import (
    consistency_loss,
    consistency_target,
    flow_matching_loss,
    mse,
    noisy_latents,
    pseudo_huber,
    x0_from_velocity,
)


def t5d(values, frames=None):
    """A [1, 1, F, 1, 1] latent from a list of per-frame values."""
    return torch.tensor(values, dtype=torch.float32)[None, None, :, None, None]


def test_x0_from_velocity_hand_values():
    x, v = t5d([1.0, 2.0]), t5d([2.0, -2.0])
    sigma = t5d([0.5, 0.25])
    # 1 - 0.5*2 = 0 ; 2 - 0.25*(-2) = 2.5
    torch.testing.assert_close(x0_from_velocity(x, sigma, v), t5d([0.0, 2.5]))


def test_x0_from_velocity_is_identity_at_sigma_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 2, 2, generator=g)
    v = torch.randn(2, 3, 4, 2, 2, generator=g) * 100
    assert torch.equal(x0_from_velocity(x, torch.zeros(2, 1, 4, 1, 1), v), x)


def test_consistency_target_boundary_is_x_next_exactly():
    g = torch.Generator().manual_seed(1)
    x_next = torch.randn(2, 4, 3, 2, 2, generator=g)
    v = torch.randn(2, 4, 3, 2, 2, generator=g)
    sigma_next = torch.tensor([[0.0, 0.5, 0.0], [0.25, 0.0, 0.0]])[:, None, :, None, None]
    # A target network may return garbage where its output is unused: the boundary stays exact.
    v[:, :, 2] = float("nan")  # frame 2 is at sigma 0 in both samples
    out = consistency_target(x_next, sigma_next, v)
    at_zero = (sigma_next == 0).expand_as(x_next)
    assert torch.equal(out[at_zero], x_next[at_zero])
    expected = x_next - sigma_next * v
    assert torch.allclose(out[~at_zero], expected[~at_zero])
    assert not out.requires_grad


def test_consistency_target_hand_values():
    x_next, v = t5d([3.0, 1.0]), t5d([2.0, 4.0])
    sigma_next = t5d([0.5, 0.0])
    torch.testing.assert_close(consistency_target(x_next, sigma_next, v), t5d([2.0, 1.0]))


def test_pseudo_huber_hand_values():
    # diff 3 with c = 4: sqrt(9 + 16) - 4 = 1; diff 0: 0 -> mean 0.5
    p, t = t5d([3.0, 5.0]), t5d([0.0, 5.0])
    assert pseudo_huber(p, t, c=4.0).item() == pytest.approx(0.5, abs=1e-6)


def test_pseudo_huber_limits():
    # Small errors: ~ d^2 / (2c); large errors: ~ |d| - c.
    small = pseudo_huber(t5d([1e-3]), t5d([0.0]), c=1.0).item()
    assert small == pytest.approx(0.5e-6, rel=1e-5)
    large = pseudo_huber(t5d([1e3]), t5d([0.0]), c=1.0).item()
    assert large == pytest.approx(1e3 - 1.0, rel=1e-6)


def test_mse_and_loss_switch():
    p, t = t5d([1.0, 3.0]), t5d([0.0, 1.0])
    assert mse(p, t).item() == pytest.approx(2.5)
    assert consistency_loss(p, t, "mse").item() == pytest.approx(2.5)
    expected = ((math.sqrt(1 + 0.25) - 0.5) + (math.sqrt(4 + 0.25) - 0.5)) / 2
    assert consistency_loss(p, t, "pseudo_huber", huber_c=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_noisy_latents_hand_values():
    x0, eps = t5d([2.0, 2.0]), t5d([-1.0, 4.0])
    sigma = t5d([0.25, 1.0])
    # 0.75*2 + 0.25*(-1) = 1.25 ; at sigma 1 pure noise
    torch.testing.assert_close(noisy_latents(x0, eps, sigma), t5d([1.25, 4.0]))


def test_flow_matching_loss_hand_values():
    v = t5d([1.0, 1.0])
    x0, eps = t5d([0.0, 1.0]), t5d([1.0, 1.0])  # target eps - x0 = [1, 0]
    assert flow_matching_loss(v, x0, eps).item() == pytest.approx(0.5)
    # per-sample weights: sample 0 error 0.5, sample 1 ([3, 2] vs [1, 0]) error 4; weights (1, 3)
    v2 = torch.cat([v, t5d([3.0, 2.0])])
    x02, eps2 = torch.cat([x0, x0]), torch.cat([eps, eps])
    w = torch.tensor([1.0, 3.0])
    assert flow_matching_loss(v2, x02, eps2, w).item() == pytest.approx((0.5 + 3 * 4.0) / 4)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="pseudo-Huber c"):
        pseudo_huber(t5d([1.0]), t5d([0.0]), c=0.0)
    with pytest.raises(ValueError, match="unknown consistency loss"):
        consistency_loss(t5d([1.0]), t5d([0.0]), "l1")
    with pytest.raises(ValueError, match="not broadcastable"):
        x0_from_velocity(t5d([1.0, 2.0]), torch.ones(3), t5d([1.0, 2.0]))
    with pytest.raises(ValueError, match="differs"):
        x0_from_velocity(t5d([1.0, 2.0]), t5d([1.0, 1.0]), t5d([1.0]))
    with pytest.raises(ValueError, match="weight"):
        flow_matching_loss(t5d([1.0]), t5d([1.0]), t5d([1.0]), torch.ones(2))
