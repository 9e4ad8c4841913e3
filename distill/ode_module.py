"""ODE initialisation of the student: the LightningModule around ``distill.ode_init``.

The step is ``ode_regression_step`` (a pure function); this module owns the student, its
optimiser and the random draws. Only the student is built and trained here: the causal teacher's
work is already in the trajectory shards (``distill.data.trajectories``). The student is built
the way stage B builds it (``load_causal_network``: sharded per block then root under
ModelParallelStrategy), and ``export_student_folder`` writes it as a student folder, guidance
embedding included, for stage B to start from.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from distill.ar_adaptation import make_optimizer, read_causal_teacher, step_generator
from distill.config import ODEInitConfig, ParallelConfig, check_init_expert
from distill.losses import LOSS_KINDS
from distill.networks import load_causal_network
from distill.ode_init import levels_of_expert, ode_regression_step
from distill.sharding import full_state_dict
from student.causal_dit import CausalWanModel
from student.checkpoint import save_student
from student.config import StudentConfig, student_config_from_dict


class ODEInitModule(L.LightningModule):
    """Trains the student on causal-teacher trajectories.

    Args:
        causal_teacher_dir: the stage-A export (its experts are where the student may start).
        student: the student's ``StudentConfig`` as a dict.
        sigmas: the K noise levels of the trajectory states (the student's sigmas without 0).
        student_init: a WanModel or student folder to start from; None = the stage-A expert
            named by ``init_expert`` (+ a zero guidance embedding).
        expert: None trains one network on every level; "high" / "low" trains that network of a
            two-network student (``student.moe``) on its levels only, starting from the stage-A
            expert of the same range (``init_expert`` is then not used).
        stage, parallel, seed: run knobs.
    Batches (``TrajectoryDataModule``): states [B, K, C, F, H, W], ends [B, C, F, H, W],
    guidance [B], context [B, L, D].
    """

    def __init__(self, causal_teacher_dir: str, student: dict, sigmas: list[float],
                 student_init: str | None = None, init_expert: str = "high",
                 stage: ODEInitConfig = ODEInitConfig(),
                 parallel: ParallelConfig = ParallelConfig(), seed: int = 0,
                 expert: str | None = None):
        super().__init__()
        self.save_hyperparameters({"causal_teacher_dir": causal_teacher_dir, "student": student,
                                   "sigmas": list(sigmas), "student_init": student_init,
                                   "init_expert": init_expert, "stage": asdict(stage),
                                   "parallel": asdict(parallel), "seed": seed, "expert": expert})
        check_init_expert(init_expert if expert is None else expert)
        if stage.loss not in LOSS_KINDS:
            raise ValueError(f"ode_init.loss={stage.loss!r} must be one of {list(LOSS_KINDS)}")
        self.automatic_optimization = False
        self.causal_teacher_dir, self.student_init, self.init_expert = (causal_teacher_dir,
                                                                        student_init, init_expert)
        self.stage, self.parallel, self.seed = stage, parallel, seed
        self.sigmas = torch.tensor(sigmas, dtype=torch.float64)
        self.student_config: StudentConfig = student_config_from_dict(student, "ODE-init student")
        self.teacher_config, _ = read_causal_teacher(causal_teacher_dir)
        self.expert = expert
        sampling = self.teacher_config.sampling
        self.levels = (None if expert is None else
                       levels_of_expert(self.sigmas, expert, sampling.boundary,
                                        sampling.num_train_timesteps))
        self.student: CausalWanModel | None = None

    def configure_model(self) -> None:
        if self.student is not None:  # the hook may run twice
            return
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        start = {"high": self.teacher_config.expert_high_dir, "low": self.teacher_config.expert_low_dir}
        init = (Path(self.student_init) if self.student_init
                else Path(self.causal_teacher_dir) / start[self.expert or self.init_expert])
        p = self.parallel
        self.student = load_causal_network(
            self.student_config, init, device=self.trainer.strategy.root_device, mesh=mesh,
            trainable=True, compute_dtype=p.compute_dtype,
            activation_checkpointing=p.activation_checkpointing,
            reshard_after_forward=p.reshard_after_forward)

    def configure_optimizers(self):
        opt, sched = make_optimizer(self.student.parameters(), self.stage.optim)
        return [opt], [sched]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Derived from the step, so a resumed run repeats an uninterrupted run's draws.
        private = step_generator(self.seed, self.global_step, self.global_rank)
        result = ode_regression_step(
            self.student.forward_teacher_forcing, batch["states"], batch["ends"], self.sigmas,
            batch["context"], batch["guidance"], private,
            chunk_frames=self.student_config.chunk_frames, loss=self.stage.loss,
            huber_c=self.stage.huber_c,
            num_train_timesteps=self.teacher_config.sampling.num_train_timesteps,
            levels=self.levels)
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(result.loss)
        if self.stage.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.stage.optim.grad_clip)
        opt.step()
        sched.step()
        self.log("loss", result.loss.detach(), prog_bar=True, on_step=True)
        return result.loss.detach()

    def export_student_folder(self, folder: str | Path) -> Path | None:
        """Write the student as a student folder (a collective under FSDP: every rank gathers;
        rank 0 writes). Returns the folder on rank 0, None elsewhere."""
        state = full_state_dict(self.student)
        if self.global_rank != 0:
            return None
        with torch.device("meta"):
            plain = CausalWanModel.from_config(self.student_config)
        plain.load_state_dict(state, assign=True)
        return save_student(folder, plain, self.student_config)
