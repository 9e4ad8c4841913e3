"""Reading weight files as they are published: safetensors (single or sharded with an index) and
torch ``.pth`` state dicts, one tensor at a time.

Nothing here builds a model. ``teacher.materialize`` puts what these functions yield into a module
built on the meta device, so host memory never holds two copies of an expert.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, damaged or does not match the model."""


SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
SAFETENSORS_SINGLE = "diffusion_pytorch_model.safetensors"


def weight_files_in(folder: str | os.PathLike) -> list[Path]:
    """The weight files of one model folder, in shard order.

    Accepts the Diffusers/official layout: ``*.safetensors.index.json`` naming its shards, or one
    ``*.safetensors`` file. Every shard the index names must exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist; check the checkpoint path")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(
            f"{folder} holds several index files ({[p.name for p in indexes]}); keep exactly one"
        )
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{index} is not a valid safetensors index (expected a JSON object with a "
                f"'weight_map'): {err}; re-download it"
            ) from None
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{index} names shard(s) that are missing: {missing}; re-download them into {folder}"
            )
        return [folder / name for name in shards]
    singles = sorted(folder.glob("*.safetensors"))
    if len(singles) == 1:
        return singles
    if not singles:
        raise CheckpointError(
            f"{folder} holds no weights: expected {SAFETENSORS_INDEX} with its shards or one "
            f"*.safetensors file"
        )
    raise CheckpointError(
        f"{folder} holds several *.safetensors files {[p.name for p in singles]} but no index "
        f"naming them; add the *.safetensors.index.json that came with them"
    )


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) pairs of one weight file, loading one tensor at a time.

    ``.safetensors`` is read through safe_open; ``.pth``/``.pt``/``.bin`` through torch.load with
    ``weights_only=True`` (never arbitrary pickles) and ``mmap=True`` so a large file is paged in
    tensor by tensor rather than read whole.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist; check the checkpoint folder")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"cannot read {path}: {err}; the file is damaged, re-download it") from None
        return
    if path.suffix in {".pth", ".pt", ".bin"}:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise CheckpointError(
                f"cannot read {path} as a torch state dict ({type(err).__name__}: {err}); the file "
                f"is damaged or not a plain state dict"
            ) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a state dict")
        for key in list(state):
            yield key, state.pop(key)
        return
    raise CheckpointError(f"{path}: unknown weight format {path.suffix!r}; expected .safetensors or .pth")


def read_json_file(path: str | os.PathLike, what: str = "checkpoint folder") -> dict:
    """A JSON file of a checkpoint folder, or a CheckpointError naming the path and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the {what} is incomplete")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-download or rewrite it") from None


def safetensors_keys(paths) -> set[str]:
    """The tensor names stored in safetensors files (headers only; no tensor is read)."""
    keys: set[str] = set()
    for path in paths:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys.update(f.keys())
    return keys


# The process umask, read once at import (reading it means setting it): files written here get
# the mode a plain open() would give them, not mkstemp's private 0600.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_destination(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; when the block succeeds it is renamed
    onto ``path`` (readers never see a half-written file, an old file stays intact until then),
    when it fails it is removed.

    ``suffix`` is the temporary file's ending (a writer that picks its format from the name,
    like imageio's, needs the real one). The result has mode 0666 minus the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file so that a crash never leaves a half-written file at ``path``."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_destination(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write a small text file atomically (temp file in the same folder, then rename)."""
    with atomic_destination(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    """Write a file's bytes atomically (temp file in the same folder, then rename)."""
    with atomic_destination(path) as tmp:
        tmp.write_bytes(data)
