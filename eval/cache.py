"""The project's cache folder for converted weights (e.g. the I3D safetensors file).

Nothing here downloads anything: this only says where installed files live.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "WAN_DISTILL_CACHE"


def cache_dir() -> Path:
    """Return the cache folder: ``$WAN_DISTILL_CACHE`` if set and non-empty, else
    ``~/.cache/wan-distill``.

    The folder is not created here; writers create it when they first write into it.
    """
    override = os.environ.get(CACHE_ENV_VAR, "").strip()
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "wan-distill"
