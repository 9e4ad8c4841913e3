"""Stage B: causal consistency distillation of the causal two-expert teacher into the student.

The step itself is ``distill.consistency.causal_cd_step`` (a pure function); this module owns
the networks, the optimiser, the EMA and the random draws:

- student (trained) and ema_student (the stop-gradient target network) are registered, so they
  are checkpointed and resumed; the frozen causal teacher is a ``FrozenExperts`` attribute,
  outside the registry: not in state_dict(), not in checkpoints, not cast or moved by Lightning.
- ``configure_model`` builds every network on the meta device; under ModelParallelStrategy each
  is sharded per block then at the root (FSDP2; bf16 compute with fp32 masters when configured,
  activation checkpointing optional on the student), then each rank reads its slices.
- the expert of a step comes from a (seed, step) generator, identical on every rank; intervals,
  noise and guidance scales from a (seed, step, rank) generator. Both are derived from the step,
  so a resumed run repeats an uninterrupted run's draws exactly.
- manual optimisation: backward, clip, AdamW step, then the EMA update on local shards.
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from distill.ar_adaptation import make_optimizer, read_causal_teacher, step_generator
from distill.config import ConsistencyConfig, ParallelConfig, check_init_expert, with_guidance_min
from distill.consistency import (
    TEACHER_SOLVERS,
    causal_cd_step,
    cd_schedule,
    choose_expert,
    ema_update_,
)
from distill.losses import LOSS_KINDS
from distill.networks import FrozenExperts, ema_copy, load_causal_network
from distill.sharding import paired_local_tensors, reshard_all
from student.causal_dit import CausalWanModel
from student.config import StudentConfig, student_config_from_dict
from student.moe import route_by_timestep


class ConsistencyDistillationModule(L.LightningModule):
    """Stage B LightningModule.

    Args:
        causal_teacher_dir: a stage-A export (``ARAdaptationModule.export_causal_teacher``).
        student: the student's ``StudentConfig`` as a dict (``student_config_to_dict``).
        student_init: WanModel folder the student starts from; None = the causal teacher's
            expert named by ``init_expert`` (+ a zero guidance embedding, so the student starts
            equal to it).
        init_expert: "high" or "low".
        stage, parallel, seed: run knobs (``distill.config``).
        expert: None trains one network over the whole schedule. "high" / "low" trains that
            network of a two-network student (``student.moe``) on its own intervals only; a
            target past the boundary (expert_high's last interval) then comes from
            ``partner_init``, the other network's finished folder, frozen.
    Batches: latents [B, C, F, H, W], context [B, L, D], context_neg [1, L, D].
    """

    def __init__(self, causal_teacher_dir: str, student: dict, student_init: str | None = None,
                 stage: ConsistencyConfig = ConsistencyConfig(),
                 parallel: ParallelConfig = ParallelConfig(), seed: int = 0,
                 init_expert: str = "high", expert: str | None = None,
                 partner_init: str | None = None):
        super().__init__()
        self.save_hyperparameters({"causal_teacher_dir": causal_teacher_dir, "student": student,
                                   "student_init": student_init, "init_expert": init_expert,
                                   "stage": asdict(stage),
                                   "parallel": asdict(parallel), "seed": seed, "expert": expert,
                                   "partner_init": partner_init})
        check_init_expert(init_expert)
        if expert is not None:
            check_init_expert(expert)
        if expert == "high" and partner_init is None:
            raise ValueError("the high-noise network's last interval ends in the low-noise range: "
                             "pass partner_init, the trained low-noise network's folder")
        self.expert, self.partner_init = expert, partner_init
        if stage.loss not in LOSS_KINDS:
            raise ValueError(f"stage_b.loss={stage.loss!r} must be one of {list(LOSS_KINDS)}")
        if stage.teacher_solver not in TEACHER_SOLVERS:
            raise ValueError(f"stage_b.teacher_solver={stage.teacher_solver!r} must be one of "
                             f"{list(TEACHER_SOLVERS)}")
        self.automatic_optimization = False
        self.causal_teacher_dir = causal_teacher_dir
        self.stage, self.parallel, self.seed = stage, parallel, seed
        self.student_config: StudentConfig = student_config_from_dict(student, "stage B student")
        self.teacher_config, self.expert_config = read_causal_teacher(causal_teacher_dir)
        if self.expert_config.chunk_frames != self.student_config.chunk_frames:
            raise ValueError(f"the causal teacher in {causal_teacher_dir} was adapted with "
                             f"chunk_frames={self.expert_config.chunk_frames}, the student uses "
                             f"{self.student_config.chunk_frames}; rerun stage A for this student")
        self.student_init, self.init_expert = student_init, init_expert
        sampling = self.teacher_config.sampling
        self.schedule = cd_schedule(stage.num_intervals, sampling.shift, sampling.boundary,
                                    sampling.num_train_timesteps)
        # The student's guidance means expert_low's CFG scale; expert_high runs it + this offset.
        self.guidance_offset = sampling.guidance_high - sampling.guidance_low
        # The exported student accepts the scales it is trained on.
        self.student_config = with_guidance_min(self.student_config, stage.guidance_min)
        self.student: CausalWanModel | None = None
        self.ema_student: CausalWanModel | None = None
        self._teacher: FrozenExperts | None = None  # a plain object: never registered
        self._partner: list[CausalWanModel] = []  # frozen other network; a list: not registered
        self.chosen_experts: list[tuple[int, str]] = []  # (global step, expert), for checks

    @property
    def teacher(self) -> FrozenExperts:
        """The frozen causal teacher (outside the module registry and the checkpoints)."""
        if self._teacher is None:
            raise RuntimeError("the teacher is built in configure_model(); call trainer.fit first")
        return self._teacher

    # ----- networks -----------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.student is not None:  # the hook may run twice
            return
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        device = self.trainer.strategy.root_device
        p = self.parallel
        teacher_root = Path(self.causal_teacher_dir)
        experts = [
            load_causal_network(self.expert_config, teacher_root / sub, device=device, mesh=mesh,
                                trainable=False, dtype=p.teacher_dtype,
                                reshard_after_forward=p.reshard_after_forward)
            for sub in (self.teacher_config.expert_high_dir, self.teacher_config.expert_low_dir)
        ]
        self._teacher = FrozenExperts(*experts)
        start = {"high": self.teacher_config.expert_high_dir, "low": self.teacher_config.expert_low_dir}
        init = (Path(self.student_init) if self.student_init
                else teacher_root / start[self.expert or self.init_expert])
        if self.partner_init is not None:
            self._partner = [load_causal_network(
                self.student_config, Path(self.partner_init), device=device, mesh=mesh,
                trainable=False, dtype=p.teacher_dtype,
                reshard_after_forward=p.reshard_after_forward)]
        self.student = load_causal_network(
            self.student_config, init, device=device, mesh=mesh, trainable=True,
            compute_dtype=p.compute_dtype, activation_checkpointing=p.activation_checkpointing,
            reshard_after_forward=p.reshard_after_forward)
        self.ema_student = ema_copy(self.student, self.student_config, device=device, mesh=mesh,
                                    compute_dtype=p.compute_dtype,
                                    reshard_after_forward=p.reshard_after_forward)

    def configure_optimizers(self):
        opt, sched = make_optimizer(self.student.parameters(), self.stage.optim)
        return [opt], [sched]

    # ----- training -------------------------------------------------------------------------------

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay after optimizer step ``step``: 0 (copy) before ema_start_step."""
        return 0.0 if step < self.stage.ema_start_step else self.stage.ema_decay

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        step = self.global_step
        expert = self.expert or choose_expert(self.schedule, step_generator(self.seed, step))
        self.chosen_experts.append((step, expert))
        private = step_generator(self.seed, step, self.global_rank)
        x0 = batch["latents"].float()
        lo, hi = self.student_config.guidance_range
        guidance = (lo + (hi - lo) * torch.rand(x0.shape[0], generator=private)).to(x0.device)

        student, ema, teacher = self.student, self.ema_student, self.teacher
        result = causal_cd_step(
            student.forward_teacher_forcing,
            self._target_network(),
            teacher.expert_high.forward_teacher_forcing,
            teacher.expert_low.forward_teacher_forcing,
            x0, batch["context"], batch["context_neg"], guidance, self.schedule, expert, private,
            chunk_frames=self.student_config.chunk_frames, guidance_offset=self.guidance_offset,
            loss=self.stage.loss, huber_c=self.stage.huber_c, solver=self.stage.teacher_solver,
            per_chunk_intervals=self.stage.per_chunk_intervals)

        for frozen in (ema, teacher.expert_high, teacher.expert_low, *self._partner):
            reshard_all(frozen)  # back to shards (FSDP2 keeps a root gathered after forward)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(result.loss)
        if self.stage.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), self.stage.optim.grad_clip)
            self.log("grad_norm", _to_float_tensor(grad_norm), on_step=True)
        opt.step()
        sched.step()
        # After the step: global_step now counts it. Local shards only, nothing gathered.
        ema_update_(*paired_local_tensors(ema, student), self.ema_decay_at(step))
        self.log("loss", result.loss.detach(), prog_bar=True, on_step=True)
        self.log(f"loss_{expert}", result.loss.detach(), on_step=True)
        return result.loss.detach()


    def _target_network(self):
        """The stop-gradient target: the EMA, or for one network of a two-network student the
        EMA on its own side of the boundary and the frozen partner beyond it."""
        own = self.ema_student.forward_teacher_forcing
        if self.expert is None:
            return own
        sampling = self.teacher_config.sampling
        other = self._partner[0].forward_teacher_forcing if self._partner else _no_partner
        high, low = (own, other) if self.expert == "high" else (other, own)
        return functools.partial(route_by_timestep, high, low, boundary=sampling.boundary,
                                 chunk_frames=self.student_config.chunk_frames,
                                 num_train_timesteps=sampling.num_train_timesteps)


def _no_partner(*_args, **_kwargs):
    raise RuntimeError("a consistency target fell in the other network's range but no "
                       "partner_init was given")


def _to_float_tensor(value) -> torch.Tensor:
    """clip_grad_norm_ returns a DTensor for sharded parameters; log a plain tensor."""
    full = value.full_tensor() if hasattr(value, "full_tensor") else value
    return full.detach().float()
