"""Stage 2 of teacher training: the shapes world encoded once into latents.

The flow stage would otherwise run the VAE encoder on every step. Each cached clip keeps its raw
mu and log-variance (a fresh latent is sampled from them every time the clip is drawn, a free
augmentation) and its factors, so its caption can be given in either language at training time.
The per-channel statistics of the sampled latents become the teacher's ``latents_mean`` /
``latents_std``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from eval.shapes_world import LANGS, Factors, caption, render, sample_spec
from distill.data.shapes import video_to_tensor
from distill.teacher_training.text import tokenize_captions
from teacher.vae import WanVAE
from teacher.weight_files import save_safetensors_atomic, write_text_atomic

LATENTS_FILE = "latents.safetensors"
FACTORS_FILE = "factors.json"


@dataclass
class LatentCache:
    """Encoded clips: raw ``mu`` and ``log_var`` [N, z_dim, F, h, w] float32 and N ``factors``."""

    mu: torch.Tensor
    log_var: torch.Tensor
    factors: list[Factors]

    def __post_init__(self) -> None:
        if self.mu.shape != self.log_var.shape or self.mu.ndim != 5:
            raise ValueError(f"mu {list(self.mu.shape)} and log_var {list(self.log_var.shape)} must "
                             f"both be [N, z_dim, F, h, w]")
        if len(self.factors) != self.mu.shape[0]:
            raise ValueError(f"{len(self.factors)} factors for {self.mu.shape[0]} latents")

    def __len__(self) -> int:
        return self.mu.shape[0]

    def save(self, folder: str | Path) -> Path:
        """Write ``latents.safetensors`` and ``factors.json`` into ``folder`` (atomically)."""
        folder = Path(folder)
        save_safetensors_atomic({"mu": self.mu, "log_var": self.log_var}, folder / LATENTS_FILE)
        rows = [[f.shape, f.colour, f.motion] for f in self.factors]
        write_text_atomic(json.dumps(rows), folder / FACTORS_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> LatentCache:
        folder = Path(folder)
        for name in (LATENTS_FILE, FACTORS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing; encode the world again "
                                        f"(delete {folder} and rerun the latent stage)")
        tensors = load_file(str(folder / LATENTS_FILE))
        rows = json.loads((folder / FACTORS_FILE).read_text(encoding="utf-8"))
        return cls(tensors["mu"], tensors["log_var"], [Factors(*row) for row in rows])


@torch.no_grad()
def encode_world(vae: WanVAE, num_videos: int, seed: int, batch_size: int = 32,
                 num_frames: int = 17, progress=None) -> LatentCache:
    """Render ``num_videos`` clips of the shapes world and encode them with ``vae``.

    Clip i is ``sample_spec(default_rng([seed, 2, i]))`` (stream 2: apart from the data module's
    train and validation streams). ``vae`` must use identity latent normalisation so that mu is
    raw; ``progress(done, total)`` is called after each batch.
    """
    if num_videos < 1:
        raise ValueError(f"num_videos={num_videos} must be >= 1")
    vae.eval()
    specs = [sample_spec(np.random.default_rng([seed, 2, i])) for i in range(num_videos)]
    mus, log_vars = [], []
    for start in range(0, num_videos, batch_size):
        chunk = specs[start: start + batch_size]
        video = torch.stack([video_to_tensor(render(s, num_frames)) for s in chunk])
        mu, log_var = vae.encode_moments(video)
        mus.append(mu.float())
        log_vars.append(log_var.float())
        if progress is not None:
            progress(min(start + batch_size, num_videos), num_videos)
    return LatentCache(torch.cat(mus), torch.cat(log_vars), [s.factors for s in specs])


def latent_statistics(cache: LatentCache) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of latents sampled from the cache's posteriors.

    The variance of z = mu + exp(log_var / 2) * eps is var(mu) + mean(exp(log_var)) per channel,
    computed in float64 (sums over ~10^6 elements).
    """
    mu = cache.mu.double().transpose(0, 1).flatten(1)
    var = cache.log_var.double().exp().transpose(0, 1).flatten(1)
    mean = mu.mean(dim=1)
    std = (mu.var(dim=1, unbiased=False) + var.mean(dim=1)).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class CaptionedLatents(Dataset):
    """Flow-stage samples from a LatentCache: a sampled, normalised latent and its caption tokens.

    Item i: {"x0": float32 [z_dim, F, h, w] = (mu + exp(log_var/2) * eps - mean) / std,
    "ids", "mask": int64 [text_len] of clip i's caption in a random language}. Every caption of
    both languages is tokenized once here. Randomness comes from torch's global generator, which
    Lightning seeds.
    """

    def __init__(self, cache: LatentCache, latents_mean, latents_std, tokenizer, text_len: int,
                 languages=LANGS):
        self.cache = cache
        shape = (-1, 1, 1, 1)
        self.mean = torch.tensor(latents_mean, dtype=torch.float32).view(shape)
        self.std = torch.tensor(latents_std, dtype=torch.float32).view(shape)
        self.languages = tuple(languages)
        tokens = [tokenize_captions(tokenizer, [caption(f, lang) for f in cache.factors], text_len)
                  for lang in self.languages]
        self.ids = torch.stack([t[0] for t in tokens])  # [langs, N, text_len]
        self.mask = torch.stack([t[1] for t in tokens])

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict:
        mu, log_var = self.cache.mu[index], self.cache.log_var[index]
        z = mu + torch.randn_like(mu) * (0.5 * log_var).exp()
        lang = int(torch.randint(len(self.languages), ()))
        return {"x0": (z - self.mean) / self.std, "ids": self.ids[lang, index],
                "mask": self.mask[lang, index]}
