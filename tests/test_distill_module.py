"""Both distillation stages, the latent cache and the export on a tiny random teacher (CPU).

Random weights: these tests check plumbing and invariants (what is trained, what is saved, what
the EMA holds, that the cache equals a direct encoding), never quality.
"""

from __future__ import annotations

import json
from dataclasses import replace

import lightning as L
import pytest
import torch

from distill.ar_adaptation import ARAdaptationModule, read_causal_teacher
from distill.config import ARAdaptationConfig, ConsistencyConfig, OptimConfig
from distill.data.latents import (
    MANIFEST_FILE,
    LatentDataModule,
    LatentShardDataset,
    LatentSource,
    build_latent_cache,
)
from distill.data.shapes import ShapesWorldDataset
from distill.export import EXPORT_FILE, export_student
from distill.module import ConsistencyDistillationModule
from student.checkpoint import load_student
from student.config import StudentConfig, student_config_to_dict
from teacher.checkpoint import load_teacher
from teacher.config import teacher_config_to_dict
from teacher.pipeline import encode_prompts
from tests.tiny_teacher import TINY, tiny_models, write_official

TINY_STUDENT = StudentConfig(name="tiny", teacher="tiny", dit=TINY.dit, chunk_frames=1,
                             sink_chunks=1, window_chunks=1, shift=3.0, guidance_default=3.0,
                             guidance_max=5.0)
QUICK = OptimConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher_dir = write_official(root / "teacher", tiny_models(seed=0))
    source = LatentSource(kind="shapes", num_clips=6, num_frames=5, seed=3)
    cache = build_latent_cache(root / "cache", source, str(teacher_dir), batch_size=4,
                               trainer_kwargs={"accelerator": "cpu", "devices": 1,
                                               "enable_progress_bar": False})
    return {"root": root, "teacher_dir": teacher_dir, "cache": cache, "source": source}


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_latent_cache_equals_direct_encoding(tiny_run):
    dataset = LatentShardDataset(tiny_run["cache"])
    assert (tiny_run["cache"] / MANIFEST_FILE).is_file()
    # 6 clips in batches of 4: two shards, every index once, in order.
    assert dataset.indices == list(range(6))
    assert len(list(tiny_run["cache"].glob("shard-*.safetensors"))) == 2
    models = load_teacher(tiny_run["teacher_dir"])
    world = ShapesWorldDataset(6, num_frames=5, seed=3)
    items = [world[i] for i in range(6)]
    with torch.no_grad():
        latents = models.vae.encode(torch.stack([it["video"] for it in items]))
        context = encode_prompts(models, [it["caption"] for it in items])
        negative = encode_prompts(models, [TINY.sampling.negative_prompt])
    got = [dataset[i] for i in range(6)]
    assert got[0]["latents"].shape == (16, 2, 8, 8)
    torch.testing.assert_close(torch.stack([g["latents"] for g in got]), latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack([g["context"] for g in got]), context, rtol=0, atol=1e-6)
    assert [g["caption"] for g in got] == [it["caption"] for it in items]
    torch.testing.assert_close(dataset.negative_context, negative)


def test_latent_datamodule_batches(tiny_run):
    dm = LatentDataModule(str(tiny_run["cache"]), batch_size=4, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (4, 16, 2, 8, 8)
    assert batch["context"].shape == (4, TINY.dit.text_len, TINY.dit.text_dim)
    assert batch["context_neg"].shape == (1, TINY.dit.text_len, TINY.dit.text_dim)
    with pytest.raises(ValueError, match="batch_size"):
        LatentDataModule(str(tiny_run["cache"]), batch_size=7).setup()


@pytest.fixture(scope="module")
def causal_teacher(tiny_run):
    module = ARAdaptationModule(str(tiny_run["teacher_dir"]), teacher_config_to_dict(TINY),
                                student_config_to_dict(TINY_STUDENT),
                                ARAdaptationConfig(max_steps=1, batch_size=4, optim=QUICK))
    dm = LatentDataModule(str(tiny_run["cache"]), batch_size=4)
    trainer = _trainer(fast_dev_run=True)
    before = None

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, dm)
    folder = module.export_causal_teacher(tiny_run["root"] / "causal_teacher")
    return {"module": module, "before": before, "folder": folder}


