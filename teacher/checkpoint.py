"""Loading and saving a whole two-expert teacher folder.

Two layouts load into the same modules:

- official (``Wan-AI/Wan2.2-T2V-A14B`` as downloaded): ``high_noise_model/`` and
  ``low_noise_model/`` (config.json + sharded safetensors + index), ``models_t5_umt5-xxl-enc-bf16.pth``,
  ``Wan2.1_VAE.pth``, ``google/umt5-xxl/``. An optional ``wan_distill.json`` (written by this
  project for the embedded teacher) carries the full TeacherConfig; without it the A14B preset is
  used and each expert's config.json is checked against it.
- Diffusers (``Wan-AI/Wan2.2-T2V-A14B-Diffusers``): ``model_index.json``, ``transformer/`` (the
  high-noise expert), ``transformer_2/`` (low-noise), ``vae/``, ``text_encoder/``, ``tokenizer/``;
  keys are renamed by the project's converters while loading.

Every module is built on the meta device and its tensors are read straight into place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from teacher.config import (
    A14B,
    TeacherConfig,
    teacher_config_from_dict,
    teacher_config_to_dict,
)
from teacher.convert_dit import dit_config_from_diffusers, dit_official_to_diffusers
from teacher.convert_t5 import t5_config_from_transformers, t5_official_to_transformers
from teacher.convert_vae import vae_config_from_diffusers, vae_official_to_diffusers
from teacher.dit import WanModel, is_fp32_island
from teacher.materialize import materialize
from teacher.t5 import UMT5Encoder
from teacher.tokenizer import load_tokenizer
from teacher.vae import WanVAE
from teacher.weight_files import (
    CheckpointError,
    read_json_file,
    safetensors_keys,
    save_safetensors_atomic,
    weight_files_in,
    write_text_atomic,
)

CONFIG_FILE = "wan_distill.json"
DIT_CONFIG_FILE = "config.json"
DIT_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

@dataclass
class TeacherModels:
    """The parts of a two-expert teacher, loaded and ready (eval mode, no gradients)."""

    config: TeacherConfig
    tokenizer: Any
    text_encoder: UMT5Encoder
    vae: WanVAE
    expert_high: WanModel | None  # None when loaded with experts=False (text + VAE only)
    expert_low: WanModel | None


def detect_layout(checkpoint_dir: str | Path) -> str:
    """'official' or 'diffusers', or a CheckpointError saying what a teacher folder must hold."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise CheckpointError(
            f"checkpoint folder {root} does not exist; pass the folder of the downloaded "
            f"Wan2.2-T2V-A14B (official or -Diffusers) checkpoint"
        )
    if (root / "model_index.json").is_file():
        return "diffusers"
    if (root / A14B.expert_high_dir).is_dir() or (root / CONFIG_FILE).is_file():
        return "official"
    raise CheckpointError(
        f"{root} is not a Wan2.2 teacher folder: expected {A14B.expert_high_dir}/ and "
        f"{A14B.expert_low_dir}/ (official layout) or model_index.json (Diffusers layout)"
    )



def _official_dit_config(folder: Path, expected) -> None:
    """Check an expert's config.json against the configuration the teacher is built with."""
    found = WanModel.config_from_json(read_json_file(folder / DIT_CONFIG_FILE))
    if found != expected:
        diffs = {k: (v, getattr(found, k)) for k, v in asdict(expected).items()
                 if getattr(found, k) != v}
        raise CheckpointError(
            f"{folder / DIT_CONFIG_FILE} describes a different model than the teacher config: "
            + ", ".join(f"{k}: expected {a!r}, found {b!r}" for k, (a, b) in diffs.items())
        )


def _inverse_key_map(module: nn.Module, to_other_layout) -> dict[str, str]:
    """other-layout key -> official key, derived by converting the module's own (meta) keys."""
    official = module.state_dict()
    other = to_other_layout(dict(official))
    if len(other) != len(official):
        raise CheckpointError(f"key converter for {type(module).__name__} is not one-to-one")
    # Converters rename keys without touching tensors, so identity of the tensor objects pairs
    # each converted key with its source key.
    by_id = {id(v): k for k, v in official.items()}
    return {k: by_id[id(v)] for k, v in other.items()}


def _diffusers_key_map(module: nn.Module, to_other_layout, aliases: dict[str, str | None] = {}):
    inverse = _inverse_key_map(module, to_other_layout)

    def key_map(key: str) -> str | None:
        if key in inverse:
            return inverse[key]
        if key in aliases:
            return aliases[key]
        return key  # unknown keys reach materialize(), which names them in its error

    return key_map


def _build(cls, **kwargs):
    with torch.device("meta"):
        return cls(**kwargs)


