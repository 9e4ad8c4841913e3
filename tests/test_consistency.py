"""The causal CD step and its pieces, driven by toy lambdas with hand-computed expectations."""

from __future__ import annotations

import pytest
import torch

from distill.consistency import (
    causal_cd_step,
    causal_cfg_velocity,
    cd_schedule,
    choose_expert,
    ema_update_,
    per_frame,
    sample_intervals,
    teacher_guidance,
    teacher_ode_step,
)


def test_cd_schedule_unshifted_grid_and_expert_ranges():
    s = cd_schedule(4, shift=1.0, boundary=0.6)
    torch.testing.assert_close(s.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert s.timesteps.tolist() == [1000, 750, 500, 250, 0]
    # intervals start at t = 1000, 750 (>= 600: high) and 500, 250 (low)
    assert s.intervals_of("high").tolist() == [0, 1]
    assert s.intervals_of("low").tolist() == [2, 3]


def test_cd_schedule_shift_matches_formula():
    s = cd_schedule(2, shift=3.0, boundary=0.875)
    # shift(0.5) = 3*0.5 / (1 + 2*0.5) = 0.75
    assert s.sigmas.tolist() == [1.0, 0.75, 0.0]
    assert s.intervals_of("high").tolist() == [0]


def test_choose_expert_is_rank_independent_and_proportional():
    s = cd_schedule(8, shift=1.0, boundary=0.6)  # high intervals start at 1000, .875, .75, .625 -> 4/8
    a = [choose_expert(s, g) for g in [torch.Generator().manual_seed(7)] for _ in range(400)]
    g2 = torch.Generator().manual_seed(7)
    b = [choose_expert(s, g2) for _ in range(400)]
    assert a == b  # same seed on every rank -> same expert sequence
    share = a.count("high") / len(a)
    assert 0.42 < share < 0.58  # 4 of 8 intervals; binomial sd 0.025


def test_choose_expert_single_expert_schedule_draws_nothing():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert choose_expert(cd_schedule(4, 1.0, boundary=0.0), g) == "high"
    assert torch.equal(g.get_state(), state)  # no draw: ranks stay in step whatever the schedule


def test_sample_intervals_stay_in_expert_range():
    s = cd_schedule(10, shift=3.0, boundary=0.875)
    g = torch.Generator().manual_seed(0)
    high = set(s.intervals_of("high").tolist())
    n = sample_intervals(s, "high", (64, 3), g)
    assert n.shape == (64, 3) and set(n.flatten().tolist()) <= high
    n = sample_intervals(s, "low", (64, 3), g)
    assert not set(n.flatten().tolist()) & high


def test_per_frame_repeats_chunk_values():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = per_frame(v, 3)
    assert out.shape == (2, 1, 6, 1, 1)
    assert out[0, 0, :, 0, 0].tolist() == [1, 1, 1, 2, 2, 2]


def test_guidance_offset_rule():
    g = torch.tensor([1.0, 3.0, 5.5])
    assert teacher_guidance(g, "low", 1.0).tolist() == [1.0, 3.0, 5.5]
    assert teacher_guidance(g, "high", 1.0).tolist() == [2.0, 4.0, 6.5]
    # guidance 3.0 = the A14B default: low 3.0, high 4.0
    assert teacher_guidance(torch.tensor([3.0]), "high", 4.0 - 3.0).item() == 4.0


def _toy_expert(scale):
    """A causal 'expert': v = scale * x_noisy + mean(context) + 0.1 * x_clean (records its t)."""
    calls = []

    def fn(x_clean, x_noisy, t, context):
        calls.append((x_noisy.shape[0], t.clone()))
        c = context.mean(dim=(1, 2))[:, None, None, None, None]
        return scale * x_noisy + c + 0.1 * x_clean

    fn.calls = calls
    return fn


def test_cfg_velocity_per_sample_scales():
    expert = _toy_expert(2.0)
    x_clean = torch.zeros(2, 1, 2, 1, 1)
    x_noisy = torch.ones(2, 1, 2, 1, 1)
    t = torch.full((2, 2), 500)
    pos = torch.full((2, 3, 4), 1.0)
    neg = torch.zeros(1, 3, 4)
    g = torch.tensor([1.5, 3.0])
    v = causal_cfg_velocity(expert, x_clean, x_noisy, t, pos, neg, g)
    # v_pos = 2 + 1 = 3, v_neg = 2 -> v = 2 + g * 1
    assert v[:, 0, 0, 0, 0].tolist() == [3.5, 5.0]
    assert expert.calls[0][0] == 4  # one batched forward of 2B


def test_teacher_heun_step_on_linear_ode():
    k, h = -2.0, -0.25  # v = k x, step from 0.5 to 0.25
    expert = lambda xc, xn, t, c: k * xn  # noqa: E731
    x = torch.full((1, 1, 1, 1, 1), 1.0)
    s_n, s_next = torch.tensor([[0.5]]), torch.tensor([[0.25]])
    t_n, t_next = torch.tensor([[500]]), torch.tensor([[250]])
    ctx = torch.zeros(1, 1, 1)
    g = torch.ones(1)
    euler = teacher_ode_step(expert, x, x, s_n, s_next, t_n, t_next, ctx, ctx, g, 1, "euler")
    heun = teacher_ode_step(expert, x, x, s_n, s_next, t_n, t_next, ctx, ctx, g, 1, "heun")
    assert euler.item() == pytest.approx(1 + h * k)
    assert heun.item() == pytest.approx(1 + h * k + (h * k) ** 2 / 2)


def _cd_case(num_steps, expert, seed=3, per_chunk=True, solver="euler"):
    torch.manual_seed(0)
    B, C, F = 3, 2, 4
    x0 = torch.randn(B, C, F, 2, 2)
    pos = torch.randn(B, 5, 4)
    neg = torch.zeros(1, 5, 4)
    guidance = torch.tensor([1.0, 2.0, 3.0])
    w_student = torch.nn.Parameter(torch.tensor(0.7))
    w_ema = torch.nn.Parameter(torch.tensor(0.4))

    def student(xc, xn, t, ctx, g):
        return w_student * xn - 0.2 * xc + g[:, None, None, None, None] * 0.01

    def ema(xc, xn, t, ctx, g):
        return w_ema * xn - 0.2 * xc + g[:, None, None, None, None] * 0.01

    high, low = _toy_expert(0.5), _toy_expert(-0.3)
    schedule = cd_schedule(num_steps, shift=2.0, boundary=0.9)
    out = causal_cd_step(student, ema, high, low, x0, pos, neg, guidance, schedule, expert,
                         torch.Generator().manual_seed(seed), chunk_frames=2, guidance_offset=1.0,
                         loss="mse", per_chunk_intervals=per_chunk, solver=solver)
    return out, locals()


@pytest.mark.parametrize("expert", ["high", "low"])
def test_causal_cd_step_matches_hand_computation(expert):
    out, c = _cd_case(6, expert)
    s = c["schedule"]
    # Replay the generator: intervals, then noise (documented draw order).
    g = torch.Generator().manual_seed(3)
    n = sample_intervals(s, expert, (3, 2), g)
    eps = torch.randn(c["x0"].shape, generator=g)
    assert torch.equal(out.intervals, n)
    sn = per_frame(s.sigmas[n].float(), 2)
    snext = per_frame(s.sigmas[n + 1].float(), 2)
    x0, pos = c["x0"], c["pos"]
    x_n = (1 - sn) * x0 + sn * eps
    scale = 0.5 if expert == "high" else -0.3
    g_t = c["guidance"] + (1.0 if expert == "high" else 0.0)
    ctx_mean = pos.mean(dim=(1, 2))[:, None, None, None, None]
    v_pos = scale * x_n + ctx_mean + 0.1 * x0
    v_neg = scale * x_n + 0.1 * x0  # negative context is zero
    v_teacher = v_neg + g_t[:, None, None, None, None] * (v_pos - v_neg)
    x_next = x_n + (snext - sn) * v_teacher
    gs = c["guidance"][:, None, None, None, None] * 0.01
    target = torch.where(snext == 0, x_next, x_next - snext * (0.4 * x_next - 0.2 * x0 + gs))
    pred = x_n - sn * (0.7 * x_n - 0.2 * x0 + gs)
    torch.testing.assert_close(out.target, target, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.prediction, pred, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, (pred - target).square().mean(), rtol=1e-5, atol=1e-7)
    # only the chosen expert ran, at the chunk timesteps of the step start
    used, unused = (c["high"], c["low"]) if expert == "high" else (c["low"], c["high"])
    assert len(used.calls) == 1 and not unused.calls
    assert torch.equal(used.calls[0][1], torch.cat([s.timesteps[n], s.timesteps[n]]))


def test_causal_cd_gradient_reaches_only_the_student():
    out, c = _cd_case(6, "low")
    out.loss.backward()
    assert c["w_student"].grad is not None and c["w_student"].grad.abs() > 0
    assert c["w_ema"].grad is None


def test_boundary_interval_target_is_the_teacher_endpoint():
    # N = 1: the only interval ends at sigma = 0, so the target is x_next itself; with an exact
    # teacher (v = eps - x0) x_next is the data x0.
    x0 = torch.randn(2, 1, 2, 2, 2)

    def exact_teacher(xc, xn, t, ctx):
        return (xn - xc) / 1.0  # at sigma 1: x_n = eps, so v = eps - x0 (x_clean is x0)

    def garbage(xc, xn, t, ctx, g):
        return torch.full_like(xn, float("inf"))

    out = causal_cd_step(lambda *a: torch.zeros_like(a[1]), garbage, exact_teacher, exact_teacher,
                         x0, torch.zeros(2, 1, 1), torch.zeros(1, 1, 1), torch.ones(2),
                         cd_schedule(1, 1.0, 0.0), "high", torch.Generator().manual_seed(0),
                         chunk_frames=1, guidance_offset=0.0, loss="mse")
    torch.testing.assert_close(out.target, x0)


def test_per_sample_intervals_share_n_across_chunks():
    out, _ = _cd_case(12, "low", per_chunk=False)
    assert (out.intervals == out.intervals[:, :1]).all()


def test_cd_step_rejects_bad_chunking():
    with pytest.raises(ValueError, match="chunk_frames"):
        causal_cd_step(None, None, None, None, torch.zeros(1, 1, 3, 1, 1), torch.zeros(1, 1, 1),
                       torch.zeros(1, 1, 1), torch.ones(1), cd_schedule(4, 1.0, 0.5), "low",
                       torch.Generator(), chunk_frames=2, guidance_offset=0.0)


def test_ema_update_math():
    e = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])]
    v = [torch.tensor([3.0, 1.0]), torch.tensor([2.0])]
    ema_update_(e, v, decay=0.9)
    torch.testing.assert_close(e[0], torch.tensor([1.2, 0.1]))
    torch.testing.assert_close(e[1], torch.tensor([2.0]))
    ema_update_(e, v, decay=0.0)  # decay 0 copies
    torch.testing.assert_close(e[0], v[0])
    with pytest.raises(ValueError, match="decay"):
        ema_update_(e, v, decay=1.5)
