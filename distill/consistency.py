"""Causal consistency distillation (stage B) as pure functions of (networks, tensors, schedule, rng).

One step (FastVideo causal-CD / Causal Forcing++ style, shared/reference/distill-anchors.md 2.1):

1. the teacher's schedule is discretised into N sigmas ``1 = s_0 > s_1 > ... > s_N = 0``
   (``cd_schedule``); an index n is drawn per sample (or per chunk) inside the range of ONE expert,
   and that expert is the same for the whole batch and on every rank (``choose_expert`` takes a
   generator seeded identically on all ranks: FSDP ranks must run the same module);
2. ``x_n = (1 - s_n) x0 + s_n eps`` for every noisy chunk; the clean chunks x0 are the context
   (teacher forcing: noisy chunk c attends to clean chunks < c and to itself);
3. the causal teacher takes one ODE step s_n -> s_{n+1} with that expert and its CFG scale
   (Euler, or Heun) -> x_{n+1};
4. student x0 at (x_n, s_n): ``f = x_n - s_n v_student``; target: the stop-gradient EMA student's
   x0 at (x_{n+1}, s_{n+1}), which is x_{n+1} itself where s_{n+1} = 0;
5. loss: pseudo-Huber or MSE between the two (``distill.losses``).

Networks are plain callables so the step is testable with toy lambdas:

- student / EMA student: ``(x_clean, x_noisy, t [B, n_chunks] int64, context, guidance [B]) -> v``;
- a causal teacher expert: ``(x_clean, x_noisy, t [B, n_chunks] int64, context) -> v``;

all with latents [B, C, F, H, W] and v shaped like x_noisy.

Guidance: the student's scalar guidance g means the LOW-noise expert's CFG scale; the high-noise
expert runs g + (guidance_high - guidance_low) of the teacher preset (``teacher_guidance``), so
g = guidance_low reproduces the teacher's default sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from distill.losses import (
    ConsistencyLossKind,
    consistency_loss,
    consistency_target,
    noisy_latents,
    x0_from_velocity,
)
from teacher.schedule import Expert, euler_sigmas, sigmas_to_timesteps

StudentFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CausalExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TeacherSolver = Literal["euler", "heun"]
TEACHER_SOLVERS: tuple[str, ...] = ("euler", "heun")


@dataclass(frozen=True)
class CDSchedule:
    """The teacher's schedule discretised for consistency distillation.

    sigmas: float64 [N + 1], strictly decreasing, sigmas[0] = 1 and sigmas[N] = 0.
    timesteps: int64 [N + 1], ``trunc(sigma * num_train_timesteps)`` (what the networks see).
    boundary: expert switch as a fraction of num_train_timesteps; the interval n (from sigmas[n]
        to sigmas[n + 1]) belongs to the expert of its START timestep, as in the teacher's own
        sampler, which keeps one expert per solver step.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    boundary: float
    num_train_timesteps: int = 1000

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    def expert_of_interval(self) -> torch.Tensor:
        """bool [N]: True where interval n starts in expert_high's range (t_n >= boundary * N_train)."""
        return self.timesteps[:-1] >= self.boundary * self.num_train_timesteps

    def intervals_of(self, expert: Expert) -> torch.Tensor:
        """int64 indices n of the intervals that ``expert`` runs (possibly empty)."""
        high = self.expert_of_interval()
        mask = high if expert == "high" else ~high
        return torch.nonzero(mask).flatten()


def cd_schedule(num_steps: int, shift: float, boundary: float,
                num_train_timesteps: int = 1000) -> CDSchedule:
    """N = ``num_steps`` intervals of the shifted grid from 1 to 0 (``teacher.schedule.euler_sigmas``).

    The shift is the teacher preset's, so the intervals are dense where the teacher's sampler
    spends its steps. FastVideo's causal-CD uses N = 48 at shift 5.
    """
    sigmas = euler_sigmas(num_steps, shift)
    timesteps = sigmas_to_timesteps(sigmas, num_train_timesteps)
    if not 0.0 <= boundary <= 1.0:
        raise ValueError(f"boundary must be in [0, 1], got {boundary!r} (A14B: 0.875)")
    return CDSchedule(sigmas=sigmas, timesteps=timesteps, boundary=float(boundary),
                      num_train_timesteps=num_train_timesteps)


