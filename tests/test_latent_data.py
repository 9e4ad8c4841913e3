"""Data sources of the latent cache: a video folder with captions, and teacher-generated latents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.data.latents import (
    LatentShardDataset,
    LatentSource,
    PromptDataset,
    VideoFolderDataset,
    build_latent_cache,
)
from teacher.checkpoint import load_teacher
from teacher.pipeline import GenerationRequest, encode_prompts, initial_noise, latent_shape, \
    resolve_request, sample_latents
from teacher.video_io import write_mp4
from tests.tiny_teacher import tiny_models, write_official


def _clip(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth content (a gradient plus a flat square) survives mp4 compression well.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], -1)
    video = np.repeat(base[None], frames, 0).astype(np.uint8)
    top = int(rng.integers(0, height // 2))
    video[:, top: top + 8, 4:12] = [250, 20, 20]
    return video


def test_video_folder_reads_crops_and_captions(tmp_path):
    write_mp4(tmp_path / "a.mp4", _clip(9, 48, 80, 0), fps=8)
    (tmp_path / "a.txt").write_text("a red square\n")
    write_mp4(tmp_path / "b.mp4", _clip(9, 64, 64, 1), fps=8)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"video": "b.mp4", "caption": "blue"}) + "\n")
    ds = VideoFolderDataset(tmp_path, num_frames=5, height=32, width=32, frame_stride=2)
    assert len(ds) == 2 and ds.captions == ["a red square", "blue"]
    item = ds[0]
    assert item["video"].shape == (3, 5, 32, 32) and item["video"].dtype == torch.float32
    assert -1.0 <= item["video"].min() and item["video"].max() <= 1.0
    # 48x80 centre-cropped to 48x48 (columns 16..63), resized to 32x32: the red channel is the
    # x gradient, so the left edge is ~16/80*255 and the right ~63/80*255.
    red = (item["video"][0, 0] + 1) * 127.5
    assert abs(float(red[16, 0]) - 16 * 255 / 80) < 12
    assert abs(float(red[16, -1]) - 63 * 255 / 80) < 12


def test_video_folder_errors_name_the_file(tmp_path):
    write_mp4(tmp_path / "a.mp4", _clip(5, 32, 32, 0), fps=8)
    with pytest.raises(FileNotFoundError, match="no caption for .*a.mp4"):
        VideoFolderDataset(tmp_path, 5, 32, 32)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="a.mp4 has 5 frames, fewer than the 9"):
        VideoFolderDataset(tmp_path, 9, 32, 32)[0]
    with pytest.raises(ValueError, match="multiples of 8"):
        VideoFolderDataset(tmp_path, 5, 30, 32)
    (tmp_path / "captions.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="captions.jsonl:1"):
        VideoFolderDataset(tmp_path, 5, 32, 32)


def test_prompt_dataset_cycles_prompts_with_per_item_seeds():
    ds = PromptDataset(["a", "", "b"], num_items=5, seed=10)
    assert [ds[i]["caption"] for i in range(5)] == ["a", "b", "a", "b", "a"]
    assert [ds[i]["seed"] for i in range(5)] == [10, 11, 12, 13, 14]


def test_teacher_samples_equal_the_teacher_pipeline(tmp_path):
    teacher_dir = write_official(tmp_path / "teacher", tiny_models(seed=4))
    prompts = ("a red circle moving left", "一个蓝色正方形向上移动")
    source = LatentSource(kind="teacher_samples", num_clips=3, num_frames=5, seed=7,
                          prompts=prompts, steps=2)
    cache = build_latent_cache(tmp_path / "cache", source, str(teacher_dir), batch_size=2,
                               trainer_kwargs={"accelerator": "cpu", "devices": 1,
                                               "enable_progress_bar": False})
    ds = LatentShardDataset(cache)
    assert ds.indices == [0, 1, 2]
    models = load_teacher(teacher_dir)
    for i in range(3):
        prompt = prompts[i % 2]
        request = resolve_request(models, GenerationRequest(prompt=prompt, steps=2, frames=5))
        ctx = encode_prompts(models, [prompt, request.negative_prompt])
        noise = initial_noise(latent_shape(models, 5, request.height, request.width), [7 + i])
        expected, _ = sample_latents(models, ctx[:1], ctx[1:], noise, request)
        item = ds[i]
        assert item["caption"] == prompt
        # Same seed -> same latents, independent of the predict batch (2 + 1 items here).
        torch.testing.assert_close(item["latents"], expected[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(item["context"], ctx[0])
