"""The embedded shapes world: procedural captioned videos with known generative factors.

One object on a black background, 64x64 RGB, 8 fps; 17 frames (1 + 4k, as the Wan VAE wants)
by default, but any frame range of an endless clip can be rendered. Factors: shape x colour x
motion (3 x 7 x 4 = 84 combinations), each with one English and one Chinese caption template.
Geometry (start centre, size, speed) is random per clip. The object moves at constant speed and
reflects at the borders, so a clip never leaves the frame and a stream can run forever.

Pure numpy, deterministic from a seed, a few ms per 17-frame clip. ``eval.oracle`` inverts it.

Motion semantics: the caption's motion is the direction at frame 0. A reflection flips the
velocity component at a wall, so a window that starts after an odd number of reflections moves
the other way; ``direction_at`` gives the direction at any frame, and the oracle reports the
direction at a window's first frame by undoing the reflections it sees (see ``eval.oracle``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

FRAME_SIZE = 64  # height == width of every rendered frame, pixels
NUM_FRAMES = 17  # default clip length: 1 + 4k frames for the causal Wan VAE
FPS = 8

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated colours with max channel 255: far apart in RGB and in chromaticity, so the oracle
# can tell them apart even after MP4 (yuv420p) colour shifts or a dimmer generated object.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down")
LANGS: tuple[str, ...] = ("en", "zh")

# Unit velocity (dx, dy) in image coordinates (x to the right, y downwards) per motion.
MOTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
# The motion a reflection at a wall turns each motion into.
OPPOSITE_MOTION: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up"}

# Sampling ranges. Objects 24-32 px across survive the VAE's 8x spatial compression (3-4 latent
# pixels; DESIGN.md found 14-20 px lost the shape). 1-2.5 px/frame is 4-10 px per latent frame
# (4x temporal compression): visible motion across the 5 latent frames of a 17-frame clip.
SIZE_RANGE: tuple[float, float] = (24.0, 32.0)
SPEED_RANGE: tuple[float, float] = (1.0, 2.5)
# A sampled clip moves in the captioned direction for at least this many frames before its
# first reflection: half of a default clip's 16 steps, so the caption holds for the first half
# of every training clip (and "on average" over it), and with the speeds above a 17-frame clip
# holds at most one reflection (the next one is >= 32 / 2.5 frames later).
MIN_FRAMES_BEFORE_REFLECTION = 8

_ZH_COLOURS = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "cyan": "青色",
    "magenta": "品红色",
    "white": "白色",
}
_ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
_ZH_MOTIONS = {"left": "向左", "right": "向右", "up": "向上", "down": "向下"}


@dataclass(frozen=True)
class Factors:
    """The captioned factors of a clip: shape in SHAPES, colour in COLOURS, motion in MOTIONS."""

    shape: str
    colour: str
    motion: str

    def __post_init__(self) -> None:
        _check_factor("shape", self.shape, SHAPES)
        _check_factor("colour", self.colour, COLOURS)
        _check_factor("motion", self.motion, MOTIONS)


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render an endless clip.

    x, y: the object's bounding-box centre at frame 0, pixels (x right, y down); must keep the
    box inside the frame: size/2 <= x, y <= FRAME_SIZE - size/2.
    size: the bounding box side, pixels (circle diameter, square side, triangle base and height).
    speed: pixels per frame along the motion axis (>= 0).
    """

    shape: str
    colour: str
    motion: str
    x: float
    y: float
    size: float
    speed: float

    def __post_init__(self) -> None:
        Factors(self.shape, self.colour, self.motion)  # validates the factor names
        if not 0.0 < self.size <= FRAME_SIZE:
            raise ValueError(f"ClipSpec.size={self.size} must be in (0, {FRAME_SIZE}] pixels")
        if not self.speed >= 0.0:
            raise ValueError(f"ClipSpec.speed={self.speed} must be >= 0 pixels per frame")
        lo, hi = _centre_range(self.size)
        for name, value in (("x", self.x), ("y", self.y)):
            if not lo <= value <= hi:
                raise ValueError(
                    f"ClipSpec.{name}={value} puts a size-{self.size} object outside the frame; "
                    f"use a centre in [{lo}, {hi}]"
                )

    @property
    def factors(self) -> Factors:
        return Factors(self.shape, self.colour, self.motion)


def _check_factor(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(allowed)}")


def _centre_range(size: float) -> tuple[float, float]:
    """Range of the box centre that keeps a size-``size`` box inside the frame."""
    return size / 2.0, FRAME_SIZE - size / 2.0


def _as_rng(rng_or_seed: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool):
        return np.random.default_rng(int(rng_or_seed))
    raise TypeError(
        f"expected a numpy Generator or an int seed, got {type(rng_or_seed).__name__}"
    )


