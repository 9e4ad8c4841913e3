"""Export of the distilled student and its EMA as student folders (``student.checkpoint``).

Layout written to ``folder``::

    config.json, diffusion_pytorch_model.safetensors, wan_distill_student.json   <- ``main`` weights
    <other>/ (the same three files)                                              <- the other weights
    wan_distill_export.json       which weights are where, the training step, the teacher

``main`` is "ema" by default (the usual inference network of consistency distillation), so
``student.checkpoint.load_student(folder)`` - what ``wan-distill stream`` / ``eval`` do by
default - gets it; the online student is in ``student/`` (or the EMA in ``ema/`` when main is
"student"). Under FSDP the full weights are gathered from the shards (a collective: every rank
must call ``export_student``); rank 0 writes, each file atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.sharding import full_state_dict
from student.causal_dit import CausalWanModel
from student.checkpoint import load_student, save_moe_student, save_student
from student.config import StudentConfig
from student.moe import MoEStudent
from teacher.weight_files import write_text_atomic

EXPORT_FILE = "wan_distill_export.json"
WEIGHT_CHOICES = ("ema", "student")


def _plain_model(state: dict[str, torch.Tensor], config: StudentConfig) -> CausalWanModel:
    """A CPU CausalWanModel holding ``state`` (built on meta, tensors assigned: no copy)."""
    with torch.device("meta"):
        model = CausalWanModel.from_config(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def export_student(student: torch.nn.Module, ema_student: torch.nn.Module, config: StudentConfig,
                   folder: str | Path, *, main: str = "ema", rank: int = 0,
                   info: dict | None = None) -> Path | None:
    """Write the student and EMA weights as student folders (see module doc).

    Args:
        student, ema_student: the trained networks (sharded or plain).
        config: their StudentConfig.
        folder: output folder (created).
        main: "ema" or "student": which weights go to the top level.
        rank: this process's global rank (only rank 0 writes).
        info: extra JSON-ready facts for ``wan_distill_export.json`` (step, teacher...).
    Returns:
        the folder on rank 0, None on the other ranks.
    """
    if main not in WEIGHT_CHOICES:
        raise ValueError(f"main={main!r} must be one of {list(WEIGHT_CHOICES)}")
    # Collectives first, on every rank, in the same order.
    states = {"student": full_state_dict(student), "ema": full_state_dict(ema_student)}
    if rank != 0:
        return None
    folder = Path(folder)
    other = "student" if main == "ema" else "ema"
    save_student(folder, _plain_model(states[main], config), config)
    save_student(folder / other, _plain_model(states[other], config), config)
    write_text_atomic(json.dumps({"main": main, other: f"{other}/", **(info or {})}, indent=2,
                                 ensure_ascii=False), folder / EXPORT_FILE)
    return folder


def export_moe_student(network_weights: dict[str, tuple[Path, Path]], config: StudentConfig,
                       folder: str | Path, *, main: str = "ema", info: dict | None = None) -> Path:
    """Join a two-network student's networks into one two-network export.

    ``network_weights`` maps "high"/"low" to (the student folder of its ``main`` weights, the
    student folder of its other weights): for a network stage B trained, the top level and the
    subfolder of its ``export_student`` folder; for one it did not train, its starting folder
    twice. ``folder`` gets the ``export_student`` layout with two-network students
    (``student.checkpoint.save_moe_student``): the ``main`` weights on top, the others in
    ``<other>/``. Rank 0 only.
    """
    if main not in WEIGHT_CHOICES:
        raise ValueError(f"main={main!r} must be one of {list(WEIGHT_CHOICES)}")
    if config.boundary is None:
        raise ValueError(f"student config {config.name!r} has no boundary: it is one network")
    folder = Path(folder)
    other = "student" if main == "ema" else "ema"
    for which, target in ((0, folder), (1, folder / other)):
        nets = {name: load_student(paths[which])[0] for name, paths in network_weights.items()}
        save_moe_student(target, MoEStudent(nets["high"], nets["low"], config.boundary,
                                            config.num_train_timesteps), config)
    write_text_atomic(json.dumps({"main": main, other: f"{other}/", **(info or {})}, indent=2,
                                 ensure_ascii=False), folder / EXPORT_FILE)
    return folder
