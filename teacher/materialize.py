"""Filling a module built on the meta device with tensors read from weight files.

Why the meta device: an A14B expert is 57 GB in fp32. Building it normally would allocate and
randomly initialise all of it before the checkpoint overwrites it, and ``load_state_dict`` of a
full state dict would hold a second copy. Here each tensor is read, cast and assigned into place
one at a time, so the process holds one copy plus one tensor in flight.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from teacher.weight_files import CheckpointError, iter_tensors

KeyMap = Callable[[str], str | None]
"""Renames a file key to a module key; None drops the key (a known alias such as a tied copy)."""


def materialize(
    module: nn.Module,
    files: Iterable[str | os.PathLike],
    *,
    key_map: KeyMap | None = None,
    dtype: torch.dtype | None = None,
    fp32_names: Callable[[str], bool] | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Assign every parameter and persistent buffer of ``module`` from ``files``; strict.

    Args:
        module: built under ``torch.device("meta")``; its state-dict keys are the expected keys.
        files: weight files (safetensors or .pth) whose keys, after ``key_map``, are exactly the
            module's keys.
        key_map: renames file keys (e.g. the Diffusers layout to the official one).
        dtype: floating tensors are cast to it; None keeps the file's dtype.
        fp32_names: keys for which floating tensors stay float32 whatever ``dtype`` says (the
            official fp32 islands of the DiT: time embedding, modulation, head).
        device: where the tensors are placed.

    Raises:
        CheckpointError naming the file, the key, what was expected and what was found, for an
        unexpected key, a duplicate, a shape mismatch, or keys that no file provided.
    """
    expected = {k: v for k, v in module.state_dict(keep_vars=True).items()}
    seen: dict[str, Path] = {}
    for path in files:
        path = Path(path)
        for file_key, tensor in iter_tensors(path):
            key = key_map(file_key) if key_map else file_key
            if key is None:
                continue
            if key not in expected:
                raise CheckpointError(
                    f"{path}: unexpected key {file_key!r}"
                    + (f" (mapped to {key!r})" if key != file_key else "")
                    + f"; the model ({type(module).__name__}) has no such parameter. The file "
                    f"belongs to another model or configuration"
                )
            if key in seen:
                raise CheckpointError(f"{path}: key {key!r} was already loaded from {seen[key]}")
            want = expected[key]
            if tuple(tensor.shape) != tuple(want.shape):
                raise CheckpointError(
                    f"{path}: key {file_key!r} has shape {list(tensor.shape)}, the model expects "
                    f"{list(want.shape)}; the checkpoint and the model configuration disagree"
                )
            if tensor.is_floating_point():
                target = torch.float32 if fp32_names and fp32_names(key) else (dtype or tensor.dtype)
                tensor = tensor.to(device=device, dtype=target)
            else:
                tensor = tensor.to(device=device)
            _assign(module, key, tensor)
            seen[key] = path
    missing = [k for k in expected if k not in seen]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{len(missing)} key(s) of {type(module).__name__} are in no file of "
            f"{sorted({str(p) for p in seen.values()}) or 'the given files'}: {shown}{more}; the "
            f"checkpoint is incomplete (a missing shard?)"
        )
    _check_no_meta_left(module)
    return module


def _assign(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Replace one meta parameter or buffer in place, keeping its Parameter-ness and grad flag."""
    owner_name, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:  # state_dict listed it, so this would be a bug in this function
        raise CheckpointError(f"{key!r} is neither a parameter nor a buffer of {type(owner).__name__}")


def _check_no_meta_left(module: nn.Module) -> None:
    """Non-persistent buffers are not in any file; a module must rebuild them itself."""
    for name, buf in module.named_buffers():
        if buf.is_meta:
            raise CheckpointError(
                f"buffer {name!r} of {type(module).__name__} is still on the meta device after "
                f"loading: the module must compute it on first use instead of registering it"
            )
