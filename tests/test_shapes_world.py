"""The embedded shapes world: determinism, captions, rendering geometry, reflections."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from eval.shapes_world import (
    COLOURS,
    FRAME_SIZE,
    LANGS,
    MIN_FRAMES_BEFORE_REFLECTION,
    MOTIONS,
    PALETTE,
    SHAPES,
    SIZE_RANGE,
    SPEED_RANGE,
    ClipSpec,
    Factors,
    all_factors,
    all_prompts,
    caption,
    caption_lang,
    direction_at,
    eval_prompts,
    parse_caption,
    render,
    sample_spec,
    trajectory,
)


def _mask(frame: np.ndarray) -> np.ndarray:
    """Pixels at least half covered by the object (coverage >= 0.5 <=> brightness >= 128)."""
    return frame.max(axis=-1) >= 128


def _simulate_reflections(spec: ClipSpec, num_frames: int) -> np.ndarray:
    """Independent reference: step the centre frame by frame and mirror it at each wall."""
    lo, hi = spec.size / 2, FRAME_SIZE - spec.size / 2
    unit = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[spec.motion]
    pos = np.array([spec.x, spec.y])
    vel = np.array(unit, dtype=np.float64) * spec.speed
    out = [pos.copy()]
    for _ in range(num_frames - 1):
        pos = pos + vel
        for axis in range(2):
            if pos[axis] > hi:
                pos[axis], vel[axis] = 2 * hi - pos[axis], -vel[axis]
            elif pos[axis] < lo:
                pos[axis], vel[axis] = 2 * lo - pos[axis], -vel[axis]
        out.append(pos.copy())
    return np.asarray(out)


def test_same_seed_same_video_and_different_seeds_differ():
    a, b, c = render(sample_spec(7)), render(sample_spec(7)), render(sample_spec(8))
    assert a.shape == (17, FRAME_SIZE, FRAME_SIZE, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert sample_spec(7) != sample_spec(8) and not np.array_equal(a, c)
    rng_a, rng_b = np.random.default_rng([1, 2]), np.random.default_rng([1, 2])
    assert [sample_spec(rng_a) for _ in range(5)] == [sample_spec(rng_b) for _ in range(5)]


def test_fixed_factors_keep_the_geometry_of_the_draw():
    factors = Factors("triangle", "cyan", "down")
    spec = sample_spec(11, factors=factors)
    free = sample_spec(11)
    assert spec.factors == factors
    # Same numbers drawn, so the size and speed do not depend on the requested factors.
    assert (spec.size, spec.speed) == (free.size, free.speed)


def test_caption_templates_in_both_languages():
    red_circle_left = Factors("circle", "red", "left")
    assert caption(red_circle_left, "en") == "a red circle moving left"
    assert caption(red_circle_left, "zh") == "一个红色的圆形向左移动"
    assert caption(Factors("square", "magenta", "up"), "zh") == "一个品红色的正方形向上移动"
    with pytest.raises(ValueError, match="language"):
        caption(red_circle_left, "fr")


@pytest.mark.parametrize("lang", LANGS)
def test_parse_round_trip_of_all_84_combinations(lang):
    prompts = all_prompts(lang)
    assert len(prompts) == 84 == len(set(prompts))
    for factors, text in zip(all_factors(), prompts):
        assert parse_caption(text) == factors
        assert caption_lang(text) == lang
    assert {f.shape for f in all_factors()} == set(SHAPES)
    assert len({(f.shape, f.colour, f.motion) for f in all_factors()}) == 84


def test_parse_tolerates_case_spaces_and_full_stop_and_rejects_the_rest():
    assert parse_caption("  A Red  Circle moving LEFT. ") == Factors("circle", "red", "left")
    assert parse_caption("一个 红色的圆形向左移动。") == Factors("circle", "red", "left")
    for bad in ("", "a purple circle moving left", "a red circle moving sideways",
                "a red circle", "一个紫色的圆形向左移动", "two red circles moving left"):
        with pytest.raises(ValueError, match="not a shapes-world caption"):
            parse_caption(bad)


def test_every_combination_renders_with_its_colour_and_area():
    for i, factors in enumerate(all_factors()):
        spec = sample_spec(np.random.default_rng([5, i]), factors=factors)
        video = render(spec)
        frame = video[0]
        # The interior carries the exact palette colour; everything far outside is black.
        cx, cy = trajectory(spec, np.array([0]))[0]
        inside = frame[int(cy + spec.size / 6), int(cx)]  # below the centre: inside all shapes
        assert tuple(inside) == PALETTE[spec.colour], factors
        colours = {tuple(p) for p in frame.reshape(-1, 3) if p.max() == 255}
        assert colours == {PALETTE[spec.colour]}
        half = spec.size / 2
        expected = {"circle": math.pi * half**2, "square": spec.size**2,
                    "triangle": spec.size**2 / 2}[spec.shape]
        # Half-covered pixels form the shape up to the rasterisation of its outline
        # (<= about one pixel per unit of perimeter, here a few %).
        area = _mask(frame).sum()
        assert abs(area - expected) <= 0.05 * expected, (factors, area, expected)


def test_trajectory_matches_a_step_by_step_reflection_and_stays_inside():
    for i, motion in enumerate(MOTIONS):
        factors = Factors("square", "white", motion)
        spec = sample_spec(np.random.default_rng([6, i]), factors=factors)
        reference = _simulate_reflections(spec, 300)
        np.testing.assert_allclose(trajectory(spec, np.arange(300)), reference, atol=1e-9)


def test_bounce_keeps_the_object_whole_and_flips_the_displacement_at_the_wall():
    spec = ClipSpec("circle", "green", "left", x=40.0, y=30.0, size=26.0, speed=2.0)
    video = render(spec, num_frames=60)  # 60 frames x 2 px cross the 38 px range three times
    masks = [_mask(f) for f in video]
    areas = np.array([m.sum() for m in masks])
    # Never clipped by the border: the area varies only by sub-pixel rasterisation.
    assert areas.max() - areas.min() <= 0.03 * areas.mean()
    xs = np.array([np.nonzero(m)[1].mean() for m in masks])
    left_edges = np.array([np.nonzero(m)[1].min() for m in masks])
    right_edges = np.array([np.nonzero(m)[1].max() for m in masks])
    steps = np.diff(xs)
    moving = np.abs(steps) > 0.5  # skip the partial step that contains a wall hit
    signs = np.sign(steps[moving])
    flips = np.nonzero(np.diff(signs))[0]
    assert signs[0] < 0 and len(flips) == 3  # left wall, right wall, left wall
    frame_of = np.nonzero(moving)[0]
    lo, hi = spec.size / 2, FRAME_SIZE - spec.size / 2
    for k, flip in enumerate(flips):
        turn = frame_of[flip] + 1  # the frame at the end of the last full step before the flip
        # Analytic wall hits: the centre reaches lo after (x - lo) / speed frames, then every
        # (hi - lo) / speed frames it reaches the other wall.
        hit = (spec.x - lo) / spec.speed + k * (hi - lo) / spec.speed
        assert math.floor(hit) <= turn <= math.ceil(hit), (k, turn, hit)
        # At the turn the object is within one step of that wall (frames sample the bounce).
        if k % 2 == 0:
            assert left_edges[turn] <= spec.speed
        else:
            assert right_edges[turn] >= FRAME_SIZE - 1 - spec.speed
    # Wall hits at frames 13.5 and 32.5: the direction just after each frame follows them.
    directions = [direction_at(spec, f) for f in (0, 13, 14, 32, 33)]
    assert directions == ["left", "left", "right", "right", "left"]


def test_render_ranges_are_consistent():
    spec = sample_spec(3)
    whole = render(spec, num_frames=21)
    np.testing.assert_array_equal(render(spec, num_frames=11, start_frame=10), whole[10:21])
    far = render(spec, num_frames=40, start_frame=1000)
    np.testing.assert_array_equal(render(spec, num_frames=5, start_frame=1020), far[20:25])
    with pytest.raises(ValueError, match="start_frame"):
        render(spec, start_frame=-1)
    with pytest.raises(ValueError, match="num_frames"):
        render(spec, num_frames=0)


def test_sampled_sizes_speeds_and_first_reflection():
    for i in range(60):
        spec = sample_spec(np.random.default_rng([9, i]))
        assert SIZE_RANGE[0] <= spec.size <= SIZE_RANGE[1]
        assert SPEED_RANGE[0] <= spec.speed <= SPEED_RANGE[1]
        mask = _mask(render(spec, num_frames=1)[0])
        ys, xs = np.nonzero(mask)
        # The measured box is the spec size up to half-pixel rasterisation at each side.
        for extent in (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1):
            assert spec.size - 1.5 <= extent <= spec.size + 1, (spec, extent)
        # The caption's direction holds for the first frames of every sampled clip.
        assert {direction_at(spec, f) for f in range(MIN_FRAMES_BEFORE_REFLECTION)} == {spec.motion}


def test_spec_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="colour 'purple'"):
        ClipSpec("circle", "purple", "left", 32.0, 32.0, 24.0, 1.0)
    with pytest.raises(ValueError, match="ClipSpec.x=5"):
        ClipSpec("circle", "red", "left", 5.0, 32.0, 24.0, 1.0)
    with pytest.raises(ValueError, match="speed"):
        ClipSpec("circle", "red", "left", 32.0, 32.0, 24.0, -1.0)
    with pytest.raises(TypeError, match="Generator or an int seed"):
        sample_spec("seed")


def test_eval_prompts_are_deterministic_balanced_and_prefix_stable():
    prompts = eval_prompts(168, seed=4)
    assert prompts == eval_prompts(168, seed=4) and prompts != eval_prompts(168, seed=5)
    assert eval_prompts(20, seed=4) == prompts[:20]
    pairs = {(parse_caption(p), caption_lang(p)) for p in prompts}
    assert len(pairs) == 168  # every (factors, language) pair exactly once
    first = [(parse_caption(p), caption_lang(p)) for p in prompts[:8]]
    assert {f.colour for f, _ in first} == set(COLOURS)
    assert {f.shape for f, _ in first} == set(SHAPES)
    assert {f.motion for f, _ in first} == set(MOTIONS)
    assert {lang for _, lang in first} == set(LANGS)


def test_rendering_is_cheap():
    specs = [sample_spec(i) for i in range(20)]
    start = time.perf_counter()
    for spec in specs:
        render(spec)
    per_clip = (time.perf_counter() - start) / len(specs)
    assert per_clip < 0.05  # ~3 ms measured on a shared 2-core CPU; generous for slow CI
