"""The shapes-world oracle: recover (colour, shape, motion) from any video of one object.

Exact, weight-free measures of prompt adherence for the embedded world (eval-metrics.md 6(c)).
Works on the native 64x64 renders, on resized videos and after lossy MP4 round trips, because
every decision is scale-free: the foreground is segmented at half the object's own brightness,
colour is compared by chromaticity, shape by the fill ratio of the bounding box, and speeds are
measured in fractions of the frame size.

A failed recovery is None (no object in most frames, unrecognisable fill, no motion), and a
None never matches a target, so failures count as errors in ``accuracy``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from eval.shapes_world import COLOURS, PALETTE, ClipSpec, Factors, parse_caption

# Foreground: a pixel's max channel above half the frame's object brightness (the 0.5-coverage
# edge of an anti-aliased shape, so fill ratios match the geometry) and above an absolute floor
# that no black background, even after MP4 noise (|error| of a few levels), reaches.
BACKGROUND_FLOOR = 64
# Reference brightness of a frame: the value at this percentile rank of its max channel, not the
# maximum, so a few bright noise pixels cannot lift the threshold above a dimmer object.
BRIGHTNESS_PERCENTILE = 99.5
# An object must cover at least this fraction of the frame (8 px at 64x64; the smallest sampled
# triangle covers ~290 px) and appear in at least half of the frames.
MIN_OBJECT_FRACTION = 0.002
MIN_FRAMES_WITH_OBJECT = 0.5
# Fill ratio of the bounding box: circle pi/4, square 1, triangle 1/2; decide at the midpoints.
# Below MIN_FILL the blob is no shape of this world (e.g. a ring or scattered pixels).
FILL_SQUARE = 1.0
FILL_CIRCLE = math.pi / 4.0
FILL_TRIANGLE = 0.5
MIN_FILL = 0.3
# Motion: median speed below this fraction of the frame size per frame is "no motion" (the world
# moves >= 1/64 of the frame per frame; MP4 centroid jitter is ~1/1000).
MIN_SPEED_FRACTION = 0.003
# A reversal counts as a reflection only when the object is within this fraction of the frame
# size from the wall it turned at; a reversal in mid-frame is a real change of direction.
WALL_MARGIN_FRACTION = 0.1

_AXIS_DIRECTIONS = {0: ("left", "right"), 1: ("up", "down")}  # axis -> (negative, positive)


@dataclass(frozen=True)
class Verdict:
    """What the oracle recovered from one video; None where recovery failed.

    colour / shape / motion: factor names or None. found: an object was seen in enough frames.
    rgb: median object colour (R, G, B) in 0..255. fill: median fill ratio of the bounding box.
    speed: median bounce-unfolded velocity along the motion axis, in frame sizes per frame
    (signed: negative means left/up). Diagnostics are None when not measured.
    """

    colour: str | None
    shape: str | None
    motion: str | None
    found: bool
    rgb: tuple[float, float, float] | None = None
    fill: float | None = None
    speed: float | None = None

    def matches(self, target: Factors | ClipSpec | str) -> dict[str, bool]:
        """Per-factor agreement with a target (factors, spec or caption); None never agrees."""
        factors = _as_factors(target)
        result = {
            "colour": self.colour == factors.colour,
            "shape": self.shape == factors.shape,
            "motion": self.motion == factors.motion,
        }
        result["joint"] = all(result.values())
        return result


def _as_factors(target: Factors | ClipSpec | str) -> Factors:
    if isinstance(target, Factors):
        return target
    if isinstance(target, ClipSpec):
        return target.factors
    if isinstance(target, str):
        return parse_caption(target)
    raise TypeError(
        f"target must be Factors, ClipSpec or a caption str, got {type(target).__name__}"
    )


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(
            f"the oracle expects a uint8 video [T, H, W, 3], got {video.dtype} {video.shape}; "
            "convert a [-1, 1] float tensor [3, T, H, W] with "
            "((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)"
        )
    if video.shape[0] < 2 or min(video.shape[1:3]) < 8:
        raise ValueError(f"the oracle needs >= 2 frames of >= 8x8 pixels, got {video.shape}")
    return video


@dataclass(frozen=True)
class ObjectTrack:
    """The object (largest foreground component) of every frame; K = frames where it was seen.

    frames: int [K] frame indices; mask: bool [T, H, W] (empty in frames without an object);
    area: int [K] pixels; box: int [K, 4] inclusive (x0, y0, x1, y1); centroid: float [K, 2]
    brightness-weighted (x, y) in pixels.
    """

    frames: np.ndarray
    mask: np.ndarray
    area: np.ndarray
    box: np.ndarray
    centroid: np.ndarray


def _find_objects(video: np.ndarray) -> ObjectTrack:
    """Segment the largest 8-connected bright component in each frame of uint8 [T, H, W, 3]."""
    num_frames, height, width = video.shape[:3]
    brightness = video.max(axis=-1)  # [T, H, W] uint8
    flat = brightness.reshape(num_frames, -1)
    rank = int(round(BRIGHTNESS_PERCENTILE / 100.0 * (flat.shape[1] - 1)))
    reference = np.partition(flat, rank, axis=1)[:, rank].astype(np.float64)  # [T]
    threshold = np.maximum(BACKGROUND_FLOOR, 0.5 * reference)
    foreground = brightness > threshold[:, None, None]
    # Label all frames in one call: 8-connected within a frame, never connected across frames.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, count = ndimage.label(foreground, structure=structure)
    min_pixels = max(4, MIN_OBJECT_FRACTION * height * width)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0  # label 0 is the background, and "no object yet" in ``best`` below
    slices = ndimage.find_objects(labels)  # per label: (t, y, x) bounding slices
    best = np.zeros(num_frames, dtype=np.int64)  # label of each frame's largest component
    for label, box in enumerate(slices, start=1):
        t = box[0].start
        if sizes[label] >= min_pixels and sizes[label] > sizes[best[t]]:
            best[t] = label
    frames = np.nonzero(best)[0]
    chosen = best[frames]
    mask = np.zeros_like(foreground)
    mask[frames] = labels[frames] == chosen[:, None, None]
    boxes = np.asarray(
        [(slices[c - 1][2].start, slices[c - 1][1].start,
          slices[c - 1][2].stop - 1, slices[c - 1][1].stop - 1) for c in chosen],
        dtype=np.int64,
    ).reshape(-1, 4)
    # Brightness-weighted centroid (sub-pixel: anti-aliased edges move smoothly), with pixel
    # centres at +0.5 as in the renderer (only differences matter to the motion).
    weights = np.where(mask[frames], brightness[frames], 0).astype(np.float64)  # [K, H, W]
    total = weights.sum(axis=(1, 2))
    x = weights.sum(axis=1) @ (np.arange(width) + 0.5) / total
    y = weights.sum(axis=2) @ (np.arange(height) + 0.5) / total
    centroid = np.stack([x, y], axis=-1)
    return ObjectTrack(frames, mask, sizes[chosen], boxes, centroid)


def track(video: np.ndarray) -> ObjectTrack:
    """The object the oracle follows in each frame of uint8 [T, H, W, 3]: where it was seen,
    its box and centroid (what ``judge`` measures motion from)."""
    return _find_objects(_check_video(video))


def _classify_colour(video: np.ndarray, objects: ObjectTrack) -> tuple[str, tuple]:
    """Nearest palette colour by chromaticity of the object's interior pixels."""
    # The interior (mask eroded by one pixel within each frame) avoids anti-aliased edges and
    # the chroma bleeding of yuv420p subsampling; a frame whose object is too small to have an
    # interior contributes its whole mask instead.
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = True
    interior = ndimage.binary_erosion(objects.mask, structure=in_plane)
    empty = ~interior.any(axis=(1, 2))
    interior[empty] = objects.mask[empty]
    rgb = np.median(video[interior].astype(np.float64), axis=0)
    # Scale so the brightest channel is 1: a dim or slightly washed-out generated object keeps
    # its hue. Every palette colour already has max channel 255.
    chroma = rgb / max(rgb.max(), 1.0)
    palette = np.asarray([PALETTE[c] for c in COLOURS], dtype=np.float64) / 255.0
    nearest = int(np.argmin(((palette - chroma) ** 2).sum(axis=1)))
    return COLOURS[nearest], tuple(float(c) for c in rgb)