def choose_expert(schedule: CDSchedule, shared_generator: torch.Generator) -> Expert:
    """Draw the expert of this step, with probability = its share of the N intervals.

    Drawing the expert first and then an interval inside its range gives every interval the same
    overall probability 1/N, while all samples of the batch use one expert.

    ``shared_generator`` MUST produce the same numbers on every rank (seed it from the run seed and
    the global step only): under FSDP each rank's forward issues collectives over the shard group,
    and ranks calling different experts silently pair up mismatched all-gathers
    (shared/reference/lightning-and-style.md A5).
    """
    high = schedule.expert_of_interval()
    n_high = int(high.sum())
    if n_high == 0:
        return "low"
    if n_high == schedule.num_steps:
        return "high"
    u = torch.rand((), generator=shared_generator, dtype=torch.float64).item()
    return "high" if u < n_high / schedule.num_steps else "low"


def sample_intervals(schedule: CDSchedule, expert: Expert, shape: tuple[int, ...],
                     generator: torch.Generator) -> torch.Tensor:
    """Uniform interval indices n inside ``expert``'s range, int64 of ``shape`` (on the CPU)."""
    allowed = schedule.intervals_of(expert)
    if allowed.numel() == 0:
        raise ValueError(f"the CD schedule has no interval for expert_{expert} (boundary "
                         f"{schedule.boundary}, N = {schedule.num_steps}); raise num_steps")
    pick = torch.randint(0, allowed.numel(), shape, generator=generator, device=generator.device)
    return allowed[pick.cpu()]