def test_stage_a_trains_only_the_drawn_expert(causal_teacher):
    module, before = causal_teacher["module"], causal_teacher["before"]
    (step, expert), = module.chosen_experts
    assert step == 0
    trained, frozen = (("expert_high", "expert_low") if expert == "high"
                       else ("expert_low", "expert_high"))
    after = module.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {trained}, f"drew {expert}, changed {changed}"
    # Stage A experts start from the teacher and have no guidance embedding.
    teacher = load_teacher(causal_teacher["module"].teacher_dir)
    assert all(not k.startswith("guidance_embedding") for k in after)
    ref = getattr(teacher, frozen).state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(after[f"{frozen}.{k}"], v)


def test_causal_teacher_export_round_trip(causal_teacher):
    folder = causal_teacher["folder"]
    teacher_cfg, expert_cfg = read_causal_teacher(folder)
    assert teacher_cfg == TINY and expert_cfg.guidance_embedding is False
    model, _ = load_student(folder / TINY.expert_low_dir)
    state = causal_teacher["module"].expert_low.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.fixture(scope="module")
def stage_b(causal_teacher, tiny_run):
    stage = ConsistencyConfig(max_steps=1, batch_size=4, optim=QUICK, num_intervals=6,
                              ema_decay=0.9, loss="mse")
    module = ConsistencyDistillationModule(str(causal_teacher["folder"]),
                                           student_config_to_dict(TINY_STUDENT), stage=stage)
    snap = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            snap["ema0"] = {k: v.clone() for k, v in pl_module.ema_student.state_dict().items()}
            snap["teacher0"] = {k: v.clone() for k, v in
                                pl_module.teacher.expert_low.state_dict().items()}

    trainer = _trainer(fast_dev_run=True, callbacks=[Snapshot()])
    trainer.fit(module, LatentDataModule(str(tiny_run["cache"]), batch_size=4))
    return {"module": module, "trainer": trainer, **snap}


