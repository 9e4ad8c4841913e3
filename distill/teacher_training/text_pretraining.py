"""Stage 3 of teacher training: the text encoder learns what a caption says before flow matching.

The real teacher's umT5 arrives pretrained on text and frozen; the shapes encoder starts from
random weights. Trained only through the flow loss it learned the colour word everywhere in the
caption but left the direction word on its own bytes, and the experts never learned to read it
(motion at chance; BENCHMARKS.md, "Shapes teacher"). Giving the experts one-hot factor embeddings
instead made the high-noise expert follow the captioned direction, so the text representation was
the bottleneck. This stage makes every caption token predict the caption's three factors (shape,
colour, motion) through one linear head per factor, over every caption of the world in both
languages, so each factor can be read from any token. The heads are thrown away afterwards.
"""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from distill.teacher_training.settings import TextStageConfig
from distill.teacher_training.text import tokenize_captions
from eval.shapes_world import COLOURS, LANGS, MOTIONS, SHAPES, all_factors, caption
from teacher.config import T5Config
from teacher.t5 import UMT5Encoder

FACTOR_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("shape", SHAPES), ("colour", COLOURS), ("motion", MOTIONS))


def caption_table(tokenizer, text_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every caption of the world (84 factor combinations x both languages).

    Returns ids, mask [N, text_len] int64 and labels [N, 3] int64 (indices into SHAPES, COLOURS,
    MOTIONS, in that order).
    """
    factors = [(f, lang) for f in all_factors() for lang in LANGS]
    ids, mask = tokenize_captions(tokenizer, [caption(f, lang) for f, lang in factors], text_len)
    labels = torch.tensor([[values.index(getattr(f, name)) for name, values in FACTOR_CLASSES]
                           for f, _ in factors], dtype=torch.int64)
    return ids, mask, labels


def per_token_factor_logits(hidden: torch.Tensor, mask: torch.Tensor, heads: nn.ModuleList
                            ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits of each factor head on every valid token.

    hidden [B, L, dim], mask [B, L] -> ([valid, classes_k] per factor k, row index [valid] of
    each valid token's caption).
    """
    valid = mask.bool()
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(valid)[valid]
    tokens = hidden[valid]
    return [head(tokens) for head in heads], rows


def per_token_factor_loss(hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                          heads: nn.ModuleList) -> torch.Tensor:
    """Sum over factors of the cross-entropy of every valid token against its caption's factor,
    averaged over valid tokens: hidden [B, L, dim], mask [B, L], labels [B, 3] -> scalar."""
    logits, rows = per_token_factor_logits(hidden, mask, heads)
    return sum(nn.functional.cross_entropy(lg, labels[rows, k]) for k, lg in enumerate(logits))


@torch.no_grad()
def per_token_factor_accuracy(hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                              heads: nn.ModuleList) -> dict[str, float]:
    """Fraction of valid tokens whose head predicts their caption's factor, per factor."""
    logits, rows = per_token_factor_logits(hidden, mask, heads)
    return {name: float((lg.argmax(-1) == labels[rows, k]).float().mean())
            for k, ((name, _), lg) in enumerate(zip(FACTOR_CLASSES, logits))}


class TextPretrainingModule(L.LightningModule):
    """A fresh UMT5Encoder plus one linear head per factor, trained by ``per_token_factor_loss``."""

    def __init__(self, config: T5Config, stage: TextStageConfig):
        super().__init__()
        self.stage = stage
        self.text_encoder = UMT5Encoder(**asdict(config))
        self.heads = nn.ModuleList(nn.Linear(config.dim, len(values)) for _, values in FACTOR_CLASSES)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        ids, mask, labels = batch
        loss = per_token_factor_loss(self.text_encoder(ids, mask), mask, labels, self.heads)
        self.log("text/loss", loss, prog_bar=True, on_step=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.stage.lr, weight_decay=0.0)


def caption_loader(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, stage: TextStageConfig,
                   seed: int) -> DataLoader:
    """Batches of captions drawn with replacement, ``stage.steps`` batches in all."""
    data = TensorDataset(ids, mask, labels)
    sampler = RandomSampler(data, replacement=True, num_samples=stage.steps * stage.batch_size,
                            generator=torch.Generator().manual_seed(seed))
    return DataLoader(data, batch_size=stage.batch_size, sampler=sampler)
