"""The tiny streaming decoder: shapes, streaming = whole-clip decode, frame causality, loading
guarded by the VAE's fingerprint, and its training run (loss, resume, the written folder)."""

import json
from dataclasses import replace

import pytest
import torch

from distill.tiny_decoder import (
    DecoderTrainingSettings,
    TinyDecoderTraining,
    decoder_loss,
    motion_l1,
    summary_line,
    train_decoder,
    uint8_to_video,
)
from student.tiny_decoder import (
    SHAPES_TINY_DECODER,
    TinyDecoder,
    TinyDecoderConfig,
    vae_fingerprint,
)
from student.tiny_decoder_checkpoint import load_tiny_decoder, save_tiny_decoder
from teacher.vae import WanVAE
from tests.tiny_teacher import TINY, TINY_DECODER as SMALL, tiny_models


def _random(config: TinyDecoderConfig, seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    decoder = TinyDecoder(config).eval()
    with torch.no_grad():  # non-zero biases too, so that zero padding cannot hide a leak
        for p in decoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return decoder


@pytest.mark.parametrize("config,latent_hw", [(SHAPES_TINY_DECODER, 16), (SMALL, 4)])
def test_frames_and_size_follow_the_vae_rule(config, latent_hw):
    decoder = _random(config)
    z = torch.randn(2, config.z_dim, 3, latent_hw, latent_hw)
    with torch.no_grad():
        video = decoder.decode(z)
    side = latent_hw * config.spatial_factor
    assert config.temporal_factor == 4
    assert video.shape == (2, 3, 1 + 4 * 2, side, side) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1


def test_streaming_chunks_equal_the_whole_clip():
    decoder = _random(SMALL)
    z = torch.randn(1, 16, 5, 4, 4)
    with torch.no_grad():
        whole = decoder.decode(z)
        cache = decoder.new_decode_cache()
        parts = [decoder.decode_chunk(z[:, :, a:b], cache) for a, b in ((0, 1), (1, 3), (3, 5))]
    assert [p.shape[2] for p in parts] == [1, 8, 8]
    assert cache.frames_in == 5
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=1e-5)


def test_a_latent_frame_changes_no_earlier_frame():
    decoder = _random(SMALL)
    z = torch.randn(1, 16, 4, 4, 4)
    changed = z.clone()
    changed[:, :, 2] += 1.0
    with torch.no_grad():
        a, b = decoder.decode(z, clamp=False), decoder.decode(changed, clamp=False)
    first_affected = 1 + 4 * (2 - 1)  # latent 2 decodes to frames 5..8
    assert torch.equal(a[:, :, :first_affected], b[:, :, :first_affected])
    assert not torch.allclose(a[:, :, first_affected:first_affected + 4],
                              b[:, :, first_affected:first_affected + 4])


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="time_growth"):
        TinyDecoderConfig(z_dim=4, channels=(8, 8), blocks=(1, 1), time_growth=(), head_frames=2,
                          patch=2)
    with pytest.raises(ValueError, match="blocks"):
        replace(SMALL, blocks=(1, 1))
    vae = WanVAE(**{**TINY.vae.__dict__})
    with pytest.raises(ValueError, match=r"cannot replace a VAE of \(16, 8, 4\)"):
        SHAPES_TINY_DECODER.check_vae(vae)
    decoder, other = _random(SMALL), _random(SMALL)
    with pytest.raises(ValueError, match="new_decode_cache"):
        decoder.decode_chunk(torch.randn(1, 16, 1, 4, 4), other.new_decode_cache())
    with pytest.raises(ValueError, match="z_dim=16"):
        decoder.decode(torch.randn(1, 4, 1, 4, 4))
    cache = decoder.new_decode_cache()
    with torch.no_grad():
        decoder.decode_chunk(torch.randn(1, 16, 1, 4, 4), cache)
        with pytest.raises(ValueError, match="do not continue this stream"):
            decoder.decode_chunk(torch.randn(2, 16, 1, 4, 4), cache)


