"""Save and load a tiny streaming decoder (``student.tiny_decoder``) beside the VAE it replaces.

A decoder folder holds ``tiny_decoder.json`` (its ``TinyDecoderConfig``, with the fingerprint of
the VAE it was trained for) and ``tiny_decoder.safetensors``. A teacher folder keeps the decoder
trained for its VAE in ``<teacher>/tiny_decoder``; loading checks the fingerprint, because a
decoder of another VAE would turn the same latents into other frames without any error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from student.tiny_decoder import TinyDecoder, TinyDecoderConfig, vae_fingerprint
from teacher.weight_files import CheckpointError, save_safetensors_atomic, write_text_atomic

TINY_DECODER_FOLDER = "tiny_decoder"
CONFIG_FILE = "tiny_decoder.json"
WEIGHTS_FILE = "tiny_decoder.safetensors"


def save_tiny_decoder(folder: str | Path, decoder: TinyDecoder) -> Path:
    """Write ``tiny_decoder.json`` and ``tiny_decoder.safetensors`` into ``folder``, each
    atomically (weights first, so a config never names weights that are not there)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(decoder.state_dict(), folder / WEIGHTS_FILE)
    write_text_atomic(json.dumps(decoder.config.to_dict(), indent=2), folder / CONFIG_FILE)
    return folder


def has_tiny_decoder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def load_tiny_decoder(folder: str | Path, vae: nn.Module | None = None, *,
                      device: torch.device | str = "cpu") -> TinyDecoder:
    """Load a decoder folder (strict: every key and shape), in eval mode without gradients.

    With ``vae``, check that the decoder was trained for exactly that VAE (its weights'
    fingerprint): a decoder of another VAE would decode the latents into the wrong frames.
    """
    folder = Path(folder)
    if not has_tiny_decoder(folder):
        raise FileNotFoundError(f"no tiny decoder in {folder} (needs {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE}); train one with `wan-distill train-decoder`")
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    config = TinyDecoderConfig.from_dict(data, str(path))
    if vae is not None:
        config.check_vae(vae)
        if config.vae_fingerprint != vae_fingerprint(vae):
            raise ValueError(f"the tiny decoder in {folder} was trained for the VAE with "
                             f"fingerprint {config.vae_fingerprint or '(none)'}, not this one "
                             f"({vae_fingerprint(vae)}); retrain it with `wan-distill "
                             f"train-decoder` for this teacher")
    decoder = TinyDecoder(config)
    decoder.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return decoder.to(device).eval().requires_grad_(False)


def find_tiny_decoder(teacher_dir: str | Path, vae: nn.Module, *,
                      device: torch.device | str = "cpu") -> tuple[TinyDecoder | None, str | None]:
    """(the decoder in ``<teacher_dir>/tiny_decoder``, None), or (None, the reason) when the
    folder is missing or holds a decoder trained for another VAE (for callers that fall back to
    the VAE or skip, rather than fail)."""
    try:
        return load_tiny_decoder(Path(teacher_dir) / TINY_DECODER_FOLDER, vae, device=device), None
    except (FileNotFoundError, ValueError) as err:
        return None, str(err)
