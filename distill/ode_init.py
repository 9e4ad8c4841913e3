"""ODE initialisation of the student, as pure functions of (networks, tensors, schedule, rng).

Between stage A and stage B (CausVid's and Self-Forcing's ODE initialisation, made causal as in
Causal Forcing; shared/reference/distill-anchors.md): the causal two-expert teacher samples
trajectories chunk by chunk, each chunk's clean context being the teacher's own finished chunks
through its KV cache, and the student learns to jump from the trajectory's state at each of its
own sigmas straight to the trajectory's end. Because the teacher is causal, that end is a
function of what the student sees at inference (noise of this chunk, finished past chunks): the
map the student regresses exists.

Why before consistency distillation: CD only hands the student the teacher's local ODE step and
its own EMA prediction, so what the student does not draw yet (shapes, from an expert_high
start) it never learns within a CPU budget; the trajectory ends carry the teacher's shapes
directly (BENCHMARKS.md, "ODE initialisation").

Networks are callables:

- a causal teacher expert for streaming: ``forward_chunk(x_chunk, t [B], context, None, cache)``
  and ``append_chunk(x0_chunk, context, None, cache)`` of ``student.causal_dit.CausalWanModel``;
- the student: ``(x_clean, x_noisy, t [B, n_chunks], context, guidance [B]) -> v``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from distill.consistency import StudentFn, per_frame, teacher_guidance
from distill.losses import ConsistencyLossKind, consistency_loss, x0_from_velocity
from distill.networks import FrozenExperts
from teacher.schedule import euler_sigmas, expert_high_mask, sigmas_to_timesteps


class TrajectoryGrid(NamedTuple):
    """The teacher's Euler grid and where the student's sigmas sit on it.

    sigmas: float64 [solver_steps + 1], 1 -> 0; keep: int64 [K] indices into sigmas of the
    student's sigmas (its last, 0, excluded: there is nothing to predict there).
    """

    sigmas: torch.Tensor
    keep: torch.Tensor


def trajectory_grid(solver_steps: int, shift: float, student_sigmas: torch.Tensor) -> TrajectoryGrid:
    """The teacher's ``solver_steps``-step Euler grid at ``shift``, which must contain every
    student sigma (it does when solver_steps is a multiple of the student's steps and both use
    the same shift)."""
    if solver_steps < 1:
        raise ValueError(f"ode_init.solver_steps={solver_steps} must be >= 1")
    grid = euler_sigmas(solver_steps, shift)
    keep = []
    for s in student_sigmas[:-1].double():
        hit = torch.isclose(grid, s, rtol=0.0, atol=1e-9).nonzero()
        if hit.numel() == 0:
            raise ValueError(
                f"the student's sigma {float(s):.6f} is not on the teacher's {solver_steps}-step "
                f"grid {[round(float(g), 4) for g in grid]}; set ode_init.solver_steps to a "
                f"multiple of the student's steps ({len(student_sigmas) - 1})")
        keep.append(int(hit[0, 0]))
    return TrajectoryGrid(grid, torch.tensor(keep, dtype=torch.int64))


@torch.no_grad()
def causal_teacher_chunk(
    teacher: FrozenExperts,
    noise: torch.Tensor,
    contexts: torch.Tensor,
    guidance: torch.Tensor,
    grid: TrajectoryGrid,
    caches: dict,
    *,
    boundary: float,
    guidance_offset: float,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk by the causal teacher: every Euler step of ``grid`` with the expert of the
    step's timestep (t >= boundary * N: expert_high at guidance + guidance_offset; below:
    expert_low at guidance), against ``caches`` (read only; the caller appends the chunk).

    Args:
        noise: [B, C, chunk_frames, H, W], the chunk's noise.
        contexts: [2B, L, D], the prompt rows then the unconditional rows (CFG in one batch).
        guidance: [B] student guidance scales (expert_low's CFG scale).
        caches: {"high", "low"}: each expert's cache of 2B rows.
    Returns:
        states [B, K, C, chunk_frames, H, W] (the chunk at grid.sigmas[grid.keep]) and its end
        [B, C, chunk_frames, H, W], both fp32.
    """
    batch = noise.shape[0]
    timesteps = sigmas_to_timesteps(grid.sigmas, num_train_timesteps)
    keep = grid.keep.tolist()
    states = torch.zeros((batch, len(keep), *noise.shape[1:]), dtype=torch.float32,
                         device=noise.device)
    x = noise.float()
    for i in range(len(grid.sigmas) - 1):
        if i in keep:
            states[:, keep.index(i)] = x
        t = int(timesteps[i])
        name = "high" if t >= boundary * num_train_timesteps else "low"
        scale = teacher_guidance(guidance.float(), name, guidance_offset).view(-1, 1, 1, 1, 1)
        t_rows = torch.full((2 * batch,), t, dtype=torch.int64, device=noise.device)
        v = teacher.expert(name).forward_chunk(torch.cat([x, x]), t_rows, contexts, None,
                                               caches[name]).float()
        v_pos, v_neg = v[:batch], v[batch:]
        x = x + float(grid.sigmas[i + 1] - grid.sigmas[i]) * (v_neg + scale * (v_pos - v_neg))
    return states, x