def _classify_shape(objects: ObjectTrack, height: int, width: int) -> tuple[str | None, float]:
    """Median fill ratio of the bounding box over frames where the box does not touch the
    border (a clipped object has a misleading box); all frames if it always touches."""
    x0, y0, x1, y1 = objects.box.T
    fills = objects.area / ((x1 - x0 + 1) * (y1 - y0 + 1))
    clear = (x0 > 0) & (y0 > 0) & (x1 < width - 1) & (y1 < height - 1)
    fill = float(np.median(fills[clear] if clear.any() else fills))
    if fill < MIN_FILL:
        return None, fill
    if fill >= (FILL_SQUARE + FILL_CIRCLE) / 2.0:
        return "square", fill
    if fill >= (FILL_CIRCLE + FILL_TRIANGLE) / 2.0:
        return "circle", fill
    return "triangle", fill


def _classify_motion(
    objects: ObjectTrack, height: int, width: int
) -> tuple[str | None, float | None]:
    """Direction of motion at the first frame, undoing reflections (bounce-aware median).

    The world reflects the object at the walls, so a clip captioned "left" may move right after
    touching the left wall. Taken raw, the median velocity would then follow whichever segment
    is longer. Instead every reversal that happens at the wall the object was heading to is
    treated as a reflection: velocities after an odd number of reflections are negated
    ("unfolded"), which turns the zig-zag back into the straight path of the first segment.
    The median of the unfolded velocities is the direction at the first frame, which for a clip
    rendered from frame 0 is the captioned motion. A reversal away from the walls is a genuine
    change of direction and is not undone, so it votes against the first direction.
    Frame-to-frame steps slower than the speed threshold (e.g. the partial step that contains a
    wall hit, or frozen frames) get no say in detecting reversals; frozen videos have a median
    speed of zero and so no motion at all.
    """
    if len(objects.frames) < 2:
        return None, None
    centres, boxes = objects.centroid, objects.box  # [K, 2] (x, y), [K, 4]
    gaps = np.diff(objects.frames.astype(np.float64))
    velocity = np.diff(centres, axis=0) / gaps[:, None]  # pixels per frame, [K-1, 2]
    axis = int(np.argmax(np.abs(velocity).sum(axis=0)))  # the axis with the longer path
    extent = width if axis == 0 else height
    min_speed = MIN_SPEED_FRACTION * extent
    margin = WALL_MARGIN_FRACTION * extent
    v = velocity[:, axis]
    position = centres[:, axis]
    low_edge, high_edge = boxes[:, axis], boxes[:, axis + 2]

    parity = np.ones_like(v)
    flip = 1.0
    previous = None  # index of the last step fast enough to have a reliable sign
    for j in range(len(v)):
        if abs(v[j]) >= min_speed:
            if previous is not None and np.sign(v[j]) != np.sign(v[previous]):
                # The turn happened at the extreme position between the two steps.
                between = np.arange(previous + 1, j + 1)
                if v[previous] < 0:  # was heading to the low wall
                    turn = between[np.argmin(position[between])]
                    at_wall = low_edge[turn] <= margin
                else:
                    turn = between[np.argmax(position[between])]
                    at_wall = high_edge[turn] >= extent - 1 - margin
                if at_wall:
                    flip = -flip
            previous = j
        parity[j] = flip
    speed = float(np.median(v * parity))
    if abs(speed) < min_speed:
        return None, speed / extent
    negative, positive = _AXIS_DIRECTIONS[axis]
    return (negative if speed < 0 else positive), speed / extent


