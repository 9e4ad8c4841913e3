"""Building blocks of the Wan2.1 causal video VAE (``teacher.vae.WanVAE``).

Numerics follow the official ``wan/modules/vae2_1.py`` (reference ``wan22-a14b.md`` §1.2, §5 item
12); module and attribute names follow its checkpoint keys, so ``Wan2.1_VAE.pth`` loads strictly.

Streaming memory. Every layer that looks at past frames reads and writes its state in a
``memory`` dict passed in by the caller and keyed by the layer object itself. Nothing is stored on
the modules, so one VAE can serve several streams at once, each with its own dict. The state is:

- ``CausalConv3d`` (temporal kernel > 1): its last ``CACHE_T`` = 2 input frames.
- ``Resample`` upsample3d: ``True`` once the first frame of the stream has passed.
- ``Resample`` downsample3d: the input frames not yet consumed by a stride-2 window.

With this state a stream can be cut into chunks of any length (as long as each chunk completes a
downsample3d window; WanVAE's chunk rules ensure that): the result equals one call on the whole
stream up to float rounding, because every temporal operation is causal and its state is exactly
the part of the past its kernel still needs. WanVAE runs the official pass sizes (1 frame, then 4;
one latent frame per decoder pass), so there the result is the same bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Frames of past input a causal 3x3x3 conv keeps between chunks (official CACHE_T = 2): its
# kernel spans the current frame and the two before it.
CACHE_T = 2

Memory = dict
"""Per-stream state: ``{layer: Tensor | bool}``, owned by an ``EncodeCache``/``DecodeCache``."""


class CausalConv3d(nn.Conv3d):
    """3D convolution whose temporal padding is all in front, so output t sees inputs <= t.

    Shapes: [B, C_in, T, H, W] -> [B, C_out, T', H', W'] (T' = T for stride 1 and padding p with
    kernel 2p+1). With ``memory``, the frames remembered from the previous chunk replace the
    front zero padding, so chunked calls equal one call on the concatenated input.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pad_t, pad_h, pad_w = padding if isinstance(padding, tuple) else (padding,) * 3
        # F.pad order is (w_left, w_right, h_top, h_bottom, t_front, t_back).
        self.time_pad = 2 * pad_t
        self.space_pad = (pad_w, pad_w, pad_h, pad_h)
        if self.time_pad > CACHE_T:
            raise ValueError(f"temporal padding {self.time_pad} exceeds the cache of {CACHE_T} "
                             f"frames")

    def forward(self, x: torch.Tensor, memory: Memory | None = None) -> torch.Tensor:
        front = self.time_pad
        if memory is not None and self.time_pad > 0:
            past = memory.get(self)
            if past is not None:
                x = torch.cat([past, x], dim=2)
                front -= past.shape[2]
            # clone: a slice would keep the whole chunk's storage alive until the next call.
            memory[self] = x[:, :, -self.time_pad:].clone()
        x = F.pad(x, (*self.space_pad, front, 0))
        if x.device.type == "cpu" and self.groups == 1 and self.dilation == (1, 1, 1):
            return self._conv_by_frames(x)
        return super().forward(x)

    def _conv_by_frames(self, x: torch.Tensor) -> torch.Tensor:
        """The same convolution as ``nn.Conv3d`` on padded ``x``, as one Conv2d per temporal tap
        over all output frames at once, summed.

        Why: on the CPU PyTorch runs Conv3d through its slow im2col kernel (``slow_conv3d``),
        while Conv2d goes through oneDNN; with the norm below it makes the shapes VAE's decode
        1.5x faster (tests/benchmarks/bench_vae_decode.py), equal up to float summation order
        (tested against ``F.conv3d``). CUDA keeps the plain Conv3d (cuDNN runs it well).
        """
        taps, stride_t = self.kernel_size[0], self.stride[0]
        batch, channels, frames, height, width = x.shape
        frames_out = (frames - taps) // stride_t + 1
        out = None
        for tap in range(taps):
            # Input frames tap, tap + stride_t, ... feed output frames 0, 1, ...
            window = x[:, :, tap:tap + stride_t * (frames_out - 1) + 1:stride_t]
            window = window.transpose(1, 2).reshape(batch * frames_out, channels, height, width)
            y = F.conv2d(window, self.weight[:, :, tap], self.bias if tap == 0 else None,
                         self.stride[1:])
            out = y if out is None else out + y
        return out.unflatten(0, (batch, frames_out)).transpose(1, 2).contiguous()


