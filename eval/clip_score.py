"""CLIP score with torchmetrics, the CLIP model read from a local folder.

torchmetrics 1.9.0 calls ``.norm()`` on what ``CLIPModel.get_image_features`` returns, which is a
``BaseModelOutputWithPooling`` under transformers >= 5 (torchmetrics issue #3407). It accepts a
callable returning (model, processor), so the model goes in wrapped in ``_FeatureTensors``, which
hands torchmetrics plain embedding tensors whatever the transformers version. The score is
computed per frame against the video's prompt and averaged over frames; torchmetrics reports
100*cos (clamped at 0 on the mean), and the raw cosine is that / 100.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from eval.unavailable import MetricUnavailable


class _FeatureTensors(torch.nn.Module):
    """A CLIPModel whose feature methods return tensors (unwrapping ``pooler_output``)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


def load_clip_score(clip_dir: str | os.PathLike | None, device: torch.device | str = "cpu",
                    sync_on_compute: bool = True):
    """A torchmetrics ``CLIPScore`` over the CLIP model in ``clip_dir`` (never the network).

    ``sync_on_compute=False`` keeps ``compute()`` local to this process: per-video scores are
    computed one video at a time, and a multi-process run gathers them in its own metric state.
    """
    if not clip_dir:
        raise MetricUnavailable(
            "CLIP score needs a local CLIP folder (e.g. a snapshot of openai/clip-vit-base-patch32 "
            "with config, weights, tokenizer and preprocessor files); give it as clip_dir"
        )
    folder = Path(clip_dir)
    if not (folder / "config.json").is_file():
        raise MetricUnavailable(f"{folder} is not a CLIP model folder (no config.json)")
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as err:
        raise MetricUnavailable(f"CLIP score needs transformers ({err}); pip install 'wan-distill[metrics]'") from None
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise MetricUnavailable(f"cannot load CLIP from {folder}: {err}") from None
    metric = CLIPScore(model_name_or_path=lambda: (_FeatureTensors(model), processor),
                       sync_on_compute=sync_on_compute)
    return metric.to(device)


@torch.no_grad()
def clip_score_per_video(metric, videos: torch.Tensor, prompts: list[str],
                         frames_per_video: int | None = 8) -> torch.Tensor:
    """100*cos(frame, prompt) averaged over (evenly sampled) frames: float [N].

    videos: uint8 [N,T,H,W,3]. Frames are sampled evenly when ``frames_per_video`` is set (the
    common CLIPSIM practice); the count is part of the protocol and is reported with the score.
    """
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected uint8 videos [N,T,H,W,3], got {videos.dtype} {list(videos.shape)}")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{videos.shape[0]} videos but {len(prompts)} prompts")
    t = videos.shape[1]
    idx = (torch.linspace(0, t - 1, frames_per_video).round().long()
           if frames_per_video and frames_per_video < t else torch.arange(t))
    scores = []
    for video, prompt in zip(videos, prompts):
        frames = video[idx].permute(0, 3, 1, 2)  # [k,3,H,W] in 0..255, as the CLIP processor wants
        metric.reset()
        metric.update(frames, [prompt] * len(frames))
        scores.append(float(metric.compute()))  # mean over the frames, clamped at 0 by torchmetrics
    return torch.tensor(scores)
