"""Whole-teacher folders: the official and Diffusers layouts load into identical models, and
damaged folders fail with errors that name the file, the key and the fix."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from teacher.checkpoint import detect_layout, load_teacher
from teacher.dit import is_fp32_island
from teacher.weight_files import CheckpointError
from tests.tiny_teacher import tiny_models, write_diffusers, write_official


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    models = tiny_models()
    root = tmp_path_factory.mktemp("ckpt")
    return models, write_official(root / "official", models), write_diffusers(root / "diffusers", models)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_layouts_detected(tiny):
    _, official, diffusers = tiny
    assert detect_layout(official) == "official"
    assert detect_layout(diffusers) == "diffusers"


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_both_layouts_load_the_written_weights(tiny, layout):
    models, official, diffusers = tiny
    loaded = load_teacher(official if layout == "official" else diffusers)
    for part in ("expert_high", "expert_low", "vae", "text_encoder"):
        assert_same_state(getattr(models, part), getattr(loaded, part))
    # A Diffusers transformer config has no text_len (its pipeline pads to max_sequence_length,
    # 512 for Wan); everything else must round-trip.
    assert replace(loaded.config.dit, text_len=0) == replace(models.config.dit, text_len=0)
    assert loaded.config.sampling.boundary == models.config.sampling.boundary
    ids, mask = loaded.tokenizer(["a red circle"], text_len=16)
    assert ids.shape == (1, 16) and int(mask.sum()) == len("a red circle") + 1


def test_bf16_load_keeps_the_official_fp32_islands(tiny):
    _, official, _ = tiny
    loaded = load_teacher(official, dtype=torch.bfloat16)
    for name, p in loaded.expert_high.named_parameters():
        assert p.dtype == (torch.float32 if is_fp32_island(name) else torch.bfloat16), name
    assert loaded.expert_high.head.head.weight.dtype == torch.float32
    assert loaded.expert_high.blocks[0].modulation.dtype == torch.float32
    assert loaded.expert_high.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in loaded.vae.parameters())
    assert not any(p.requires_grad for p in loaded.expert_low.parameters())


def test_missing_shard_names_the_file(tiny, tmp_path):
    _, official, _ = tiny
    broken = shutil.copytree(official, tmp_path / "broken")
    next((broken / "low_noise_model").glob("*-00002-of-00002.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"low_noise_model.*missing"):
        load_teacher(broken)


def test_missing_vae_and_expert_folder(tiny, tmp_path):
    _, official, _ = tiny
    broken = shutil.copytree(official, tmp_path / "novae")
    (broken / "vae.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"vae.safetensors is missing"):
        load_teacher(broken)
    broken = shutil.copytree(official, tmp_path / "noexpert")
    shutil.rmtree(broken / "high_noise_model")
    with pytest.raises(CheckpointError, match=r"high_noise_model is missing"):
        load_teacher(broken)


def test_config_disagreeing_with_weights(tiny, tmp_path):
    _, official, _ = tiny
    broken = shutil.copytree(official, tmp_path / "cfg")
    cfg_path = broken / "high_noise_model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"num_layers: expected 1, found 3"):
        load_teacher(broken)


def test_unexpected_key_in_diffusers_file(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, diffusers = tiny
    broken = shutil.copytree(diffusers, tmp_path / "extra")
    path = broken / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["decoder.bogus.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected key 'decoder.bogus.weight'"):
        load_teacher(broken)


def test_not_a_teacher_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        detect_layout(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a Wan2.2 teacher folder"):
        detect_layout(tmp_path)


def test_parts_only_load_skips_the_experts(tiny, tmp_path):
    models, official, _ = tiny
    broken = shutil.copytree(official, tmp_path / "noexperts")
    shutil.rmtree(broken / "high_noise_model")  # not even read when experts=False
    parts = load_teacher(broken, experts=False)
    assert parts.expert_high is None and parts.expert_low is None
    assert_same_state(models.vae, parts.vae)
    assert_same_state(models.text_encoder, parts.text_encoder)


def test_vae_stride_must_match_the_vae():
    from teacher.config import SHAPES, TeacherConfig, VAEConfig

    four_x = VAEConfig(dim=8, dim_mult=(1, 2, 4), temperal_downsample=(True, True))
    assert TeacherConfig(name="ok", vae=four_x, vae_stride=(4, 4, 4)).vae_stride == (4, 4, 4)
    with pytest.raises(ValueError, match=r"set vae_stride=\(4, 4, 4\)"):
        TeacherConfig(name="bad", vae=four_x)  # the default (4, 8, 8) is the A14B's
    with pytest.raises(ValueError, match="vae_stride"):
        replace(SHAPES, vae_stride=(4, 16, 16))
