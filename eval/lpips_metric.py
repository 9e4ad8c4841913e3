"""LPIPS with the ``lpips`` package, its ImageNet trunk read from a local file.

The ``lpips`` wheel ships only the calibrated 1x1 heads; the AlexNet/VGG/SqueezeNet trunks are
torchvision ImageNet files that no registry carries. They are looked up locally (an explicit path,
or torch hub's cache) and checked against the sha256 prefix torchvision publishes in their file
names, because torch hub does not check a pre-placed file. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from eval.unavailable import MetricUnavailable

# torchvision ImageNet weights used by lpips: file name and the sha256 prefix in that name.
TRUNK_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def torch_hub_checkpoints() -> Path:
    """Where torch hub keeps downloaded weights ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_prefix_of(path: Path, prefix_len: int = 8) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:prefix_len]


def find_trunk(net: str = "alex", path: str | os.PathLike | None = None) -> Path:
    """The verified trunk file for ``net``, or MetricUnavailable saying where to put it."""
    if net not in TRUNK_FILES:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(TRUNK_FILES)}")
    name = TRUNK_FILES[net]
    candidate = Path(path) if path else torch_hub_checkpoints() / name
    if not candidate.is_file():
        raise MetricUnavailable(
            f"LPIPS needs the torchvision ImageNet trunk {name} (not on any package registry); "
            f"place it at {candidate} or give its path (lpips_trunk in the eval config)"
        )
    expected = name.rsplit("-", 1)[-1].split(".")[0]
    found = sha256_prefix_of(candidate)
    if found != expected:
        raise MetricUnavailable(
            f"{candidate} has sha256 prefix {found}, expected {expected} for {name}: it is not the "
            f"torchvision file LPIPS was calibrated with"
        )
    return candidate


def load_lpips(net: str = "alex", trunk_path: str | os.PathLike | None = None,
               device: torch.device | str = "cpu") -> torch.nn.Module:
    """lpips.LPIPS (v0.1 heads) with the trunk from ``find_trunk``; eval mode, no gradients."""
    import lpips

    trunk = find_trunk(net, trunk_path)
    # pnet_rand=True builds the trunk without torchvision's download; the real weights follow.
    model = lpips.LPIPS(net=net, version="0.1", pnet_rand=True, verbose=False)
    load_trunk_weights(model, torch.load(trunk, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False).to(device)


def load_trunk_weights(model: torch.nn.Module, torchvision_state: dict) -> None:
    """Copy torchvision ``features.<i>.*`` tensors into lpips' ``net.slice<k>.<i>.*`` modules.

    lpips keeps torchvision's layer index as the child name inside each slice, so the index alone
    finds the tensor; every trunk parameter must be found (strict)."""
    targets = {name: p for name, p in model.net.named_parameters()}
    for name, param in targets.items():
        _, index, leaf = name.split(".")
        key = f"features.{index}.{leaf}"
        if key not in torchvision_state:
            raise MetricUnavailable(f"trunk file has no {key!r}; it is not a torchvision {type(model.net).__name__} file")
        source = torchvision_state[key]
        if source.shape != param.shape:
            raise MetricUnavailable(f"trunk key {key!r} has shape {list(source.shape)}, expected {list(param.shape)}")
        with torch.no_grad():
            param.copy_(source)


def _to_unit_range(video: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 [N,T,H,W,3] or float [N,T,H,W,3] in [-1,1] -> float [N*T,3,H,W] in [-1,1]."""
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"{name}: expected videos [N,T,H,W,3], got {list(video.shape)}")
    if video.dtype == torch.uint8:
        x = video.float() / 127.5 - 1.0
    else:
        x = video.float()
        lo, hi = float(x.min()), float(x.max())
        # torchmetrics checks only the lower bound, so a [0,255] tensor would pass silently there.
        if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
            raise ValueError(f"{name}: float videos must lie in [-1, 1], found [{lo:.3g}, {hi:.3g}]; "
                             f"pass uint8 frames or rescale with 2*x/255-1")
    return x.flatten(0, 1).permute(0, 3, 1, 2)


@torch.no_grad()
def lpips_per_video(model: torch.nn.Module, videos_a: torch.Tensor, videos_b: torch.Tensor,
                    batch_frames: int = 64) -> torch.Tensor:
    """Paired per-frame LPIPS averaged over frames: float [N] (one value per video pair)."""
    if videos_a.shape != videos_b.shape:
        raise ValueError(f"paired videos differ in shape: {list(videos_a.shape)} vs {list(videos_b.shape)}")
    n, t = videos_a.shape[:2]
    a, b = _to_unit_range(videos_a, "videos_a"), _to_unit_range(videos_b, "videos_b")
    device = next(model.parameters()).device
    out = torch.cat([model(a[i:i + batch_frames].to(device), b[i:i + batch_frames].to(device)).flatten().cpu()
                     for i in range(0, a.shape[0], batch_frames)])
    return out.view(n, t).mean(dim=1)