def per_frame(values: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """Per-chunk values [B, n_chunks] -> per-frame [B, 1, n_chunks * chunk_frames, 1, 1].

    Broadcastable to latents [B, C, F, H, W]; every frame of a chunk shares its chunk's value.
    """
    if values.ndim != 2:
        raise ValueError(f"per-chunk values must be [B, n_chunks], got {list(values.shape)}")
    return values.repeat_interleave(chunk_frames, dim=1)[:, None, :, None, None]


def teacher_guidance(guidance: torch.Tensor, expert: Expert, guidance_offset: float) -> torch.Tensor:
    """The CFG scale the teacher's ``expert`` runs for student guidance g [B].

    expert_low: g; expert_high: g + guidance_offset, where guidance_offset = guidance_high -
    guidance_low of the teacher preset (1.0 for A14B's 4.0 / 3.0).
    """
    if guidance.ndim != 1:
        raise ValueError(f"guidance must be one scale per sample [B], got {list(guidance.shape)}")
    return guidance + guidance_offset if expert == "high" else guidance


def causal_cfg_velocity(expert_fn: CausalExpertFn, x_clean: torch.Tensor, x_noisy: torch.Tensor,
                        t: torch.Tensor, context_pos: torch.Tensor, context_neg: torch.Tensor,
                        guidance: torch.Tensor) -> torch.Tensor:
    """Classifier-free guided velocity of a causal expert, with one CFG scale per sample.

    ``v = v_neg + g * (v_pos - v_neg)``, both branches in ONE forward of batch 2B (same t, same
    clean context). Where g == 1 everywhere the unconditional branch is skipped.

    Args:
        x_clean, x_noisy: [B, C, F, H, W]; t: int64 [B, n_chunks].
        context_pos: [B, L, D]; context_neg: [B, L, D] or [1, L, D] (shared).
        guidance: [B] CFG scales (float).
    Returns:
        v [B, C, F, H, W] fp32.
    """
    batch = x_noisy.shape[0]
    if guidance.shape != (batch,):
        raise ValueError(f"guidance has shape {list(guidance.shape)}, expected [B={batch}]")
    if bool((guidance == 1).all()):
        return expert_fn(x_clean, x_noisy, t, context_pos).float()
    context_neg = context_neg.expand(batch, -1, -1)
    if context_neg.shape != context_pos.shape:
        raise ValueError(f"context_neg {list(context_neg.shape)} and context_pos "
                         f"{list(context_pos.shape)} must match (pad both to text_len)")
    v = expert_fn(torch.cat([x_clean, x_clean]), torch.cat([x_noisy, x_noisy]),
                  torch.cat([t, t]), torch.cat([context_pos, context_neg])).float()
    v_pos, v_neg = v[:batch], v[batch:]
    g = guidance.float()[:, None, None, None, None]
    return v_neg + g * (v_pos - v_neg)


def teacher_ode_step(expert_fn: CausalExpertFn, x_clean: torch.Tensor, x_n: torch.Tensor,
                     sigma_n: torch.Tensor, sigma_next: torch.Tensor, t_n: torch.Tensor,
                     t_next: torch.Tensor, context_pos: torch.Tensor, context_neg: torch.Tensor,
                     guidance: torch.Tensor, chunk_frames: int,
                     solver: TeacherSolver = "euler") -> torch.Tensor:
    """One teacher ODE step per chunk from sigma_n to sigma_next (per-chunk [B, n_chunks]).

    Euler: ``x_n + (s' - s) v(x_n, s)``. Heun adds the trapezoid correction with a second
    evaluation at (x_euler, s') by the SAME expert (the interval belongs to the expert of its
    start, as in the teacher's sampler); chunks whose s' = 0 keep the Euler result, as in EDM's
    Heun sampler (there is no velocity to average at the end of the ODE).

    Returns x_next [B, C, F, H, W] fp32, no gradient.
    """
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"unknown teacher solver {solver!r}; choose one of {list(TEACHER_SOLVERS)}")
    with torch.no_grad():
        h = per_frame(sigma_next - sigma_n, chunk_frames).to(torch.float32)
        v1 = causal_cfg_velocity(expert_fn, x_clean, x_n, t_n, context_pos, context_neg, guidance)
        x_euler = x_n.float() + h * v1
        if solver == "euler":
            return x_euler
        v2 = causal_cfg_velocity(expert_fn, x_clean, x_euler, t_next, context_pos, context_neg,
                                 guidance)
        x_heun = x_n.float() + h * 0.5 * (v1 + v2)
        at_end = per_frame(sigma_next == 0, chunk_frames).expand_as(x_heun)
        return torch.where(at_end, x_euler, x_heun)


class CDResult(NamedTuple):
    """What one causal CD step produced (tensors detached except ``loss``)."""

    loss: torch.Tensor  # scalar, carries the student's gradient
    prediction: torch.Tensor  # student x0 at (x_n, s_n) [B, C, F, H, W], detached
    target: torch.Tensor  # EMA x0 at (x_{n+1}, s_{n+1}) [B, C, F, H, W]
    intervals: torch.Tensor  # int64 [B, n_chunks], the n of every chunk
    expert: Expert


