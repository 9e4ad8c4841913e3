"""Samplers as pure functions: parity with diffusers' UniPC, hand-computed Euler, exact flows."""

import numpy as np
import pytest
import torch

from teacher.schedule import euler_sigmas, sigmas_to_timesteps, unipc_sigmas
from teacher.solvers import euler_sample, sample, solver_sigmas, unipc_sample


def toy_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Nonlinear, smooth in x and sigma: exercises every UniPC coefficient."""
    return torch.tanh(x) * 0.5 + x * sigma


def _noise(seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 3, 5, 5, generator=g).to(dtype)


def _diffusers_unipc(noise, steps, shift, order):
    """diffusers' UniPCMultistepScheduler driven step by step, on the official grid."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=order, prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=shift, predict_x0=True, solver_type="bh2",
        lower_order_final=True, final_sigmas_type="zero",
    )
    # float32(0.999) is the official sigma_max (see test_schedule): the grids are then identical.
    sched.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0, steps + 1)[:-1])
    sched.set_begin_index(0)
    assert torch.equal(sched.sigmas, unipc_sigmas(steps, shift).float())
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(toy_velocity(x, float(sched.sigmas[i])), t, x).prev_sample
    return x


@pytest.mark.parametrize(
    "steps,shift,order",
    [(40, 12.0, 2), (2, 12.0, 2), (4, 12.0, 2), (8, 12.0, 2), (10, 12.0, 2), (10, 3.0, 2),
     (10, 12.0, 1), (10, 12.0, 3), (40, 12.0, 3)],
)
def test_unipc_matches_diffusers(steps, shift, order):
    noise = _noise()
    ref = _diffusers_unipc(noise, steps, shift, order)
    ours = unipc_sample(lambda x, sigma, t: toy_velocity(x, sigma), noise, unipc_sigmas(steps, shift),
                        order=order)
    assert ours.dtype == torch.float32 and ours.shape == noise.shape
    # Measured: <= 1.5e-6 (diffusers computes its coefficients in float32, we in float64).
    assert (ours - ref).abs().max().item() <= 1e-5


def test_euler_two_steps_by_hand():
    x = torch.tensor([1.0, -2.0])
    seen = []

    def denoiser(x, sigma, t):
        seen.append((sigma, t))
        return x * sigma + 1.0

    # Grid [1, 0.5, 0] (shift 1). v(x,1) = [2, -1]  -> x = [1,-2] - 0.5*[2,-1]   = [0, -1.5]
    #                             v(x,.5) = [1, .25] -> x = [0,-1.5] - 0.5*[1,.25] = [-0.5, -1.625]
    out = euler_sample(denoiser, x, euler_sigmas(2, 1.0))
    assert torch.equal(out, torch.tensor([-0.5, -1.625]))
    assert seen == [(1.0, 1000), (0.5, 500)]


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_straight_flow_recovers_x0(solver):
    """v = eps - x0 is the exact velocity on the straight path; both samplers must land on x0."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(1, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    sigmas = solver_sigmas(solver, 8, 12.0)
    start = (1 - sigmas[0].item()) * x0 + sigmas[0].item() * eps
    out = sample(solver, lambda x, sigma, t: eps - x0, start, sigmas)
    assert out.dtype == torch.float64
    assert (out - x0).abs().max().item() <= 1e-12


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_single_point_data_flow_recovers_x0_from_any_start(solver):
    """For data = {x0} the exact velocity field is (x - x0) / sigma, so x0 is reached from any x."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    start = 3.0 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    out = sample(solver, lambda x, sigma, t: (x - x0) / sigma, start, solver_sigmas(solver, 6, 5.0))
    assert (out - x0).abs().max().item() <= 1e-12


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_callback_once_per_step_with_the_model_timestep(solver):
    sigmas = solver_sigmas(solver, 7, 12.0)
    calls = []
    seen_by_model = []

    def denoiser(x, sigma, t):
        seen_by_model.append(t)
        return toy_velocity(x, sigma)

    out = sample(solver, denoiser, _noise(), sigmas,
                 callback=lambda i, t, sigma, x: calls.append((i, t, sigma, x.clone())))
    assert [c[0] for c in calls] == list(range(7))
    assert [c[1] for c in calls] == sigmas_to_timesteps(sigmas[:-1]).tolist() == seen_by_model
    assert all(isinstance(c[1], int) for c in calls)
    assert [c[2] for c in calls] == sigmas[:-1].tolist()
    assert torch.equal(calls[-1][3], out)


def test_low_precision_noise_is_integrated_in_float32():
    out = unipc_sample(lambda x, sigma, t: toy_velocity(x, sigma).to(torch.bfloat16),
                       _noise().to(torch.bfloat16), unipc_sigmas(3, 12.0))
    assert out.dtype == torch.float32


def test_sample_dispatch_and_errors():
    noise = _noise()
    den = lambda x, sigma, t: toy_velocity(x, sigma)  # noqa: E731
    s = unipc_sigmas(5, 12.0)
    assert torch.equal(sample("unipc", den, noise, s), unipc_sample(den, noise, s))
    assert torch.equal(sample("euler", den, noise, s), euler_sample(den, noise, s))
    with pytest.raises(ValueError, match="unknown solver 'dpm'.*unipc.*euler"):
        sample("dpm", den, noise, s)
    with pytest.raises(ValueError, match="unknown solver"):
        solver_sigmas("heun", 10, 12.0)
    with pytest.raises(ValueError, match="sigmas\\[0\\] < 1"):
        unipc_sample(den, noise, euler_sigmas(4, 12.0))
    with pytest.raises(ValueError, match="strictly decreasing"):
        euler_sample(den, noise, torch.tensor([0.5, 0.7, 0.0]))
    with pytest.raises(ValueError, match="at least 2 sigmas"):
        euler_sample(den, noise, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="order"):
        unipc_sample(den, noise, s, order=4)
    with pytest.raises(ValueError, match="shaped like x"):
        unipc_sample(lambda x, sigma, t: x[:1], noise, s)
