"""Teacher training for the shapes world: the losses and samplers it is built from, and a tiny
end-to-end run (two steps per Lightning stage) that writes a folder ``load_teacher`` reads."""

import json
import shutil
from dataclasses import asdict, replace

import pytest
import torch

from distill.teacher_training.flow_losses import (
    flow_matching_loss,
    noisy_latents,
    sample_expert_timesteps,
)
from distill.teacher_training.latents import LatentCache, latent_statistics
from distill.teacher_training.settings import VAEPhase, load_training_config
from distill.teacher_training.vae_losses import (
    edge_l1,
    foreground_weights,
    gaussian_kl,
    psnr,
    weighted_l1,
)
from distill.teacher_training.vae_module import phase_at, warmup_cosine
from eval.shapes_world import Factors
from tests.tiny_teacher import TINY


# ------------------------------------------------------------------------- flow matching


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_expert_timesteps_stay_on_their_side_of_the_boundary(shift):
    g = torch.Generator().manual_seed(0)
    sigma_h, t_h = sample_expert_timesteps(4000, "high", 0.875, shift, generator=g)
    sigma_l, t_l = sample_expert_timesteps(4000, "low", 0.875, shift, generator=g)
    assert t_h.dtype == torch.int64 and t_h.min() >= 875 and t_h.max() <= 999
    assert t_l.min() >= 0 and t_l.max() <= 874
    # t is the sampler's trunc(sigma * 1000), up to the clamp at the boundary.
    assert torch.equal(t_l, (sigma_l.double() * 1000).long().clamp(0, 874))
    assert sigma_h.min() >= 0.875 and sigma_l.max() < 0.875


def test_expert_timesteps_follow_the_shifted_uniform_law():
    # P(sigma <= x) for the low expert is (unshift(x) - 0) / unshift(b): check at x = 0.5 by
    # counting, with shift 3 (independent of the sampler's own arithmetic).
    n, shift, b = 40000, 3.0, 0.875
    sigma, _ = sample_expert_timesteps(n, "low", b, shift, generator=torch.Generator().manual_seed(1))
    u_half = 0.5 / (3.0 - 2.0 * 0.5)  # inverse of 3u / (1 + 2u) at 0.5
    u_b = b / (3.0 - 2.0 * b)
    expected = u_half / u_b
    assert abs(float((sigma <= 0.5).float().mean()) - expected) < 0.01  # ~4 std of a proportion