@torch.no_grad()
def causal_teacher_trajectories(
    teacher: FrozenExperts,
    noise: torch.Tensor,
    context_pos: torch.Tensor,
    context_neg: torch.Tensor,
    guidance: torch.Tensor,
    grid: TrajectoryGrid,
    *,
    boundary: float,
    guidance_offset: float,
    chunk_frames: int,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the causal teacher chunk by chunk (``causal_teacher_chunk``: Euler on ``grid``,
    CFG per expert) and keep the states at the student's sigmas.

    Each chunk's end is appended to both experts' KV caches (conditional and unconditional
    rows) as the clean context of the next chunks.

    Args:
        noise: [B, C, F, H, W], F a multiple of chunk_frames.
        context_pos: [B, L, D]; context_neg: [1 or B, L, D].
        guidance: [B] student guidance scales (expert_low's CFG scale).
    Returns:
        states [B, K, C, F, H, W] (the trajectory at grid.sigmas[grid.keep], per chunk) and
        ends [B, C, F, H, W], both fp32.
    """
    batch, frames = noise.shape[0], noise.shape[2]
    if chunk_frames < 1 or frames % chunk_frames:
        raise ValueError(f"{frames} latent frames do not split into chunks of chunk_frames="
                         f"{chunk_frames}")
    if guidance.shape != (batch,):
        raise ValueError(f"guidance has shape {list(guidance.shape)}, expected [B={batch}]")
    contexts = torch.cat([context_pos, context_neg.expand_as(context_pos)])
    caches = {name: teacher.expert(name).new_cache(2 * batch, noise.device, window_chunks=None)
              for name in ("high", "low")}
    states = torch.zeros((batch, grid.keep.numel(), *noise.shape[1:]), dtype=torch.float32,
                         device=noise.device)
    ends = torch.zeros(noise.shape, dtype=torch.float32, device=noise.device)
    for start in range(0, frames, chunk_frames):
        chunk = slice(start, start + chunk_frames)
        states[:, :, :, chunk], x = causal_teacher_chunk(
            teacher, noise[:, :, chunk], contexts, guidance, grid, caches, boundary=boundary,
            guidance_offset=guidance_offset, num_train_timesteps=num_train_timesteps)
        ends[:, :, chunk] = x
        if start + chunk_frames < frames:
            for name, cache in caches.items():
                teacher.expert(name).append_chunk(torch.cat([x, x]), contexts, None, cache)
    return states, ends


def levels_of_expert(sigmas: torch.Tensor, expert: str, boundary: float,
                     num_train_timesteps: int = 1000) -> torch.Tensor:
    """Indices of the student's sigmas whose timestep lies in ``expert``'s range (t >= boundary
    * N is the high-noise network's), the levels one network of a two-network student trains on.
    """
    if expert not in ("high", "low"):
        raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
    high = expert_high_mask(sigmas_to_timesteps(sigmas.double(), num_train_timesteps), boundary,
                            num_train_timesteps)
    found = torch.nonzero(high if expert == "high" else ~high).flatten()
    if found.numel() == 0:
        raise ValueError(f"none of the student's sigmas {[round(float(s), 4) for s in sigmas]} is "
                         f"in expert_{expert}'s range (boundary {boundary}); a two-network student "
                         f"needs steps on both sides: raise the student's steps")
    return found


class ODEResult(NamedTuple):
    """What one ODE-regression step produced (tensors detached except ``loss``)."""

    loss: torch.Tensor
    prediction: torch.Tensor  # student x0 [B, C, F, H, W]
    levels: torch.Tensor  # int64 [B, n_chunks]: which kept state each chunk started from


def ode_regression_step(student: StudentFn, states: torch.Tensor, ends: torch.Tensor,
                        sigmas: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor,
                        generator: torch.Generator, *, chunk_frames: int,
                        loss: ConsistencyLossKind = "mse", huber_c: float = 1e-3,
                        num_train_timesteps: int = 1000,
                        levels: torch.Tensor | None = None) -> ODEResult:
    """Student x0 from a trajectory state against the trajectory's end.

    Every chunk draws one of the kept noise levels (from ``generator``; all K, or only
    ``levels``, int64 indices into the K: the levels of one network of a two-network student,
    ``levels_of_expert``); the noisy chunk is the
    trajectory's state there, the clean context is the trajectory's finished chunks (``ends``,
    teacher forcing), and the student's ``x - sigma * v`` is compared with the chunk's end.

    Args:
        states: [B, K, C, F, H, W]; ends: [B, C, F, H, W] (``causal_teacher_trajectories``).
        sigmas: [K] the noise levels of the K states (the student's sigmas without the final 0).
        context: [B, L, D]; guidance: [B] the scales the trajectories were sampled with.
    """
    if states.ndim != 6 or states.shape[0] != ends.shape[0] or states.shape[2:] != ends.shape[1:]:
        raise ValueError(f"states {list(states.shape)} must be [B, K, *ends.shape[1:]] with ends "
                         f"{list(ends.shape)}")
    batch, levels_count, frames = states.shape[0], states.shape[1], states.shape[3]
    if sigmas.shape != (levels_count,):
        raise ValueError(f"sigmas has shape {list(sigmas.shape)}, expected [K={levels_count}]")
    if chunk_frames < 1 or frames % chunk_frames:
        raise ValueError(f"{frames} latent frames do not split into chunks of chunk_frames="
                         f"{chunk_frames}")
    n_chunks = frames // chunk_frames
    allowed = torch.arange(levels_count) if levels is None else levels.to(torch.int64).cpu()
    if allowed.numel() == 0 or bool(((allowed < 0) | (allowed >= levels_count)).any()):
        raise ValueError(f"levels {allowed.tolist()} must be a non-empty subset of 0..{levels_count - 1}")
    pick = torch.randint(allowed.numel(), (batch, n_chunks), generator=generator,
                         device=generator.device)
    levels = allowed[pick.cpu()].to(states.device)
    frame_levels = levels.repeat_interleave(chunk_frames, dim=1)  # [B, F]
    rows = torch.arange(batch, device=states.device)[:, None]
    cols = torch.arange(frames, device=states.device)[None, :]
    x_noisy = states[rows, frame_levels, :, cols].permute(0, 2, 1, 3, 4)  # [B, F, C..] -> [B, C, F..]
    sigmas = sigmas.to(states.device, torch.float64)
    sigma = sigmas[levels]
    t = sigmas_to_timesteps(sigmas, num_train_timesteps)[levels]
    v = student(ends, x_noisy, t, context, guidance)
    prediction = x0_from_velocity(x_noisy.float(), per_frame(sigma, chunk_frames).float(), v.float())
    value = consistency_loss(prediction, ends.float(), loss, huber_c)
    return ODEResult(value, prediction.detach(), levels)
