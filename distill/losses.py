"""Losses of the two distillation stages, as pure functions of tensors.

Conventions (teacher.schedule): ``x_sigma = (1 - sigma) * x0 + sigma * eps``, the networks
predict the velocity ``v = eps - x0``, so the clean estimate of a velocity network is
``x0 = x - sigma * v``. Sigmas arrive already broadcastable to the latents, e.g. one value per
latent frame ``[B, 1, F, 1, 1]`` (per-chunk timesteps of the causal student).

The consistency function of the student is this x0 parameterisation, ``f(x, sigma) = x - sigma *
v(x, sigma)``: at sigma = 0 it is the identity whatever the network outputs, which is the
consistency models' boundary condition ``f(x, 0) = x`` built into the parameterisation (no
c_skip/c_out needed, as in FastVideo's causal-CD; shared/reference/distill-anchors.md 2.1 B).
"""

from __future__ import annotations

from typing import Literal

import torch

ConsistencyLossKind = Literal["pseudo_huber", "mse"]
LOSS_KINDS: tuple[str, ...] = ("pseudo_huber", "mse")


def _check_broadcast(name: str, sigma: torch.Tensor, like: torch.Tensor) -> None:
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"{name} must be a tensor broadcastable to {list(like.shape)}, got "
                        f"{type(sigma).__name__}")
    try:
        ok = torch.broadcast_shapes(sigma.shape, like.shape) == like.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} has shape {list(sigma.shape)}, not broadcastable to the latents "
                         f"{list(like.shape)}; give one value per frame as [B, 1, F, 1, 1]")


def x0_from_velocity(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Clean estimate ``x - sigma * v`` of a velocity prediction; exactly ``x`` where sigma = 0.

    Args:
        x: noisy latents [B, C, F, H, W] at noise level sigma.
        sigma: noise levels broadcastable to x (e.g. [B, 1, F, 1, 1]), in [0, 1].
        v: predicted velocity shaped like x.
    Returns:
        x0 estimate shaped like x, in the promoted dtype of (x, v) (fp32 for fp32 latents).
    """
    if v.shape != x.shape:
        raise ValueError(f"velocity shape {list(v.shape)} differs from the latents {list(x.shape)}")
    _check_broadcast("sigma", sigma, x)
    return x - sigma.to(x.dtype) * v


def consistency_target(x_next: torch.Tensor, sigma_next: torch.Tensor,
                       v_target: torch.Tensor) -> torch.Tensor:
    """The consistency target: the target network's x0 at (x_next, sigma_next).

    ``x_next - sigma_next * v_target``, and exactly ``x_next`` where ``sigma_next == 0`` (the
    boundary condition). The explicit ``where`` makes the boundary exact even if the target
    network returns a non-finite velocity at t = 0, where its output is never used; a
    non-finite velocity anywhere else stays visible in the target (and the loss).

    Args:
        x_next: latents after the teacher's ODE step [B, C, F, H, W].
        sigma_next: their noise levels, broadcastable to x_next.
        v_target: the (stop-gradient) target network's velocity at (x_next, sigma_next).
    Returns:
        target [B, C, F, H, W], detached.
    """
    x0 = x0_from_velocity(x_next, sigma_next, v_target)
    at_boundary = (sigma_next == 0).expand_as(x_next)
    return torch.where(at_boundary, x_next, x0).detach()


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Mean elementwise pseudo-Huber distance ``sqrt((p - t)^2 + c^2) - c`` (a scalar).

    Quadratic (``(p - t)^2 / 2c``) for errors much smaller than c, linear beyond: a few badly
    wrong samples early in distillation do not dominate the gradient as they do under MSE.
    Computed in fp32 (c^2 is ~1e-6 for the usual c ~ 1e-3 and must not vanish in bf16).
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {list(prediction.shape)} and target {list(target.shape)} differ")
    if not c > 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c!r} (e.g. 0.001; use loss 'mse' for c = 0)")
    sq = (prediction.float() - target.float()).square()
    # sqrt(d^2 + c^2) - c rewritten as d^2 / (sqrt(d^2 + c^2) + c): the same value without the
    # cancellation that loses all digits of d^2 when d << c in fp32.
    return (sq / (torch.sqrt(sq + c * c) + c)).mean()


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 (a scalar)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {list(prediction.shape)} and target {list(target.shape)} differ")
    return (prediction.float() - target.float()).square().mean()


def consistency_loss(prediction: torch.Tensor, target: torch.Tensor,
                     kind: ConsistencyLossKind = "pseudo_huber", huber_c: float = 1e-3) -> torch.Tensor:
    """Distance between the student's x0 and the consistency target: pseudo-Huber or MSE."""
    if kind == "pseudo_huber":
        return pseudo_huber(prediction, target, huber_c)
    if kind == "mse":
        return mse(prediction, target)
    raise ValueError(f"unknown consistency loss {kind!r}; choose one of {list(LOSS_KINDS)}")


def noisy_latents(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The forward process ``(1 - sigma) * x0 + sigma * eps``; sigma broadcastable to x0."""
    if eps.shape != x0.shape:
        raise ValueError(f"noise shape {list(eps.shape)} differs from the latents {list(x0.shape)}")
    _check_broadcast("sigma", sigma, x0)
    sigma = sigma.to(x0.dtype)
    return (1 - sigma) * x0 + sigma * eps


def flow_matching_loss(v_prediction: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-matching loss of the AR adaptation: MSE between v and its target ``eps - x0``.

    Args:
        v_prediction: velocity at x_sigma [B, C, F, H, W].
        x0, eps: the clean latents and the noise that made x_sigma.
        weight: optional per-sample weights [B] (e.g. 0 for padded samples); the loss is then
            the weighted mean over samples of each sample's mean squared error.
    Returns:
        a scalar, fp32.
    """
    target = eps - x0
    if weight is None:
        return mse(v_prediction, target)
    if weight.shape != (x0.shape[0],):
        raise ValueError(f"weight has shape {list(weight.shape)}, expected [B={x0.shape[0]}]")
    per_sample = (v_prediction.float() - target.float()).square().flatten(1).mean(dim=1)
    return (per_sample * weight.float()).sum() / weight.float().sum().clamp_min(1e-12)
