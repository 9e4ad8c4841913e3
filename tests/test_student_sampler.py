"""student.sampler: the sigma list, multistep consistency sampling against hand-computed values
with toy models, and per-sample determinism with a tiny CausalWanModel."""

from __future__ import annotations

from types import SimpleNamespace

import json
from dataclasses import replace

import pytest
import torch

from student.causal_dit import CausalWanModel
from student.kv_cache import KVCache
from student.config import SHAPES_STUDENT, student_config_from_dict, student_config_to_dict
from student.sampler import (
    draw_noise,
    generate,
    sample_chunk,
    sampling_sigmas,
    student_sigmas,
)
from teacher.pipeline import initial_noise

DIT = dict(dim=24, ffn_dim=32, freq_dim=16, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
           text_len=8, eps=1e-6, text_dim=16)




def toy(forward_chunk):
    """A stand-in student: only forward_chunk matters to sample_chunk."""
    return SimpleNamespace(forward_chunk=forward_chunk)


def test_student_sigmas_hand_computed():
    # shift(s) = 5 s / (1 + 4 s) at s = 1, .75, .5, .25, 0 (Self-Forcing's warped list).
    expected = torch.tensor([1.0, 3.75 / 4.0, 2.5 / 3.0, 1.25 / 2.0, 0.0], dtype=torch.float64)
    got = student_sigmas(4, 5.0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)


def test_sampling_sigmas_take_the_tuned_grid_of_that_length_else_the_shift_grid():
    config = replace(SHAPES_STUDENT, sampling_grids=((1.0, 0.6), (1.0, 0.9, 0.5, 0.25)))
    torch.testing.assert_close(sampling_sigmas(config, 4),
                               torch.tensor([1.0, 0.9, 0.5, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(sampling_sigmas(config, 2),
                               torch.tensor([1.0, 0.6, 0.0], dtype=torch.float64))
    for steps in (1, 3):  # no grid of that length: the shift grid it was trained on
        torch.testing.assert_close(sampling_sigmas(config, steps),
                                   student_sigmas(steps, config.shift), rtol=0, atol=0)
    plain = replace(config, sampling_grids=())
    torch.testing.assert_close(sampling_sigmas(plain, 4), student_sigmas(4, plain.shift))


@pytest.mark.parametrize("grids, match", [
    (((0.9, 0.5),), r"\[0.9, 0.5\] must start at 1.0"),
    (((1.0, 0.5, 0.6),), "decrease strictly"),
    (((1.0, 0.5, 0.0),), "above 0"),
    (((1.0, 0.5), (1.0, 0.4)), "one grid per step count"),
])
def test_bad_sampling_grids_are_refused(grids, match):
    with pytest.raises(ValueError, match=match):
        replace(SHAPES_STUDENT, sampling_grids=grids)


def test_sampling_grids_round_trip_and_stay_out_of_configs_without_them():
    back = student_config_from_dict(json.loads(json.dumps(student_config_to_dict(SHAPES_STUDENT))))
    assert back == SHAPES_STUDENT and back.sampling_grids == SHAPES_STUDENT.sampling_grids
    plain = replace(SHAPES_STUDENT, sampling_grids=())
    assert "sampling_grids" not in student_config_to_dict(plain)
    assert student_config_from_dict(student_config_to_dict(plain)) == plain
    for bad in ([0.5], [["one", 0.5]], "1, 0.5"):
        with pytest.raises(ValueError, match="list of sigma lists"):
            student_config_from_dict({**student_config_to_dict(plain), "sampling_grids": bad})


def test_sample_chunk_matches_hand_computed_steps():
    """v(x, t) = 0.5 x + t/1000: three steps written out by hand with the same noise draws."""
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.0], dtype=torch.float64)
    seen_t = []

    def forward_chunk(x, t, context, guidance, cache):
        seen_t.append(t.tolist())
        return 0.5 * x + t[:, None, None, None, None].float() / 1000

    x = torch.randn(2, 3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    out = sample_chunk(toy(forward_chunk), x, sigmas, None, None, None, gens)

    ref_gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    eps = [torch.stack([torch.randn(3, 1, 2, 2, generator=g) for g in ref_gens]) for _ in range(2)]
    x0 = x - 1.0 * (0.5 * x + 1.0)                 # t = 1000
    xx = 0.2 * x0 + 0.8 * eps[0]
    x0 = xx - 0.8 * (0.5 * xx + 0.8)               # t = 800
    xx = 0.5 * x0 + 0.5 * eps[1]
    x0 = xx - 0.5 * (0.5 * xx + 0.5)               # t = 500, last: no re-noise
    assert seen_t == [[1000, 1000], [800, 800], [500, 500]]
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)


def test_x0_parameterisation_recovers_the_target_at_every_step():
    """A perfect velocity (x - y) / sigma gives x0 = y whatever the noise and the step count."""
    y = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    sigmas = student_sigmas(4, 3.0)
    sig = {int(t): float(s) for s, t in zip(sigmas[:-1], (sigmas[:-1] * 1000).long())}

    def forward_chunk(x, t, context, guidance, cache):
        return (x - y) / sig[int(t[0])]

    noise = torch.randn_like(y)
    out = sample_chunk(toy(forward_chunk), noise, sigmas, None, None, None,
                       [torch.Generator().manual_seed(0)])
    torch.testing.assert_close(out, y, rtol=0, atol=1e-5)


def test_one_step_is_x_minus_v():
    v = torch.full((1, 2, 1, 2, 2), 0.25)
    x = torch.ones(1, 2, 1, 2, 2)
    out = sample_chunk(toy(lambda *a: v), x, student_sigmas(1, 5.0), None, None, None)
    torch.testing.assert_close(out, x - v)


def tiny_student() -> CausalWanModel:
    model = CausalWanModel(chunk_frames=1, sink_chunks=1, window_chunks=2, **DIT)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def test_generate_is_per_sample_deterministic_at_any_batch_size():
    model = tiny_student()
    ctx = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    sigmas = student_sigmas(3, 3.0)
    shape = (4, 5, 4, 4)  # C, F, H, W: 5 chunks; the window (sink 1 + 2) rolls once
    seeds = [7, 8, 9]
    batch = generate(model, initial_noise(shape, seeds), sigmas, ctx, torch.tensor([2.0, 3.0, 4.0]),
                     chunk_frames=1, generators=[torch.Generator().manual_seed(s) for s in seeds])
    for i, s in enumerate(seeds):
        alone = generate(model, initial_noise(shape, [s]), sigmas, ctx[i:i + 1], [2.0, 3.0, 4.0][i],
                         chunk_frames=1, generators=[torch.Generator().manual_seed(s)])
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-5)
    again = generate(model, initial_noise(shape, seeds[:1]), sigmas, ctx[:1], 2.0, chunk_frames=1,
                     generators=[torch.Generator().manual_seed(seeds[0])])
    assert torch.equal(again, generate(model, initial_noise(shape, seeds[:1]), sigmas, ctx[:1], 2.0,
                                       chunk_frames=1,
                                       generators=[torch.Generator().manual_seed(seeds[0])]))
    # Another seed gives another video.
    other = generate(model, initial_noise(shape, [99]), sigmas, ctx[:1], 2.0, chunk_frames=1,
                     generators=[torch.Generator().manual_seed(99)])
    assert (other - again).abs().max() > 1e-2


