"""`wan-distill generate`: bad input fails before any heavy work; a tiny teacher makes a real MP4."""

import pytest
import torch

from distill.cli import main, parse_size
from teacher.checkpoint import load_teacher
from teacher.pipeline import GenerationRequest, generate, initial_noise, validate_request
from teacher.video_io import read_video
from tests.tiny_teacher import tiny_models, write_official


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_official(tmp_path_factory.mktemp("tiny") / "teacher", tiny_models())


@pytest.mark.parametrize("field,value,message", [
    ("width", 840, "width 840 is not a positive multiple of 16"),
    ("height", 0, "height 0 is not a positive multiple of 16"),
    ("frames", 80, "frames 80 is not of the form 4k\\+1"),
    ("steps", 0, "steps 0 must be at least 1"),
    ("solver", "ddim", "unknown solver 'ddim'"),
    ("prompt", "   ", "the prompt is empty"),
    ("shift", -1.0, "shift -1.0 must be positive"),
])
def test_validate_request_names_value_and_fix(field, value, message):
    kwargs = {"prompt": "a cat", field: value}
    with pytest.raises(ValueError, match=message):
        validate_request(GenerationRequest(**kwargs))


def test_parse_size():
    assert parse_size("832*480") == (832, 480)
    assert parse_size("1280x720") == (1280, 720)
    with pytest.raises(Exception, match="WIDTH\\*HEIGHT"):
        parse_size("big")


@pytest.mark.parametrize("argv,message", [
    (["--size", "830*480"], "width 830"),
    (["--frames", "80"], "frames 80"),
    (["--steps", "0"], "steps 0"),
    (["--solver", "dpm"], "unknown solver"),
    (["--prompt", ""], "the prompt is empty"),
    (["--guidance", "4", "3", "2"], "gives 3 values; pass one"),
])
def test_cli_rejects_bad_input_before_loading(tmp_path, argv, message, monkeypatch):
    import teacher.checkpoint

    def forbidden(*a, **k):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(teacher.checkpoint, "load_teacher", forbidden)
    base = ["generate", "--checkpoint-dir", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "x.mp4")]
    with pytest.raises(SystemExit, match=message):
        main(base + argv)


def test_cli_checks_out_before_loading(tmp_path, monkeypatch):
    """A video path that cannot be written fails before sampling, not after it."""
    import teacher.checkpoint

    def forbidden(*a, **k):
        raise AssertionError("weights were loaded before --out was checked")

    monkeypatch.setattr(teacher.checkpoint, "load_teacher", forbidden)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    base = ["generate", "--checkpoint-dir", str(tmp_path), "--prompt", "a cat"]
    with pytest.raises(SystemExit, match=f"--out {blocker}/x.mp4: {blocker} is a file"):
        main(base + ["--out", str(blocker / "x.mp4")])
    with pytest.raises(SystemExit, match=f"--out {tmp_path} is a folder"):
        main(base + ["--out", str(tmp_path)])


def test_cli_missing_checkpoint_folder(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", "--checkpoint-dir", str(tmp_path / "absent"), "--prompt", "a cat",
              "--out", str(tmp_path / "x.mp4")])


def test_noise_is_per_sample_whatever_the_batch():
    batch = initial_noise((4, 2, 4, 4), [7, 8, 9])
    assert torch.equal(batch[1], initial_noise((4, 2, 4, 4), [8])[0])
    assert not torch.equal(batch[0], batch[1])


def test_generate_end_to_end_writes_mp4(ckpt, tmp_path, capsys):
    out = tmp_path / "video.mp4"
    assert main(["generate", "--checkpoint-dir", str(ckpt), "--prompt", "a red circle moving left",
                 "--frames", "9", "--seed", "3", "--quiet", "--out", str(out)]) == 0
    frames, fps = read_video(out)
    assert frames.shape == (9, 32, 32, 3)
    assert fps == 8
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"wrote {out} (9 frames 32x32 at 8 fps)") and "NFE 6" in summary


def test_same_seed_same_video_and_step_count(ckpt):
    models = load_teacher(ckpt)
    a = generate(models, GenerationRequest(prompt="a blue square", seed=1))
    b = generate(models, GenerationRequest(prompt="a blue square", seed=1))
    c = generate(models, GenerationRequest(prompt="a blue square", seed=2))
    assert a.video.shape == (5, 32, 32, 3) and a.video.dtype == torch.uint8
    assert torch.equal(a.video, b.video)
    assert not torch.equal(a.video, c.video)
    steps = []
    generate(models, GenerationRequest(prompt="x", steps=4, solver="euler"),
             on_step=lambda i, t, s: steps.append(t))
    assert len(steps) == 4 and steps == sorted(steps, reverse=True)


def test_decode_latents_decodes_in_sub_batches_each_clip_as_alone(monkeypatch):
    """More clips than DECODE_BATCH are decoded in calls of at most DECODE_BATCH, and every clip
    comes out as it does decoded alone (uint8, up to one level of convolution rounding)."""
    from teacher import pipeline

    models = tiny_models()
    clips = pipeline.DECODE_BATCH + 3
    shape = pipeline.latent_shape(models, 5, 32, 32)
    latents = torch.randn(clips, *shape, generator=torch.Generator().manual_seed(0))
    calls = []
    decode = models.vae.decode

    def spy(z):
        calls.append(z.shape[0])
        return decode(z)

    monkeypatch.setattr(models.vae, "decode", spy)
    with torch.no_grad():
        videos = pipeline.decode_latents(models, latents)
        alone = torch.cat([pipeline.decode_latents(models, latents[i:i + 1]) for i in range(clips)])
    assert calls[:2] == [pipeline.DECODE_BATCH, 3] and calls[2:] == [1] * clips
    assert videos.shape == (clips, 5, 32, 32, 3) and videos.dtype == torch.uint8
    assert (videos.int() - alone.int()).abs().max() <= 1
