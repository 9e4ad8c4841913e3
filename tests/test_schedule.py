"""The teacher's sigma grids, integer timesteps and expert split, against independent computations."""

import numpy as np
import pytest
import torch

from teacher.schedule import (
    euler_sigmas,
    expert_for_timestep,
    expert_high_mask,
    shift_sigmas,
    sigmas_to_timesteps,
    unipc_sigmas,
    unshift_sigmas,
)


def _official_unipc_grid_numpy(steps: int, shift: float, n_train: int = 1000):
    """The Wan2.2 FlowUniPC construction, re-derived in numpy: float32 training sigmas,
    sigma_max read back from them, numpy linspace, shift, final zero; timesteps truncated."""
    training = (1.0 - np.linspace(1.0, 1.0 / n_train, n_train)[::-1]).astype(np.float32)
    sigma_max = float(training[0])
    base = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    shifted = shift * base / (1 + (shift - 1) * base)
    timesteps = (shifted * n_train).astype(np.int64)
    return np.append(shifted, 0.0), timesteps


def test_official_40_step_grid_matches_an_independent_numpy_construction():
    sigmas = unipc_sigmas(40, 12.0)
    ref_sigmas, ref_t = _official_unipc_grid_numpy(40, 12.0)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (41,)
    np.testing.assert_array_equal(sigmas.numpy(), ref_sigmas)
    t = sigmas_to_timesteps(sigmas[:-1])
    assert t.dtype == torch.int64
    np.testing.assert_array_equal(t.numpy(), ref_t)


@pytest.mark.parametrize("steps,shift", [(1, 12.0), (3, 1.0), (7, 3.0), (50, 5.0)])
def test_other_grids_match_the_numpy_construction(steps, shift):
    sigmas = unipc_sigmas(steps, shift)
    ref_sigmas, ref_t = _official_unipc_grid_numpy(steps, shift)
    np.testing.assert_array_equal(sigmas.numpy(), ref_sigmas)
    np.testing.assert_array_equal(sigmas_to_timesteps(sigmas[:-1]).numpy(), ref_t)
    assert (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1] == 0


def test_official_first_and_last_sigma():
    sigmas = unipc_sigmas(40, 12.0)
    assert sigmas[0].item() == pytest.approx(0.99992, abs=5e-6)
    assert sigmas[-2].item() == pytest.approx(0.23511, abs=5e-6)
    assert sigmas[-1].item() == 0.0


def test_sigma_max_keeps_the_official_float32_rounding():
    # 3 steps at shift 1: 0.999 * 2/3 in float64 truncates to 665; the official float32 0.999
    # gives 666 (see unipc_sigmas' docstring).
    t = sigmas_to_timesteps(unipc_sigmas(3, 1.0)[:-1])
    assert t.tolist() == [999, 666, 333]


def test_expert_split_is_26_high_then_14_low():
    t = sigmas_to_timesteps(unipc_sigmas(40, 12.0)[:-1])
    high = expert_high_mask(t, boundary=0.875, num_train_timesteps=1000)
    assert high.dtype == torch.bool and high.shape == (40,)
    assert high[:26].all() and not high[26:].any()
    assert (t[0].item(), t[25].item()) == (999, 877)
    assert (t[26].item(), t[39].item()) == (865, 235)
    # The scalar rule agrees with the vectorised one at every step.
    assert [expert_for_timestep(int(v)) for v in t] == ["high" if h else "low" for h in high.tolist()]


def test_expert_boundary_at_875():
    assert expert_for_timestep(875) == "high"
    assert expert_for_timestep(874) == "low"
    assert expert_for_timestep(torch.tensor(875)) == "high"
    assert expert_for_timestep(torch.tensor([874])) == "low"
    assert expert_for_timestep(900, boundary=0.9) == "high"
    assert expert_for_timestep(899, boundary=0.9) == "low"
    mask = expert_high_mask(torch.tensor([[1000, 875], [874, 0]]))
    assert mask.tolist() == [[True, True], [False, False]]