def sample_spec(
    rng_or_seed: np.random.Generator | int, factors: Factors | None = None
) -> ClipSpec:
    """Draw a random clip: uniform factors (unless ``factors`` fixes them), size, speed, centre.

    The centre along the motion axis is drawn so that the first reflection happens no earlier
    than frame MIN_FRAMES_BEFORE_REFLECTION; the other coordinate is uniform over the frame.
    """
    rng = _as_rng(rng_or_seed)
    # Draw every number in a fixed order whether or not ``factors`` is given, so the geometry
    # of sample i does not depend on which factors were requested.
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    motion = MOTIONS[rng.integers(len(MOTIONS))]
    size = float(rng.uniform(*SIZE_RANGE))
    speed = float(rng.uniform(*SPEED_RANGE))
    u_along, u_across = rng.uniform(size=2)
    if factors is not None:
        shape, colour, motion = factors.shape, factors.colour, factors.motion
    lo, hi = _centre_range(size)
    margin = min(MIN_FRAMES_BEFORE_REFLECTION * speed, hi - lo)
    dx, dy = MOTION_VECTORS[motion]
    sign = dx + dy  # +1 towards hi, -1 towards lo along the motion axis
    # Moving towards hi: start in [lo, hi - margin]; towards lo: start in [lo + margin, hi].
    along = lo + u_along * (hi - lo - margin) + (margin if sign < 0 else 0.0)
    across = lo + u_across * (hi - lo)
    x, y = (along, across) if dx != 0 else (across, along)
    return ClipSpec(shape, colour, motion, float(x), float(y), size, speed)


def trajectory(spec: ClipSpec, frames: np.ndarray) -> np.ndarray:
    """Box centres at the given frame indices: float64 [len(frames), 2] as (x, y) pixels.

    The unbounded path p0 + v*f is folded into [lo, hi] by a triangle wave: that is exactly a
    reflection at each wall, and being closed-form it gives the same frame whatever range is
    rendered.
    """
    frames = np.asarray(frames, dtype=np.float64)
    lo, hi = _centre_range(spec.size)
    dx, dy = MOTION_VECTORS[spec.motion]
    centres = np.empty(frames.shape + (2,), dtype=np.float64)
    for axis, (p0, unit) in enumerate(((spec.x, dx), (spec.y, dy))):
        centres[..., axis] = _fold(p0 + unit * spec.speed * frames, lo, hi)
    return centres


def _fold(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect positions into [lo, hi] (period 2 * (hi - lo)); all lo when the range is empty."""
    span = hi - lo
    if span <= 0.0:
        return np.full_like(p, lo)
    u = np.mod(p - lo, 2.0 * span)
    return lo + np.where(u <= span, u, 2.0 * span - u)


def direction_at(spec: ClipSpec, frame: int) -> str:
    """The direction of motion at ``frame`` (just after it): the caption's motion, or its
    opposite after an odd number of reflections."""
    dx, dy = MOTION_VECTORS[spec.motion]
    lo, hi = _centre_range(spec.size)
    p0 = spec.x if dx != 0 else spec.y
    span = hi - lo
    if span <= 0.0 or spec.speed == 0.0:
        return spec.motion
    u = np.mod(p0 - lo + (dx + dy) * spec.speed * frame, 2.0 * span)
    reflected = u >= span  # on the descending half of the triangle wave
    if not reflected:
        return spec.motion
    return OPPOSITE_MOTION[spec.motion]


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) from pixel centres to the shape's outline.

    dx, dy: pixel-centre offsets from the box centre. Exact inside; outside near corners the
    square and triangle forms underestimate the distance, which only affects the anti-aliasing
    of corner pixels.
    """
    if shape == "circle":
        return np.hypot(dx, dy) - half
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - half
    # Upright isosceles triangle: apex (0, -half), base corners (+-half, +half); bounding box
    # 2*half x 2*half and area 2*half^2, so its fill ratio is exactly 0.5.
    sides = (2.0 * np.abs(dx) - dy - half) / np.sqrt(5.0)
    base = dy - half
    return np.maximum(sides, base)


def render(spec: ClipSpec, num_frames: int = NUM_FRAMES, start_frame: int = 0) -> np.ndarray:
    """Render frames [start_frame, start_frame + num_frames) of the endless clip ``spec``.

    Returns uint8 [num_frames, FRAME_SIZE, FRAME_SIZE, 3]. Pixel coverage is 0.5 minus the
    signed distance, clipped to [0, 1] (one-pixel anti-aliasing): interior pixels carry the exact
    palette colour, and sub-pixel motion is visible, which the VAE and the oracle's centroid
    both rely on.
    """
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r} must be an integer >= 1")
    if not isinstance(start_frame, (int, np.integer)) or start_frame < 0:
        raise ValueError(f"start_frame={start_frame!r} must be an integer >= 0")
    frames = np.arange(start_frame, start_frame + num_frames)
    centres = trajectory(spec, frames)
    pixel_centres = np.arange(FRAME_SIZE, dtype=np.float64) + 0.5
    dx = pixel_centres[None, None, :] - centres[:, 0, None, None]  # [T, 1, W]
    dy = pixel_centres[None, :, None] - centres[:, 1, None, None]  # [T, H, 1]
    dx, dy = np.broadcast_arrays(dx, dy)
    coverage = np.clip(0.5 - _signed_distance(spec.shape, dx, dy, spec.size / 2.0), 0.0, 1.0)
    colour = np.asarray(PALETTE[spec.colour], dtype=np.float64)
    return np.rint(coverage[..., None] * colour).astype(np.uint8)


