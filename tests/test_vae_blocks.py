"""The VAE blocks' CPU fast paths against the plain PyTorch operations they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from teacher.vae_blocks import CausalConv3d, ChannelRMSNorm


@pytest.mark.parametrize("kernel, stride, padding", [
    (3, 1, 1),                       # the residual blocks' 3x3x3
    ((3, 1, 1), 1, (1, 0, 0)),       # upsample3d's time_conv
    ((3, 1, 1), (2, 1, 1), 0),       # downsample3d's time_conv: temporal stride 2
    (1, 1, 0),                       # a 1x1x1 shortcut
    ((3, 3, 3), (1, 2, 2), 1),       # a spatial stride
])
def test_causal_conv_by_frames_equals_conv3d(kernel, stride, padding):
    torch.manual_seed(0)
    conv = CausalConv3d(5, 7, kernel, stride=stride, padding=padding)
    x = torch.randn(2, 5, 7, 10, 12)
    pad_t, pad_h, pad_w = padding if isinstance(padding, tuple) else (padding,) * 3
    # The causal layout by hand: all temporal padding in front, spatial padding symmetric.
    expected = F.conv3d(F.pad(x, (pad_w, pad_w, pad_h, pad_h, 2 * pad_t, 0)), conv.weight,
                        conv.bias, conv.stride)
    got = conv(x)
    assert got.shape == expected.shape
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_causal_conv_by_frames_backpropagates_like_conv3d():
    torch.manual_seed(1)
    conv = CausalConv3d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 5, 6, 6, requires_grad=True)
    conv(x).square().sum().backward()
    grads = (x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad, conv.weight.grad, conv.bias.grad = None, None, None
    F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), conv.weight, conv.bias).square().sum().backward()
    for got, expected in zip(grads, (x.grad, conv.weight.grad, conv.bias.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_channel_rms_norm_equals_official_normalize(dtype, tol):
    torch.manual_seed(2)
    norm = ChannelRMSNorm(6)
    with torch.no_grad():
        norm.gamma.copy_(torch.rand(6, 1, 1, 1) + 0.5)
    x = torch.randn(2, 6, 3, 5, 5)
    x[0, :, 0, 0, 0] = 0.0  # an all-zero position: eps keeps it finite (zero), as F.normalize
    x = x.to(dtype)
    expected = F.normalize(x.float(), dim=1) * 6**0.5 * norm.gamma
    got = norm.to(dtype)(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
    assert torch.all(got[0, :, 0, 0, 0] == 0)
