"""Stage A: autoregressive (causal) adaptation of the two-expert teacher by teacher forcing.

Why (Causal Forcing, shared/reference/distill-anchors.md 2.2): the bidirectional
teacher's ODE map for chunk c depends on the noise of later chunks, which a streaming student
never sees, so consistency distillation needs a teacher whose ODE map is a function of causal
inputs. Each expert becomes a ``CausalWanModel`` (no guidance embedding) trained by flow matching
in the teacher-forcing layout: noisy chunk c attends to the CLEAN chunks < c and to itself, which
is exactly what the student sees at inference with a KV cache of its finished chunks.

Per step ONE expert trains, on noise levels inside its range only (t >= boundary -> expert_high),
so the pair stays a two-expert model. The expert is drawn from a generator seeded by (seed,
step) alone, identical on every rank: FSDP ranks must run the same module. Everything else
random (noise levels, noise, caption dropout) comes from a (seed, step, rank) generator, which
also makes a resumed run draw exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from distill.config import ARAdaptationConfig, OptimConfig, ParallelConfig
from distill.losses import flow_matching_loss, noisy_latents
from distill.networks import causal_expert_config, load_causal_network
from distill.sharding import full_state_dict
from student.causal_dit import CausalWanModel
from student.checkpoint import save_student
from student.config import StudentConfig, student_config_from_dict, student_config_to_dict
from teacher.config import TeacherConfig, teacher_config_from_dict, teacher_config_to_dict
from teacher.schedule import Expert, shift_sigmas, unshift_sigmas
from teacher.weight_files import write_text_atomic

CAUSAL_TEACHER_FILE = "wan_distill_causal_teacher.json"


def step_generator(seed: int, step: int, rank: int | None = None,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one training step: (seed, step) shared by all ranks when ``rank`` is
    None, else (seed, step, rank) for this rank's private draws.

    Deriving it from the step (not from a running RNG) makes the draws of step k the same whether
    the run was interrupted and resumed or not.
    """
    mix = (seed * 1_000_003 + step) * 1_000_033 + (0 if rank is None else rank + 1)
    return torch.Generator(device=device).manual_seed(mix % (2**63 - 1))


def expert_u_range(expert: Expert, boundary: float, shift: float) -> tuple[float, float]:
    """[u_lo, u_hi) of uniform u whose shifted sigma lies in ``expert``'s range."""
    u_boundary = unshift_sigmas(boundary, shift)
    return (u_boundary, 1.0) if expert == "high" else (0.0, u_boundary)


def choose_training_expert(boundary: float, shift: float, shared: torch.Generator) -> Expert:
    """Draw the expert of a step with probability = its share of shifted-uniform noise levels."""
    p_high = 1.0 - unshift_sigmas(boundary, shift)
    return "high" if torch.rand((), generator=shared, dtype=torch.float64).item() < p_high else "low"