def test_flow_matching_interpolates_and_scores_the_true_velocity_zero():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 4, 2, 4, 4, generator=g), torch.randn(3, 4, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    x_t = noisy_latents(x0, noise, sigma)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(x_t[2], noise[2])
    assert torch.equal(flow_matching_loss(noise - x0, x0, noise), torch.zeros(3))
    torch.testing.assert_close(flow_matching_loss(torch.zeros_like(x0), x0, noise),
                               (noise - x0).square().flatten(1).mean(1))


def test_training_context_equals_the_samplers_context():
    from distill.teacher_training.text import context_from_ids, tokenize_captions
    from teacher.pipeline import encode_text
    from teacher.t5 import UMT5Encoder
    from teacher.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    encoder = UMT5Encoder(**asdict(TINY.t5)).eval()
    captions = ["a red circle moving left", "一个红色的圆形向左移动", ""]
    ids, mask = tokenize_captions(ByteTokenizer(), captions, 40)
    with torch.no_grad():
        ours = context_from_ids(encoder, ids, mask)
        sampler = encode_text(ByteTokenizer(), encoder, captions, 40)
    torch.testing.assert_close(ours, sampler, rtol=0, atol=0)
    assert int(mask[2].sum()) == 1 and float(ours[2, 1:].abs().sum()) == 0.0  # "" is EOS alone


# ---------------------------------------------------------------------------- VAE losses


def _square_clip() -> torch.Tensor:
    video = -torch.ones(1, 3, 2, 16, 16)
    video[:, 0, :, 4:12, 4:12] = 1.0  # a red 8x8 square on black
    return video


def test_foreground_weights_cover_the_object_and_its_dilated_ring():
    w = foreground_weights(_square_clip(), foreground_weight=9.0, dilation=2)
    assert w.shape == (1, 1, 2, 16, 16)
    heavy = w == 10.0
    assert int(heavy[0, 0, 0].sum()) == 12 * 12  # 8x8 grown by 2 px on every side
    assert bool(heavy[0, 0, 0, 2:14, 2:14].all()) and float(w[0, 0, 0, 0, 0]) == 1.0


def test_boundary_weight_marks_the_band_around_the_outline():
    w = foreground_weights(_square_clip(), foreground_weight=0.0, dilation=1, boundary_weight=5.0)
    frame = w[0, 0, 0]
    band = frame == 6.0
    # The outline band of an 8x8 square (rows/cols 4..11) grown and shrunk by 1 px: the 10x10
    # square minus the 6x6 interior, i.e. 100 - 36 pixels; elsewhere the weight stays 1.
    assert int(band.sum()) == 100 - 36
    assert bool(band[3, 3:13].all()) and not bool(band[5:11, 5:11].any())
    assert bool((frame[~band] == 1.0).all())


def test_weighted_and_edge_losses_against_direct_sums():
    target = _square_clip()
    output = target.clone()
    output[:, :, :, 4:12, 4:12] = 0.5 * target[:, :, :, 4:12, 4:12]  # dimmer object
    w = foreground_weights(target, 4.0, 0)
    manual = (w * (output - target).abs()).sum() / 3 / w.sum()
    torch.testing.assert_close(weighted_l1(output, target, w), manual)
    assert float(edge_l1(target, target, w)) == 0.0
    blurred = torch.nn.functional.avg_pool3d(target, (1, 3, 3), stride=1, padding=(0, 1, 1),
                                             count_include_pad=False)
    assert float(edge_l1(blurred, target, w)) > 0.01


def test_kl_and_psnr_against_closed_forms():
    mu, log_var = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2) * 0.3
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * log_var).exp()), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(gaussian_kl(mu, log_var), reference.mean(), rtol=1e-5, atol=1e-6)
    a = torch.zeros(1, 3, 1, 4, 4)
    assert abs(psnr(a + 0.2, a) - 10 * torch.log10(torch.tensor(4 / 0.04)).item()) < 1e-4  # 20 dB


def test_latent_statistics_match_sampled_latents():
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(400, 2, 1, 2, 2, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1, 1) + 2.0
    log_var = torch.full_like(mu, 2 * torch.log(torch.tensor(0.5)).item())
    cache = LatentCache(mu, log_var, [Factors("circle", "red", "left")] * 400)
    mean, std = latent_statistics(cache)
    z = mu.unsqueeze(0) + 0.5 * torch.randn(50, *mu.shape, generator=g)
    z = z.transpose(0, 2).flatten(1)  # [channels, samples]
    torch.testing.assert_close(torch.tensor(mean), z.double().mean(1).float(), rtol=0, atol=0.02)
    torch.testing.assert_close(torch.tensor(std), z.double().std(1).float(), rtol=0.02, atol=0)


# ------------------------------------------------------------------------------ settings


