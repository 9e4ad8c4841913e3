"""Typed configurations of the teacher's parts, with named presets.

Architecture numbers live here, never in YAML: a YAML recipe names a preset and sets run knobs.
Every field name equals the keyword argument of the module it configures, so a module is built
with ``Module(**dataclasses.asdict(cfg))``. The A14B values come from
``shared/reference/wan22-a14b.md`` (sections 1.1-1.3, 2, 3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# The official default negative prompt (Wan2.2 shared_config): used whenever the user gives none.
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class T5Config:
    """umT5 encoder-only transformer (``teacher.UMT5Encoder``)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 causal video VAE (``teacher.WanVAE``)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # official spelling
    # Per-channel latent normalisation (encode: (mu - mean) / std). None means the official Wan2.1
    # constants when z_dim == 16, identity otherwise; a VAE trained here stores its own.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class DiTConfig:
    """One WanModel expert (``teacher.WanModel``); fields are the official config.json fields."""

    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    text_len: int = 512
    eps: float = 1e-6
    text_dim: int = 4096
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True


@dataclass(frozen=True)
class SamplingConfig:
    """How the two-expert teacher samples by default (official generate.py + wan_t2v_A14B config)."""

    steps: int = 40
    shift: float = 12.0
    solver: str = "unipc"
    # t >= boundary * num_train_timesteps runs expert_high with guidance_high, else expert_low.
    boundary: float = 0.875
    num_train_timesteps: int = 1000
    guidance_high: float = 4.0
    guidance_low: float = 3.0
    frames: int = 81
    fps: int = 16
    width: int = 1280
    height: int = 720
    negative_prompt: str = OFFICIAL_NEGATIVE_PROMPT


@dataclass(frozen=True)
class TeacherConfig:
    """Everything that defines a two-expert teacher: its parts and its default sampler."""

    name: str
    t5: T5Config = field(default_factory=T5Config)
    vae: VAEConfig = field(default_factory=VAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Spatial / temporal compression of the VAE: latent = (16, (F-1)/4+1, H/8, W/8).
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    # Folder and file names inside a checkpoint directory (official layout).
    t5_checkpoint: str = "models_t5_umt5-xxl-enc-bf16.pth"
    vae_checkpoint: str = "Wan2.1_VAE.pth"
    tokenizer_dir: str = "google/umt5-xxl"
    expert_high_dir: str = "high_noise_model"
    expert_low_dir: str = "low_noise_model"

    def __post_init__(self) -> None:
        # vae_stride is what the pipeline sizes latents by; it must be what the VAE really does.
        implied = (2 ** sum(self.vae.temperal_downsample), 2 ** (len(self.vae.dim_mult) - 1),
                   2 ** (len(self.vae.dim_mult) - 1))
        if tuple(self.vae_stride) != implied:
            raise ValueError(
                f"TeacherConfig {self.name!r}: vae_stride={tuple(self.vae_stride)} but the VAE "
                f"(dim_mult={self.vae.dim_mult}, temperal_downsample="
                f"{self.vae.temperal_downsample}) compresses by {implied}; set vae_stride={implied}")


A14B = TeacherConfig(name="a14b")

# The embedded shapes-world teacher: the same classes at tiny widths (DESIGN.md, "The embedded
# default"). Its text encoder reads UTF-8 bytes, so English and Chinese captions both work.
# Widths here are what the shipped weights were trained with; change them only with new weights.
# The VAE compresses 4x in space, not the real 8x: at 64x64 an 8x latent (8x8) gives a 24-32 px
# object 3-4 latent pixels, and a VAE trained for minutes on a CPU then returns blobs whose fill
# ratio no longer tells a triangle from a circle (measured: 83% shape accuracy on its own
# reconstructions after 1,200 steps). The DiT's 4x4 patches keep the token grid the 8x VAE with 2x2
# patches would give (4x4 tokens per latent frame), so the experts cost the same. z_dim is 4 so a
# patch (4 x 4 x 4 = 64 values) fits the experts' 128-wide tokens: with 16 channels a patch held
# 256 values, more than the residual stream can carry, and flow matching stalled (loss ~0.8 after
# 4,000 steps; joint accuracy 9.5%). With 4 channels, a pretrained, frozen text encoder and
# 12,000 flow steps, run 5 reached 86% at the A14B's CFG 4/3; the low-noise expert's CFG is 2
# here, chosen on run 5 with held-out prompts (joint 96.5% there against 86.5% at 3: stronger
# guidance at low noise rounds the squares' corners). The shipped teacher is run 6, the same
# recipe with the experts trained in parallel: 92.0% at this default (BENCHMARKS.md).
SHAPES = TeacherConfig(
    name="shapes",
    t5=T5Config(vocab_size=259, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2,
                num_buckets=32),
    vae=VAEConfig(dim=8, z_dim=4, dim_mult=(1, 2, 4), num_res_blocks=1,
                  temperal_downsample=(True, True)),
    vae_stride=(4, 4, 4),
    dit=DiTConfig(dim=128, ffn_dim=512, freq_dim=64, num_heads=4, num_layers=4, in_dim=4,
                  out_dim=4, text_len=64, text_dim=64, patch_size=(1, 4, 4)),
    sampling=SamplingConfig(steps=40, shift=3.0, guidance_high=4.0, guidance_low=2.0, frames=17,
                            fps=8, width=64, height=64, negative_prompt=""),
    t5_checkpoint="text_encoder.safetensors",
    vae_checkpoint="vae.safetensors",
    tokenizer_dir="tokenizer",
)

TEACHER_PRESETS: dict[str, TeacherConfig] = {"a14b": A14B, "shapes": SHAPES}


def teacher_preset(name: str) -> TeacherConfig:
    """Return a named teacher preset, or fail naming the known ones."""
    try:
        return TEACHER_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown teacher preset {name!r}; known presets: {sorted(TEACHER_PRESETS)}"
        ) from None



def teacher_config_to_dict(config: TeacherConfig) -> dict:
    """A JSON-ready dict of a TeacherConfig (tuples become lists)."""
    return asdict(config)


def _from_dict(cls, values: dict, where: str):
    """Build dataclass ``cls`` from a dict: lists become tuples, unknown fields are errors."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def teacher_config_from_dict(data: dict, source: str = "teacher config") -> TeacherConfig:
    """Rebuild a TeacherConfig written by ``teacher_config_to_dict``; ``source`` names the file."""
    parts = {"t5": T5Config, "vae": VAEConfig, "dit": DiTConfig, "sampling": SamplingConfig}
    if "name" not in data:
        raise ValueError(f"{source}: missing field 'name'")
    values = dict(data)
    for key, cls in parts.items():
        if key in values:
            values[key] = _from_dict(cls, values[key], f"{source} [{key}]")
    return _from_dict(TeacherConfig, values, source)