def causal_cd_step(
    student: StudentFn,
    ema_student: StudentFn,
    expert_high: CausalExpertFn,
    expert_low: CausalExpertFn,
    x0: torch.Tensor,
    context_pos: torch.Tensor,
    context_neg: torch.Tensor,
    guidance: torch.Tensor,
    schedule: CDSchedule,
    expert: Expert,
    generator: torch.Generator,
    *,
    chunk_frames: int,
    guidance_offset: float,
    loss: ConsistencyLossKind = "pseudo_huber",
    huber_c: float = 1e-3,
    solver: TeacherSolver = "euler",
    per_chunk_intervals: bool = True,
) -> CDResult:
    """One causal consistency-distillation step; returns the loss (backward is the caller's).

    Args:
        student, ema_student: ``(x_clean, x_noisy, t, context, guidance) -> v`` (the EMA is
            called under no_grad).
        expert_high, expert_low: causal teacher experts ``(x_clean, x_noisy, t, context) -> v``.
        x0: clean data latents [B, C, F, H, W], F = n_chunks * chunk_frames: the clean context
            AND the x0 the noisy chunks are made from.
        context_pos: prompt context [B, L, D]; context_neg: unconditional context [1 or B, L, D].
        guidance: student guidance scales [B] (the low-noise expert's CFG scale).
        schedule: ``cd_schedule(...)``.
        expert: this step's expert, from ``choose_expert`` with a generator shared by all ranks.
        generator: this rank's generator for the intervals and the noise (its device is where
            they are drawn).
        chunk_frames: latent frames per chunk.
        guidance_offset: guidance_high - guidance_low of the teacher preset.
        loss, huber_c: the consistency distance (``distill.losses.consistency_loss``).
        solver: the teacher's ODE step, "euler" or "heun".
        per_chunk_intervals: draw n per chunk (True) or one n per sample for all its chunks.
    Draw order from ``generator``: intervals, then noise (a test can replay it).
    """
    if x0.ndim != 5:
        raise ValueError(f"x0 must be latents [B, C, F, H, W], got {list(x0.shape)}")
    batch, frames = x0.shape[0], x0.shape[2]
    if chunk_frames < 1 or frames % chunk_frames:
        raise ValueError(f"{frames} latent frames do not split into chunks of chunk_frames="
                         f"{chunk_frames}; crop the clip to a multiple")
    n_chunks = frames // chunk_frames
    if expert not in ("high", "low"):
        raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
    expert_fn = expert_high if expert == "high" else expert_low

    shape = (batch, n_chunks) if per_chunk_intervals else (batch, 1)
    n = sample_intervals(schedule, expert, shape, generator).expand(batch, n_chunks)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device,
                      dtype=torch.float32).to(x0.device)
    device = x0.device
    sigma_n = schedule.sigmas[n].to(device)
    sigma_next = schedule.sigmas[n + 1].to(device)
    t_n = schedule.timesteps[n].to(device)
    t_next = schedule.timesteps[n + 1].to(device)

    x0 = x0.float()
    x_n = noisy_latents(x0, eps, per_frame(sigma_n, chunk_frames))
    g_teacher = teacher_guidance(guidance, expert, guidance_offset)
    x_next = teacher_ode_step(expert_fn, x0, x_n, sigma_n, sigma_next, t_n, t_next, context_pos,
                              context_neg, g_teacher, chunk_frames, solver)

    with torch.no_grad():
        v_target = ema_student(x0, x_next, t_next, context_pos, guidance).float()
        target = consistency_target(x_next, per_frame(sigma_next, chunk_frames), v_target)

    v_student = student(x0, x_n, t_n, context_pos, guidance)
    prediction = x0_from_velocity(x_n, per_frame(sigma_n, chunk_frames), v_student.float())
    value = consistency_loss(prediction, target, loss, huber_c)
    return CDResult(value, prediction.detach(), target, n, expert)


@torch.no_grad()
def ema_update_(ema_tensors: Iterable[torch.Tensor], tensors: Iterable[torch.Tensor],
                decay: float) -> None:
    """In place ``ema = decay * ema + (1 - decay) * value`` for paired tensors.

    Pass LOCAL shards (``DTensor.to_local()``) under FSDP: the update is elementwise, so every
    rank updates its own shard and nothing is gathered.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay!r} (typical: 0.99 - 0.999)")
    ema_list, value_list = list(ema_tensors), list(tensors)
    if len(ema_list) != len(value_list):
        raise ValueError(f"EMA has {len(ema_list)} tensors but the model {len(value_list)}")
    for e, v in zip(ema_list, value_list):
        if e.shape != v.shape:
            raise ValueError(f"EMA tensor {list(e.shape)} does not match model tensor {list(v.shape)}")
        e.lerp_(v.to(e.dtype), 1.0 - decay)
