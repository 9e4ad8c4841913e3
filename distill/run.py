"""The distillation job: data -> stage A (causal teacher) -> ODE initialisation of the student ->
stage B (consistency distillation) -> export.

``distill_main()`` with no arguments runs the shapes recipe (``configs/distill/shapes.yaml``, whose
values are also ``DistillConfig``'s defaults, so the job runs without the configs folder) on the
embedded teacher and writes the student where ``wan-distill stream`` / ``eval`` look by default
(``student.paths.default_student_dir``). Every stage is resumable: the latent cache is complete
once its manifest exists, stage A once the causal teacher's json exists, the ODE initialisation
once its student folder exists (its trajectories once their manifest does), and every training
stage restarts from its last checkpoint when the run folder belongs to the same teacher and
settings.

With ``split_experts`` (the shapes recipe) the student is two networks (``student.moe``): the
ODE initialisation trains each on its own noise levels (``ode_init/high``, ``ode_init/low``),
stage B the networks named in ``stage_b.networks`` (``stage_b/<network>``, the low-noise one
first), and ``distill.export.export_moe_student`` joins them into one student folder.

Under ``torchrun`` (or a cluster launcher) every rank runs ``distill_main``; Lightning's
ModelParallelStrategy picks the processes up, and only rank 0 prints and writes shared files.
"""

from __future__ import annotations

import os
import sys