def test_schedules_and_phases():
    assert warmup_cosine(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    phases = (VAEPhase(3, 1, 8), VAEPhase(2, 17, 2))
    assert [phase_at(phases, s).frames for s in range(7)] == [1, 1, 1, 17, 17, 17, 17]


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"\[flow\].*unknown key.*'stepz'"):
        load_training_config({"flow": {"stepz": 3}})
    with pytest.raises(ValueError, match="frames=4 must be 1 \\+ 4k"):
        load_training_config({"vae": {"phases": [{"steps": 1, "frames": 4, "batch_size": 1}]}})
    with pytest.raises(ValueError, match="grad_clip=-1.0 must be >= 0"):
        load_training_config({"flow": {"grad_clip": -1.0}})
    with pytest.raises(ValueError, match="text_lr=-0.1 must be >= 0"):
        load_training_config({"flow": {"text_lr": -0.1}})
    with pytest.raises(ValueError, match=r"\[text\].*unknown key.*'lrr'"):
        load_training_config({"text": {"lrr": 1.0}})
    with pytest.raises(ValueError, match="parallel_experts needs text_lr 0.*parallel_experts: false"):
        load_training_config({"flow": {"text_lr": 1e-4}})
    load_training_config({"flow": {"text_lr": 1e-4, "parallel_experts": False}})


def test_expert_batch_shares_and_module_expert_choice():
    from distill.teacher_training.flow_module import FlowTeacherModule, expert_batch_sizes
    from distill.teacher_training.settings import FlowStageConfig

    assert expert_batch_sizes(16, 0.5) == (8, 8)
    assert expert_batch_sizes(3, 0.5) == (2, 1)
    assert expert_batch_sizes(2, 0.9) == (1, 1)  # each expert keeps one sample
    with pytest.raises(ValueError, match="batch_size=1 must be >= 2"):
        expert_batch_sizes(1, 0.5)
    empty = torch.zeros(TINY.dit.text_len, dtype=torch.long)
    low = FlowTeacherModule(TINY, FlowStageConfig(), empty, empty, experts=("low",))
    assert hasattr(low, "expert_low") and not hasattr(low, "expert_high")
    optimizer = low.configure_optimizers()["optimizer"]
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {
        id(p) for p in low.expert_low.parameters()}
    with pytest.raises(ValueError, match="non-empty subset"):
        FlowTeacherModule(TINY, FlowStageConfig(), empty, empty, experts=("mid",))
    with pytest.raises(ValueError, match="text_lr=0.1 fine-tunes the text encoder through both"):
        FlowTeacherModule(TINY, FlowStageConfig(text_lr=0.1, parallel_experts=False), empty, empty,
                          experts=("high",))


def test_shipped_recipe_equals_the_config_defaults():
    from distill.teacher_training.run import DEFAULT_CONFIG
    from distill.teacher_training.settings import TeacherTrainingConfig

    assert load_training_config(DEFAULT_CONFIG) == TeacherTrainingConfig()


def test_flow_grad_clip_reaches_the_trainer(tmp_path):
    from distill.teacher_training.run import _trainer

    assert _trainer(tmp_path, 1, 1, False, grad_clip=0.5).gradient_clip_val == 0.5
    assert _trainer(tmp_path, 1, 1, False, grad_clip=0.0).gradient_clip_val is None


# ---------------------------------------------------------------------------- end to end

TINY_RUN = {
    "seed": 3, "num_threads": 2,
    "vae": {"phases": [{"steps": 1, "frames": 1, "batch_size": 2},
                       {"steps": 1, "frames": 5, "batch_size": 1}],
            "val_clips": 2, "warmup_steps": 1},
    "latents": {"num_videos": 6, "batch_size": 3},
    "text": {"steps": 2, "batch_size": 4},
    "flow": {"steps": 2, "batch_size": 3, "warmup_steps": 1, "ema_start_step": 0,
             "checkpoint_every": 1, "parallel_experts": False},
    "sampling": {"frames": 5, "width": 64, "height": 64},
}
TINY_ARCH = replace(TINY, vae=replace(TINY.vae, dim=4, num_res_blocks=1))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from distill.teacher_training.run import train_teacher

    root = tmp_path_factory.mktemp("teacher_run")
    summary = train_teacher(TINY_RUN, root / "out", work_dir=root / "work", progress=False,
                            teacher_config=TINY_ARCH)
    return root, summary