def test_generate_equals_a_manual_chunk_loop():
    model = tiny_student()
    ctx = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    sigmas = student_sigmas(2, 3.0)
    noise = initial_noise((4, 3, 4, 4), [5])
    out = generate(model, noise, sigmas, ctx, 3.0, chunk_frames=1,
                   generators=[torch.Generator().manual_seed(5)])
    # generate defers each append into the next chunk's first pass: bit for bit the manual loop
    # that does so, and within float rounding the loop with an append pass of its own.
    for defer, atol in ((True, 0.0), (False, 1e-5)):
        gen = torch.Generator().manual_seed(5)
        cache = model.new_cache(1)
        with torch.no_grad():
            for c in range(3):
                x0 = sample_chunk(model, noise[:, :, c:c + 1], sigmas, ctx, 3.0, cache, [gen])
                torch.testing.assert_close(out[:, :, c:c + 1], x0, rtol=0, atol=atol)
                model.append_chunk(x0, ctx, 3.0, cache, defer=defer)


def test_bad_inputs():
    v = toy(lambda x, *a: torch.zeros_like(x))
    x = torch.zeros(2, 2, 1, 2, 2)
    with pytest.raises(ValueError, match="decrease strictly"):
        sample_chunk(v, x, torch.tensor([0.5, 0.8, 0.0]), None, None, None)
    with pytest.raises(ValueError, match=">= 2 values"):
        sample_chunk(v, x, torch.tensor([1.0]), None, None, None)
    with pytest.raises(ValueError, match="2 generators for a batch of 1|one per sample"):
        draw_noise((2,), [torch.Generator(), torch.Generator()], 1, "cpu")
    with pytest.raises(ValueError, match="chunk_frames=2"):
        generate(tiny_student(), torch.zeros(1, 4, 3, 4, 4), student_sigmas(2, 3.0),
                 torch.zeros(1, 5, 16), 3.0, chunk_frames=2)
    assert isinstance(tiny_student().new_cache(1), KVCache)
