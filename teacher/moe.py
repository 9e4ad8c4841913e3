"""The two-expert teacher velocity: pick the expert by timestep, apply its classifier-free guidance.

Wan2.2-A14B has no router: a hard threshold on the integer timestep picks expert_high
(t >= boundary * N, guidance_high) or expert_low (guidance_low), and CFG is
``v = v_neg + g * (v_pos - v_neg)`` (shared/reference/wan22-a14b.md, sections 2 and 3.3).

The experts are callables ``expert(x [B,C,F,H,W], t [B] int64, context [B,L,D]) -> v`` shaped
like x; their weights, devices and offloading stay with the caller, so these functions are pure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from teacher.schedule import Expert, expert_for_timestep

ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertVelocity(NamedTuple):
    """The guided velocity [B,C,F,H,W] and which expert produced it ("high" or "low")."""

    velocity: torch.Tensor
    expert: Expert


def two_expert_velocity(
    expert_high: ExpertFn,
    expert_low: ExpertFn,
    x: torch.Tensor,
    t: torch.Tensor | int,
    context_pos: torch.Tensor,
    context_neg: torch.Tensor | None,
    boundary: float = 0.875,
    guidance_high: float = 4.0,
    guidance_low: float = 3.0,
    num_train_timesteps: int = 1000,
    batch_cfg: bool = True,
) -> ExpertVelocity:
    """The teacher's velocity at one step: one expert, chosen by t, with its CFG scale.

    ``t`` is ONE integer timestep for the whole batch (an int, or a [B] int64 tensor whose
    entries are all equal). The expert choice is therefore per step and identical for every
    sample, which is what keeps data-parallel ranks running the same expert in lockstep.

    CFG needs a conditional and an unconditional pass. ``batch_cfg=True`` runs them as one
    forward of batch 2B ([x; x] with [context_pos; context_neg]); ``batch_cfg=False`` runs two
    forwards of batch B, as the official code does (there B = 1). For a network that treats
    samples independently both give the same numbers (exactly for the toy experts of the tests;
    to kernel rounding for a real DiT, whose GEMMs may tile a batch of 2B differently).
    With guidance 1 the unconditional pass is skipped: v = v_pos.

    Args:
        expert_high, expert_low: ``(x, t, context) -> v``.
        x: latent [B, C, F, H, W], float.
        t: the step's integer timestep (int, 0-d or [B] integer tensor).
        context_pos: prompt context [B, L, D].
        context_neg: negative-prompt context [B, L, D] or [1, L, D] (shared by the batch); may be
            None only when the chosen expert's guidance is 1.
        boundary: switch point as a fraction of num_train_timesteps (0.875 -> t = 875).
        guidance_high, guidance_low: CFG scales of expert_high / expert_low (official 4.0 / 3.0).
        num_train_timesteps: N.
        batch_cfg: one 2B forward (True) or two B forwards (False).
    Returns:
        ExpertVelocity(velocity [B,C,F,H,W] in at least float32, expert "high" | "low").
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 5 or not x.is_floating_point():
        raise ValueError(
            f"x must be a float latent [B, C, F, H, W], got {getattr(x, 'shape', type(x).__name__)}"
        )
    batch = x.shape[0]
    t_value = _single_timestep(t, batch)
    expert_name = expert_for_timestep(t_value, boundary, num_train_timesteps)
    expert, guidance = (
        (expert_high, guidance_high) if expert_name == "high" else (expert_low, guidance_low)
    )
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance_{expert_name} must be a finite number, got {guidance!r}")

    _check_context(context_pos, batch, "context_pos")
    t_batch = torch.full((batch,), t_value, dtype=torch.int64, device=x.device)

    if guidance == 1:
        # g = 1 makes CFG the conditional velocity; the unconditional forward would be wasted.
        return ExpertVelocity(_at_least_fp32(_run(expert, x, t_batch, context_pos)), expert_name)

    if context_neg is None:
        raise ValueError(
            f"context_neg is None but guidance_{expert_name} = {guidance} needs the unconditional "
            "pass; encode the negative prompt (the official default when none is given) or set "
            "the guidance to 1"
        )
    _check_context(context_neg, batch, "context_neg", allow_broadcast=True)
    context_neg = context_neg.expand(batch, -1, -1)

    if batch_cfg:
        if context_neg.shape[1:] != context_pos.shape[1:]:
            raise ValueError(
                f"batch_cfg needs context_pos {tuple(context_pos.shape)} and context_neg "
                f"{tuple(context_neg.shape)} of the same length and width; pad both to the DiT's "
                "text_len, or pass batch_cfg=False"
            )
        v_both = _run(expert, torch.cat([x, x]), torch.cat([t_batch, t_batch]),
                      torch.cat([context_pos, context_neg]))
        v_pos, v_neg = v_both[:batch], v_both[batch:]
    else:
        v_pos = _run(expert, x, t_batch, context_pos)
        v_neg = _run(expert, x, t_batch, context_neg)

    v_pos, v_neg = _at_least_fp32(v_pos), _at_least_fp32(v_neg)
    return ExpertVelocity(v_neg + guidance * (v_pos - v_neg), expert_name)


