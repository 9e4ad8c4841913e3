"""The Wan2.1 causal video VAE (``WanVAE``), the one Wan2.2-T2V-A14B uses.

Video [B, 3, T, H, W] in [-1, 1] with T = 4k+1 <-> normalised latents [B, 16, k+1, H/8, W/8]
(A14B config: dim 96, dim_mult [1,2,4,4], 2 res blocks, temporal downsampling [F,T,T]). Facts and
official line numbers: reference ``wan22-a14b.md`` §1.2 and §5 item 12; streaming use:
``streaming.md`` §3.

Time is causal everywhere, so both directions run chunk by chunk with a caller-owned cache:
encode takes 1 frame, then 4 at a time (the official chunking); decode takes any number of latent
frames per call (``decode_chunk``) and equals one whole-clip decode when the chunks are joined.
The caches live in ``EncodeCache``/``DecodeCache`` objects, never on the module, so several
sessions can share one VAE. The first latent frame decodes to 1 video frame, each later one to 4.

Latent normalisation (per channel, not in the state dict): encode returns (mu - mean) / std,
decode first undoes it. ``latents_mean``/``latents_std`` default to the official Wan2.1 constants
when z_dim == 16 and to the identity otherwise; a VAE trained here passes its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from teacher.vae_blocks import CausalConv3d, Decoder3d, Encoder3d, Memory

# Official Wan2.1 latent statistics (W22 vae2_1.py L629-639), used for z_dim == 16 by default.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass(eq=False)
class StreamCache:
    """What one stream through a WanVAE remembers between chunks; create with ``WanVAE.new_*``.

    ``memory`` maps each causal layer to its state (see ``teacher.vae_blocks``). The counters say
    how far the stream got: ``frames_in`` input frames consumed, ``frames_out`` frames produced.
    ``batch_shape`` is (B, H, W) of the first chunk; later chunks must match it.
    """

    owner: int  # id() of the WanVAE the cache belongs to
    memory: Memory = field(default_factory=dict)
    frames_in: int = 0
    frames_out: int = 0
    batch_shape: tuple[int, int, int] | None = None

    @property
    def started(self) -> bool:
        """True once the first chunk (the one whose first frame is special) has been processed."""
        return self.frames_in > 0


@dataclass(eq=False)
class EncodeCache(StreamCache):
    """Encoder state of one video stream (``frames_in`` video frames, ``frames_out`` latents)."""


@dataclass(eq=False)
class DecodeCache(StreamCache):
    """Decoder state of one latent stream (``frames_in`` latents, ``frames_out`` video frames)."""


_Statistics = tuple[float, ...] | None  # per-channel values, or None for identity


def _latent_statistics(z_dim: int, mean, std) -> tuple[_Statistics, _Statistics]:
    if (mean is None) != (std is None):
        raise ValueError("give both latents_mean and latents_std, or neither")
    if mean is None:
        if z_dim == 16:
            return WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
        return None, None  # identity: no official statistics exist for other widths
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != z_dim or len(std) != z_dim:
        raise ValueError(f"latents_mean/latents_std have {len(mean)}/{len(std)} values; "
                         f"z_dim is {z_dim}")
    if min(std) <= 0:
        raise ValueError(f"latents_std must be positive, got {std}")
    return mean, std


class WanVAE(nn.Module):
    """Wan2.1 causal video VAE; parameter names equal the official ``Wan2.1_VAE.pth`` keys.

    Args:
        dim: base width (official 96).
        z_dim: latent channels (16); the encoder emits 2*z_dim (mu and log-variance).
        dim_mult: width multiplier per stage; len(dim_mult)-1 spatial x2 downsamplings.
        num_res_blocks: residual blocks per encoder stage (the decoder uses one more).
        temperal_downsample: per downsampling stage, whether it also halves time (official
            spelling); the decoder mirrors it.
        latents_mean, latents_std: per-channel latent statistics; None = official constants for
            z_dim == 16, identity otherwise. Plain constants, not parameters or buffers.

    Runs in the parameters' dtype (fp32 officially); inputs are cast to it.
    """

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temperal_downsample: Sequence[bool] = (False, True, True),
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
    ):
        super().__init__()
        dim_mult, temperal_downsample = tuple(dim_mult), tuple(bool(v) for v in temperal_downsample)
        if len(temperal_downsample) != len(dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample has {len(temperal_downsample)} entries; it needs one per "
                f"downsampling stage, len(dim_mult) - 1 = {len(dim_mult) - 1}"
            )
        if min(dim, z_dim, num_res_blocks, *dim_mult) < 1:
            raise ValueError(f"dim {dim}, z_dim {z_dim}, num_res_blocks {num_res_blocks} and "
                             f"dim_mult {dim_mult} must all be positive")
        self.dim, self.z_dim, self.dim_mult = dim, z_dim, dim_mult
        self.num_res_blocks, self.temperal_downsample = num_res_blocks, temperal_downsample
        self.latents_mean, self.latents_std = _latent_statistics(z_dim, latents_mean, latents_std)
        self.temporal_factor = 2 ** sum(temperal_downsample)  # 4 for A14B
        self.spatial_factor = 2 ** (len(dim_mult) - 1)  # 8 for A14B

        self.encoder = Encoder3d(dim, 2 * z_dim, dim_mult, num_res_blocks, temperal_downsample)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, temperal_downsample[::-1])

    # ----------------------------------------------------------------- latent normalisation
    def normalize_latents(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw mu [B, z_dim, n, h, w] -> normalised latents, (mu - mean) * (1 / std)."""
        if self.latents_mean is None:
            return mu
        mean, inv_std = self._statistics(mu)
        return (mu - mean) * inv_std  # the official order of operations (L536-540)

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> raw, z / (1 / std) + mean (the official order, L547-551)."""
        if self.latents_mean is None:
            return z
        mean, inv_std = self._statistics(z)
        return z / inv_std + mean

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.latents_std, dtype=like.dtype, device=like.device)
        return mean, (1.0 / std).view(shape)

    # ----------------------------------------------------------------------------- encode
    def new_encode_cache(self) -> EncodeCache:
        """A fresh encoder state for one video stream."""
        return EncodeCache(owner=id(self))

    def encode_chunk(self, video: torch.Tensor, cache: EncodeCache) -> torch.Tensor:
        """Encode a stream's next frames [B, 3, t, H, W] -> normalised mu [B, z_dim, n, H/8, W/8].

        The first chunk has 1 + 4a frames and gives 1 + a latent frames; each later chunk has 4b
        frames (b >= 1) and gives b (4 = ``temporal_factor``). Joined over chunks of any such
        lengths it equals ``encode`` of the whole clip bit for bit.
        """
        return self.normalize_latents(self._moments_chunk(video, cache).chunk(2, dim=1)[0])

    def _moments_chunk(self, video: torch.Tensor, cache: EncodeCache) -> torch.Tensor:
        """The next frames of a stream -> raw moments [B, 2*z_dim, n, h, w] (mu then log_var)."""
        self._check_cache(cache, EncodeCache, "new_encode_cache")
        video = self._check_video(video, "encode_chunk")
        frames, f = video.shape[2], self.temporal_factor
        if not cache.started and (frames - 1) % f != 0:
            raise ValueError(f"the first chunk of a stream needs {f}k+1 frames (e.g. 1 or "
                             f"{f + 1}), got {frames}")
        if cache.started and (frames == 0 or frames % f != 0):
            raise ValueError(f"chunks after the first need a positive multiple of {f} frames, "
                             f"got {frames}")
        self._check_batch_shape(cache, video)
        # The official pass order: the stream's first frame alone, then f frames per pass. Each
        # pass yields one latent frame, memory stays bounded, and the result does not depend on
        # how the caller cut the stream (a longer pass is equal only up to float rounding, since
        # the convolutions then run with other shapes).
        starts = [0, *range(1, frames, f)] if not cache.started else list(range(0, frames, f))
        passes = []
        for start in starts:
            stop = 1 if start == 0 and not cache.started else start + f
            passes.append(self.conv1(self.encoder(video[:, :, start:stop], cache.memory)))
        cache.frames_in += frames
        cache.frames_out += len(passes)
        return torch.cat(passes, dim=2)

    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Video [B, 3, 4k+1, H, W] in [-1, 1] -> raw (mu, log_var), each [B, z_dim, k+1, H/8, W/8].

        Un-normalised (what a VAE trainer needs for the KL term); encoded 1, 4, 4, ... frames at a
        time with one cache, as officially.
        """
        video = self._check_video(video, "encode")
        frames, f = video.shape[2], self.temporal_factor
        if (frames - 1) % f != 0:
            raise ValueError(f"encode needs {f}k+1 frames (e.g. {f * 4 + 1} or {f * 20 + 1}), "
                             f"got {frames}; trim or pad the clip")
        mu, log_var = self._moments_chunk(video, self.new_encode_cache()).chunk(2, dim=1)
        return mu, log_var

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, 4k+1, H, W] in [-1, 1] -> normalised mu [B, z_dim, k+1, H/8, W/8].

        The posterior mean, not a sample, as the official encode.
        """
        return self.normalize_latents(self.encode_moments(video)[0])

    # ----------------------------------------------------------------------------- decode
    def new_decode_cache(self) -> DecodeCache:
        """A fresh decoder state for one latent stream (a streaming session owns one)."""
        return DecodeCache(owner=id(self))

    def decode_chunk(self, latents: torch.Tensor, cache: DecodeCache,
                     clamp: bool = True) -> torch.Tensor:
        """Decode the next n >= 1 normalised latent frames [B, z_dim, n, h, w] of a stream.

        Returns video [B, 3, T, 8h, 8w]: T = 1 + 4(n-1) for the stream's first chunk, 4n after.
        Joined over chunks of any lengths it equals ``decode`` of the whole latent clip bit for
        bit. Never decode the same latents twice with one cache: the cache would then hold them
        twice. ``clamp=False`` skips the final clamp to [-1, 1] (for training losses).
        """
        self._check_cache(cache, DecodeCache, "new_decode_cache")
        latents = self._check_latents(latents)
        self._check_batch_shape(cache, latents)
        # One latent frame per decoder pass, as officially: bounded activation memory, and the
        # output does not depend on how the stream was cut into chunks (see _moments_chunk).
        raw = self.denormalize_latents(latents)
        passes = [self.decoder(self.conv2(raw[:, :, i: i + 1]), cache.memory)
                  for i in range(latents.shape[2])]
        video = torch.cat(passes, dim=2)
        cache.frames_in += latents.shape[2]
        cache.frames_out += video.shape[2]
        return video.clamp(-1.0, 1.0) if clamp else video

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latents [B, z_dim, n, h, w] -> video [B, 3, 1 + 4(n-1), 8h, 8w] in [-1, 1].

        ``decode_chunk`` of the whole clip on a fresh cache.
        """
        return self.decode_chunk(latents, self.new_decode_cache(), clamp)

    # ------------------------------------------------------------------------- validation
    def _dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _check_video(self, video: torch.Tensor, where: str) -> torch.Tensor:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"{where}: expected video [B, 3, T, H, W], got shape "
                             f"{list(video.shape)}")
        if not video.is_floating_point():
            raise TypeError(f"{where}: video must be floating point in [-1, 1], got {video.dtype}")
        h, w, s = video.shape[3], video.shape[4], self.spatial_factor
        if h % s or w % s or h == 0 or w == 0:
            raise ValueError(f"{where}: height {h} and width {w} must be positive multiples of "
                             f"{s}; resize or crop the video")
        return video.to(self._dtype())

    def _check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 5 or latents.shape[1] != self.z_dim or latents.shape[2] == 0:
            raise ValueError(f"decode: expected latents [B, {self.z_dim}, n>=1, h, w], got shape "
                             f"{list(latents.shape)}")
        if not latents.is_floating_point():
            raise TypeError(f"decode: latents must be floating point, got {latents.dtype}")
        return latents.to(self._dtype())

    def _check_cache(self, cache: StreamCache, kind: type, factory: str) -> None:
        if not isinstance(cache, kind):
            raise TypeError(f"expected a {kind.__name__} from WanVAE.{factory}(), "
                            f"got {type(cache).__name__}")
        if cache.owner != id(self):
            raise ValueError(f"this {kind.__name__} was created by another WanVAE; make one "
                             f"with this model's {factory}()")

    @staticmethod
    def _check_batch_shape(cache: StreamCache, x: torch.Tensor) -> None:
        shape = (x.shape[0], x.shape[3], x.shape[4])
        if cache.batch_shape is None:
            cache.batch_shape = shape
        elif cache.batch_shape != shape:
            raise ValueError(f"chunk has (batch, height, width) {shape} but the stream started "
                             f"with {cache.batch_shape}; start a new cache for a new stream")
