"""The shapes-world teacher shipped in teacher/weights/shapes: strict load, official layout, and
what its videos get right (the issue's exact command, then both languages from Python).

The shipped teacher (run 6) renders the captioned object, colour and direction in most videos
(BENCHMARKS.md, "Shapes teacher"); squares are its weakest value. These tests hold it to the
object and its colour for fixed seeds, and over a fixed set of prompts to every factor.
"""

from dataclasses import asdict, replace

import pytest
import torch

from distill.cli import main
from distill.teacher_training.evaluate import evaluate_teacher
from student.paths import embedded_teacher_dir
from eval.oracle import judge
from teacher.checkpoint import detect_layout, load_teacher
from teacher.config import SHAPES
from teacher.dit import WanModel
from teacher.pipeline import GenerationRequest, generate
from teacher.vae import WanVAE
from teacher.video_io import read_video
from teacher.weight_files import safetensors_keys, weight_files_in

SHIPPED = embedded_teacher_dir()


@pytest.fixture(scope="module")
def models():
    return load_teacher(SHIPPED)


def test_shipped_folder_has_the_official_layout_and_exact_keys():
    assert detect_layout(SHIPPED) == "official"
    for sub in (SHAPES.expert_high_dir, SHAPES.expert_low_dir):
        keys = safetensors_keys(weight_files_in(SHIPPED / sub))
        assert keys == set(WanModel(**asdict(SHAPES.dit)).state_dict())
    assert safetensors_keys([SHIPPED / SHAPES.vae_checkpoint]) == set(
        WanVAE(**asdict(SHAPES.vae)).state_dict())
    assert (SHIPPED / SHAPES.tokenizer_dir).is_dir()


def test_shipped_config_is_the_shapes_preset_plus_its_latent_statistics(models):
    config = models.config
    assert len(config.vae.latents_mean) == len(config.vae.latents_std) == SHAPES.vae.z_dim
    assert all(s > 0 for s in config.vae.latents_std)
    assert replace(config, vae=replace(config.vae, latents_mean=None, latents_std=None)) == SHAPES


def test_issue_command_writes_a_video_of_the_captioned_object(tmp_path):
    out = tmp_path / "x.mp4"
    assert main(["generate", "--prompt", "a red circle moving left", "--quiet",
                 "--out", str(out)]) == 0
    frames, fps = read_video(out)
    assert frames.shape == (17, 64, 64, 3) and fps == 8
    verdict = judge(frames)  # after the MP4 round trip, as a user would see it
    assert verdict.found and verdict.colour == "red", verdict


@pytest.mark.parametrize("prompt, colour", [("a blue square moving up", "blue"),
                                            ("一个黄色的三角形向右移动", "yellow"),
                                            ("一个青色的圆形向下移动", "cyan")])
def test_fixed_seed_videos_show_the_captioned_colour_in_both_languages(models, prompt, colour):
    video = generate(models, GenerationRequest(prompt=prompt, seed=0)).video
    assert video.shape == (17, 64, 64, 3) and video.dtype == torch.uint8
    verdict = judge(video.numpy())
    assert verdict.found and verdict.colour == colour, verdict


def test_fixed_prompts_show_every_captioned_factor(models):
    """24 seeded prompts (both languages, every shape and direction) at the default sampler.
    Run 3, whose experts could not read the direction word, scored motion 21% (chance 25%) and
    joint 14% over 200 prompts; run 4, which drew squares round, joint 44.5%."""
    result = evaluate_teacher(models, num_prompts=24, batch_size=24, progress=False)
    assert set(result["by_factor_value"]["motion"]) == {"left", "right", "up", "down"}
    assert set(result["by_factor_value"]["shape"]) == {"circle", "square", "triangle"}
    assert result["overall"]["colour"] == 1.0
    assert result["overall"]["motion"] >= 0.8 and result["overall"]["joint"] >= 0.8, result["overall"]


def test_shipped_tiny_decoder_loads_beside_this_vae_and_draws_the_encoded_clips(models):
    """The tiny decoder in teacher/weights/shapes/tiny_decoder was trained for this VAE (its
    fingerprint matches) and decodes encoded world clips into what they show."""
    import numpy as np

    from distill.data.shapes import video_to_tensor
    from eval.oracle import accuracy
    from eval.shapes_world import render, sample_spec
    from student.tiny_decoder_checkpoint import TINY_DECODER_FOLDER, load_tiny_decoder
    from teacher.pipeline import video_to_uint8

    tiny = load_tiny_decoder(embedded_teacher_dir() / TINY_DECODER_FOLDER, models.vae)
    specs = [sample_spec(np.random.default_rng([123, i])) for i in range(8)]
    clips = torch.stack([video_to_tensor(render(s, 17)) for s in specs])
    with torch.no_grad():
        video = video_to_uint8(tiny.decode(models.vae.encode(clips)))
    assert video.shape == (8, 17, 64, 64, 3)
    result = accuracy(video.numpy(), specs)
    assert result["colour"] == 1.0 and result["joint"] >= 6 / 8, result
