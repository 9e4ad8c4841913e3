"""eval.stream_quality: windows of a long stream judged by the oracle, on streams rendered by the
world itself (so the right answer is known), frozen ones, and prompt switches."""

import numpy as np
import pytest

from eval.shapes_world import Factors, caption, render, sample_spec
from eval.stream_quality import judge_stream, stream_windows, window_rates

STREAM_FRAMES = 241  # 30 s at 8 fps: the first clip, then 14 windows of 16 frames


def test_windows_follow_the_chunks():
    windows = stream_windows(STREAM_FRAMES)
    assert windows[:3] == [(0, 17), (17, 33), (33, 49)]
    assert windows[-1] == (225, 241) and len(windows) == 15
    assert stream_windows(40) == [(0, 17), (17, 33)]  # frames 33-39 make no whole window
    with pytest.raises(ValueError, match="16 frames is shorter than one clip"):
        stream_windows(16)


def test_the_world_itself_passes_every_window_through_its_reflections():
    reflected_windows = 0
    for seed in range(6):
        spec = sample_spec(seed)
        verdicts = judge_stream(render(spec, STREAM_FRAMES), [(0, caption(spec, "zh"))])
        assert all(v.joint and v.moving for v in verdicts), (spec, verdicts)
        assert all(1.0 <= v.speed <= 2.6 for v in verdicts)  # the world's 1-2.5 px per frame
        assert verdicts[0].direction
        reflected_windows += sum(not v.direction for v in verdicts)
    # Walls turn the object round: later windows move against the caption, on its axis.
    assert reflected_windows >= 12


def test_an_object_that_stops_fails_motion_but_keeps_colour_and_shape():
    spec = sample_spec(3)
    frames = render(spec, STREAM_FRAMES)
    frames[40:] = frames[40]
    verdicts = judge_stream(frames, [(0, caption(spec))])
    assert verdicts[0].joint
    for v in verdicts[3:]:
        assert v.colour and v.shape and not v.moving and not v.motion and v.speed == 0.0
    rates = window_rates([verdicts, judge_stream(render(spec, STREAM_FRAMES),
                                                 [(0, caption(spec))])])
    assert rates[0]["joint"] == 1.0 and rates[-1]["motion"] == 0.5 and rates[-1]["colour"] == 1.0
    assert rates[-1]["speed"] == pytest.approx(verdicts[-1].speed / 2 + spec.speed / 2, abs=0.1)


def test_a_switch_is_judged_against_the_new_prompt_from_its_window_on():
    first = sample_spec(1, Factors("circle", "red", "left"))
    second = sample_spec(2, Factors("square", "blue", "up"))
    frames = np.concatenate([render(first, 65), render(second, STREAM_FRAMES - 65, 65)])
    switched = judge_stream(frames, [(0, caption(first)), (65, caption(second, "zh"))])
    assert all(v.joint for v in switched)
    assert [v.prompt for v in switched[3:5]] == [caption(first), caption(second, "zh")]
    unswitched = judge_stream(frames, [(0, caption(first))])
    assert all(v.joint for v in unswitched[:4])
    assert not any(v.colour or v.shape or v.motion for v in unswitched[4:])


def test_bad_schedules_fail_naming_the_fix():
    frames = render(sample_spec(0), STREAM_FRAMES)
    prompt = caption(sample_spec(0))
    with pytest.raises(ValueError, match="switch at frame 60 falls inside a window"):
        judge_stream(frames, [(0, prompt), (60, prompt)])
    with pytest.raises(ValueError, match="must start with the prompt at frame 0"):
        judge_stream(frames, [(17, prompt)])
    with pytest.raises(ValueError, match="must increase"):
        judge_stream(frames, [(0, prompt), (33, prompt), (17, prompt)])
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        judge_stream(frames, [(0, "a red blob")])
    with pytest.raises(ValueError, match="same number of windows"):
        window_rates([judge_stream(frames, [(0, prompt)]), judge_stream(frames[:40], [(0, prompt)])])


def test_wall_contact_tells_a_reflection_from_an_object_that_stops():
    from eval.stream_quality import FRAMES_AFTER_CONTACT, REFLECTED_PX, wall_contact

    contacts = []
    for seed in range(8):
        spec = sample_spec(seed)
        frames = render(spec, 65)
        back = wall_contact(frames, spec.motion)
        assert back is not None and back >= REFLECTED_PX, (spec, back)
        contacts.append(back)
        stuck = frames.copy()
        # Freeze the object where it first touches the wall: it comes back by nothing.
        first = next(t for t in range(65)
                     if wall_contact(frames[:t + FRAMES_AFTER_CONTACT + 1], spec.motion) is not None)
        stuck[first:] = frames[first]
        assert wall_contact(stuck, spec.motion) == pytest.approx(0.0, abs=1e-9)
    assert max(contacts) > 4.0  # faster objects come back further
    # Moving away from every wall it could touch, or too short to see the way back: None.
    spec = sample_spec(0)
    assert wall_contact(render(spec, 5), spec.motion) is None


def test_appearance_by_chunk_shows_when_the_new_object_appears():
    from eval.stream_quality import appearance_by_chunk

    first = sample_spec(1, Factors("circle", "red", "left"))
    second = sample_spec(2, Factors("square", "blue", "up"))
    # The new object shows two chunks (8 frames) after the switch at frame 65.
    frames = np.concatenate([render(first, 73), render(second, 40, 73)])
    chunks = appearance_by_chunk(frames, 65, caption(second), count=8)
    assert chunks == [(False, False)] * 2 + [(True, True)] * 6
    assert appearance_by_chunk(frames, 0, caption(first), count=2) == [(True, True)] * 2
    with pytest.raises(ValueError, match="run past the stream's 113 frames"):
        appearance_by_chunk(frames, 65, caption(second), count=13)