def test_tiny_run_writes_a_loadable_teacher(tiny_run):
    from teacher.checkpoint import load_teacher

    root, summary = tiny_run
    out = root / "out"
    for name in ("high_noise_model/config.json", "high_noise_model/diffusion_pytorch_model.safetensors",
                 "low_noise_model/diffusion_pytorch_model.safetensors", "vae.safetensors",
                 "text_encoder.safetensors", "tokenizer/byte_tokenizer.json", "wan_distill.json"):
        assert (out / name).is_file(), name
    models = load_teacher(out)
    stats = json.loads((root / "work" / "latents" / "report.json").read_text())
    assert models.config.vae.latents_mean == pytest.approx(stats["latents_mean"])
    assert models.config.vae.latents_std == pytest.approx(stats["latents_std"])
    assert models.config.sampling.frames == 5 and models.config.dit == TINY_ARCH.dit
    assert set(summary["stage_s"]) == {"vae", "latents", "text", "flow", "export"}
    assert set(summary["text"]) == {"shape", "colour", "motion"}
    # The shipped experts are the EMA weights the flow stage saved.
    from safetensors.torch import load_file
    saved = load_file(str(root / "work" / "flow" / "expert_high.safetensors"))
    for key, value in models.expert_high.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    # The flow stage froze the pretrained text encoder (text_lr 0): shipped = stage 3's weights
    # up to the rounding of the EMA (an AdamW step would move them by ~lr = 1e-3).
    pretrained = load_file(str(root / "work" / "text" / "text_encoder.safetensors"))
    for key, value in models.text_encoder.state_dict().items():
        torch.testing.assert_close(value, pretrained[key], rtol=0, atol=1e-6)