def test_saved_decoder_loads_only_beside_its_vae(tmp_path):
    models = tiny_models()
    fingerprint = vae_fingerprint(models.vae)
    decoder = _random(replace(SMALL, vae_fingerprint=fingerprint))
    folder = save_tiny_decoder(tmp_path / "tiny_decoder", decoder)
    loaded = load_tiny_decoder(folder, models.vae)
    assert loaded.config == decoder.config and loaded.config.vae_fingerprint == fingerprint
    assert not any(p.requires_grad for p in loaded.parameters())
    z = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), decoder.decode(z))
    # Another VAE of the same shape (other weights) must not take this decoder.
    other = tiny_models(seed=5).vae
    assert vae_fingerprint(other) != fingerprint
    with pytest.raises(ValueError, match="retrain it with `wan-distill train-decoder`"):
        load_tiny_decoder(folder, other)
    # The latent statistics are part of what the decoder reads.
    shifted = WanVAE(**{**TINY.vae.__dict__, "latents_mean": (0.5,) * 16,
                        "latents_std": (1.0,) * 16})
    shifted.load_state_dict(models.vae.state_dict())
    assert vae_fingerprint(shifted) != fingerprint
    with pytest.raises(FileNotFoundError, match="train one with `wan-distill train-decoder`"):
        load_tiny_decoder(tmp_path / "missing")
    (folder / "tiny_decoder.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tiny_decoder(folder)


def test_motion_term_counts_only_what_moves_between_frames():
    still = torch.zeros(1, 3, 4, 8, 8)
    moving = still.clone()
    moving[:, :, 1:, 2, 2] = 1.0  # one pixel switches on after frame 0 and stays
    weights = torch.ones(1, 1, 4, 8, 8)
    # A video shifted by a constant has the same frame differences: nothing to penalise.
    assert motion_l1(moving + 0.5, moving, weights).item() == 0.0
    # Held still against the target's change: one step of 1 in one pixel of 3 x 8 x 8 x 3
    # differences, averaged over channels (all 3 change) and weighted sums.
    assert motion_l1(still, moving, weights).item() == pytest.approx(1 / (3 * 8 * 8))


def test_loss_is_zero_on_the_target_and_training_lowers_it():
    settings = DecoderTrainingSettings(batch_size=2, num_clips=2, lr=3e-3)
    target = torch.full((2, 3, 5, 16, 16), -1.0)
    target[:, :, :, 4:10, 4:10] = 0.6
    assert decoder_loss(target, target, settings).item() == 0.0
    torch.manual_seed(0)
    module = TinyDecoderTraining(SHAPES_TINY_DECODER, settings)
    batch = {"latents": torch.randn(2, 4, 2, 4, 4),
             "target": ((target + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)}
    assert torch.equal(uint8_to_video(batch["target"]), target)
    optimiser = module.configure_optimizers()
    losses = []
    for _ in range(60):
        loss = decoder_loss(module.decoder.decode(batch["latents"], clamp=False), target, settings)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_train_decoder_writes_a_loadable_decoder_and_resumes(tmp_path):
    from distill.data.latents import load_text_and_vae
    from student.paths import embedded_teacher_dir

    small = dict(num_clips=8, val_clips=4, batch_size=4, checkpoint_every=3)
    straight = train_decoder(out=tmp_path / "a", work_dir=tmp_path / "run_a", progress=False,
                             settings=DecoderTrainingSettings(steps=6, **small))
    # Interrupted after 3 steps (its checkpoint), then resumed to 6: the same decoder.
    train_decoder(out=tmp_path / "b", work_dir=tmp_path / "run_b", progress=False,
                  settings=DecoderTrainingSettings(steps=3, **small))
    train_decoder(out=tmp_path / "b", work_dir=tmp_path / "run_b", progress=False,
                  settings=DecoderTrainingSettings(steps=6, **small))
    _, _, _, vae = load_text_and_vae(embedded_teacher_dir())
    a, b = load_tiny_decoder(tmp_path / "a", vae), load_tiny_decoder(tmp_path / "b", vae)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert set(straight) >= {"oracle_joint", "psnr_tiny_vs_vae_db", "decode_ms_per_clip_1_thread"}
    assert straight["val_clips"] == 4 and straight["steps"] == 6
    assert json.loads((tmp_path / "run_a" / "report.json").read_text())["out"] == str(tmp_path / "a")
    assert summary_line(straight).startswith("trained the tiny decoder in ")
    with pytest.raises(SystemExit, match="lr differ"):
        train_decoder(out=tmp_path / "c", work_dir=tmp_path / "run_a", progress=False,
                      settings=DecoderTrainingSettings(steps=6, lr=1e-4, **small))