# Before torch is imported (libgomp reads this once, when it loads): OpenMP worker threads that
# spin-wait for work thrash when another process holds one of the cores; measured on the 2-core
# CPU with one busy neighbour, a CD step took 12.9 s spinning and 1.0 s passive. setdefault: an
# explicit user setting wins. If torch was imported earlier, this comes too late and
# ``distill_main`` falls back to one thread (``_passive_omp``), which cannot thrash.
_PASSIVE_OMP = ("torch" not in sys.modules
                or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from jsonargparse import ArgumentParser  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from tqdm import tqdm  # noqa: E402

from distill.ar_adaptation import CAUSAL_TEACHER_FILE, ARAdaptationModule  # noqa: E402
from distill.checkpointing import AtomicCheckpoint, resume_checkpoint  # noqa: E402
from distill.config import (  # noqa: E402
    DistillConfig,
    TrainerConfig,
    check_init_expert,
    with_guidance_min,
)
from distill.data.latents import (  # noqa: E402
    LatentDataModule,
    build_latent_cache,
    cache_key,
    is_complete,
    teacher_fingerprint,
)
from distill.data.trajectories import TrajectoryDataModule, build_trajectories  # noqa: E402
from distill.export import export_moe_student, export_student  # noqa: E402
from distill.module import ConsistencyDistillationModule  # noqa: E402
from distill.ode_init import trajectory_grid  # noqa: E402
from distill.ode_module import ODEInitModule  # noqa: E402
from student.paths import (  # noqa: E402
    default_latent_cache_dir,
    default_run_dir,
    default_student_dir,
    embedded_teacher_dir,
)
from student.checkpoint import STUDENT_CONFIG_FILE  # noqa: E402
from student.config import StudentConfig, student_config_to_dict, student_preset  # noqa: E402
from student.sampler import student_sigmas  # noqa: E402
from teacher.checkpoint import CONFIG_FILE  # noqa: E402
from teacher.config import A14B, TeacherConfig, teacher_config_from_dict, teacher_config_to_dict  # noqa: E402
from teacher.output_paths import OutputLocationError, check_output_folder  # noqa: E402
from teacher.weight_files import write_text_atomic  # noqa: E402

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "distill" / "shapes.yaml"
IDENTITY_FILE = "identity.json"


# ---------------------------------------------------------------------------------------------
# Configuration


def build_parser() -> ArgumentParser:
    """The typed parser of a recipe: ``--config FILE`` plus dotted overrides such as
    ``--stage_b.max_steps=100``; unknown keys and wrong types are errors."""
    parser = ArgumentParser(prog="wan-distill distill", description=__doc__.splitlines()[0],
                            default_config_files=[])
    parser.add_argument("--config", action="config", help="a recipe YAML (configs/distill/*.yaml)")
    parser.add_class_arguments(DistillConfig, nested_key=None, fail_untyped=True)
    return parser


def load_config(config_path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> DistillConfig:
    """A recipe (default: the shapes recipe) plus overrides -> ``DistillConfig``.

    Overrides are ``key=value``, ``--key=value`` or ``--key value`` with dotted keys
    (``stage_b.optim.lr=3e-4``).
    """
    args: list[str] = []
    path = Path(config_path) if config_path is not None else DEFAULT_RECIPE
    if config_path is not None and not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist; see configs/distill/ for examples")
    if path.is_file():
        args += ["--config", str(path)]
    # Bare "key=value" gets its dashes; anything else ("--key", a value after it) stays as is.
    args += [f"--{o}" if not o.startswith("-") and "=" in o else o for o in overrides]
    parser = build_parser()
    namespace = parser.parse_args(args)
    built = parser.instantiate(namespace)
    values = {k: getattr(built, k) for k in DistillConfig.__dataclass_fields__}
    return DistillConfig(**values)


def read_teacher_config(teacher_dir: Path) -> TeacherConfig:
    """The teacher folder's ``wan_distill.json`` (the embedded teacher), else the A14B preset."""
    path = teacher_dir / CONFIG_FILE
    if path.is_file():
        return teacher_config_from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
    return A14B


def resolve_student(config: DistillConfig, teacher: TeacherConfig) -> StudentConfig:
    """The student preset, checked against where its weights start, with the guidance range
    it is trained on (``stage_b.guidance_min`` to its ``guidance_max``)."""
    student = with_guidance_min(student_preset(config.student), config.stage_b.guidance_min)
    check_init_expert(config.init_expert)
    if config.student_init is None and student.dit != teacher.dit:
        raise ValueError(
            f"student preset {config.student!r} has another DiT shape than the teacher's experts "
            f"({student.dit} vs {teacher.dit}), so it cannot start from an adapted expert; set "
            f"student_init to a WanModel folder of its shape (e.g. Wan2.1-T2V-1.3B)")
    return student


# ---------------------------------------------------------------------------------------------
# Trainers


class StageProgress(Callback):
    """One tqdm bar per training stage, counting optimizer steps up to max_steps (rank 0)."""

    def __init__(self, description: str, total: int, enabled: bool = True):
        self.description, self.total, self.enabled = description, total, enabled
        self.bar: tqdm | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.bar = tqdm(total=self.total, initial=trainer.global_step, desc=self.description,
                        unit="step", disable=not (self.enabled and trainer.is_global_zero),
                        dynamic_ncols=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is None:
            return
        self.bar.update(trainer.global_step - self.bar.n)
        loss = trainer.callback_metrics.get("loss")
        if loss is not None:
            self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()


def make_strategy(tc: TrainerConfig):
    """'auto' -> Lightning's default; 'model_parallel' -> ModelParallelStrategy (FSDP2)."""
    if tc.strategy == "auto":
        return "auto"
    if tc.strategy != "model_parallel":
        raise ValueError(f"trainer.strategy={tc.strategy!r} must be 'auto' or 'model_parallel'")
    if tc.tensor_parallel_size != 1:
        raise ValueError(f"trainer.tensor_parallel_size={tc.tensor_parallel_size}: sequence/tensor "
                         f"parallelism is not implemented; use 1 and shard over data_parallel")
    return ModelParallelStrategy(data_parallel_size=tc.data_parallel_size or "auto",
                                 tensor_parallel_size=1)


def make_trainer(tc: TrainerConfig, stage_dir: Path, max_steps: int, description: str,
                 extra_callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """A Trainer for one training stage: checkpoints (last only) and CSV logs in ``stage_dir``."""
    checkpoint = AtomicCheckpoint(dirpath=stage_dir / "checkpoints", filename="step{step}",
                                 every_n_train_steps=max(1, tc.checkpoint_every_n_steps),
                                 save_top_k=0, save_last=True)
    return L.Trainer(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes,
        strategy=make_strategy(tc), precision=tc.precision, max_steps=max_steps,
        log_every_n_steps=tc.log_every_n_steps, enable_progress_bar=False,
        enable_model_summary=False, logger=CSVLogger(stage_dir, name="logs"),
        callbacks=[checkpoint, StageProgress(description, max_steps, tc.progress_bar),
                   *extra_callbacks],
        # The training loaders split every epoch over the ranks themselves, so that a resumed
        # run continues mid-epoch (distill.data.resumable); a sampler inserted here would undo it.
        use_distributed_sampler=False)


def last_checkpoint(stage_dir: Path) -> str | None:
    """The complete ``<stage_dir>/checkpoints/last.ckpt`` (a file, or a folder for sharded
    checkpoints) to resume from, wherever a kill interrupted its writing
    (``distill.checkpointing``)."""
    return resume_checkpoint(stage_dir / "checkpoints" / "last.ckpt")


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def prepare_stage_dir(stage_dir: Path, identity: dict, resume: bool) -> bool:
    """Make ``stage_dir`` belong to ``identity`` (teacher, data, settings): a folder of another
    identity, or any folder when ``resume`` is False, is cleared. Returns True if the folder
    already belonged to it (its checkpoints may be resumed)."""
    path = stage_dir / IDENTITY_FILE
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as read back from the file
    same = resume and path.is_file() and json.loads(path.read_text(encoding="utf-8")) == identity
    _barrier()
    if _rank() == 0 and not same:
        if stage_dir.exists():
            shutil.rmtree(stage_dir)
        write_text_atomic(json.dumps(identity, indent=2, ensure_ascii=False), path)
    _barrier()
    return same


# ---------------------------------------------------------------------------------------------
# The job


@dataclass
class DistillSummary:
    """What a distillation run did: folders, seconds per phase, steps and final losses."""

    student_dir: Path
    causal_teacher_dir: Path
    cache_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    reused: set[str] = field(default_factory=set)  # phases a previous run had finished

    def line(self) -> str:
        s = self.seconds

        def clock(x: float) -> str:
            return f"{int(x // 60)}m{int(x % 60):02d}s"

        def took(phase: str) -> str:
            return "reused" if phase in self.reused else clock(s.get(phase, 0))

        loss = ", ".join(f"{k} loss {v:.4f}" for k, v in self.losses.items())
        ode = (f"ODE init {self.steps['ode_init']} steps {took('ode_init')}, "
               if "ode_init" in self.steps else "")
        return (f"distilled in {clock(s.get('total', 0))} (data {took('data')}, "
                f"stage A {self.steps.get('stage_a', 0)} steps {took('stage_a')}, "
                f"{ode}stage B {self.steps.get('stage_b', 0)} steps {clock(s.get('stage_b', 0))}"
                f"{'; ' + loss if loss else ''}) -> {self.student_dir}")


def _quiet_lightning() -> None:
    """Keep the console to the progress bars and the summary (logs still go to CSV)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*ModelParallelStrategy.*experimental.*")
    # The EMA target network is registered (checkpointed) and deliberately in eval mode.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    # The loaders resume mid-epoch from the restored step (distill.data.resumable), which this
    # warning, looking only for a state_dict on the loader, cannot see.
    warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
    # Checkpoints are meant to hold the state AFTER the step (resume continues from there).
    warnings.filterwarnings("ignore", message=".*manual optimization and every_n_train_steps.*")


@dataclass
class _Job:
    """What every stage of one run reads: the resolved recipe, the models' configs, the folders
    and the summary the stages fill in."""

    cfg: DistillConfig
    teacher_dir: Path
    teacher: TeacherConfig
    student: StudentConfig
    run_dir: Path
    data_key: str
    summary: DistillSummary

    @property
    def causal_dir(self) -> Path:
        return self.summary.causal_teacher_dir

    @property
    def networks(self) -> list[str | None]:
        """The networks trained: one, or one per teacher expert (a two-network student)."""
        return ["high", "low"] if self.cfg.split_experts else [None]

    def predict_kwargs(self) -> dict:
        """Trainer arguments of a predict run (a fresh strategy object per Trainer)."""
        tc = self.cfg.trainer
        return {"accelerator": tc.accelerator, "devices": tc.devices, "num_nodes": tc.num_nodes,
                "strategy": make_strategy(tc), "enable_progress_bar": tc.progress_bar}

    def datamodule(self, batch_size: int) -> LatentDataModule:
        return LatentDataModule(str(self.summary.cache_dir), batch_size=batch_size,
                                num_frames=self.cfg.data.num_frames, seed=self.cfg.seed,
                                num_workers=self.cfg.data.num_workers)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the block's wall-clock seconds to the summary under ``name``."""
        t0 = time.perf_counter()
        yield
        self.summary.seconds[name] = time.perf_counter() - t0


def _network_dir(folder: Path, network: str | None) -> Path:
    return folder if network is None else folder / network


def _network_label(network: str | None) -> str:
    return f" ({network})" if network else ""


def _final_loss(trainer: L.Trainer) -> float | None:
    metrics = trainer.callback_metrics
    return float(metrics["loss"]) if "loss" in metrics else None


def _initial_weights(cfg: DistillConfig) -> str:
    """Where the student's networks start before any training (named in the identities)."""
    return cfg.student_init or f"stage-A expert_{cfg.init_expert}"


def _prepare_job(cfg: DistillConfig) -> _Job:
    """Check the recipe against the teacher folder and resolve every folder of the run."""
    teacher_dir = Path(cfg.teacher_dir) if cfg.teacher_dir else embedded_teacher_dir()
    if not teacher_dir.is_dir():
        raise FileNotFoundError(
            f"teacher folder {teacher_dir} does not exist; "
            + ("the embedded shapes teacher is not installed (train it with the teacher_training "
               "job) or pass teacher_dir=PATH" if cfg.teacher_dir is None else
               "pass the folder of the downloaded Wan2.2-T2V-A14B checkpoint"))
    teacher = read_teacher_config(teacher_dir)
    student = resolve_student(cfg, teacher)
    if cfg.split_experts and cfg.ode_init.max_steps == 0 and set(cfg.stage_b.networks) != {"high", "low"}:
        raise ValueError(f"with split_experts and no ODE initialisation (ode_init.max_steps=0) "
                         f"stage B must train both networks; got stage_b.networks="
                         f"{list(cfg.stage_b.networks)}: set it to [high, low]")
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.student)
    output_dir = Path(cfg.output_dir) if cfg.output_dir else default_student_dir(cfg.student)
    # The student is exported last: a place it cannot go fails now, not after the stages. The
    # folders are not created here (an empty student folder would look like a student).
    check_output_folder(run_dir, "run_dir")
    check_output_folder(output_dir, "output_dir")
    key = cache_key(cfg.data.source, teacher_dir, cfg.data.store_dtype)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_latent_cache_dir() / key
    summary = DistillSummary(output_dir, run_dir / "causal_teacher", cache_dir)
    return _Job(cfg, teacher_dir, teacher, student, run_dir, key, summary)


def _build_data(job: _Job) -> None:
    """The latent cache: encoded once, reused by every stage and by later runs."""
    cfg = job.cfg
    if is_complete(job.summary.cache_dir):
        job.summary.reused.add("data")
    build_latent_cache(job.summary.cache_dir, cfg.data.source, str(job.teacher_dir),
                       batch_size=cfg.data.encode_batch_size, store_dtype=cfg.data.store_dtype,
                       num_workers=cfg.data.num_workers, trainer_kwargs=job.predict_kwargs())


def _run_stage_a(job: _Job) -> dict:
    """Stage A: the causal two-expert teacher. Returns the stage's identity (which the later
    stages' identities include, so a new causal teacher restarts them)."""
    cfg, causal_dir = job.cfg, job.causal_dir
    stage_a_dir = job.run_dir / "stage_a"
    identity_a = {"teacher": teacher_fingerprint(job.teacher_dir), "data": job.data_key,
                  "chunk_frames": job.student.chunk_frames, "stage_a": asdict(cfg.stage_a),
                  "parallel": asdict(cfg.parallel), "seed": cfg.seed}
    resumable = prepare_stage_dir(stage_a_dir, identity_a, cfg.resume)
    job.summary.steps["stage_a"] = cfg.stage_a.max_steps
    if resumable and (causal_dir / CAUSAL_TEACHER_FILE).is_file():
        job.summary.reused.add("stage_a")
        return identity_a
    if _rank() == 0 and causal_dir.exists():
        shutil.rmtree(causal_dir)
    L.seed_everything(cfg.seed, verbose=False)
    module_a = ARAdaptationModule(str(job.teacher_dir), teacher_config_to_dict(job.teacher),
                                  student_config_to_dict(job.student), cfg.stage_a, cfg.parallel,
                                  cfg.seed)
    trainer_a = make_trainer(cfg.trainer, stage_a_dir, cfg.stage_a.max_steps,
                             "stage A: causal teacher")
    trainer_a.fit(module_a, job.datamodule(cfg.stage_a.batch_size),
                  ckpt_path=last_checkpoint(stage_a_dir) if resumable else None)
    module_a.export_causal_teacher(causal_dir)
    _barrier()
    if (loss := _final_loss(trainer_a)) is not None:
        job.summary.losses["stage A"] = loss
    return identity_a


def _trained_fields(student: StudentConfig) -> dict:
    """The student config as a stage's identity sees it: without its sampling grids, which only
    inference reads (a new grid re-exports the student; it does not retrain it)."""
    return {k: v for k, v in student_config_to_dict(student).items() if k != "sampling_grids"}


def _run_ode_init(job: _Job, identity_a: dict) -> tuple[dict, dict[str | None, str | None]]:
    """ODE initialisation: the student learns the causal teacher's own trajectories.

    Returns what stage B starts from: its identity entry and, per network, the folder of its
    ODE-initialised weights.
    """
    cfg, o, student = job.cfg, job.cfg.ode_init, job.student
    inits: dict[str | None, str | None] = {}
    ode_dir = job.run_dir / "ode_init"
    identity_o = {"causal_teacher": identity_a, "student": _trained_fields(student),
                  "student_init": _initial_weights(cfg), "ode_init": asdict(o),
                  "guidance_min": cfg.stage_b.guidance_min, "networks": job.networks}
    resumable = prepare_stage_dir(ode_dir, identity_o, cfg.resume)
    grid = trajectory_grid(o.solver_steps, student.shift,
                           student_sigmas(student.steps, student.shift))
    skipped = 0
    for network in job.networks:
        net_dir = _network_dir(ode_dir, network)
        ode_student = net_dir / "student"
        inits[network] = str(ode_student)
        if resumable and (ode_student / STUDENT_CONFIG_FILE).is_file():
            skipped += 1
            continue
        trajectories = build_trajectories(
            ode_dir / "trajectories", job.summary.cache_dir, str(job.causal_dir), grid,
            num_items=o.num_trajectories,
            guidance_range=student.guidance_range, seed=cfg.seed,
            batch_size=o.generate_batch_size, teacher_dtype=cfg.parallel.teacher_dtype,
            num_frames=cfg.data.num_frames, trainer_kwargs=job.predict_kwargs())
        L.seed_everything(cfg.seed, verbose=False)
        module_o = ODEInitModule(str(job.causal_dir), student_config_to_dict(student),
                                 grid.sigmas[grid.keep].tolist(), cfg.student_init,
                                 cfg.init_expert, o, cfg.parallel, cfg.seed, expert=network)
        trainer_o = make_trainer(cfg.trainer, net_dir, o.steps_of(network),
                                 "ODE init: teacher trajectories" + _network_label(network))
        trainer_o.fit(module_o, TrajectoryDataModule(str(trajectories), str(job.summary.cache_dir),
                                                     o.batch_size, cfg.seed, cfg.data.num_frames),
                      ckpt_path=last_checkpoint(net_dir) if resumable else None)
        module_o.export_student_folder(ode_student)
        _barrier()
        if (loss := _final_loss(trainer_o)) is not None:
            job.summary.losses["ODE init" + (f" {network}" if network else "")] = loss
    job.summary.steps["ode_init"] = sum(o.steps_of(network) for network in job.networks)
    if skipped == len(job.networks):
        job.summary.reused.add("ode_init")
    return {"ode_init": identity_o}, inits


def _run_stage_b(job: _Job, identity_a: dict, start_b: dict,
                 inits: dict[str | None, str | None]) -> None:
    """Stage B: consistency distillation into the student, then the export.

    With two networks, those named in stage_b.networks are trained, the low-noise one first:
    the high-noise network's last interval takes its target from the finished low-noise one.
    """
    cfg, student, teacher, causal_dir = job.cfg, job.student, job.teacher, job.causal_dir
    stage_b_dir = job.run_dir / "stage_b"
    trained = [n for n in job.networks if n is None or n in cfg.stage_b.networks]
    identity_b = {"causal_teacher": identity_a, "student": _trained_fields(student),
                  "student_init": start_b, "stage_b": asdict(cfg.stage_b), "networks": trained}
    resumable = prepare_stage_dir(stage_b_dir, identity_b, cfg.resume)
    info = {"teacher_dir": str(job.teacher_dir), "causal_teacher_dir": str(causal_dir),
            "stage_b": asdict(cfg.stage_b)}
    main_weights = cfg.stage_b.export_weights
    other_weights = "student" if main_weights == "ema" else "ema"

    def start_folder(network: str) -> Path:
        """Where a network stands before stage B (its ODE-initialised or starting weights)."""
        if inits[network] is not None:
            return Path(inits[network])
        return causal_dir / {"high": teacher.expert_high_dir, "low": teacher.expert_low_dir}[network]

    # name -> (folder of its main weights, folder of its other weights); untrained: one folder.
    network_weights = {n: (start_folder(n), start_folder(n)) for n in job.networks if n not in trained}
    for network in sorted(trained, key=lambda n: n != "low"):
        net_dir = _network_dir(stage_b_dir, network)
        L.seed_everything(cfg.seed, verbose=False)
        module_b = ConsistencyDistillationModule(
            str(causal_dir), student_config_to_dict(student), inits[network], cfg.stage_b,
            cfg.parallel, cfg.seed, init_expert=cfg.init_expert, expert=network,
            partner_init=str(network_weights["low"][0]) if network == "high" else None)
        trainer_b = make_trainer(cfg.trainer, net_dir, cfg.stage_b.max_steps,
                                 "stage B: consistency distillation" + _network_label(network))
        trainer_b.fit(module_b, job.datamodule(cfg.stage_b.batch_size),
                      ckpt_path=last_checkpoint(net_dir) if resumable else None)
        if (loss := _final_loss(trainer_b)) is not None:
            job.summary.losses["stage B" + (f" {network}" if network else "")] = loss
        target = job.summary.student_dir if network is None else net_dir / "export"
        export_student(module_b.student, module_b.ema_student, student, target,
                       main=main_weights, rank=trainer_b.global_rank,
                       info={"step": trainer_b.global_step, **info})
        _barrier()
        if network is not None:
            network_weights[network] = (target, target / other_weights)
    job.summary.steps["stage_b"] = cfg.stage_b.max_steps * len(trained)
    if cfg.split_experts and _rank() == 0:
        exported = replace(student, boundary=teacher.sampling.boundary)
        export_moe_student(network_weights, exported, job.summary.student_dir, main=main_weights,
                           info={"stage_b_networks": trained, **info})
    _barrier()


def distill_main(config: str | os.PathLike | DistillConfig | None = None,
                 overrides: Sequence[str] = (), *, verbose: bool = True) -> DistillSummary:
    """Run the whole distillation job; returns its summary (and prints its one-line form).

    Args:
        config: a recipe path, a ``DistillConfig``, or None for the shapes recipe.
        overrides: dotted ``key=value`` overrides of the recipe (``stage_b.max_steps=50``).
        verbose: print the closing summary line (rank 0).
    """
    cfg = config if isinstance(config, DistillConfig) else load_config(config, overrides)
    if isinstance(config, DistillConfig) and overrides:
        raise ValueError("overrides apply to recipe files; edit the DistillConfig directly")
    _quiet_lightning()
    if cfg.trainer.num_threads is not None:
        torch.set_num_threads(cfg.trainer.num_threads)
    elif not _PASSIVE_OMP and torch.get_num_threads() > 1:
        torch.set_num_threads(1)  # spinning OpenMP threads would thrash on a shared CPU
    start = time.perf_counter()
    job = _prepare_job(cfg)
    with job.phase("data"):
        _build_data(job)
    with job.phase("stage_a"):
        identity_a = _run_stage_a(job)
    # Stage B starts from the ODE-initialised networks, or without that stage from the start.
    start_b: dict = {"init": _initial_weights(cfg)}
    inits: dict[str | None, str | None] = {n: cfg.student_init for n in job.networks}
    if cfg.ode_init.max_steps > 0:
        with job.phase("ode_init"):
            start_b, inits = _run_ode_init(job, identity_a)
    with job.phase("stage_b"):
        _run_stage_b(job, identity_a, start_b, inits)
    job.summary.seconds["total"] = time.perf_counter() - start
    if verbose and _rank() == 0:
        print(job.summary.line(), flush=True)
    return job.summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distill.run [--config FILE] [--key=value ...]``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config = None
    if "--config" in argv:
        i = argv.index("--config")
        config = argv[i + 1]
        del argv[i: i + 2]
    try:
        distill_main(config, argv)
    except (FileNotFoundError, OutputLocationError) as err:  # a missing input, a bad output
        raise SystemExit(f"error: {err}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