def test_tiny_run_latents_round_trip_through_the_shipped_vae(tiny_run):
    from distill.teacher_training.run import load_stage_vae
    from teacher.checkpoint import load_teacher

    root, _ = tiny_run
    shipped = load_teacher(root / "out").vae
    raw = load_stage_vae(TINY_ARCH, root / "work")
    video = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    mean = torch.tensor(shipped.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(shipped.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(shipped.encode(video), (raw.encode(video) - mean) / std,
                                   rtol=1e-5, atol=1e-5)


def test_rerun_skips_finished_stages_and_rejects_another_seed(tiny_run):
    from distill.teacher_training.run import train_teacher

    root, summary = tiny_run
    weights = root / "work" / "vae" / "vae.safetensors"
    before = weights.stat().st_mtime_ns
    again = train_teacher(TINY_RUN, root / "out", work_dir=root / "work", progress=False,
                          teacher_config=TINY_ARCH)
    assert weights.stat().st_mtime_ns == before
    assert again["stage_s"]["flow"] == summary["stage_s"]["flow"]
    with pytest.raises(ValueError, match="different run"):
        train_teacher(TINY_RUN, root / "out2", seed=4, work_dir=root / "work", progress=False,
                      teacher_config=TINY_ARCH)


def test_interrupted_flow_stage_resumes_from_its_last_checkpoint(tiny_run, monkeypatch):
    from distill.teacher_training.flow_module import FlowTeacherModule
    from distill.teacher_training.run import train_teacher

    root, _ = tiny_run
    flow = root / "work" / "flow"
    assert (flow / "checkpoints" / "last.ckpt").is_file()
    shipped = (flow / "expert_low.safetensors").read_bytes()
    # Simulate a crash after the last optimizer step but before the stage wrote its result.
    (flow / "report.json").unlink()
    (flow / "expert_low.safetensors").unlink()

    def no_more_training(self, batch, batch_idx):
        raise AssertionError("resumed stage ran a training step although max_steps was reached")

    monkeypatch.setattr(FlowTeacherModule, "training_step", no_more_training)
    train_teacher(TINY_RUN, root / "out", work_dir=root / "work", progress=False,
                  teacher_config=TINY_ARCH)
    # The EMA weights come back from the checkpoint, not from the raw (non-averaged) weights.
    assert (flow / "expert_low.safetensors").read_bytes() == shipped


def test_parallel_experts_train_in_their_own_processes_what_one_process_trains(tmp_path):
    from safetensors.torch import load_file

    from distill.teacher_training.run import fit_flow_experts, train_teacher
    from teacher.checkpoint import load_teacher

    run = {**TINY_RUN, "flow": {**TINY_RUN["flow"], "parallel_experts": True}}
    work = tmp_path / "work"
    summary = train_teacher(run, tmp_path / "out", work_dir=work, progress=False,
                            teacher_config=TINY_ARCH)
    models = load_teacher(tmp_path / "out")
    for name in ("high", "low"):
        assert (work / "flow" / name / "checkpoints" / "last.ckpt").is_file()
    reports = {name: json.loads((work / "flow" / name / "report.json").read_text())["final_metrics"]
               for name in ("high", "low")}
    # batch 3 at high_fraction 0.5: two samples per step for expert_high, one for expert_low
    assert summary["flow"]["flow/loss"] == pytest.approx(
        (2 * reports["high"]["flow/loss_high"] + reports["low"]["flow/loss_low"]) / 3)

    # Replaying expert_low's training in this process (one thread, as its process had) gives
    # the shipped weights: the spawned process ran this function with this seed and nothing else.
    text_state = load_file(str(work / "text" / "text_encoder.safetensors"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        replay, _ = fit_flow_experts(load_training_config(run), models.config, 3, tmp_path / "replay",
                                     LatentCache.load(work / "latents"), text_state, ("low",), False)
    finally:
        torch.set_num_threads(threads)
    for key, value in models.expert_low.state_dict().items():
        torch.testing.assert_close(value, replay["expert_low"][key], rtol=0, atol=1e-6)
    for key, value in models.text_encoder.state_dict().items():
        assert torch.equal(value, text_state[key]), key  # frozen, shipped as stage 3 wrote it

    # An interruption after expert_low's last step: the rerun resumes its process from its last
    # checkpoint (no step left to run) and writes the same EMA weights.
    shipped = (work / "flow" / "expert_low.safetensors").read_bytes()
    for path in ("report.json", "expert_low.safetensors", "low/report.json",
                 "low/expert_low.safetensors"):
        (work / "flow" / path).unlink()
    train_teacher(run, tmp_path / "out", work_dir=work, progress=False, teacher_config=TINY_ARCH)
    assert (work / "flow" / "expert_low.safetensors").read_bytes() == shipped

    # One thread: the experts' processes take turns and train the same weights (the flow stage
    # alone is rerun; the earlier stages' results depend on their thread count).
    concurrent = {name: (work / "flow" / f"expert_{name}.safetensors").read_bytes()
                  for name in ("high", "low")}
    shutil.rmtree(work / "flow")
    train_teacher({**run, "num_threads": 1}, tmp_path / "out", work_dir=work, progress=False,
                  teacher_config=TINY_ARCH)
    for name, weights in concurrent.items():
        assert (work / "flow" / f"expert_{name}.safetensors").read_bytes() == weights, name


def test_evaluate_reports_every_language_and_factor(tiny_run):
    from distill.teacher_training.evaluate import evaluate_teacher

    root, _ = tiny_run
    result = evaluate_teacher(root / "out", num_prompts=8, steps=2, batch_size=8, progress=False)
    assert result["overall"]["n"] == 8
    assert set(result["by_language"]) == {"en", "zh"}
    assert sum(r["n"] for r in result["by_language"].values()) == 8
    assert set(result["by_factor_value"]["motion"]) == {"left", "right", "up", "down"}
    assert result["settings"]["nfe_per_video"] == 4  # 2 steps x (conditional + unconditional)
    assert 0.0 <= result["overall"]["joint"] <= 1.0