def test_teacher_is_outside_registry_and_checkpoint(stage_b, tmp_path):
    module, trainer = stage_b["module"], stage_b["trainer"]
    keys = set(module.state_dict())
    assert keys and all(k.startswith(("student.", "ema_student.")) for k in keys)
    assert not any(p is q for p in module.parameters()
                   for q in module.teacher.expert_low.parameters())
    assert "_teacher" not in dict(module.named_modules())
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    saved = torch.load(tmp_path / "b.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == keys
    # the frozen teacher did not move
    for k, v in module.teacher.expert_low.state_dict().items():
        assert torch.equal(v, stage_b["teacher0"][k])
        assert not module.teacher.expert_low.get_parameter(k).requires_grad


def test_student_starts_from_the_init_expert_and_ema_follows(stage_b, causal_teacher):
    module = stage_b["module"]
    # EMA before training = the student's init = the adapted high expert by default (init_expert)
    # (+ zero guidance head).
    ema0 = stage_b["ema0"]
    high = causal_teacher["module"].expert_high.state_dict()
    low = causal_teacher["module"].expert_low.state_dict()
    for k, v in high.items():
        assert torch.equal(ema0[k], v)
    assert any(not torch.equal(ema0[k], v) for k, v in low.items())
    assert torch.count_nonzero(ema0["guidance_embedding.2.weight"]) == 0
    # After one step with decay 0.9: ema = 0.9 * ema0 + 0.1 * student.
    student = module.student.state_dict()
    for k, v in module.ema_student.state_dict().items():
        torch.testing.assert_close(v, 0.9 * ema0[k] + 0.1 * student[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(student[k], ema0[k]) for k in student)


def test_init_expert_must_name_an_expert(causal_teacher):
    with pytest.raises(ValueError, match=r"init_expert='middle' must be one of \['high', 'low'\]"):
        ConsistencyDistillationModule(str(causal_teacher["folder"]),
                                      student_config_to_dict(TINY_STUDENT), init_expert="middle")


def test_export_student_folders(stage_b, tmp_path):
    module = stage_b["module"]
    folder = export_student(module.student, module.ema_student, TINY_STUDENT, tmp_path / "s",
                            main="ema", info={"step": 1})
    ema, cfg = load_student(folder)
    online, _ = load_student(folder / "student")
    assert cfg == TINY_STUDENT
    for k, v in module.ema_student.state_dict().items():
        assert torch.equal(ema.state_dict()[k], v)
    for k, v in module.student.state_dict().items():
        assert torch.equal(online.state_dict()[k], v)
    info = json.loads((folder / EXPORT_FILE).read_text())
    assert info["main"] == "ema" and info["step"] == 1


def test_stage_b_rejects_bad_settings(causal_teacher):
    with pytest.raises(ValueError, match="loss"):
        ConsistencyDistillationModule(str(causal_teacher["folder"]),
                                      student_config_to_dict(TINY_STUDENT),
                                      stage=ConsistencyConfig(loss="l1"))
    other = replace(TINY_STUDENT, chunk_frames=2)
    with pytest.raises(ValueError, match="chunk_frames"):
        ConsistencyDistillationModule(str(causal_teacher["folder"]), student_config_to_dict(other))


def test_stage_b_trains_on_its_guidance_range_and_the_student_carries_it(
        causal_teacher, tiny_run, monkeypatch):
    import distill.module

    stage = ConsistencyConfig(max_steps=1, batch_size=4, optim=QUICK, num_intervals=6,
                              guidance_min=2.5)
    module = ConsistencyDistillationModule(str(causal_teacher["folder"]),
                                           student_config_to_dict(TINY_STUDENT), stage=stage)
    assert module.student_config.guidance_range == (2.5, 5.0)  # what the export writes
    drawn = []
    original = distill.module.causal_cd_step

    def recording(*args, **kwargs):
        drawn.append(args[7])  # the per-sample guidance scales
        return original(*args, **kwargs)

    monkeypatch.setattr(distill.module, "causal_cd_step", recording)
    _trainer(fast_dev_run=True).fit(module, LatentDataModule(str(tiny_run["cache"]), batch_size=4))
    assert len(drawn) == 1 and drawn[0].shape == (4,)
    assert 2.5 <= float(drawn[0].min()) and float(drawn[0].max()) <= 5.0
    with pytest.raises(ValueError, match=r"stage_b.guidance_min=3.5 must lie in \[1, the "
                                         r"student's guidance_default=3.0\]"):
        ConsistencyDistillationModule(str(causal_teacher["folder"]),
                                      student_config_to_dict(TINY_STUDENT),
                                      stage=ConsistencyConfig(guidance_min=3.5))


def test_one_network_of_a_two_network_student(causal_teacher, tiny_run):
    """expert="high": only its intervals, and targets past the boundary from the frozen partner."""
    folder = str(causal_teacher["folder"])
    stage = ConsistencyConfig(max_steps=1, batch_size=4, optim=QUICK, num_intervals=6, loss="mse")
    with pytest.raises(ValueError, match="partner_init"):
        ConsistencyDistillationModule(folder, student_config_to_dict(TINY_STUDENT), stage=stage,
                                      expert="high")
    partner_dir = causal_teacher["folder"] / TINY.expert_low_dir
    module = ConsistencyDistillationModule(folder, student_config_to_dict(TINY_STUDENT),
                                           stage=stage, expert="high",
                                           partner_init=str(partner_dir))
    trainer = _trainer(fast_dev_run=True)
    trainer.fit(module, LatentDataModule(str(tiny_run["cache"]), batch_size=4))
    assert module.chosen_experts == [(0, "high")]
    assert all(k.startswith(("student.", "ema_student.")) for k in module.state_dict())
    # The student started from expert_high (its own range), the partner is expert_low.
    partner = module._partner[0]
    low = causal_teacher["module"].expert_low.state_dict()
    for k, v in low.items():
        assert torch.equal(partner.state_dict()[k], v)

    item = LatentShardDataset(str(tiny_run["cache"]))[0]
    x = item["latents"][None].float()
    ctx = item["context"][None]
    n_chunks = x.shape[2]
    assert n_chunks >= 2
    boundary_t = TINY.sampling.boundary * TINY.sampling.num_train_timesteps
    t = torch.tensor([[999 if c % 2 == 0 else 100 for c in range(n_chunks)]])
    noisy = torch.randn_like(x)
    with torch.no_grad():
        got = module._target_network()(x, noisy, t, ctx, torch.tensor([2.0]))
        from_ema = module.ema_student.forward_teacher_forcing(x, noisy, t, ctx, torch.tensor([2.0]))
        from_partner = partner.forward_teacher_forcing(x, noisy, t, ctx, torch.tensor([2.0]))
    for c in range(n_chunks):
        want = from_ema if int(t[0, c]) >= boundary_t else from_partner
        torch.testing.assert_close(got[:, :, c], want[:, :, c], rtol=0, atol=0)
