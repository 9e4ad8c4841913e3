"""A tiny random two-expert teacher written to disk in the official and the Diffusers layouts.

Random weights are enough to test loading, sampling plumbing and the CLI; nothing here is a
quality claim.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from student.tiny_decoder import TinyDecoder, TinyDecoderConfig, vae_fingerprint
from teacher.checkpoint import TeacherModels, save_teacher
from teacher.config import DiTConfig, SamplingConfig, T5Config, TeacherConfig, VAEConfig
from teacher.convert_dit import dit_official_to_diffusers
from teacher.convert_t5 import t5_official_to_transformers
from teacher.convert_vae import vae_official_to_diffusers
from teacher.dit import WanModel
from teacher.t5 import UMT5Encoder
from teacher.tokenizer import ByteTokenizer
from teacher.vae import WanVAE
from teacher.weight_files import save_safetensors_atomic

TINY = TeacherConfig(
    name="tiny",
    t5=T5Config(vocab_size=259, dim=16, dim_attn=16, dim_ffn=24, num_heads=2, num_layers=1,
                num_buckets=8),
    vae=VAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                  temperal_downsample=(False, True, True)),
    dit=DiTConfig(dim=24, ffn_dim=32, freq_dim=16, num_heads=2, num_layers=1, in_dim=16,
                  out_dim=16, text_len=16, text_dim=16),
    sampling=SamplingConfig(steps=3, shift=3.0, frames=5, fps=8, width=32, height=32,
                            negative_prompt=""),
    t5_checkpoint="text_encoder.safetensors",
    vae_checkpoint="vae.safetensors",
    tokenizer_dir="tokenizer",
)


# A tiny streaming decoder for TINY's VAE (16 channels, 8x in space, 4x in time).
TINY_DECODER = TinyDecoderConfig(z_dim=16, channels=(8, 8, 4), blocks=(1, 1, 1),
                                 time_growth=(False, True), head_frames=2, patch=2)


def tiny_decoder_for(vae: WanVAE, seed: int = 0) -> TinyDecoder:
    """A random ``TINY_DECODER`` carrying ``vae``'s fingerprint (loads beside that VAE)."""
    torch.manual_seed(seed)
    return TinyDecoder(replace(TINY_DECODER, vae_fingerprint=vae_fingerprint(vae))).eval()


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere (also in zero-initialised tables) so layouts cannot hide errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def tiny_models(config: TeacherConfig = TINY, seed: int = 0) -> TeacherModels:
    return TeacherModels(
        config=config,
        tokenizer=ByteTokenizer(),
        text_encoder=_randomise(UMT5Encoder(**asdict(config.t5)), seed),
        vae=_randomise(WanVAE(**asdict(config.vae)), seed + 1),
        expert_high=_randomise(WanModel(**asdict(config.dit)), seed + 2),
        expert_low=_randomise(WanModel(**asdict(config.dit)), seed + 3),
    )


def write_sharded(folder: Path, state: dict, shards: int = 2) -> None:
    """Write ``state`` as ``shards`` safetensors files plus the index, like the official experts."""
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_safetensors_atomic(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def write_official(root: Path, models: TeacherModels) -> Path:
    """Official layout; experts sharded with an index (as downloaded)."""
    save_teacher(root, models)
    for sub, expert in (("high_noise_model", models.expert_high), ("low_noise_model", models.expert_low)):
        (root / sub / "diffusion_pytorch_model.safetensors").unlink()
        write_sharded(root / sub, expert.state_dict())
    return root


def write_diffusers(root: Path, models: TeacherModels) -> Path:
    """The Diffusers pipeline layout, keys renamed by the project's converters."""
    cfg = models.config
    d = cfg.dit
    (root / "transformer").mkdir(parents=True, exist_ok=True)
    dit_json = {
        "_class_name": "WanTransformer3DModel", "patch_size": list(d.patch_size),
        "num_attention_heads": d.num_heads, "attention_head_dim": d.dim // d.num_heads,
        "in_channels": d.in_dim, "out_channels": d.out_dim, "text_dim": d.text_dim,
        "freq_dim": d.freq_dim, "ffn_dim": d.ffn_dim, "num_layers": d.num_layers,
        "cross_attn_norm": d.cross_attn_norm, "qk_norm": "rms_norm_across_heads", "eps": d.eps,
        "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
    }
    for sub, expert in (("transformer", models.expert_high), ("transformer_2", models.expert_low)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "config.json").write_text(json.dumps(dit_json))
        write_sharded(root / sub, dit_official_to_diffusers(expert.state_dict()))
    v = cfg.vae
    (root / "vae").mkdir(parents=True, exist_ok=True)
    (root / "vae" / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKLWan", "base_dim": v.dim, "z_dim": v.z_dim,
        "dim_mult": list(v.dim_mult), "num_res_blocks": v.num_res_blocks, "attn_scales": [],
        "temperal_downsample": list(v.temperal_downsample), "dropout": 0.0}))
    save_safetensors_atomic(vae_official_to_diffusers(models.vae.state_dict()),
                            root / "vae" / "diffusion_pytorch_model.safetensors")
    t = cfg.t5
    (root / "text_encoder").mkdir(parents=True, exist_ok=True)
    (root / "text_encoder" / "config.json").write_text(json.dumps({
        "architectures": ["UMT5EncoderModel"], "vocab_size": t.vocab_size, "d_model": t.dim,
        "d_kv": t.dim_attn // t.num_heads, "d_ff": t.dim_ffn, "num_heads": t.num_heads,
        "num_layers": t.num_layers, "relative_attention_num_buckets": t.num_buckets,
        "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new", "is_gated_act": True, "layer_norm_epsilon": 1e-6}))
    save_safetensors_atomic(t5_official_to_transformers(models.text_encoder.state_dict()),
                            root / "text_encoder" / "model.safetensors")
    models.tokenizer.save(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "boundary_ratio": cfg.sampling.boundary,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    return root
