"""Loading and saving a student folder, and initialising a student from a Wan DiT.

A student folder has the official single-model layout plus one project file::

    config.json                           the WanModel config (official keys, the DiT shape)
    diffusion_pytorch_model.safetensors   the student's state dict (WanModel keys + guidance_embedding.*)
    wan_distill_student.json              the full StudentConfig (chunking, window, sampler)

A student is initialised from an expert state dict (e.g. the adapted low-noise expert) or from an
official DiT folder (Wan2.1-T2V-1.3B, or one expert folder of Wan2.2-A14B): strict key checking,
with only the guidance-embedding keys new (zero-initialised so the student starts equal to its
source).

A two-network student (``StudentConfig.boundary`` set, ``student.moe.MoEStudent``) mirrors the
teacher's two-expert layout: its ``wan_distill_student.json`` at the top, and one single-network
student folder per network in ``high_noise_model/`` and ``low_noise_model/``. Modules are built on the meta device and filled tensor by tensor
(``teacher.materialize``), so host memory holds one copy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from teacher.dit import WanModel, is_fp32_island
from teacher.materialize import materialize
from teacher.weight_files import (
    CheckpointError,
    save_safetensors_atomic,
    weight_files_in,
    write_text_atomic,
    read_json_file,
)
from student.causal_dit import CausalWanModel, is_student_fp32_island
from student.config import StudentConfig, student_config_from_dict, student_config_to_dict
from student.moe import MoEStudent

STUDENT_CONFIG_FILE = "wan_distill_student.json"
DIT_CONFIG_FILE = "config.json"
DIT_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
MOE_SUBFOLDERS = {"high": "high_noise_model", "low": "low_noise_model"}


def _read_student_json(path: Path) -> dict:
    return read_json_file(path, what="student folder")



def _check_dit_config(folder: Path, config: StudentConfig) -> None:
    """The folder's official config.json must describe ``config.dit``."""
    found = WanModel.config_from_json(_read_student_json(folder / DIT_CONFIG_FILE))
    if found != config.dit:
        diffs = ", ".join(f"{k}: expected {v!r}, found {getattr(found, k)!r}"
                          for k, v in asdict(config.dit).items() if getattr(found, k) != v)
        raise CheckpointError(f"{folder / DIT_CONFIG_FILE} describes another DiT than student "
                              f"config {config.name!r}: {diffs}")


def _finish(model: CausalWanModel, trainable: bool) -> CausalWanModel:
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def save_student(folder: str | Path, model: CausalWanModel, config: StudentConfig) -> Path:
    """Write ``model`` and ``config`` as a student folder (each file atomically); returns it."""
    folder = Path(folder)
    if model.config != config.dit or model.chunk_frames != config.chunk_frames:
        raise ValueError(f"the model (dit {model.config}, chunk_frames {model.chunk_frames}) does "
                         f"not match student config {config.name!r}; save it with its own config")
    if (model.guidance_embedding is not None) != config.guidance_embedding:
        raise ValueError(f"the model's guidance embedding presence does not match "
                         f"config.guidance_embedding={config.guidance_embedding}")
    save_safetensors_atomic(model.state_dict(), folder / DIT_WEIGHTS_FILE)
    write_text_atomic(json.dumps(WanModel.config_to_json(config.dit), indent=2),
                      folder / DIT_CONFIG_FILE)
    write_text_atomic(json.dumps(student_config_to_dict(config), indent=2),
                      folder / STUDENT_CONFIG_FILE)
    return folder


def save_moe_student(folder: str | Path, student: MoEStudent, config: StudentConfig) -> Path:
    """Write a two-network student (see module doc); each file atomically, the top-level
    config last, so a folder without it is recognisably unfinished."""
    if config.boundary is None or config.boundary != student.boundary:
        raise ValueError(f"student config {config.name!r} has boundary={config.boundary} but the "
                         f"two-network student switches at {student.boundary}")
    folder = Path(folder)
    single = replace(config, boundary=None)
    save_student(folder / MOE_SUBFOLDERS["high"], student.high, single)
    save_student(folder / MOE_SUBFOLDERS["low"], student.low, single)
    write_text_atomic(json.dumps(student_config_to_dict(config), indent=2),
                      folder / STUDENT_CONFIG_FILE)
    return folder