def _finish(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def load_teacher(
    checkpoint_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    text_encoder_dtype: torch.dtype | None = None,
    experts: bool = True,
) -> TeacherModels:
    """Load a teacher folder (official or Diffusers layout) onto the CPU.

    Args:
        dtype: the DiT experts' dtype; the official fp32 islands stay fp32 (bf16 on a GPU is the
            official setting; fp32 on the CPU).
        text_encoder_dtype: defaults to ``dtype`` (the official T5 runs in bf16 on the GPU).
        experts: False skips the two DiT experts (a student's streaming engine needs only the
            tokenizer, text encoder and VAE: for A14B that saves 57 GB of reading).
    The VAE always runs in fp32, as in the official code. Devices are the caller's business:
    ``teacher.pipeline`` moves only the active expert to the accelerator.
    """
    root = Path(checkpoint_dir)
    layout = detect_layout(root)
    t5_dtype = text_encoder_dtype or dtype
    if layout == "official":
        config = (teacher_config_from_dict(read_json_file(root / CONFIG_FILE), str(root / CONFIG_FILE))
                  if (root / CONFIG_FILE).is_file() else A14B)
        loaded = []
        for sub in (config.expert_high_dir, config.expert_low_dir) if experts else ():
            folder = root / sub
            if not folder.is_dir():
                raise CheckpointError(f"{folder} is missing; the checkpoint folder is incomplete")
            _official_dit_config(folder, config.dit)
            expert = _build(WanModel, **asdict(config.dit))
            materialize(expert, weight_files_in(folder), dtype=dtype, fp32_names=is_fp32_island)
            loaded.append(_finish(expert))
        vae = _build(WanVAE, **asdict(config.vae))
        materialize(vae, [_must_exist(root / config.vae_checkpoint)], dtype=torch.float32)
        text_encoder = _build(UMT5Encoder, **asdict(config.t5))
        materialize(text_encoder, [_must_exist(root / config.t5_checkpoint)], dtype=t5_dtype)
        tokenizer = load_tokenizer(_must_exist(root / config.tokenizer_dir))
    else:
        index = read_json_file(root / "model_index.json")
        dit_cfg = dit_config_from_diffusers(read_json_file(root / "transformer" / DIT_CONFIG_FILE))
        vae_cfg = vae_config_from_diffusers(read_json_file(root / "vae" / DIT_CONFIG_FILE))
        t5_cfg = t5_config_from_transformers(read_json_file(root / "text_encoder" / DIT_CONFIG_FILE))
        boundary = index.get("boundary_ratio")
        if boundary is None:
            raise CheckpointError(
                f"{root / 'model_index.json'} has no boundary_ratio: this is not a two-expert "
                f"Wan2.2 pipeline"
            )
        config = replace(A14B, name="a14b-diffusers", dit=dit_cfg, vae=vae_cfg, t5=t5_cfg,
                         sampling=replace(A14B.sampling, boundary=float(boundary)))
        loaded = []
        for sub in ("transformer", "transformer_2") if experts else ():
            expert = _build(WanModel, **asdict(dit_cfg))
            key_map = _diffusers_key_map(expert, dit_official_to_diffusers)
            materialize(expert, weight_files_in(root / sub), key_map=key_map, dtype=dtype,
                        fp32_names=is_fp32_island)
            loaded.append(_finish(expert))
        vae = _build(WanVAE, **asdict(vae_cfg))
        materialize(vae, weight_files_in(root / "vae"),
                    key_map=_diffusers_key_map(vae, vae_official_to_diffusers), dtype=torch.float32)
        text_encoder = _build(UMT5Encoder, **asdict(t5_cfg))
        # transformers ties encoder.embed_tokens to shared: a file may hold either name or both.
        t5_files = weight_files_in(root / "text_encoder")
        tied = None if "shared.weight" in safetensors_keys(t5_files) else "token_embedding.weight"
        t5_map = _diffusers_key_map(text_encoder, t5_official_to_transformers,
                                    aliases={"encoder.embed_tokens.weight": tied})
        materialize(text_encoder, t5_files, key_map=t5_map, dtype=t5_dtype)
        tokenizer = load_tokenizer(_must_exist(root / "tokenizer"))
    return TeacherModels(config=config, tokenizer=tokenizer, text_encoder=_finish(text_encoder),
                         vae=_finish(vae), expert_high=loaded[0] if experts else None,
                         expert_low=loaded[1] if experts else None)


def _must_exist(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint folder is incomplete")
    return path


def save_teacher(checkpoint_dir: str | Path, models: TeacherModels) -> Path:
    """Write a teacher in the official layout (+ wan_distill.json), each file atomically.

    Used for the embedded shapes teacher; its parts are small, so each is one safetensors file
    (the loader reads sharded folders the same way).
    """
    root = Path(checkpoint_dir)
    config = models.config
    for sub, expert in ((config.expert_high_dir, models.expert_high),
                        (config.expert_low_dir, models.expert_low)):
        save_safetensors_atomic(expert.state_dict(), root / sub / DIT_WEIGHTS_FILE)
        write_text_atomic(json.dumps(WanModel.config_to_json(config.dit), indent=2),
                          root / sub / DIT_CONFIG_FILE)
    save_safetensors_atomic(models.vae.state_dict(), root / config.vae_checkpoint)
    save_safetensors_atomic(models.text_encoder.state_dict(), root / config.t5_checkpoint)
    models.tokenizer.save(root / config.tokenizer_dir)
    write_text_atomic(json.dumps(teacher_config_to_dict(config), indent=2, ensure_ascii=False),
                      root / CONFIG_FILE)
    return root
