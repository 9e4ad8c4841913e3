"""Typed configuration of the causal few-step student, with named presets.

Architecture numbers live here (never in YAML). ``dit`` is the teacher's ``DiTConfig`` type, so a
student and an expert of the same shape share every parameter name and shape; the student only
adds the guidance embedding. Facts: shared/reference/distill-anchors.md §2.2 (chunking, sink and
window sizes of Self-Forcing/LongLive), §2.4 (4-step sigma lists).

Streaming geometry, in latent frames: a chunk is ``chunk_frames`` frames; the KV cache keeps the
first ``sink_chunks`` chunks forever plus the latest ``window_chunks`` chunks, so a chunk attends
to at most ``(sink_chunks + window_chunks + 1) * chunk_frames`` frames. Choose the sizes so that
this span equals the clip length the student was trained on: then RoPE positions and attention
spans at inference equal those of training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from teacher.config import A14B, SHAPES, DiTConfig
from teacher.rope import ROPE_MAX_POSITIONS


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    """One causal student: its DiT shape, streaming geometry and default sampler.

    Attributes:
        name: preset name (informational; written to the student folder).
        teacher: name of the teacher preset the student is distilled from (``teacher.config``).
        dit: the WanModel shape (``teacher.config.DiTConfig``); ``patch_size[0]`` must be 1.
        chunk_frames: latent frames per chunk (one timestep per chunk).
        sink_chunks: first chunks kept in the KV cache forever (attention sink), >= 0.
        window_chunks: most recent chunks kept in the KV cache, >= 1.
        steps: student denoising steps per chunk.
        shift: resolution shift of the student's sigma list (``student.sampler.student_sigmas``):
            the training grid, and the sampling grid at step counts ``sampling_grids`` lacks.
        sampling_grids: tuned sampling sigma lists, one per step count (its length): each starts
            at 1, decreases strictly and stays above 0 (the final 0 is implied). Inference only:
            training keeps the shift grid (``student.sampler.sampling_sigmas``).
        guidance_default: guidance scale used when the user gives none (for the A14B students
            the teacher's low-noise expert CFG scale, which reproduces the teacher's default
            sampler; the shapes student's was chosen on held-out prompts).
        guidance_max: upper end of the guidance range the student is trained on
            (U[guidance_min, guidance_max]).
        guidance_min: lower end of that range, 1 (no guidance) unless stage B's
            ``guidance_min`` raised it.
        guidance_embedding: whether the model has the guidance embedding (False for the causal
            teachers of distillation stage A).
        num_train_timesteps: N of the flow-matching schedule (model timestep = trunc(sigma * N)).
        boundary: None for one network; else the student is two networks of ``dit``'s shape
            (``student.moe.MoEStudent``), the high-noise one running the steps with
            t >= boundary * num_train_timesteps: the teacher's expert switch.
    """

    name: str = "custom"
    teacher: str = "a14b"
    dit: DiTConfig
    chunk_frames: int
    sink_chunks: int
    window_chunks: int
    steps: int = 4
    shift: float
    guidance_default: float
    guidance_max: float
    guidance_min: float = 1.0
    guidance_embedding: bool = True
    num_train_timesteps: int = 1000
    boundary: float | None = None
    sampling_grids: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.dit.patch_size[0] != 1:
            raise ValueError(f"StudentConfig {self.name!r}: dit.patch_size={self.dit.patch_size}; "
                             f"the causal student needs a temporal patch of 1 (chunks are whole "
                             f"latent frames)")
        if self.chunk_frames < 1 or self.sink_chunks < 0 or self.window_chunks < 1:
            raise ValueError(f"StudentConfig {self.name!r}: chunk_frames={self.chunk_frames} "
                             f"(>= 1), sink_chunks={self.sink_chunks} (>= 0) and window_chunks="
                             f"{self.window_chunks} (>= 1) are out of range")
        if self.steps < 1:
            raise ValueError(f"StudentConfig {self.name!r}: steps={self.steps} must be >= 1")
        if not self.shift > 0:
            raise ValueError(f"StudentConfig {self.name!r}: shift={self.shift} must be > 0")
        if not 1.0 <= self.guidance_min <= self.guidance_default <= self.guidance_max:
            raise ValueError(f"StudentConfig {self.name!r}: need 1 <= guidance_min "
                             f"({self.guidance_min}) <= guidance_default ({self.guidance_default}) "
                             f"<= guidance_max ({self.guidance_max})")
        if self.boundary is not None and not 0.0 < self.boundary < 1.0:
            raise ValueError(f"StudentConfig {self.name!r}: boundary={self.boundary} must lie "
                             f"strictly between 0 and 1 (or be null for one network)")
        self._check_sampling_grids()
        if self.max_attended_frames > ROPE_MAX_POSITIONS:
            raise ValueError(f"StudentConfig {self.name!r}: a chunk attends to "
                             f"{self.max_attended_frames} frames, beyond the {ROPE_MAX_POSITIONS} "
                             f"RoPE positions; use fewer sink/window chunks")

    def _check_sampling_grids(self) -> None:
        lengths = [len(grid) for grid in self.sampling_grids]
        for grid in self.sampling_grids:
            ok = (len(grid) >= 1 and grid[0] == 1.0 and grid[-1] > 0
                  and all(a > b for a, b in zip(grid, grid[1:])))
            if not ok:
                raise ValueError(f"StudentConfig {self.name!r}: sampling grid {list(grid)} must "
                                 f"start at 1.0 and decrease strictly to a value above 0 (the "
                                 f"final 0 is implied), e.g. [1.0, 0.88, 0.55, 0.35]")
        if len(set(lengths)) != len(lengths):
            raise ValueError(f"StudentConfig {self.name!r}: sampling grids of lengths {lengths}; "
                             f"give at most one grid per step count")

    @property
    def guidance_range(self) -> tuple[float, float]:
        """The guidance scales the student accepts: [guidance_min, guidance_max], its training
        range (the engine, the evaluation and the server's protocol limits all check against
        this)."""
        return self.guidance_min, self.guidance_max

    @property
    def max_attended_frames(self) -> int:
        """Latent frames a chunk attends to once the cache is full (sink + window + itself)."""
        return (self.sink_chunks + self.window_chunks + 1) * self.chunk_frames

    def model_kwargs(self) -> dict:
        """Keyword arguments of ``student.causal_dit.CausalWanModel`` for this config."""
        return {**asdict(self.dit), "chunk_frames": self.chunk_frames,
                "guidance_embedding": self.guidance_embedding,
                "sink_chunks": self.sink_chunks, "window_chunks": self.window_chunks}


# The embedded shapes world: the teacher's SHAPES widths, one latent frame per chunk. A shapes clip
# is 17 frames = 5 latent frames, so sink 1 + window 3 + the current chunk spans exactly one
# training clip. Guidance is trained on [1, 3] around the teacher's 2: on [1, 5] the student
# spent most of its trajectories on scales where it draws poorly (73% joint at 3, 68.5% at 4 and 5)
# and scored 88% at its default; on [1, 3] the same recipe scores 92% (BENCHMARKS.md, session 11).
# Default 1.5: chosen on held-out prompts (prompt seed 1, not the evaluation's), where it scored
# 96% joint against 95% at 1 and 95.5% at 2.
# Sampling grids, chosen on the same held-out prompts among 26 grids and confirmed on three prompt
# sets never used to choose (1,400 prompts; BENCHMARKS.md, session 19): the shift-3 training grid
# [1, 0.9, 0.75, 0.5] leaves the low-noise network's last steps too noisy, and objects hold still
# or lose their corners. The 4-step grid keeps two high-noise steps (1, then just above the
# 0.875 switch) and moves the low-noise ones down: 97.7% joint against 94.6%, above the teacher's
# own UniPC 4 (95.3%). At 2 steps, the low-noise step at 0.65 instead of 0.75: 89.9% against
# 86.0% (tiny decoder).
SHAPES_STUDENT = StudentConfig(
    name="shapes", teacher=SHAPES.name, dit=SHAPES.dit, chunk_frames=1, sink_chunks=1,
    window_chunks=3, steps=4, shift=SHAPES.sampling.shift,
    guidance_default=1.5, guidance_max=3.0,
    sampling_grids=((1.0, 0.65), (1.0, 0.88, 0.55, 0.35)),
)

# Wan2.1-T2V-1.3B's shape (official config.json of that checkpoint), which shares the A14B
# teacher's VAE and text encoder. Chunks of 3 latent frames as Self-Forcing/CausVid; sink 3 +
# window 12 latent frames as LongLive, so a chunk attends to 18 <= 21 trained frames.
CAUSAL_1_3B = StudentConfig(
    name="causal-1.3b", teacher=A14B.name,
    dit=DiTConfig(dim=1536, ffn_dim=8960, freq_dim=256, num_heads=12, num_layers=30, in_dim=16,
                  out_dim=16, text_len=512, eps=1e-6, text_dim=4096),
    chunk_frames=3, sink_chunks=1, window_chunks=4, steps=4, shift=A14B.sampling.shift,
    guidance_default=A14B.sampling.guidance_low, guidance_max=5.0,
)

# One A14B expert's shape (dim 5120, 40 layers), initialised from the adapted low-noise expert.
CAUSAL_14B = StudentConfig(
    name="causal-14b", teacher=A14B.name, dit=A14B.dit, chunk_frames=3, sink_chunks=1,
    window_chunks=4, steps=4, shift=A14B.sampling.shift,
    guidance_default=A14B.sampling.guidance_low, guidance_max=5.0,
)

STUDENT_PRESETS: dict[str, StudentConfig] = {
    c.name: c for c in (SHAPES_STUDENT, CAUSAL_1_3B, CAUSAL_14B)
}


def student_preset(name: str) -> StudentConfig:
    """Return a named student preset, or fail naming the known ones."""
    try:
        return STUDENT_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown student preset {name!r}; known presets: {sorted(STUDENT_PRESETS)}"
        ) from None


def student_config_to_dict(config: StudentConfig) -> dict:
    """A JSON-ready dict of a StudentConfig (tuples become lists)."""
    values = asdict(config)
    # Defaults are left out, so that student folders and run identities written before the
    # fields existed read back as the same config.
    if values["guidance_min"] == 1.0:
        del values["guidance_min"]
    if not values["sampling_grids"]:
        del values["sampling_grids"]
    else:
        values["sampling_grids"] = [list(grid) for grid in values["sampling_grids"]]
    values["dit"] = {k: list(v) if isinstance(v, tuple) else v for k, v in values["dit"].items()}
    return values


def student_config_from_dict(data: dict, source: str = "student config") -> StudentConfig:
    """Rebuild a StudentConfig written by ``student_config_to_dict``; ``source`` names the file.

    Unknown fields are errors (a typo would otherwise silently take a default).
    """
    known = {f.name for f in fields(StudentConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    if "dit" not in data or not isinstance(data["dit"], dict):
        raise ValueError(f"{source}: missing the 'dit' object (the WanModel shape)")
    dit_known = {f.name for f in fields(DiTConfig)}
    dit_unknown = sorted(set(data["dit"]) - dit_known)
    if dit_unknown:
        raise ValueError(f"{source} [dit]: unknown field(s) {dit_unknown}; known: {sorted(dit_known)}")
    dit = DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["dit"].items()})
    grids = data.get("sampling_grids", ())
    try:
        if not isinstance(grids, (list, tuple)):
            raise TypeError
        grids = tuple(tuple(float(x) for x in grid) for grid in grids)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: sampling_grids must be a list of sigma lists such as "
                         f"[[1.0, 0.65], [1.0, 0.88, 0.55, 0.35]], got {grids!r}") from None
    try:
        return StudentConfig(**{**data, "dit": dit, "sampling_grids": grids})
    except TypeError as err:  # a required field is missing
        raise ValueError(f"{source}: {err}") from None