def sample_expert_sigmas(expert: Expert, shape: tuple[int, ...], boundary: float, shift: float,
                         generator: torch.Generator, num_train_timesteps: int = 1000
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels inside ``expert``'s range: u uniform over its range, sigma = shift(u).

    Returns (sigma float32, t int64), both of ``shape``, t = trunc(sigma * N) clamped into the
    expert's integer range (t >= boundary * N is expert_high's), so the expert never trains on
    the other's timesteps; sigma is clamped below 1 where t is.
    """
    lo, hi = expert_u_range(expert, boundary, shift)
    u = lo + (hi - lo) * torch.rand(shape, generator=generator, device=generator.device,
                                    dtype=torch.float64)
    sigma = shift_sigmas(u, shift).clamp(0.0, 1.0)
    t_boundary = math.ceil(boundary * num_train_timesteps)
    t_lo, t_hi = (t_boundary, num_train_timesteps) if expert == "high" else (0, t_boundary - 1)
    t = (sigma * num_train_timesteps).to(torch.int64).clamp(t_lo, t_hi)
    return sigma.float(), t


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps`` steps, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def make_optimizer(params, optim: OptimConfig):
    """AdamW + a LambdaLR warm-up (stepped once per optimizer step)."""
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                            weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_factor(s, optim.warmup_steps))
    return opt, sched


class ARAdaptationModule(L.LightningModule):
    """Stage A LightningModule: trains ``expert_high`` and ``expert_low`` (both registered: they
    are the trained networks here) as causal experts.

    Batches (``distill.data.latents.LatentDataModule``): latents [B, C, F, H, W], context
    [B, L, D], context_neg [1, L, D]. Manual optimisation: one AdamW over both experts, of which
    only the drawn expert gets gradients (AdamW skips parameters without a gradient).
    """

    def __init__(self, teacher_dir: str, teacher: dict, student: dict,
                 stage: ARAdaptationConfig = ARAdaptationConfig(),
                 parallel: ParallelConfig = ParallelConfig(), seed: int = 0):
        super().__init__()
        self.save_hyperparameters({"teacher_dir": teacher_dir, "teacher": teacher,
                                   "student": student, "stage": asdict(stage),
                                   "parallel": asdict(parallel), "seed": seed})
        self.automatic_optimization = False
        self.teacher_dir, self.stage, self.parallel, self.seed = teacher_dir, stage, parallel, seed
        self.teacher_config: TeacherConfig = teacher_config_from_dict(teacher, "stage A teacher")
        student_config = student_config_from_dict(student, "stage A student")
        self.expert_config: StudentConfig = causal_expert_config(student_config, self.teacher_config)
        self.shift = stage.train_shift or self.teacher_config.sampling.shift
        self.expert_high: CausalWanModel | None = None
        self.expert_low: CausalWanModel | None = None
        self.chosen_experts: list[tuple[int, str]] = []  # (global step, expert), for checks

    def configure_model(self) -> None:
        if self.expert_high is not None:  # the hook may run twice
            return
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        device = self.trainer.strategy.root_device
        for name, sub in (("expert_high", self.teacher_config.expert_high_dir),
                          ("expert_low", self.teacher_config.expert_low_dir)):
            network = load_causal_network(
                self.expert_config, Path(self.teacher_dir) / sub, device=device, mesh=mesh,
                trainable=True, compute_dtype=self.parallel.compute_dtype,
                activation_checkpointing=self.parallel.activation_checkpointing,
                reshard_after_forward=self.parallel.reshard_after_forward)
            setattr(self, name, network)

    def configure_optimizers(self):
        opt, sched = make_optimizer(self.parameters(), self.stage.optim)
        return [opt], [sched]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        step = self.global_step
        sampling = self.teacher_config.sampling
        shared = step_generator(self.seed, step)
        expert: Expert = choose_training_expert(sampling.boundary, self.shift, shared)
        self.chosen_experts.append((step, expert))
        private = step_generator(self.seed, step, self.global_rank)

        x0 = batch["latents"].float()
        context, context_neg = batch["context"], batch["context_neg"]
        batch_size, frames = x0.shape[0], x0.shape[2]
        n_chunks = frames // self.expert_config.chunk_frames
        sigma, t = sample_expert_sigmas(expert, (batch_size, n_chunks), sampling.boundary,
                                        self.shift, private, sampling.num_train_timesteps)
        eps = torch.randn(x0.shape, generator=private, dtype=torch.float32).to(x0.device)
        drop = torch.rand(batch_size, generator=private) < self.stage.caption_dropout
        # Dropped captions see the negative prompt: the unconditional input of CFG at sampling.
        context = torch.where(drop.to(x0.device)[:, None, None],
                              context_neg.to(context.dtype).expand_as(context), context)
        per_frame_sigma = sigma.to(x0.device).repeat_interleave(
            self.expert_config.chunk_frames, dim=1)[:, None, :, None, None]
        x_t = noisy_latents(x0, eps, per_frame_sigma)

        network = self.expert_high if expert == "high" else self.expert_low
        v = network.forward_teacher_forcing(x0, x_t, t.to(x0.device), context)
        loss = flow_matching_loss(v, x0, eps)

        opt = self.optimizers()
        sched = self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.stage.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.stage.optim.grad_clip)
        opt.step()
        sched.step()
        self.log("loss", loss.detach(), prog_bar=True, on_step=True)
        self.log(f"loss_{expert}", loss.detach(), on_step=True)
        return loss.detach()

    def export_causal_teacher(self, folder: str | Path) -> Path | None:
        """Write the adapted experts as a causal teacher folder: ``<expert dir>/`` each a student
        folder (official config.json + safetensors + wan_distill_student.json) and
        ``wan_distill_causal_teacher.json`` (the teacher config). A collective under FSDP (every
        rank gathers); rank 0 writes. Returns the folder on rank 0, None elsewhere.
        """
        folder = Path(folder)
        for network, sub in ((self.expert_high, self.teacher_config.expert_high_dir),
                             (self.expert_low, self.teacher_config.expert_low_dir)):
            state = full_state_dict(network)
            if self.global_rank == 0:
                with torch.device("meta"):
                    plain = CausalWanModel.from_config(self.expert_config)
                plain.load_state_dict(state, assign=True)
                save_student(folder / sub, plain, self.expert_config)
        if self.global_rank != 0:
            return None
        # Written last: its presence marks a complete causal teacher.
        write_text_atomic(json.dumps({
            "teacher": teacher_config_to_dict(self.teacher_config),
            "expert": student_config_to_dict(self.expert_config)}, indent=2, ensure_ascii=False),
            folder / CAUSAL_TEACHER_FILE)
        return folder


def read_causal_teacher(folder: str | Path) -> tuple[TeacherConfig, StudentConfig]:
    """(teacher config, causal expert config) of a folder written by ``export_causal_teacher``."""
    path = Path(folder) / CAUSAL_TEACHER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a causal teacher written by "
                                f"stage A (run it, or point to its export)")
    data = json.loads(path.read_text(encoding="utf-8"))
    return (teacher_config_from_dict(data["teacher"], str(path)),
            student_config_from_dict(data["expert"], str(path)))