def make_teacher_denoiser(
    expert_high: ExpertFn,
    expert_low: ExpertFn,
    context_pos: torch.Tensor,
    context_neg: torch.Tensor | None,
    boundary: float = 0.875,
    guidance_high: float = 4.0,
    guidance_low: float = 3.0,
    num_train_timesteps: int = 1000,
    batch_cfg: bool = True,
) -> Callable[[torch.Tensor, float, int], torch.Tensor]:
    """Bind experts, contexts and guidance into the ``denoiser(x, sigma, t) -> v`` of the solvers.

    The model sees only the integer timestep t; sigma is part of the solver interface and unused
    here. Arguments are those of ``two_expert_velocity``.
    """

    def denoiser(x: torch.Tensor, sigma: float, t: int) -> torch.Tensor:
        return two_expert_velocity(
            expert_high, expert_low, x, t, context_pos, context_neg,
            boundary=boundary, guidance_high=guidance_high, guidance_low=guidance_low,
            num_train_timesteps=num_train_timesteps, batch_cfg=batch_cfg,
        ).velocity

    return denoiser


# ----------------------------------------------------------------------------------------------


def _single_timestep(t: torch.Tensor | int, batch: int) -> int:
    """The one integer timestep of a step, from an int or an all-equal integer tensor."""
    if isinstance(t, torch.Tensor):
        if t.is_floating_point() or t.dtype == torch.bool or t.ndim > 1 \
                or (t.ndim == 1 and t.shape[0] != batch):
            raise ValueError(
                f"t must be an int or an integer tensor [B={batch}], got {t.dtype} {tuple(t.shape)}"
            )
        flat = t.reshape(-1)
        # One sync per step, as in the official `t.item()`; pass an int to avoid it.
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise ValueError(
                f"the teacher runs one timestep per step for the whole batch, got t = {flat.tolist()}; "
                "sample a batch on a shared grid (per-sample timesteps belong to the student)"
            )
        return int(flat[0].item())
    if isinstance(t, bool) or not isinstance(t, int):
        raise TypeError(f"t must be an integer timestep, got {t!r}")
    return t


def _check_context(context: torch.Tensor, batch: int, name: str, allow_broadcast: bool = False) -> None:
    if not isinstance(context, torch.Tensor) or context.ndim != 3:
        raise ValueError(f"{name} must be a tensor [B, L, D], got {getattr(context, 'shape', type(context).__name__)}")
    if context.shape[0] != batch and not (allow_broadcast and context.shape[0] == 1):
        allowed = f"{batch} or 1" if allow_broadcast else f"{batch}"
        raise ValueError(f"{name} has batch {context.shape[0]}, expected {allowed} (the batch of x)")


def _run(expert: ExpertFn, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    v = expert(x, t, context)
    if not isinstance(v, torch.Tensor) or v.shape != x.shape:
        raise ValueError(
            f"an expert must return a velocity shaped like x {tuple(x.shape)}, got "
            f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
        )
    return v


def _at_least_fp32(v: torch.Tensor) -> torch.Tensor:
    # CFG extrapolates (g > 1 amplifies v_pos - v_neg); do it in fp32 even for a bf16 model.
    return v.to(torch.promote_types(v.dtype, torch.float32))
