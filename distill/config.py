"""Typed run configuration of the distillation job, one dataclass per concern.

Architecture numbers live in presets (``teacher.config``, ``student.config``); a YAML recipe in
``configs/distill/`` names the student preset and the teacher folder and sets the run knobs below
(steps, batch sizes, learning rates, parallelism). ``distill.run.load_config`` parses a recipe
into ``DistillConfig`` with jsonargparse, so every key is type-checked and an unknown key is an
error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from distill.data.latents import LatentSource
from student.config import StudentConfig


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warm-up, then a constant learning rate."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global grad norm of the trained network; 0 disables clipping


@dataclass(frozen=True)
class ParallelConfig:
    """Sharding and precision (used when the strategy is model_parallel, i.e. FSDP2).

    compute_dtype: "bf16" = MixedPrecisionPolicy(param bf16, reduce fp32) over fp32 masters for
        the trained networks; "fp32" everywhere on the CPU.
    teacher_dtype: storage/compute dtype of the frozen causal teacher (fp32 islands stay fp32).
    activation_checkpointing: recompute each block of the trained networks in backward.
    """

    compute_dtype: str = "fp32"
    teacher_dtype: str = "fp32"
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True


@dataclass(frozen=True)
class ARAdaptationConfig:
    """Stage A: the two teacher experts made causal by teacher forcing (flow matching).

    Each step trains ONE expert (drawn identically on every rank, with probability = its share
    of the training noise levels) on t inside its range; caption dropout feeds the negative
    prompt encoding so classifier-free guidance keeps working.
    """

    max_steps: int = 600
    batch_size: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10))
    caption_dropout: float = 0.1
    train_shift: float | None = None  # noise-level shift of training t; None: the teacher's


@dataclass(frozen=True)
class ODEInitConfig:
    """Between stages A and B: the student learns the causal teacher's trajectories
    (``distill.ode_init``). ``max_steps`` 0 skips it; stage B then starts from the stage-A expert
    (or ``student_init``).

    num_trajectories: items of the latent cache whose prompts the causal teacher samples (None:
        all), each at a guidance scale ~ U[stage_b.guidance_min, student guidance_max].
    solver_steps: the teacher's Euler steps per chunk, a multiple of the student's steps (so
        the student's sigmas are points of the trajectory).
    max_steps: the one network's steps, or the high-noise network's of a two-network student;
        max_steps_low: the low-noise network's (None: max_steps). Its job is easier: its loss
        settles within a few hundred steps on the shapes world (0.004 against 0.07).
    """

    max_steps: int = 700
    max_steps_low: int | None = 400
    batch_size: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=20))
    num_trajectories: int | None = 512
    solver_steps: int = 8
    generate_batch_size: int = 64
    loss: str = "mse"
    huber_c: float = 1e-3

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"ode_init.max_steps={self.max_steps} must be >= 0 (0 skips the stage)")
        if self.max_steps_low is not None and self.max_steps_low < 1:
            raise ValueError(f"ode_init.max_steps_low={self.max_steps_low} must be >= 1 (or null: "
                             f"max_steps)")
        if self.batch_size < 1 or self.generate_batch_size < 1:
            raise ValueError(f"ode_init.batch_size={self.batch_size} and generate_batch_size="
                             f"{self.generate_batch_size} must be >= 1")
        if self.num_trajectories is not None and self.num_trajectories < self.batch_size:
            raise ValueError(f"ode_init.num_trajectories={self.num_trajectories} must be >= "
                             f"ode_init.batch_size={self.batch_size} (or null: every cached prompt)")

    def steps_of(self, network: str | None) -> int:
        """Training steps of ``network`` ("high", "low", or None for a one-network student)."""
        if network == "low" and self.max_steps_low is not None:
            return self.max_steps_low
        return self.max_steps


@dataclass(frozen=True)
class ConsistencyConfig:
    """Stage B: causal consistency distillation into the student (``distill.consistency``)."""

    max_steps: int = 150  # per network trained
    # For a two-network student: the networks stage B trains; the others keep their
    # ODE-initialised weights. On the shapes world stage B gained the high-noise network 1 point
    # of joint accuracy and cost the low-noise one 2.5 (BENCHMARKS.md, "Two-expert student").
    networks: tuple[str, ...] = ("high",)
    batch_size: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10))
    num_intervals: int = 48  # N of the discretised teacher schedule
    loss: str = "pseudo_huber"
    huber_c: float = 1e-3
    ema_decay: float = 0.99
    ema_start_step: int = 0  # before it the EMA copies the student (FastVideo starts at 200)
    teacher_solver: str = "euler"
    per_chunk_intervals: bool = True
    # Student guidance ~ U[guidance_min, student preset guidance_max] in the ODE stage and here;
    # the exported student accepts that range (guidance_min at most its guidance_default).
    guidance_min: float = 1.0
    export_weights: str = "ema"  # which weights the exported student folder's top level holds

    def __post_init__(self) -> None:
        if not self.networks or not set(self.networks) <= {"high", "low"}:
            raise ValueError(f"stage_b.networks={list(self.networks)} must name 'high' and/or "
                             f"'low' (the networks of a two-network student stage B trains)")


@dataclass(frozen=True)
class DataConfig:
    """Where the latents come from; encoded once into ``cache_dir`` (default: a folder under
    ``student.paths.default_latent_cache_dir()`` named by the source and the teacher)."""

    source: LatentSource = field(default_factory=LatentSource)
    cache_dir: str | None = None
    encode_batch_size: int = 16
    store_dtype: str = "fp32"
    num_workers: int = 0
    num_frames: int | None = None  # latent frames per training clip; None: all cached frames


@dataclass(frozen=True)
class TrainerConfig:
    """What the Lightning Trainers of the job get.

    strategy: "auto" (one process, plain modules) or "model_parallel" (FSDP2 through
    ModelParallelStrategy; data_parallel_size x tensor_parallel_size = devices x num_nodes, and
    tensor_parallel_size must be 1: sequence parallelism is not implemented).
    """

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    data_parallel_size: int | None = None
    tensor_parallel_size: int = 1
    precision: str = "32-true"
    checkpoint_every_n_steps: int = 100
    log_every_n_steps: int = 10
    progress_bar: bool = True
    num_threads: int | None = None  # CPU threads of torch; None: its default (1 if OpenMP spins)


def with_guidance_min(student: StudentConfig, guidance_min: float) -> StudentConfig:
    """``student`` trained on guidance scales from ``stage_b.guidance_min``: the exported
    student then accepts [guidance_min, guidance_max] only, which is what it learned."""
    if not 1.0 <= guidance_min <= student.guidance_default:
        raise ValueError(f"stage_b.guidance_min={guidance_min} must lie in [1, the student's "
                         f"guidance_default={student.guidance_default}] (the scale it runs at "
                         f"when none is given must be one it is trained on)")
    return replace(student, guidance_min=float(guidance_min))


# The stage-A experts a student can start from (DistillConfig.init_expert).
INIT_EXPERTS = ("high", "low")


def check_init_expert(name: str) -> None:
    """Fail early, naming the value and the choices, when ``init_expert`` is not an expert."""
    if name not in INIT_EXPERTS:
        raise ValueError(f"init_expert={name!r} must be one of {list(INIT_EXPERTS)} (the stage-A "
                         f"expert the student starts from)")


@dataclass(frozen=True)
class DistillConfig:
    """The whole job: data -> stage A (causal teacher) -> ODE initialisation of the student ->
    stage B (consistency distillation) -> export.

    teacher_dir: the teacher folder; None = the embedded shapes teacher (teacher/weights/shapes).
    student: student preset name (``student.config.STUDENT_PRESETS``).
    student_init: a WanModel folder to initialise the student from (e.g. Wan2.1-T2V-1.3B); None =
        the adapted expert named by ``init_expert`` (the student then has the experts' shape).
    init_expert: "high" or "low": which stage-A expert starts the student (of the ODE
        initialisation, or of stage B without it) when student_init is None. The high-noise expert is the one that reads the direction word (BENCHMARKS.md).
    split_experts: the student is two networks, one per teacher expert (``student.moe``): the
        high-noise one runs the steps above the teacher's boundary, each is started from its own
        adapted expert (``init_expert`` is then not used) and trained on its own noise levels.
        One network of an expert's size drew every square round on the shapes world
        (BENCHMARKS.md, "Two-expert student").
    output_dir: where the student is exported; None = ``student.paths.default_student_dir``.
    run_dir: checkpoints and the adapted causal teacher; None = ``student.paths.default_run_dir``.
    resume: continue a run found in run_dir (same teacher and settings) from its last checkpoint.
    """

    teacher_dir: str | None = None
    student: str = "shapes"
    student_init: str | None = None
    init_expert: str = "high"
    split_experts: bool = True
    output_dir: str | None = None
    run_dir: str | None = None
    seed: int = 0
    resume: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    stage_a: ARAdaptationConfig = field(default_factory=ARAdaptationConfig)
    ode_init: ODEInitConfig = field(default_factory=ODEInitConfig)
    stage_b: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
