"""The two-network student (student.moe): routing by timestep, separate KV caches, the folder
layout, and the per-network training pieces (ODE levels, stage-B targets past the boundary)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from distill.networks import load_causal_network
from distill.ode_init import levels_of_expert, ode_regression_step
from student.causal_dit import CausalWanModel
from student.checkpoint import MOE_SUBFOLDERS, load_student, save_moe_student, save_student
from student.config import SHAPES_STUDENT, StudentConfig
from student.moe import MoEStudent, route_by_timestep
from student.sampler import generate, sample_chunk, stream_cache, student_sigmas
from teacher.config import DiTConfig
from teacher.pipeline import initial_noise
from teacher.schedule import sigmas_to_timesteps

DIT = DiTConfig(dim=24, ffn_dim=32, freq_dim=16, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
                text_len=8, eps=1e-6, text_dim=16)
CONFIG = StudentConfig(name="tiny-moe", teacher="tiny", dit=DIT, chunk_frames=1, sink_chunks=1,
                       window_chunks=2, shift=3.0, guidance_default=2.0, guidance_max=5.0,
                       boundary=0.875)


def network(seed: int) -> CausalWanModel:
    model = CausalWanModel.from_config(replace(CONFIG, boundary=None))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def test_route_by_timestep_runs_one_network_per_range_and_mixes_per_chunk():
    calls = []

    def high(x_clean, x_noisy, t, ctx, g):
        calls.append("high")
        return torch.full_like(x_noisy, 1.0)

    def low(x_clean, x_noisy, t, ctx, g):
        calls.append("low")
        return torch.full_like(x_noisy, -1.0)

    x = torch.zeros(2, 3, 4, 2, 2)  # 2 chunks of 2 frames
    v = route_by_timestep(high, low, x, x, torch.tensor([[900, 875], [999, 880]]), None, None,
                          0.875, 2)
    assert calls == ["high"] and bool((v == 1).all())
    calls.clear()
    v = route_by_timestep(high, low, x, x, torch.tensor([[900, 100], [874, 875]]), None, None,
                          0.875, 2)
    assert calls == ["high", "low"]
    expected = torch.tensor([[1, 1, -1, -1], [-1, -1, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(v[:, 0, :, 0, 0], expected)
    torch.testing.assert_close(v, expected[:, None, :, None, None].expand_as(v))


def _generate(model, sigmas, steps_seed=5):
    ctx = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    noise = initial_noise((4, 4, 4, 4), [steps_seed])
    return generate(model, noise, sigmas, ctx, 2.0, chunk_frames=1,
                    generators=[torch.Generator().manual_seed(steps_seed)])


def test_streaming_uses_each_network_with_its_own_cache():
    high, low = network(1), network(2)
    moe = MoEStudent(high, low, boundary=0.875)
    # Every step above the boundary: the stream is the high network's own stream, KV cache and
    # all (its cache holds its own K/V, not the low network's); below: the low network's.
    above = torch.tensor([1.0, 0.95, 0.9, 0.0], dtype=torch.float64)
    below = torch.tensor([0.8, 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(_generate(moe, above), _generate(high, above), rtol=0, atol=0)
    torch.testing.assert_close(_generate(moe, below), _generate(low, below), rtol=0, atol=0)
    # Both ranges in one chunk: neither network alone.
    mixed = student_sigmas(4, 3.0)
    out = _generate(moe, mixed)
    for single in (high, low):
        assert (out - _generate(single, mixed)).abs().max() > 1e-3


def test_cache_holds_both_networks_and_a_step_runs_one():
    moe = MoEStudent(network(1), network(2), boundary=0.875)
    cache = moe.new_cache(1)
    ctx = torch.randn(1, 5, 16)
    moe.append_chunk(torch.randn(1, 4, 1, 4, 4), ctx, 2.0, cache)
    assert cache.high.num_chunks == cache.low.num_chunks == cache.num_chunks == 1
    assert cache.nbytes() == cache.high.nbytes() + cache.low.nbytes() > 0
    with pytest.raises(ValueError, match="straddle"):
        moe.forward_chunk(torch.randn(2, 4, 1, 4, 4), torch.tensor([900, 800]),
                          ctx.expand(2, -1, -1), 2.0, moe.new_cache(2))


def test_a_stream_caches_only_the_networks_its_steps_run(monkeypatch):
    moe = MoEStudent(network(1), network(2), boundary=0.875)
    one_step, four_steps = student_sigmas(1, 3.0), student_sigmas(4, 3.0)
    assert moe.networks_run_at(sigmas_to_timesteps(one_step[:-1])) == ("high",)
    assert moe.networks_run_at(sigmas_to_timesteps(four_steps[:-1])) == ("high", "low")
    assert moe.networks_run_at(torch.tensor([800, 500])) == ("low",)
    with pytest.raises(ValueError, match="empty"):
        moe.networks_run_at(torch.tensor([], dtype=torch.int64))
    cache = stream_cache(moe, one_step, 1)
    assert cache.high is not None and cache.low is None
    assert cache.nbytes() == cache.high.nbytes()
    both = stream_cache(moe, four_steps, 1)
    assert both.high is not None and both.low is not None

    # At 1 step the low network never runs, appends included. With both caches (before), every
    # deferred append flushed the previous chunk into the low network's cache: a pass per chunk
    # whose K/V nothing read. The video is the same either way.
    low_passes = []
    embed = moe.low.embed_video
    monkeypatch.setattr(moe.low, "embed_video", lambda x: low_passes.append(1) or embed(x))
    streamed = _generate(moe, one_step)
    assert low_passes == []
    ctx = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    noise = initial_noise((4, 4, 4, 4), [5])
    generators, old_cache, chunks = [torch.Generator().manual_seed(5)], moe.new_cache(1), []
    with torch.no_grad():
        for c in range(4):
            x0 = sample_chunk(moe, noise[:, :, c:c + 1], one_step, ctx, 2.0, old_cache, generators)
            chunks.append(x0)
            if c < 3:
                moe.append_chunk(x0, ctx, 2.0, old_cache, defer=True)
    assert len(low_passes) == 2  # chunks 0 and 1, each flushed by the next append
    torch.testing.assert_close(streamed, torch.cat(chunks, dim=2), rtol=0, atol=0)

    # A step the cache was not made for is refused, naming the fix.
    with pytest.raises(ValueError, match=r"low-noise network.*new_cache\(timesteps="):
        moe.forward_chunk(torch.randn(1, 4, 1, 4, 4), torch.tensor([500]), ctx, 2.0, cache)


def test_networks_must_match_and_boundary_is_checked():
    other = CausalWanModel.from_config(replace(CONFIG, boundary=None, chunk_frames=2))
    with pytest.raises(ValueError, match="one shape and chunking"):
        MoEStudent(network(1), other, boundary=0.875)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        MoEStudent(network(1), network(2), boundary=1.0)
    with pytest.raises(ValueError, match="boundary=1.5"):
        replace(CONFIG, boundary=1.5)


def test_folder_round_trip(tmp_path):
    moe = MoEStudent(network(1), network(2), boundary=0.875)
    save_moe_student(tmp_path / "s", moe, CONFIG)
    for sub in MOE_SUBFOLDERS.values():
        assert (tmp_path / "s" / sub / "diffusion_pytorch_model.safetensors").is_file()
    loaded, config = load_student(tmp_path / "s")
    assert config == CONFIG and isinstance(loaded, MoEStudent) and loaded.boundary == 0.875
    for name in ("high", "low"):
        for k, v in getattr(moe, name).state_dict().items():
            assert torch.equal(getattr(loaded, name).state_dict()[k], v)
    with pytest.raises(ValueError, match="boundary"):
        save_moe_student(tmp_path / "t", moe, replace(CONFIG, boundary=0.5))
    # Training starts from one network's folder, and says which when given the pair.
    with pytest.raises(ValueError, match="high_noise_model"):
        load_causal_network(replace(CONFIG, boundary=None), tmp_path / "s",
                            device=torch.device("cpu"), mesh=None, trainable=True)
    single = load_causal_network(replace(CONFIG, boundary=None), tmp_path / "s" / "low_noise_model",
                                 device=torch.device("cpu"), mesh=None, trainable=True)
    for k, v in moe.low.state_dict().items():
        assert torch.equal(single.state_dict()[k], v)
    # A one-network folder still loads as one network.
    save_student(tmp_path / "one", network(3), replace(CONFIG, boundary=None))
    assert isinstance(load_student(tmp_path / "one")[0], CausalWanModel)


def test_levels_of_expert_split_the_four_step_list():
    sigmas = student_sigmas(SHAPES_STUDENT.steps, 5.0)[:-1]  # 1, 0.9375 | 0.833, 0.625
    assert levels_of_expert(sigmas, "high", 0.875).tolist() == [0, 1]
    assert levels_of_expert(sigmas, "low", 0.875).tolist() == [2, 3]
    with pytest.raises(ValueError, match="raise the student's steps"):
        levels_of_expert(sigmas[:1], "low", 0.875)
    with pytest.raises(ValueError, match="'high' or 'low'"):
        levels_of_expert(sigmas, "mid", 0.875)


def test_regression_step_draws_only_the_given_levels():
    states = torch.randn(8, 4, 2, 3, 2, 2)
    ends = torch.randn(8, 2, 3, 2, 2)
    sigmas = torch.tensor([1.0, 0.9, 0.7, 0.4], dtype=torch.float64)
    seen = []

    def student(x_clean, x_noisy, t, ctx, g):
        seen.append(t.clone())
        return torch.zeros_like(x_noisy)

    out = ode_regression_step(student, states, ends, sigmas, None, None,
                              torch.Generator().manual_seed(0), chunk_frames=1,
                              levels=torch.tensor([2, 3]))
    assert set(out.levels.unique().tolist()) == {2, 3}
    assert set(seen[0].unique().tolist()) == {700, 400}
    # Each chunk's state is the one of its drawn level; with v = 0 the prediction is that state.
    for b in range(8):
        for f in range(3):
            torch.testing.assert_close(out.prediction[b, :, f], states[b, int(out.levels[b, f]), :, f])
    # None means every level, drawn exactly as before the option existed.
    all_levels = ode_regression_step(student, states, ends, sigmas, None, None,
                                     torch.Generator().manual_seed(0), chunk_frames=1)
    assert torch.equal(all_levels.levels, torch.randint(4, (8, 3),
                                                        generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="non-empty subset"):
        ode_regression_step(student, states, ends, sigmas, None, None, torch.Generator(),
                            chunk_frames=1, levels=torch.tensor([4]))