def judge(video: np.ndarray) -> Verdict:
    """Recover the factors of one uint8 video [T, H, W, 3] (any T >= 2 and size >= 8x8)."""
    video = _check_video(video)
    num_frames, height, width = video.shape[:3]
    objects = _find_objects(video)
    seen = len(objects.frames)
    if seen == 0 or seen < MIN_FRAMES_WITH_OBJECT * num_frames:
        return Verdict(colour=None, shape=None, motion=None, found=False)
    colour, rgb = _classify_colour(video, objects)
    shape, fill = _classify_shape(objects, height, width)
    motion, speed = _classify_motion(objects, height, width)
    return Verdict(colour, shape, motion, True, rgb=rgb, fill=fill, speed=speed)


def accuracy(
    videos: Sequence[np.ndarray] | np.ndarray,
    targets: Sequence[Factors | ClipSpec | str],
) -> dict:
    """Per-factor and joint accuracy of videos against their targets.

    videos: a sequence of uint8 [T, H, W, 3] (sizes may differ) or one array [N, T, H, W, 3].
    targets: per video, Factors, a ClipSpec or a caption (English or Chinese).
    Returns {"n", "colour", "shape", "motion", "joint" (fractions in [0, 1]), "correct"
    (counts per factor and joint), "not_found" (videos without an object), "no_motion"
    (videos with an object whose motion was not recovered)}.
    """
    if len(videos) != len(targets):
        raise ValueError(f"got {len(videos)} videos but {len(targets)} targets; pass one each")
    if len(videos) == 0:
        raise ValueError("accuracy needs at least one video")
    factors = [_as_factors(t) for t in targets]
    correct = {"colour": 0, "shape": 0, "motion": 0, "joint": 0}
    not_found = no_motion = 0
    for video, target in zip(videos, factors):
        verdict = judge(video)
        not_found += not verdict.found
        no_motion += verdict.found and verdict.motion is None
        for key, ok in verdict.matches(target).items():
            correct[key] += ok
    n = len(videos)
    result = {key: count / n for key, count in correct.items()}
    result.update(n=n, correct=correct, not_found=not_found, no_motion=no_motion)
    return result