def read_student_config(folder: str | Path) -> StudentConfig:
    """The StudentConfig of a student folder (``wan_distill_student.json``)."""
    path = Path(folder) / STUDENT_CONFIG_FILE
    return student_config_from_dict(_read_student_json(path), str(path))


def load_student(folder: str | Path, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu",
                 trainable: bool = False) -> tuple[CausalWanModel | MoEStudent, StudentConfig]:
    """Load a student folder written by ``save_student`` or ``save_moe_student`` (strict: every
    key, every shape); a two-network folder gives a ``MoEStudent``.

    Args:
        dtype: weight dtype; the fp32 islands (time/guidance embeddings, modulation, head) stay
            fp32, as in the official precision policy.
        device: where the weights are placed.
        trainable: False (default) returns the model in eval mode with gradients off.
    """
    config = read_student_config(folder)
    if config.boundary is not None:
        single = replace(config, boundary=None)
        high, low = (student_weights_into(Path(folder) / MOE_SUBFOLDERS[name], single, dtype=dtype,
                                          device=device, trainable=trainable)
                     for name in ("high", "low"))
        return MoEStudent(high, low, config.boundary, config.num_train_timesteps), config
    return student_weights_into(folder, config, dtype=dtype, device=device,
                                trainable=trainable), config


def has_guidance_embedding(folder: str | Path) -> bool:
    """True for a student folder whose network has a guidance embedding (a distilled or
    ODE-initialised student), False for an expert-format folder (a Wan DiT, a causal expert)."""
    folder = Path(folder)
    return (folder / STUDENT_CONFIG_FILE).is_file() and read_student_config(folder).guidance_embedding


def student_weights_into(folder: str | Path, config: StudentConfig, *,
                         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                         trainable: bool = False) -> CausalWanModel:
    """A student of ``config`` holding the weights of the student folder ``folder``, strictly:
    every key (guidance embedding included) and every shape. The folder's own sampler settings
    do not matter, only its DiT (checked against ``config.dit``)."""
    folder = Path(folder)
    _check_dit_config(folder, config)
    with torch.device("meta"):
        model = CausalWanModel.from_config(config)
    materialize(model, weight_files_in(folder), dtype=dtype, fp32_names=is_student_fp32_island,
                device=device)
    return _finish(model, trainable)


def student_from_expert_state_dict(config: StudentConfig, state_dict: dict[str, torch.Tensor], *,
                                   trainable: bool = True) -> CausalWanModel:
    """A student of ``config`` initialised from an expert's state dict (strict; only the
    guidance keys are new and start at zero). The tensors are copied, so the expert stays
    untouched. Returns a trainable model by default (initialisation is the start of training).
    """
    model = CausalWanModel.from_config(config)
    model.load_expert_state_dict(state_dict)
    device = next(iter(state_dict.values())).device if state_dict else torch.device("cpu")
    return _finish(model.to(device), trainable)


def student_from_wan_folder(folder: str | Path, config: StudentConfig, *,
                            dtype: torch.dtype = torch.float32,
                            device: torch.device | str = "cpu",
                            trainable: bool = True) -> CausalWanModel:
    """A student initialised from an official DiT folder: ``Wan2.1-T2V-1.3B`` (config.json and
    safetensors at the top) or one Wan2.2 expert folder (``low_noise_model/``).

    The folder's config.json must equal ``config.dit``; its weights must hold exactly the
    WanModel keys (``teacher.materialize`` names any unexpected, missing or misshaped key and
    its file). The guidance embedding is new and zero-initialised.
    """
    folder = Path(folder)
    _check_dit_config(folder, config)
    with torch.device("meta"):
        base = WanModel(**asdict(config.dit))
        model = CausalWanModel.from_config(config)
    materialize(base, weight_files_in(folder), dtype=dtype, fp32_names=is_fp32_island,
                device=device)
    # assign=True moves the base's tensors into the student without a copy.
    model.load_expert_state_dict(base.state_dict(), assign=True)
    _check_materialised(model)
    return _finish(model, trainable)


def _check_materialised(model: nn.Module) -> None:
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"parameters {left[:5]} are still on the meta device after loading; "
                              f"the checkpoint did not provide them")