def caption(spec_or_factors: ClipSpec | Factors, lang: str = "en") -> str:
    """The caption of a clip in one language: one fixed template per language.

    en: "a red circle moving left"; zh: "一个红色的圆形向左移动".
    """
    f = spec_or_factors
    Factors(f.shape, f.colour, f.motion)
    if lang == "en":
        return f"a {f.colour} {f.shape} moving {f.motion}"
    if lang == "zh":
        return f"一个{_ZH_COLOURS[f.colour]}的{_ZH_SHAPES[f.shape]}{_ZH_MOTIONS[f.motion]}移动"
    raise ValueError(f"unknown caption language {lang!r}; choose one of {list(LANGS)}")


def _alternation(words: dict[str, str]) -> str:
    # Longest first so that no word matches as a prefix of another.
    return "|".join(re.escape(w) for w in sorted(words.values(), key=len, reverse=True))


_EN_PATTERN = re.compile(
    rf"a (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)}) "
    rf"moving (?P<motion>{'|'.join(MOTIONS)})"
)
_ZH_PATTERN = re.compile(
    rf"一个(?P<colour>{_alternation(_ZH_COLOURS)})的(?P<shape>{_alternation(_ZH_SHAPES)})"
    rf"(?P<motion>{_alternation(_ZH_MOTIONS)})移动"
)
_ZH_INVERSE = {
    "colour": {v: k for k, v in _ZH_COLOURS.items()},
    "shape": {v: k for k, v in _ZH_SHAPES.items()},
    "motion": {v: k for k, v in _ZH_MOTIONS.items()},
}


def caption_lang(text: str) -> str:
    """Language ("en" or "zh") of a caption made by ``caption``; fails like ``parse_caption``."""
    return _parse(text)[1]


def parse_caption(text: str) -> Factors:
    """Recover the factors of a caption in either language.

    Whitespace, English letter case and one trailing full stop ("." or "。") are ignored;
    anything else that is not one of the two templates raises ValueError.
    """
    return _parse(text)[0]


def _parse(text: str) -> tuple[Factors, str]:
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    normalised = " ".join(text.split()).lower()
    if normalised.endswith((".", "。")):
        normalised = normalised[:-1].rstrip()
    match = _EN_PATTERN.fullmatch(normalised)
    if match:
        return Factors(match["shape"], match["colour"], match["motion"]), "en"
    match = _ZH_PATTERN.fullmatch(normalised.replace(" ", ""))
    if match:
        inverse = {k: _ZH_INVERSE[k][match[k]] for k in ("shape", "colour", "motion")}
        return Factors(**inverse), "zh"
    raise ValueError(
        f"caption {text!r} is not a shapes-world caption; expected e.g. "
        f"{caption(Factors('circle', 'red', 'left'), 'en')!r} or "
        f"{caption(Factors('circle', 'red', 'left'), 'zh')!r} "
        f"(shapes {list(SHAPES)}, colours {list(COLOURS)}, motions {list(MOTIONS)})"
    )


def all_factors() -> list[Factors]:
    """The 84 factor combinations, ordered by shape, then colour, then motion."""
    return [Factors(s, c, m) for s, c, m in itertools.product(SHAPES, COLOURS, MOTIONS)]


def all_prompts(lang: str = "en") -> list[str]:
    """The 84 captions in one language, in ``all_factors`` order."""
    return [caption(f, lang) for f in all_factors()]


def eval_prompts(n: int, seed: int = 0) -> list[str]:
    """A deterministic, balanced list of ``n`` captions in both languages.

    Prompt i takes colour i mod 7, shape i mod 3 and (motion, language) from i mod 8, each
    through a seed-dependent permutation of that factor. As 7, 3 and 8 are pairwise coprime,
    i -> (i mod 7, i mod 3, i mod 8) is one-to-one on 0..167 (Chinese remainder theorem), so:
    every colour appears in any 7 consecutive prompts, every shape in any 3, every motion and
    both languages in any 8; n >= 168 contains each of the 168 (factors, language) pairs once.
    The list for n is a prefix of the list for any larger n with the same seed.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"eval_prompts needs n >= 1 prompts, got {n!r}")
    rng = np.random.default_rng(seed)
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))]
    motions = [MOTIONS[i] for i in rng.permutation(len(MOTIONS))]
    langs = [LANGS[i] for i in rng.permutation(len(LANGS))]
    prompts = []
    for i in range(n):
        factors = Factors(shapes[i % 3], colours[i % 7], motions[i % 4])
        prompts.append(caption(factors, langs[(i // 4) % 2]))
    return prompts