def test_euler_grid_starts_at_one_and_matches_numpy():
    sigmas = euler_sigmas(40, 12.0)
    base = np.linspace(1.0, 0.0, 41)[:40]
    ref = np.append(12.0 * base / (1 + 11.0 * base), 0.0)
    np.testing.assert_array_equal(sigmas.numpy(), ref)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    t = sigmas_to_timesteps(sigmas[:-1])
    assert t[0].item() == 1000
    # The reference records the same 26/14 split for the DPM++ grid.
    assert int(expert_high_mask(t).sum()) == 26


def test_shift_sigmas_values():
    s = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert shift_sigmas(s, 3.0).tolist() == [0.0, 0.75, 1.0]  # 3*0.5 / (1 + 2*0.5)
    assert torch.equal(shift_sigmas(s, 1.0), s)
    assert shift_sigmas(0.25, 12.0) == pytest.approx(3.0 / 3.75)


def test_timesteps_truncate_not_round():
    t = sigmas_to_timesteps(torch.tensor([0.9999, 0.8769, 0.0005, 0.0], dtype=torch.float64))
    assert t.tolist() == [999, 876, 0, 0]


def test_matches_diffusers_unipc_grid():
    diffusers = pytest.importorskip("diffusers")

    def make(shift):
        return diffusers.UniPCMultistepScheduler(
            num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=shift, predict_x0=True, solver_type="bh2",
            lower_order_final=True, final_sigmas_type="zero",
        )

    sched = make(12.0)
    ours = unipc_sigmas(40, 12.0)
    ours_t = sigmas_to_timesteps(ours[:-1])

    # The call the reference prescribes (section 6.3 item 3): identical integer timesteps; the
    # float32 sigmas agree to one float32 ulp, because diffusers is given the float64 0.999
    # where the official scheduler uses float32(0.999).
    sched.set_timesteps(sigmas=np.linspace(0.999, 0, 41)[:-1])
    assert torch.equal(sched.timesteps, ours_t)
    assert (sched.sigmas - ours.float()).abs().max().item() <= 6e-8

    # Given the official float32 sigma_max, diffusers reproduces the grid bit for bit.
    for steps, shift in [(40, 12.0), (2, 12.0), (4, 12.0), (10, 3.0), (25, 5.0)]:
        ours = unipc_sigmas(steps, shift)
        sched = make(shift)
        sched.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0, steps + 1)[:-1])
        assert torch.equal(sched.timesteps, sigmas_to_timesteps(ours[:-1])), (steps, shift)
        assert torch.equal(sched.sigmas, ours.float()), (steps, shift)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "40"])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        unipc_sigmas(steps, 12.0)
    with pytest.raises(ValueError, match="steps"):
        euler_sigmas(steps, 12.0)


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_shift(shift):
    with pytest.raises(ValueError, match="shift"):
        unipc_sigmas(40, shift)
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(torch.tensor([0.5]), shift)


def test_bad_timestep_inputs():
    with pytest.raises(ValueError, match="1-D"):
        sigmas_to_timesteps(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sigmas_to_timesteps(torch.tensor([1.5, 0.5]))
    with pytest.raises(TypeError, match="integer"):
        expert_for_timestep(0.9)  # a sigma passed by mistake
    with pytest.raises(ValueError, match="boundary"):
        expert_for_timestep(500, boundary=1.5)
    with pytest.raises(ValueError, match="integer tensor"):
        expert_high_mask(torch.tensor([0.9, 0.1]))
    with pytest.raises(ValueError, match="one integer timestep"):
        expert_for_timestep(torch.tensor([900, 800]))
    with pytest.raises(ValueError, match="num_train_timesteps"):
        unipc_sigmas(40, 12.0, num_train_timesteps=0)


@pytest.mark.parametrize("shift", [1.0, 3.0, 12.0])
def test_unshift_inverts_shift_and_rejects_a_bad_shift(shift):
    x = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(unshift_sigmas(x, shift), shift), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(unshift_sigmas(shift_sigmas(x, shift), shift), x, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="shift"):
        unshift_sigmas(0.5, 0.0)


def test_unshift_of_the_a14b_boundary_by_hand():
    # 12 u / (1 + 11 u) = 0.875  <=>  u = 0.875 / (12 - 11 * 0.875) = 0.875 / 2.375
    assert unshift_sigmas(0.875, 12.0) == pytest.approx(0.875 / 2.375, rel=1e-15)
