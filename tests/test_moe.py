"""The two-expert CFG velocity with toy experts whose outputs say who ran and with what."""

import pytest
import torch

from teacher.moe import make_teacher_denoiser, two_expert_velocity
from teacher.schedule import sigmas_to_timesteps, unipc_sigmas
from teacher.solvers import unipc_sample


class ToyExpert:
    """v = scale * x + offset + mean(context) per sample; records every call."""

    def __init__(self, scale: float, offset: float):
        self.scale, self.offset = scale, offset
        self.calls: list[tuple[int, list[int]]] = []  # (batch size, t values)

    def __call__(self, x, t, context):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        assert context.shape[0] == x.shape[0]
        self.calls.append((x.shape[0], t.tolist()))
        return self.scale * x + self.offset + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 2, 3, 3, generator=g)
    ctx_pos = torch.randn(batch, 6, 8, generator=g)
    ctx_neg = torch.randn(batch, 6, 8, generator=g)
    return x, ctx_pos, ctx_neg


def _expected(expert: ToyExpert, x, ctx_pos, ctx_neg, g):
    v_pos = expert.scale * x + expert.offset + ctx_pos.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    v_neg = expert.scale * x + expert.offset + ctx_neg.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    return v_neg + g * (v_pos - v_neg)


@pytest.mark.parametrize("t,which", [(875, "high"), (999, "high"), (874, "low"), (235, "low")])
@pytest.mark.parametrize("batch_cfg", [True, False])
def test_expert_choice_and_its_guidance(t, which, batch_cfg):
    high, low = ToyExpert(2.0, 10.0), ToyExpert(-1.0, -10.0)
    x, ctx_pos, ctx_neg = _inputs()
    v, ran = two_expert_velocity(high, low, x, torch.full((2,), t), ctx_pos, ctx_neg,
                                 guidance_high=4.0, guidance_low=3.0, batch_cfg=batch_cfg)
    assert ran == which
    chosen, idle = (high, low) if which == "high" else (low, high)
    assert idle.calls == []
    g = 4.0 if which == "high" else 3.0
    torch.testing.assert_close(v, _expected(chosen, x, ctx_pos, ctx_neg, g), rtol=0, atol=1e-5)
    # Every call saw the step's one timestep for every sample.
    assert all(set(ts) == {t} for _, ts in chosen.calls)


def test_batched_and_unbatched_cfg_are_identical():
    x, ctx_pos, ctx_neg = _inputs(batch=3, seed=1)
    batched, unbatched = ToyExpert(0.7, 1.0), ToyExpert(0.7, 1.0)
    v_b, _ = two_expert_velocity(batched, batched, x, 900, ctx_pos, ctx_neg, batch_cfg=True)
    v_u, _ = two_expert_velocity(unbatched, unbatched, x, 900, ctx_pos, ctx_neg, batch_cfg=False)
    assert torch.equal(v_b, v_u)
    assert [b for b, _ in batched.calls] == [6]  # one forward of batch 2B
    assert [b for b, _ in unbatched.calls] == [3, 3]  # cond and uncond, batch B each


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_guidance_one_skips_the_unconditional_pass(batch_cfg):
    high, low = ToyExpert(2.0, 10.0), ToyExpert(-1.0, -10.0)
    x, ctx_pos, _ = _inputs()
    v, ran = two_expert_velocity(high, low, x, 500, ctx_pos, None, guidance_low=1.0,
                                 batch_cfg=batch_cfg)
    assert ran == "low" and low.calls == [(2, [500, 500])]
    expected = -1.0 * x - 10.0 + ctx_pos.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)
    # The other expert still guides at 4.0, so it needs the negative context.
    with pytest.raises(ValueError, match="context_neg is None"):
        two_expert_velocity(high, low, x, 950, ctx_pos, None, guidance_low=1.0)


def test_shared_negative_context_broadcasts():
    x, ctx_pos, ctx_neg = _inputs(batch=2, seed=2)
    shared = ctx_neg[:1]
    e = ToyExpert(1.5, 0.5)
    v_shared, _ = two_expert_velocity(e, e, x, 880, ctx_pos, shared)
    v_full, _ = two_expert_velocity(e, e, x, 880, ctx_pos, shared.expand(2, -1, -1).clone())
    assert torch.equal(v_shared, v_full)


def test_bad_inputs():
    e = ToyExpert(1.0, 0.0)
    x, ctx_pos, ctx_neg = _inputs()
    with pytest.raises(ValueError, match="one timestep per step"):
        two_expert_velocity(e, e, x, torch.tensor([900, 800]), ctx_pos, ctx_neg)
    with pytest.raises(ValueError, match="integer tensor"):
        two_expert_velocity(e, e, x, torch.tensor([0.9, 0.9]), ctx_pos, ctx_neg)
    with pytest.raises(ValueError, match=r"\[B, C, F, H, W\]"):
        two_expert_velocity(e, e, x[0], 900, ctx_pos, ctx_neg)
    with pytest.raises(ValueError, match="context_pos has batch 1"):
        two_expert_velocity(e, e, x, 900, ctx_pos[:1], ctx_neg)
    with pytest.raises(ValueError, match="batch_cfg=False"):
        two_expert_velocity(e, e, x, 900, ctx_pos, ctx_neg[:, :3])
    with pytest.raises(ValueError, match="shaped like x"):
        two_expert_velocity(lambda x, t, c: x[:1], e, x, 900, ctx_pos, ctx_neg)


def test_teacher_denoiser_switches_experts_along_the_official_grid():
    high, low = ToyExpert(0.1, 0.0), ToyExpert(0.2, 0.0)
    x, ctx_pos, ctx_neg = _inputs(batch=1, seed=3)
    denoiser = make_teacher_denoiser(high, low, ctx_pos, ctx_neg, boundary=0.875,
                                     guidance_high=4.0, guidance_low=3.0)
    sigmas = unipc_sigmas(40, 12.0)
    unipc_sample(denoiser, x, sigmas)
    t = sigmas_to_timesteps(sigmas[:-1]).tolist()
    assert [ts[0] for _, ts in high.calls] == t[:26]
    assert [ts[0] for _, ts in low.calls] == t[26:]
    assert all(b == 2 for b, _ in high.calls + low.calls)  # batched CFG: one forward per step
