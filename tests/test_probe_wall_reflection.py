"""The wall-reflection probe's parts: it picks world clips that turn back where it says, gives a
model exactly the context frames it names, and counts reflections the way the stream benchmark
does (its numbers are in BENCHMARKS.md, session 21)."""

from __future__ import annotations

import numpy as np
import torch

from eval.shapes_world import render, trajectory
from tests.benchmarks.probe_wall_reflection import (
    FIRST_TURN,
    FRAMES,
    continue_clips,
    reflection_counts,
    turning_clips,
)


def test_turning_clips_turn_back_inside_the_named_frames():
    specs = turning_clips(12, seed=5)
    assert len(specs) == 12
    for spec in specs:
        # Independent of direction_at: the box centre along the motion axis, frame by frame.
        axis = 0 if spec.motion in ("left", "right") else 1
        sign = 1.0 if spec.motion in ("right", "down") else -1.0
        along = trajectory(spec, np.arange(FRAMES + 1))[:, axis] * sign
        steps = np.diff(along)
        first_back = int(np.nonzero(steps < 0)[0][0])  # step first_back -> first_back + 1
        assert FIRST_TURN[0] - 1 <= first_back <= FIRST_TURN[1], (spec, steps)
        assert (steps[:FIRST_TURN[0] - 1] > 0).all()


def test_continue_clips_keeps_the_context_and_samples_the_rest():
    clean = torch.arange(2 * 1 * 5 * 1 * 1, dtype=torch.float32).reshape(2, 1, 5, 1, 1)
    sampled, appended = [], []

    def sample(f):
        sampled.append(f)
        return torch.full((2, 1, 1, 1, 1), -1.0 - f)

    out = continue_clips(sample, lambda x: appended.append(x.clone()), clean, context_frames=3)
    assert sampled == [3, 4]
    assert torch.equal(out[:, :, :3], clean[:, :, :3])
    assert (out[:, :, 3] == -4.0).all() and (out[:, :, 4] == -5.0).all()
    # Every frame but the last goes into the cache, the model's own frame 3 included.
    assert [float(a[0, 0, 0, 0, 0]) for a in appended] == [0.0, 1.0, 2.0, -4.0]


def test_reflection_counts_tell_a_turning_object_from_a_stopped_one():
    specs = turning_clips(8, seed=7)
    world = [render(spec, FRAMES) for spec in specs]
    # The same clips held still from the first frame a world object may turn back at.
    hold = FIRST_TURN[0]
    frozen = [np.concatenate([v[:hold + 1], np.repeat(v[hold:hold + 1], FRAMES - hold - 1, axis=0)])
              for v in world]
    assert reflection_counts(world, specs) == (8, 8)
    reached_frozen, back_frozen = reflection_counts(frozen, specs)
    assert reached_frozen >= 1 and back_frozen == 0
