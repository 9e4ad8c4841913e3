"""The ODE initialisation (``distill.ode_init``): the trajectory grid, the KV-cached causal
teacher trajectories against a recomputation through the full teacher-forcing forward, the
regression step against hand-computed values, and loading a student folder that keeps its
guidance embedding."""

from __future__ import annotations

import json

import pytest
import torch

from distill.networks import FrozenExperts, load_causal_network
from distill.ode_init import (
    causal_teacher_trajectories,
    ode_regression_step,
    trajectory_grid,
)
from student.causal_dit import CausalWanModel
from student.checkpoint import save_student
from student.config import StudentConfig
from student.sampler import student_sigmas
from teacher.config import DiTConfig
from teacher.dit import WanModel
from teacher.weight_files import save_safetensors_atomic, write_text_atomic
from tests.test_causal_dit import DIT, randomise

TOL = 1e-5  # KV-cache chunks vs the full sequence: same math, differently shaped attention sums


def test_grid_holds_the_student_sigmas():
    grid = trajectory_grid(8, 3.0, student_sigmas(4, 3.0))
    assert grid.keep.tolist() == [0, 2, 4, 6]
    assert torch.allclose(grid.sigmas[grid.keep], student_sigmas(4, 3.0)[:-1])
    assert grid.sigmas[0] == 1 and grid.sigmas[-1] == 0 and len(grid.sigmas) == 9


def test_grid_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"multiple of the student's steps \(4\)"):
        trajectory_grid(6, 3.0, student_sigmas(4, 3.0))
    with pytest.raises(ValueError, match="solver_steps=0"):
        trajectory_grid(0, 3.0, student_sigmas(4, 3.0))


def _experts() -> FrozenExperts:
    kw = dict(chunk_frames=1, guidance_embedding=False, window_chunks=None, **DIT)
    return FrozenExperts(randomise(CausalWanModel(**kw), 1), randomise(CausalWanModel(**kw), 2))


def _reference_trajectories(teacher, noise, pos, neg, guidance, grid, boundary, offset):
    """Chunk by chunk through forward_teacher_forcing on the whole clip (no KV cache): the
    noisy chunk c sits at its place, the finished chunks before it are the clean context."""
    batch, _, frames = noise.shape[:3]
    ends = torch.zeros_like(noise)
    states = torch.zeros((batch, len(grid.keep), *noise.shape[1:]))
    for c in range(frames):
        x = noise[:, :, c:c + 1].clone()
        for i in range(len(grid.sigmas) - 1):
            if i in grid.keep.tolist():
                states[:, grid.keep.tolist().index(i), :, c:c + 1] = x
            t = int(grid.sigmas[i] * 1000)
            high = t >= boundary * 1000
            expert = teacher.expert_high if high else teacher.expert_low
            scale = (guidance + offset if high else guidance).view(-1, 1, 1, 1, 1)
            noisy = torch.zeros_like(noise)
            noisy[:, :, c:c + 1] = x
            t_all = torch.full((batch, frames), t, dtype=torch.int64)
            v_pos = expert.forward_teacher_forcing(ends, noisy, t_all, pos)[:, :, c:c + 1]
            v_neg = expert.forward_teacher_forcing(ends, noisy, t_all, neg.expand_as(pos))[:, :, c:c + 1]
            x = x + float(grid.sigmas[i + 1] - grid.sigmas[i]) * (v_neg + scale * (v_pos - v_neg))
        ends[:, :, c:c + 1] = x
    return states, ends


@torch.no_grad()
def test_trajectories_equal_the_full_teacher_forcing_recomputation():
    torch.manual_seed(0)
    teacher = _experts()
    noise = torch.randn(2, 4, 3, 4, 4)
    pos, neg = torch.randn(2, 8, 16), torch.randn(1, 8, 16)
    guidance = torch.tensor([1.5, 4.0])
    grid = trajectory_grid(4, 3.0, student_sigmas(2, 3.0))  # sigmas 1, .9, .75, .5, 0; keep 0, 2
    # boundary 0.8: the first two steps run expert_high (at g + 1), the last two expert_low.
    states, ends = causal_teacher_trajectories(teacher, noise, pos, neg, guidance, grid,
                                               boundary=0.8, guidance_offset=1.0, chunk_frames=1)
    ref_states, ref_ends = _reference_trajectories(teacher, noise, pos, neg, guidance, grid, 0.8, 1.0)
    assert states.shape == (2, 2, 4, 3, 4, 4) and ends.shape == noise.shape
    scale = ref_ends.abs().max()
    assert (ends - ref_ends).abs().max() <= TOL * scale
    assert (states - ref_states).abs().max() <= TOL * scale
    assert torch.equal(states[:, 0], noise)  # the state at sigma 1 is the chunk's noise
    # The expert switch and the offset matter: with the experts swapped the ends differ.
    swapped = FrozenExperts(teacher.expert_low, teacher.expert_high)
    _, other = causal_teacher_trajectories(swapped, noise, pos, neg, guidance, grid, boundary=0.8,
                                           guidance_offset=1.0, chunk_frames=1)
    assert (other - ends).abs().max() > 100 * TOL * scale


