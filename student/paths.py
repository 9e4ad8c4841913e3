"""Where distillation writes what other commands read by default.

One function per location, so ``wan-distill stream`` / ``eval`` and the distillation job agree
on the default student folder without repeating the rule.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV_VAR = "WAN_DISTILL_HOME"


def wan_distill_home() -> Path:
    """``$WAN_DISTILL_HOME`` if set and non-empty, else ``~/.cache/wan-distill`` (not created here)."""
    override = os.environ.get(HOME_ENV_VAR, "").strip()
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "wan-distill"


def default_student_dir(preset: str = "shapes") -> Path:
    """The folder a distilled student of ``preset`` is exported to and loaded from by default:
    ``<home>/students/<preset>`` (config.json + diffusion_pytorch_model.safetensors, and the EMA
    weights in ``ema/``)."""
    if not preset or "/" in preset or preset.startswith("."):
        raise ValueError(f"student preset name {preset!r} must be a plain name such as 'shapes'")
    return wan_distill_home() / "students" / preset


def default_latent_cache_dir() -> Path:
    """Parent folder of encoded-latent caches (one sub-folder per data source and teacher)."""
    return wan_distill_home() / "latents"


def default_run_dir(preset: str = "shapes") -> Path:
    """Working folder of a distillation run: checkpoints, the adapted causal teacher, logs."""
    return wan_distill_home() / "runs" / preset


def embedded_teacher_dir() -> Path:
    """The shipped shapes-world teacher (``teacher/weights/shapes`` inside the project)."""
    return Path(__file__).resolve().parent.parent / "teacher" / "weights" / "shapes"
