"""Run knobs for training the embedded shapes-world teacher, one typed config per stage.

Architecture numbers come from a teacher preset (``teacher.config``); a YAML recipe such as
``configs/teacher/shapes.yaml`` names the preset and sets only what is here: steps, batch sizes,
learning rates, loss weights, seeds and folders.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class VAEPhase:
    """A stretch of VAE training with one clip length and batch size.

    frames: clip length, 1 + 4k. frames == 1 trains on still frames (one random frame of each
    clip), which teaches the spatial code at a fraction of a clip's cost.
    """

    steps: int
    frames: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"vae phase steps={self.steps} must be >= 0")
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"vae phase frames={self.frames} must be 1 + 4k (1, 5, 9, 13 or 17)")
        if self.batch_size < 1:
            raise ValueError(f"vae phase batch_size={self.batch_size} must be >= 1")


@dataclass(frozen=True)
class VAEStageConfig:
    """Stage 1: the VAE, trained as a reconstruction autoencoder with a small KL term."""

    # Defaults here are the shipped recipe, configs/teacher/shapes.yaml (a test keeps them equal).
    phases: tuple[VAEPhase, ...] = (VAEPhase(1000, 1, 16), VAEPhase(300, 17, 4))
    lr: float = 2e-3
    warmup_steps: int = 50
    final_lr_fraction: float = 0.05  # cosine decay to lr * this at the last step
    # Pixels of the object (dilated by ``foreground_dilation`` px) weigh this much more than the
    # black background: a plain L1 is minimised by an all-black output (DESIGN.md).
    foreground_weight: float = 20.0
    foreground_dilation: int = 2
    # Extra weight on the band within foreground_dilation px of the outline (inside and out).
    boundary_weight: float = 20.0
    # L1 between spatial finite differences of output and target: keeps edges and corners,
    # which the oracle's fill ratio (shape) depends on.
    edge_weight: float = 1.0
    kl_weight: float = 1e-4
    # Scale of the posterior noise in z = mu + posterior_noise * exp(log_var / 2) * eps; 0 trains
    # a plain autoencoder (the KL term then only keeps mu near the origin).
    posterior_noise: float = 1.0
    val_clips: int = 32
    checkpoint_every: int = 100

    @property
    def steps(self) -> int:
        return sum(p.steps for p in self.phases)


@dataclass(frozen=True)
class LatentStageConfig:
    """Stage 2: the world encoded once into latents (mu and log-variance) for the flow stage."""

    num_videos: int = 3000
    batch_size: int = 32


@dataclass(frozen=True)
class TextStageConfig:
    """Stage 3: the text encoder pretrained to make every caption token carry the caption's factors
    (``distill.teacher_training.text_pretraining``); 0 steps leaves it randomly initialised."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"text steps={self.steps} must be >= 0 (0 skips the pretraining)")
        if self.batch_size < 1:
            raise ValueError(f"text batch_size={self.batch_size} must be >= 1")


@dataclass(frozen=True)
class FlowStageConfig:
    """Stage 4: expert_high + expert_low (and the text encoder unless text_lr is 0) trained by
    flow matching."""

    steps: int = 12000
    batch_size: int = 16
    lr: float = 1e-3
    # 0 freezes the pretrained text encoder, as the real teacher's umT5 is frozen.
    text_lr: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1
    # Fraction of captions replaced by the empty caption, so the model learns the unconditional
    # velocity classifier-free guidance needs (the shapes preset's negative prompt is "").
    caption_dropout: float = 0.1
    # Fraction of every batch given to expert_high (t >= boundary * 1000); the rest goes to
    # expert_low (t below the boundary).
    high_fraction: float = 0.5
    # Training sigmas are shift(u) with u uniform over each expert's range; 1.0 = uniform sigma.
    train_shift: float = 3.0
    # Gradient-norm clip (0 = none): a guard for the high learning rates a short CPU budget wants.
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_start_step: int = 100
    checkpoint_every: int = 500
    # Train the two experts at once, each in its own process with half the threads. With a frozen
    # text encoder they share nothing, and on a 2-core CPU two one-thread processes make ~1.7x
    # more steps per second than one two-thread process, whose small ops do not parallelise.
    # Each expert then gets its own gradient clip and its own stream of batches.
    parallel_experts: bool = True

    def __post_init__(self) -> None:
        if self.parallel_experts and self.text_lr > 0:
            raise ValueError(f"flow parallel_experts needs text_lr 0 (got {self.text_lr}): a text "
                             f"encoder fine-tuned through both experts cannot be split between two "
                             f"processes; set parallel_experts: false")
        if self.text_lr < 0:
            raise ValueError(f"flow text_lr={self.text_lr} must be >= 0 (0 freezes the text encoder)")
        if self.grad_clip < 0:
            raise ValueError(f"flow grad_clip={self.grad_clip} must be >= 0 (0 turns clipping off)")


@dataclass(frozen=True)
class TeacherTrainingConfig:
    """A whole teacher-training run."""

    preset: str = "shapes"
    seed: int = 0
    # None: the embedded teacher folder the package loads by default (teacher/weights/shapes)
    # and $WAN_DISTILL_HOME/runs/teacher-shapes, whatever the working directory.
    out_dir: str | None = None
    work_dir: str | None = None
    # torch threads; on a CPU shared with other jobs, fewer threads than cores avoids spinning.
    num_threads: int = 2
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    latents: LatentStageConfig = field(default_factory=LatentStageConfig)
    text: TextStageConfig = field(default_factory=TextStageConfig)
    flow: FlowStageConfig = field(default_factory=FlowStageConfig)
    # Optional overrides of the preset's sampling defaults (e.g. {"shift": 2.0}); must be fields
    # of teacher.config.SamplingConfig.
    sampling: dict[str, Any] = field(default_factory=dict)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**values)


def training_config_from_dict(data: dict, source: str = "teacher training config") -> TeacherTrainingConfig:
    """Build a TeacherTrainingConfig from a (YAML-loaded) dict; unknown keys are errors."""
    values = dict(data)
    if "vae" in values:
        vae = dict(values["vae"])
        if "phases" in vae:
            vae["phases"] = tuple(_build(VAEPhase, p, f"{source} [vae.phases]") for p in vae["phases"])
        values["vae"] = _build(VAEStageConfig, vae, f"{source} [vae]")
    if "latents" in values:
        values["latents"] = _build(LatentStageConfig, values["latents"], f"{source} [latents]")
    if "text" in values:
        values["text"] = _build(TextStageConfig, values["text"], f"{source} [text]")
    if "flow" in values:
        values["flow"] = _build(FlowStageConfig, values["flow"], f"{source} [flow]")
    return _build(TeacherTrainingConfig, values, source)


def load_training_config(config: str | Path | dict | TeacherTrainingConfig) -> TeacherTrainingConfig:
    """A TeacherTrainingConfig from a YAML path, a dict or an instance (returned as is)."""
    if isinstance(config, TeacherTrainingConfig):
        return config
    if isinstance(config, dict):
        return training_config_from_dict(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"teacher training config {path} does not exist; pass e.g. "
                                f"configs/teacher/shapes.yaml")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return training_config_from_dict(data, str(path))


def training_config_to_dict(config: TeacherTrainingConfig) -> dict:
    """A YAML/JSON-ready dict (tuples become lists)."""
    data = asdict(config)
    data["vae"]["phases"] = [dict(p) for p in data["vae"]["phases"]]
    return data