def test_trajectories_reject_bad_input():
    teacher = _experts()
    grid = trajectory_grid(2, 3.0, student_sigmas(2, 3.0))
    args = (torch.randn(2, 8, 16), torch.randn(1, 8, 16))
    with pytest.raises(ValueError, match=r"guidance has shape \[1\], expected \[B=2\]"):
        causal_teacher_trajectories(teacher, torch.randn(2, 4, 2, 4, 4), *args, torch.ones(1), grid,
                                    boundary=0.8, guidance_offset=1.0, chunk_frames=1)
    with pytest.raises(ValueError, match="chunk_frames=2"):
        causal_teacher_trajectories(teacher, torch.randn(2, 4, 3, 4, 4), *args, torch.ones(2), grid,
                                    boundary=0.8, guidance_offset=1.0, chunk_frames=2)


def test_regression_step_against_hand_computed_values():
    batch, levels_count, frames = 3, 2, 4
    states = torch.randn(batch, levels_count, 2, frames, 2, 2)
    ends = torch.randn(batch, 2, frames, 2, 2)
    sigmas = torch.tensor([0.9, 0.5], dtype=torch.float64)
    context, guidance = torch.randn(batch, 5, 3), torch.tensor([1.0, 2.0, 3.0])
    seen = {}

    def toy_student(x_clean, x_noisy, t, ctx, g):
        seen.update(clean=x_clean, noisy=x_noisy, t=t, ctx=ctx, g=g)
        return 0.5 * x_noisy + g.view(-1, 1, 1, 1, 1)

    result = ode_regression_step(toy_student, states, ends, sigmas, context, guidance,
                                 torch.Generator().manual_seed(4), chunk_frames=2)
    levels = torch.randint(levels_count, (batch, 2), generator=torch.Generator().manual_seed(4))
    assert torch.equal(result.levels, levels)
    loss = 0.0
    for b in range(batch):
        for f in range(frames):
            k = int(levels[b, f // 2])  # chunks of 2 frames share a level
            x = states[b, k, :, f]
            assert torch.equal(seen["noisy"][b, :, f], x)
            assert int(seen["t"][b, f // 2]) == int(float(sigmas[k]) * 1000)
            v = 0.5 * x + guidance[b]
            loss += float(((x - float(sigmas[k]) * v - ends[b, :, f]) ** 2).sum())
    assert torch.equal(seen["clean"], ends) and torch.equal(seen["g"], guidance)
    assert result.loss.item() == pytest.approx(loss / ends.numel(), rel=1e-5)
    with pytest.raises(ValueError, match=r"sigmas has shape \[3\], expected \[K=2\]"):
        ode_regression_step(toy_student, states, ends, torch.ones(3), context, guidance,
                            torch.Generator(), chunk_frames=2)
    with pytest.raises(ValueError, match="must be \\[B, K"):
        ode_regression_step(toy_student, states[:, 0], ends, sigmas, context, guidance,
                            torch.Generator(), chunk_frames=2)


def test_a_student_folder_keeps_its_guidance_embedding(tmp_path):
    dit = DiTConfig(**DIT, patch_size=(1, 2, 2))
    config = StudentConfig(name="t", teacher="t", dit=dit, chunk_frames=1, sink_chunks=1,
                           window_chunks=2, shift=3.0, guidance_default=3.0, guidance_max=5.0)
    trained = randomise(CausalWanModel.from_config(config), 3)  # non-zero guidance embedding
    save_student(tmp_path / "student", trained, config)
    loaded = load_causal_network(config, tmp_path / "student", device=torch.device("cpu"),
                                 mesh=None, trainable=True)
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # An expert-format folder (no guidance embedding) gives a zero last guidance layer.
    expert = randomise(WanModel(**DIT), 5)
    save_safetensors_atomic(expert.state_dict(), tmp_path / "expert" / "diffusion_pytorch_model.safetensors")
    write_text_atomic(json.dumps(WanModel.config_to_json(dit)), tmp_path / "expert" / "config.json")
    fresh = load_causal_network(config, tmp_path / "expert", device=torch.device("cpu"), mesh=None,
                                trainable=True)
    assert fresh.guidance_embedding[-1].weight.abs().sum() == 0
