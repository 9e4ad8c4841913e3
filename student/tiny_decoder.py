"""A tiny streaming decoder for the teacher's latents: frames at a fraction of the VAE's cost.

Why: once the student needs only a few passes per chunk, the Wan2.1 VAE decode is what a stream
waits for. On an H200 it was 2.8 s of the causal-1.3b student's 6.25 s for 81 frames at 832x480,
and on the CPU ~140 ms of the shapes student's ~450 ms per clip (BENCHMARKS.md). Live
generators swap in a tiny decoder for the same latents (Self-Forcing's TAEHV option, LightX2V's
LightTAE, Scope's ``tae``; shared/reference/streaming.md "Alternatives"). This is this project's
own design of that idea, trained here to reproduce one VAE's decoder (``distill.tiny_decoder``);
saved and loaded by ``student.tiny_decoder_checkpoint``.

Structure, per latent frame (coarsest resolution first):

    stem 3x3 conv -> ReLU
    for each level: memory blocks, then (between levels) a 1x1 conv that may split every frame
                    into two (time doubles), and a nearest 2x spatial upsample
    head 3x3 conv -> ``head_frames`` frames of 3 x patch^2 channels -> pixel shuffle by ``patch``

A memory block sees its own input and the input of the frame before it (zeros before the
stream's first frame): ``relu(x + conv(relu(conv(cat[x, x_prev]))))``. That is the decoder's
only temporal context, so a stream's state is one frame per block, of constant size, and the
frames of a chunk are computed side by side. No temporal convolution reaches further back.

Latents are the normalised ones the DiT produces (what ``WanVAE.decode_chunk`` takes). A stream's
first latent frame decodes to 1 frame and every later one to ``temporal_factor`` (4), as the
VAE: n latent frames give 1 + 4(n - 1) frames, in [-1, 1].
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from teacher.weight_files import CheckpointError

@dataclass(frozen=True)
class TinyDecoderConfig:
    """Shape of a ``TinyDecoder`` and the VAE it replaces.

    Args:
        z_dim: latent channels (the VAE's z_dim).
        channels: feature channels per resolution level, coarsest first.
        blocks: memory blocks per level.
        time_growth: per transition between levels (len(channels) - 1 of them), whether every
            frame splits into two there.
        head_frames: frames the head makes of each frame reaching it.
        patch: the head's pixel shuffle.
        vae_fingerprint: ``vae_fingerprint`` of the VAE whose decoder it was trained to
            reproduce ("" before training).
    """

    z_dim: int
    channels: tuple[int, ...]
    blocks: tuple[int, ...]
    time_growth: tuple[bool, ...]
    head_frames: int
    patch: int
    vae_fingerprint: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        object.__setattr__(self, "time_growth", tuple(bool(g) for g in self.time_growth))
        levels = len(self.channels)
        if self.z_dim < 1 or levels < 1 or any(c < 1 for c in self.channels):
            raise ValueError(f"TinyDecoderConfig: z_dim={self.z_dim} and channels="
                             f"{self.channels} must be positive, with at least one level")
        if len(self.blocks) != levels or any(b < 0 for b in self.blocks):
            raise ValueError(f"TinyDecoderConfig: blocks={self.blocks} needs one count >= 0 per "
                             f"level ({levels} levels)")
        if len(self.time_growth) != levels - 1:
            raise ValueError(f"TinyDecoderConfig: time_growth={self.time_growth} needs one flag "
                             f"per transition between levels ({levels - 1})")
        if self.head_frames < 1 or self.patch < 1:
            raise ValueError(f"TinyDecoderConfig: head_frames={self.head_frames} and "
                             f"patch={self.patch} must be >= 1")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channels) - 1) * self.patch

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.time_growth) * self.head_frames

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "tiny decoder config") -> TinyDecoderConfig:
        try:
            return cls(**data)
        except TypeError as err:
            raise CheckpointError(f"{where}: {err}; write it with save_tiny_decoder") from None

    def check_vae(self, vae) -> None:
        """Raise ValueError unless this decoder fits ``vae``'s latents and compression."""
        wanted = (vae.z_dim, vae.spatial_factor, vae.temporal_factor)
        have = (self.z_dim, self.spatial_factor, self.temporal_factor)
        if have != wanted:
            raise ValueError(f"a tiny decoder of (z_dim, spatial, temporal) = {have} cannot "
                             f"replace a VAE of {wanted}; train one for this VAE with "
                             f"`wan-distill train-decoder`")


# The shapes world's VAE: 4 latent channels, 4x in space and time. Chosen on the CPU: two levels
# (16x16 and 32x32 for a 64x64 clip) and a 2x pixel shuffle instead of a third level at 64x64,
# which made a training step ~4x slower (2.0 against 0.4 s at batch 16, measured in a probe).
SHAPES_TINY_DECODER = TinyDecoderConfig(z_dim=4, channels=(32, 16), blocks=(2, 2),
                                        time_growth=(True,), head_frames=2, patch=2)
# Only the shapes world has one: training renders shapes-world clips (distill.tiny_decoder), and
# a decoder for the A14B's VAE would need real videos and a GPU this project has not had for it.
TINY_DECODER_PRESETS = {"shapes": SHAPES_TINY_DECODER}


def vae_fingerprint(vae: nn.Module) -> str:
    """sha256 (first 16 hex digits) of a VAE's weights (names, shapes, dtypes, bytes) and of its
    latent statistics, which are constants outside the state dict: the decoder reads latents
    normalised by them."""
    digest = hashlib.sha256()
    stats = (getattr(vae, "latents_mean", None), getattr(vae, "latents_std", None))
    digest.update(repr(tuple(None if s is None else [float(v) for v in s] for s in stats)).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{list(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


class MemoryBlock(nn.Module):
    """Residual block over (this frame's input, the previous frame's input)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(torch.cat([x, previous], dim=1)))))


@dataclass
class TinyDecoderCache:
    """One stream's decoder state: each memory block's last input frame [B, 1, C, H, W]."""

    owner: int
    memory: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    frames_in: int = 0

    @property
    def started(self) -> bool:
        return self.frames_in > 0


class TinyDecoder(nn.Module):
    """Normalised latents -> video, frame-causal, with a constant-size stream state."""

    def __init__(self, config: TinyDecoderConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.stem = nn.Conv2d(config.z_dim, c[0], 3, padding=1)
        self.levels = nn.ModuleList(nn.ModuleList(MemoryBlock(ch) for _ in range(n))
                                    for ch, n in zip(c, config.blocks))
        self.transitions = nn.ModuleList(
            nn.Conv2d(c[i], c[i + 1] * (2 if config.time_growth[i] else 1), 1)
            for i in range(len(c) - 1))
        self.head = nn.Conv2d(c[-1], 3 * config.head_frames * config.patch ** 2, 3, padding=1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions (fan-in, ReLU gain) with zero biases; each memory block's
        last convolution and the head at zero, so blocks start as the identity and the decoder
        starts at the mid-grey frame.

        Measured on 4 clips (overfitting them, lr 1e-3, the training loss): with PyTorch's
        default initialisation the loss stayed near 0.2 (MSE 0.15) and every clip came out the
        same colourless blob; with Kaiming alone the first steps' large, sign-only L1 gradients
        switched off most ReLUs in front of the head and the output became one constant frame.
        With the zero head, MSE fell to 0.008 in 200 steps.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for level in self.levels:
            for block in level:
                nn.init.zeros_(block.conv2.weight)
        nn.init.zeros_(self.head.weight)

    # The VAE's attribute names, so code that sizes clips reads either.
    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    def new_decode_cache(self) -> TinyDecoderCache:
        """A fresh state for one latent stream (as ``WanVAE.new_decode_cache``)."""
        return TinyDecoderCache(owner=id(self))

    def decode_chunk(self, latents: torch.Tensor, cache: TinyDecoderCache,
                     clamp: bool = True) -> torch.Tensor:
        """Decode a stream's next n >= 1 latent frames [B, z_dim, n, h, w].

        Returns video [B, 3, T, h * spatial, w * spatial]: T = 1 + 4(n - 1) for the stream's
        first chunk, 4n after (4 = ``temporal_factor``). Joined over chunks it equals ``decode``
        of the whole clip up to float summation order. ``clamp=False`` skips the clamp to
        [-1, 1] (for training losses).
        """
        if not isinstance(cache, TinyDecoderCache) or cache.owner != id(self):
            raise ValueError("cache must come from this decoder's new_decode_cache(); start one "
                             "per stream")
        if (not isinstance(latents, torch.Tensor) or latents.ndim != 5
                or latents.shape[1] != self.z_dim or latents.shape[2] == 0):
            raise ValueError(f"latents have shape {list(getattr(latents, 'shape', []))}; expected "
                             f"[B, z_dim={self.z_dim}, n >= 1, h, w]")
        batch, _, n, h, w = latents.shape
        dtype = self.stem.weight.dtype
        x = self.stem(latents.to(dtype).permute(0, 2, 1, 3, 4).reshape(batch * n, -1, h, w))
        x, frames = F.relu(x), n
        for li, level in enumerate(self.levels):
            for bi, block in enumerate(level):
                frames_now = x.view(batch, frames, *x.shape[1:])
                last = cache.memory.get((li, bi))
                if last is None:
                    last = torch.zeros_like(frames_now[:, :1])
                elif last.shape[0] != batch or last.shape[2:] != frames_now.shape[2:]:
                    raise ValueError(f"latents of batch {batch} and size {h}x{w} do not continue "
                                     f"this stream; start a new cache")
                previous = torch.cat([last, frames_now[:, :-1]], dim=1).flatten(0, 1)
                cache.memory[(li, bi)] = frames_now[:, -1:]
                x = block(x, previous)
            if li < len(self.transitions):
                x = self.transitions[li](x)
                if self.config.time_growth[li]:
                    # [B*T, 2C, H, W] -> [B*2T, C, H, W]: channel halves are consecutive frames.
                    x = x.reshape(batch * frames * 2, x.shape[1] // 2, *x.shape[2:])
                    frames *= 2
                x = F.interpolate(x, scale_factor=2, mode="nearest")
        p, k = self.config.patch, self.config.head_frames
        y = self.head(x)
        y = F.pixel_shuffle(y.reshape(batch * frames * k, 3 * p * p, *y.shape[2:]), p)
        frames *= k
        video = y.reshape(batch, frames, 3, *y.shape[2:]).permute(0, 2, 1, 3, 4).float()
        if not cache.started:
            # The stream's first latent frame stands for one frame (the VAE's 1 + 4(n - 1)).
            video = video[:, :, self.temporal_factor - 1:]
        cache.frames_in += n
        return video.clamp(-1.0, 1.0) if clamp else video

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latents [B, z_dim, n, h, w] -> video [B, 3, 1 + 4(n - 1), H, W] in [-1, 1]."""
        return self.decode_chunk(latents, self.new_decode_cache(), clamp)
