"""Stage 4 of teacher training: expert_high + expert_low by flow matching.

The text encoder comes from stage 3 (``text_pretraining``) and stays frozen by default, as the
real teacher's umT5 does; with ``text_lr`` > 0 it is fine-tuned jointly, its gradient coming
from whichever expert each sample was routed to. A fraction of captions is replaced by the
empty caption, which is what the sampler's unconditional pass (negative prompt "") feeds the
experts, so classifier-free guidance works.
"""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch
from torch.utils.data import DataLoader

from distill.data.resumable import resumable_loader
from distill.teacher_training.flow_losses import (
    flow_matching_loss,
    noisy_latents,
    sample_expert_timesteps,
)
from distill.teacher_training.latents import CaptionedLatents
from distill.teacher_training.settings import FlowStageConfig
from distill.teacher_training.text import context_from_ids
from distill.teacher_training.vae_module import warmup_cosine
from teacher.config import TeacherConfig
from teacher.dit import WanModel
from teacher.t5 import UMT5Encoder


EXPERTS = ("high", "low")


def expert_batch_sizes(batch_size: int, high_fraction: float) -> tuple[int, int]:
    """(samples for expert_high, samples for expert_low) of a step of ``batch_size``; each >= 1."""
    if batch_size < 2:
        raise ValueError(f"flow.batch_size={batch_size} must be >= 2 (one sample per expert)")
    n_high = min(batch_size - 1, max(1, round(batch_size * high_fraction)))
    return n_high, batch_size - n_high


class FlowTeacherModule(L.LightningModule):
    """Trains ``expert_high`` and/or ``expert_low`` from scratch (and ``text_encoder`` if
    text_lr > 0).

    Batches (from ``CaptionedLatents``): x0 [B, z_dim, F, h, w] normalised latents, ids/mask
    [B, text_len] caption tokens. With both experts, the first ``expert_batch_sizes(B)[0]``
    samples of a step go to expert_high with t in [boundary*1000, 999], the rest to expert_low
    with t below; the loss is the flow-matching MSE averaged over the whole batch. With one
    expert (``experts=("low",)``, say) the whole batch goes to it: the flow stage trains the two
    in parallel processes that way, since with a frozen text encoder they share nothing.

    Args:
        config: the teacher's architecture and sampling defaults (boundary).
        stage: run knobs.
        empty_ids, empty_mask: [text_len] tokens of the empty caption (EOS alone).
        text_encoder_state: the pretrained text encoder's weights; None starts it from scratch.
        experts: the experts this module trains, a non-empty subset of ("high", "low").
    """

    def __init__(self, config: TeacherConfig, stage: FlowStageConfig, empty_ids: torch.Tensor,
                 empty_mask: torch.Tensor, text_encoder_state: dict | None = None,
                 experts: tuple[str, ...] = EXPERTS):
        super().__init__()
        if not 0.0 < stage.high_fraction < 1.0:
            raise ValueError(f"flow.high_fraction={stage.high_fraction} must be in (0, 1): both "
                             f"experts need samples every step")
        if not 0.0 <= stage.caption_dropout < 1.0:
            raise ValueError(f"flow.caption_dropout={stage.caption_dropout} must be in [0, 1)")
        experts = tuple(experts)
        if not experts or len(set(experts)) != len(experts) or not set(experts) <= set(EXPERTS):
            raise ValueError(f"experts={experts} must be a non-empty subset of {EXPERTS}")
        if len(experts) == 1 and stage.text_lr > 0:
            raise ValueError(f"flow.text_lr={stage.text_lr} fine-tunes the text encoder through both "
                             f"experts, so one module must train both; got experts={experts}")
        self.save_hyperparameters({"stage": asdict(stage), "teacher": config.name,
                                   "experts": list(experts)})
        self.config, self.stage, self.experts = config, stage, experts
        self.text_encoder = UMT5Encoder(**asdict(config.t5))
        if text_encoder_state is not None:
            self.text_encoder.load_state_dict(text_encoder_state)
        self.text_encoder.requires_grad_(stage.text_lr > 0)
        for name in experts:
            setattr(self, f"expert_{name}", WanModel(**asdict(config.dit)))
        # Buffers so they follow the module's device; not persistent: rebuilt from the tokenizer.
        self.register_buffer("empty_ids", empty_ids.clone(), persistent=False)
        self.register_buffer("empty_mask", empty_mask.clone(), persistent=False)

    def drop_captions(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace each caption by the empty one with probability ``caption_dropout``."""
        drop = torch.rand(ids.shape[0], device=ids.device) < self.stage.caption_dropout
        ids = torch.where(drop[:, None], self.empty_ids[None], ids)
        mask = torch.where(drop[:, None], self.empty_mask[None], mask)
        return ids, mask

    def losses(self, x0: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flow-matching losses for a batch; ``loss`` (batch mean), ``loss_high``, ``loss_low``."""
        s, sampling = self.stage, self.config.sampling
        batch = x0.shape[0]
        if len(self.experts) == 2:
            n_high = expert_batch_sizes(batch, s.high_fraction)[0]
            routed = {"high": slice(0, n_high), "low": slice(n_high, batch)}
        else:
            routed = {self.experts[0]: slice(0, batch)}
        context = context_from_ids(self.text_encoder, ids, mask)
        noise = torch.randn_like(x0)
        per_sample = []
        terms = {}
        for name, rows in routed.items():
            expert, n = getattr(self, f"expert_{name}"), rows.stop - rows.start
            sigma, t = sample_expert_timesteps(n, name, sampling.boundary, s.train_shift,
                                               sampling.num_train_timesteps)
            sigma, t = sigma.to(x0.device), t.to(x0.device)
            x_t = noisy_latents(x0[rows], noise[rows], sigma)
            loss = flow_matching_loss(expert(x_t, t, context[rows]), x0[rows], noise[rows])
            terms[f"loss_{name}"] = loss.mean()
            per_sample.append(loss)
        terms["loss"] = torch.cat(per_sample).mean()
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ids, mask = self.drop_captions(batch["ids"], batch["mask"])
        terms = self.losses(batch["x0"], ids, mask)
        self.log_dict({f"flow/{k}": v for k, v in terms.items()}, prog_bar=True, on_step=True)
        return terms["loss"]

    def configure_optimizers(self):
        s = self.stage
        params = [p for name in self.experts for p in getattr(self, f"expert_{name}").parameters()]
        groups = [{"params": params, "lr": s.lr}]
        if s.text_lr > 0:
            groups.append({"params": list(self.text_encoder.parameters()), "lr": s.text_lr})
        # fused: one kernel for all parameters instead of ~10 ops per tensor; the tiny experts'
        # step on a CPU spends a tenth of its time in the optimizer otherwise.
        optimizer = torch.optim.AdamW(groups, weight_decay=s.weight_decay, betas=(0.9, 0.99),
                                      fused=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, s.steps, s.warmup_steps, s.final_lr_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class LatentDataModule(L.LightningDataModule):
    """Shuffled batches of ``CaptionedLatents``; the shuffle order comes from ``seed``."""

    def __init__(self, dataset: CaptionedLatents, batch_size: int, seed: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        # Resumable mid-epoch, in the order of the seeded shuffle (distill.data.resumable).
        return resumable_loader(self.dataset, self.batch_size, self.seed, self.trainer)