class ChannelRMSNorm(nn.Module):
    """Official ``RMS_norm``: ``F.normalize(x, dim=1) * sqrt(C) * gamma``.

    An L2 normalisation over channels (eps 1e-12 on the norm), equal to x / rms(x) * gamma; not
    ``torch.nn.RMSNorm`` (which adds eps inside the root and normalises the last dim).
    ``gamma`` is [C, 1, 1, 1] for video tensors and [C, 1, 1] for per-frame images.
    """

    def __init__(self, dim: int, spatial_dims: int = 3):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.normalize's math (x / max(||x||, 1e-12)), written out: its channel-dim norm
        # (linalg_vector_norm over a non-last dim) runs ~30x slower on the CPU than this sum. The
        # squares are summed in fp32, as the norm kernel accumulates them.
        norm = x.square().sum(1, keepdim=True, dtype=torch.float32).sqrt().clamp_min(1e-12)
        return (x / norm).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """norm-SiLU-conv-norm-SiLU-conv plus a shortcut: [B, C_in, T, H, W] -> [B, C_out, T, H, W].

    The list keeps the official Sequential's indices (``residual.{0,2,3,6}`` hold the weights); the
    official dropout (p=0.0) at index 5 is an identity here. The shortcut is a 1x1x1 conv when the
    width changes.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.ModuleList([
            ChannelRMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            ChannelRMSNorm(out_dim), nn.SiLU(), nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        ])
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        shortcut = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, memory) if isinstance(layer, CausalConv3d) else layer(x)
        return x + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately, plus identity.

    Frames never attend to each other, so the block is causal and needs no memory.
    [B, C, T, H, W] -> same shape.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        # As the official init: a fresh block starts as the identity.
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        identity = x
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, 1, c * 3, h * w)
        q, k, v = qkv.permute(0, 1, 3, 2).contiguous().chunk(3, dim=-1)  # each [b*t, 1, h*w, c]
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        x = self.proj(x).view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return x + identity


class NearestExactUpsample2x(nn.Module):
    """x2 spatial 'nearest-exact' upsampling of [N, C, H, W], computed in fp32 as officially."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Spatial x2 up/down-sampling of each frame, optionally with temporal x2 up/down-sampling.

    Modes (official names):
    - ``downsample2d``: ZeroPad2d(0,1,0,1) (right/bottom only) + 3x3 stride-2 conv: H,W -> H/2,W/2.
    - ``downsample3d``: the same, then ``time_conv`` (kernel 3, stride 2, no padding) over time.
      The first frame of a stream passes through alone; later windows start at even frame
      indices, so T frames become 1 + (T-1)/2.
    - ``upsample2d``: nearest-exact x2 (fp32) + 3x3 conv to C/2 channels.
    - ``upsample3d``: first ``time_conv`` (C -> 2C, causal kernel 3) whose two halves are
      interleaved in time, doubling T; then the upsample2d step. The first frame of a stream skips
      the time conv (the official 'Rep' sentinel), so T frames become 1 + 2(T-1); the time conv
      sees the stream from its second frame on, zero-padded in front.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r} is not one of {self.MODES}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(NearestExactUpsample2x(),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                          nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_time(x, memory)
        b, c, t, h, w = x.shape
        x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        x = x.view(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d":
            x = self._halve_time(x, memory)
        return x

    def _double_time(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        first = None
        if memory.get(self) is None:  # first frame of the stream: no temporal upsampling
            memory[self] = True
            first, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2] > 0:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, memory).reshape(b, 2, c, t, h, w)
            # Output frame 2i is half 0 of step i, frame 2i+1 is half 1.
            x = torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c, t * 2, h, w)
        if first is None:
            return x
        return first if x.shape[2] == 0 else torch.cat([first, x], dim=2)

    def _halve_time(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        outputs = []
        pending = memory.get(self)
        if pending is None:  # first frame of the stream passes through and starts the first window
            outputs.append(x[:, :, :1])
            pending, x = x[:, :, :1], x[:, :, 1:]
        frames = torch.cat([pending, x], dim=2)
        windows = (frames.shape[2] - 1) // 2
        if windows > 0:
            outputs.append(self.time_conv(frames[:, :, : 2 * windows + 1]))
        # The last frame of a window is the first of the next one.
        memory[self] = frames[:, :, 2 * windows:].clone()
        # WanVAE checks chunk lengths, so every chunk completes at least one window.
        assert outputs, "downsample3d got a chunk that completes no window"
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(dim: int, out_channels: int) -> nn.ModuleList:
    return nn.ModuleList([ChannelRMSNorm(dim), nn.SiLU(),
                          CausalConv3d(dim, out_channels, 3, padding=1)])


def _run_middle(middle: nn.ModuleList, x: torch.Tensor, memory: Memory) -> torch.Tensor:
    return middle[2](middle[1](middle[0](x, memory)), memory)


def _run_head(head: nn.ModuleList, x: torch.Tensor, memory: Memory) -> torch.Tensor:
    return head[2](head[1](head[0](x)), memory)


class Encoder3d(nn.Module):
    """Video [B, 3, T, H, W] -> moments [B, out_channels, T', H/2^s, W/2^s] (s = len(dim_mult)-1).

    Layout (official ``downsamples`` is one flat list): per stage i, ``num_res_blocks`` residual
    blocks from width dim*dim_mult[i-1] to dim*dim_mult[i], then a Resample unless i is the last
    stage (downsample3d where ``temperal_downsample[i]``); then middle [Res, Attn, Res] and head
    [norm, SiLU, conv].
    """

    def __init__(self, dim: int, out_channels: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temperal_downsample: tuple[bool, ...]):
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "downsample3d" if temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], out_channels)

    def forward(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        x = self.conv1(x, memory)
        for block in self.downsamples:
            x = block(x, memory)
        return _run_head(self.head, _run_middle(self.middle, x, memory), memory)


class Decoder3d(nn.Module):
    """Latents [B, z_dim, n, h, w] -> video [B, 3, T, h*2^s, w*2^s] (unclamped).

    Layout (official ``upsamples`` is one flat list): conv1, middle [Res, Attn, Res], then per
    stage i ``num_res_blocks + 1`` residual blocks and a Resample unless i is the last stage
    (upsample3d where ``temperal_upsample[i]``), then head [norm, SiLU, conv to 3]. Each upsample
    conv halves the width, so stages after the first start from half the previous width.
    """

    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temperal_upsample: tuple[bool, ...]):
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsample conv output C/2 channels
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
                blocks.append(Resample(out_dim, mode))
        self.upsamples = nn.ModuleList(blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        x = _run_middle(self.middle, self.conv1(x, memory), memory)
        for block in self.upsamples:
            x = block(x, memory)
        return _run_head(self.head, x, memory)
