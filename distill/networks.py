"""Building the causal networks of both stages, sharded (FSDP2) or plain, from weight folders.

A causal network is a ``student.causal_dit.CausalWanModel`` described by a ``StudentConfig``:
the causal teacher experts are students without the guidance embedding. Weights come from a
folder with an official ``config.json`` + safetensors (an expert folder of the teacher, a stage-A
export, or Wan2.1-T2V-1.3B), whose guidance embedding, which no such folder has, starts at zero;
or from a student folder that has one (the ODE-initialised student), which keeps it.

The frozen teacher experts live in ``FrozenExperts``, a plain object: assigned to a
LightningModule attribute it is NOT registered as a submodule, so it stays out of the state dict,
the checkpoints, the optimizer and Lightning's dtype/device conversions (reference A0 item 2, A5).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh

from distill.sharding import (
    dtype_of,
    load_sharded_weights,
    mixed_precision,
    paired_local_tensors,
    shard_network,
)
from student.causal_dit import GUIDANCE_PREFIX, CausalWanModel
from student.checkpoint import (
    STUDENT_CONFIG_FILE,
    has_guidance_embedding,
    read_student_config,
    student_from_wan_folder,
    student_weights_into,
)
from student.config import StudentConfig
from teacher.config import TeacherConfig


@dataclass(eq=False)
class FrozenExperts:
    """The two frozen causal teacher experts (not an nn.Module on purpose, see module doc)."""

    expert_high: CausalWanModel
    expert_low: CausalWanModel

    def expert(self, name: str) -> CausalWanModel:
        if name not in ("high", "low"):
            raise ValueError(f"expert must be 'high' or 'low', got {name!r}")
        return self.expert_high if name == "high" else self.expert_low


def causal_expert_config(student: StudentConfig, teacher: TeacherConfig) -> StudentConfig:
    """The StudentConfig of a causal teacher expert: the teacher's DiT, the student's chunking,
    no guidance embedding (the teacher gets CFG instead)."""
    return replace(student, name=f"{teacher.name}-causal-expert", teacher=teacher.name,
                   dit=teacher.dit, guidance_embedding=False)


def load_causal_network(config: StudentConfig, folder: str | Path, *, device: torch.device,
                        mesh: DeviceMesh | None, trainable: bool, dtype: str = "fp32",
                        compute_dtype: str = "fp32", activation_checkpointing: bool = False,
                        reshard_after_forward: bool = True) -> CausalWanModel:
    """A ``CausalWanModel`` of ``config`` with the WanModel weights of ``folder``.

    Without a mesh: built on meta and filled tensor by tensor (``student.checkpoint``), on
    ``device``. With a mesh: built on meta, sharded per block then root (bf16 mixed precision
    for trainable networks when ``compute_dtype`` is bf16, activation checkpointing optional),
    ``to_empty`` on ``device``, then each rank reads its slices of the safetensors.

    Args:
        dtype: storage dtype ("fp32" for trained networks; the teacher may be "bf16"), with the
            fp32 islands kept fp32.
        trainable: requires_grad and train mode, else frozen and eval.
    """
    folder = Path(folder)
    if (folder / STUDENT_CONFIG_FILE).is_file() and read_student_config(folder).boundary is not None:
        raise ValueError(f"{folder} holds a two-network student; start from one of its networks' "
                         f"folders ({folder / 'high_noise_model'} or {folder / 'low_noise_model'})")
    keep_guidance = config.guidance_embedding and has_guidance_embedding(folder)
    if mesh is None:
        load = student_weights_into if keep_guidance else student_from_wan_folder
        return load(folder, config, dtype=dtype_of(dtype), device=device, trainable=trainable)
    with torch.device("meta"):
        model = CausalWanModel.from_config(config)
    if dtype != "fp32":
        model.to(dtype_of(dtype)).keep_fp32_islands()
    model.requires_grad_(trainable)
    model.train(trainable)
    shard_network(model, mesh, mp_policy=mixed_precision(compute_dtype) if trainable else None,
                  activation_checkpointing=activation_checkpointing and trainable,
                  reshard_after_forward=reshard_after_forward, trainable=trainable)
    model.to_empty(device=device)
    if keep_guidance:
        load_sharded_weights(model, folder)
        return model
    load_sharded_weights(model, folder, skip_prefixes=(GUIDANCE_PREFIX,))
    # Zero last layer: the new embedding adds nothing yet (same rule as the unsharded path).
    model.init_guidance_embedding()
    return model


def ema_copy(student: CausalWanModel, config: StudentConfig, *, device: torch.device,
             mesh: DeviceMesh | None, compute_dtype: str = "fp32",
             reshard_after_forward: bool = True) -> CausalWanModel:
    """A frozen copy of ``student`` sharded the same way (its local shards copied, nothing
    gathered), for the EMA target network."""
    with torch.device("meta"):
        ema = CausalWanModel.from_config(config)
    ema.requires_grad_(False)
    ema.eval()
    if mesh is not None:
        # Same placements as the student, so shard i of the EMA pairs with shard i of the student.
        shard_network(ema, mesh, mp_policy=mixed_precision(compute_dtype),
                      reshard_after_forward=reshard_after_forward, trainable=False)
    ema.to_empty(device=device)
    with torch.no_grad():
        for e, s in zip(*paired_local_tensors(ema, student)):
            e.copy_(s)
    return ema
