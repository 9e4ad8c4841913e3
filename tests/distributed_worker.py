"""A 2-process CPU distillation, launched by ``torch.distributed.run`` from the tests.

Every rank runs this file (gloo, ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
FSDP2 over the two ranks). In one launch, to pay the process start-up once:

1. stage A for one step on sharded experts, then the sharded export of the causal teacher;
2. stage B uninterrupted for ``--steps`` steps -> ``final_full.safetensors``;
3. stage B for ``--steps - 1`` steps (the "interruption": max_steps reached in the middle of
   an epoch, whose batches the resumed run must not start over) with a sharded checkpoint, then
   a NEW module and Trainer resumed from it with ``ckpt_path`` to ``--steps`` ->
   ``final_resumed.safetensors``;
4. per rank, the expert chosen at every step of every fit and the intervals it drew ->
   ``choices_rank<r>.json``;
5. the ODE initialisation: trajectories by a 2-rank predict run, two steps on the sharded
   student, its sharded export (``ode_student/``), then a stage-B student started from that
   folder (sharded, lr 0, one step) -> ``stage_b_from_ode.safetensors``; the trajectories'
   8 items in batches of 3 are uneven over the ranks (2 batches on rank 0, 1 on rank 1);
6. stage B of a two-network student's high-noise network with its frozen partner;
7. the test process's latent cache built again by a 2-rank predict run in batches of 3 ->
   ``cache_two_ranks/``.

The tests compare the files; this script asserts only what it must to get there. Inputs (tiny
teacher folder and latent cache) are prepared by the test process: ``--teacher`` and ``--cache``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from distill.ar_adaptation import ARAdaptationModule  # noqa: E402
from distill.checkpointing import AtomicCheckpoint  # noqa: E402
from distill.config import (  # noqa: E402
    ARAdaptationConfig,
    ConsistencyConfig,
    ODEInitConfig,
    OptimConfig,
    ParallelConfig,
)
from distill.data.latents import LatentDataModule, LatentSource, build_latent_cache  # noqa: E402
from distill.data.trajectories import TrajectoryDataModule, build_trajectories  # noqa: E402
from distill.module import ConsistencyDistillationModule  # noqa: E402
from distill.ode_init import trajectory_grid  # noqa: E402
from distill.ode_module import ODEInitModule  # noqa: E402
from distill.sharding import full_state_dict  # noqa: E402
from student.checkpoint import load_student  # noqa: E402
from student.config import StudentConfig, student_config_to_dict  # noqa: E402
from student.sampler import student_sigmas  # noqa: E402
from teacher.config import teacher_config_to_dict  # noqa: E402
from teacher.weight_files import save_safetensors_atomic  # noqa: E402
from tests.tiny_teacher import TINY  # noqa: E402

TINY_STUDENT = StudentConfig(name="tiny", teacher="tiny", dit=TINY.dit, chunk_frames=1,
                             sink_chunks=1, window_chunks=1, shift=3.0, guidance_default=3.0,
                             guidance_max=5.0)
QUICK = OptimConfig(lr=1e-3, warmup_steps=2, grad_clip=1.0)
CACHE_SOURCE = LatentSource(kind="shapes", num_clips=8, num_frames=5, seed=2)


class RecordDraws(L.Callback):
    """Per step: the expert the module chose and the first interval/timestep this rank drew."""

    def __init__(self, records: list, fit: str):
        self.records, self.fit = records, fit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, expert = pl_module.chosen_experts[-1]
        self.records.append({"fit": self.fit, "step": step, "expert": expert,
                         "first_latent": float(batch["latents"].flatten()[0])})


def trainer(max_steps: int, callbacks=(), checkpoint_dir: Path | None = None) -> L.Trainer:
    cbs = list(callbacks)
    if checkpoint_dir is not None:
        cbs.append(AtomicCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=max_steps,
                                    save_top_k=0, save_last=True))
    return L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(2, 1),
                     max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=checkpoint_dir is not None,
                     callbacks=cbs, use_distributed_sampler=False)  # as distill.run's


def stage_b_module(causal_dir: Path) -> ConsistencyDistillationModule:
    stage = ConsistencyConfig(max_steps=0, batch_size=2, optim=QUICK, num_intervals=6,
                              ema_decay=0.5, loss="pseudo_huber", huber_c=0.01)
    # The GPU recipes' settings, on the CPU: bf16 teacher storage and bf16 compute over fp32
    # masters (FSDP2 MixedPrecisionPolicy), activation checkpointing per student block.
    parallel = ParallelConfig(compute_dtype="bf16", teacher_dtype="bf16",
                              activation_checkpointing=True)
    return ConsistencyDistillationModule(str(causal_dir), student_config_to_dict(TINY_STUDENT),
                                         stage=stage, parallel=parallel, seed=11)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes on two cores
    warnings.filterwarnings("ignore")
    import time
    t0 = time.perf_counter()

    def mark(what: str) -> None:
        if int(os.environ["RANK"]) == 0:
            print(f"[worker] {what} at {time.perf_counter() - t0:.1f} s", flush=True)

    out = Path(args.out)
    rank = int(os.environ["RANK"])
    draws: list[dict] = []

    def data() -> LatentDataModule:
        return LatentDataModule(args.cache, batch_size=2, seed=5)

    # 1. Stage A, sharded, one step; sharded export (gather on every rank, rank 0 writes).
    L.seed_everything(0, verbose=False)
    module_a = ARAdaptationModule(args.teacher, teacher_config_to_dict(TINY),
                                  student_config_to_dict(TINY_STUDENT),
                                  ARAdaptationConfig(max_steps=1, batch_size=2, optim=QUICK),
                                  seed=3)
    trainer(1, [RecordDraws(draws, "stage_a")]).fit(module_a, data())
    assert isinstance(module_a.expert_low.blocks[0].self_attn.q.weight, DTensor), "not sharded"
    causal_dir = out / "causal_teacher"
    module_a.export_causal_teacher(causal_dir)
    torch.distributed.barrier()
    mark("stage A + export")

    # 2. Stage B uninterrupted.
    L.seed_everything(0, verbose=False)
    module = stage_b_module(causal_dir)
    trainer(args.steps, [RecordDraws(draws, "full")]).fit(module, data())
    teacher_q = module.teacher.expert_high.blocks[0].self_attn.q.weight
    assert isinstance(teacher_q, DTensor) and teacher_q.dtype == torch.bfloat16
    assert "CheckpointWrapper" in type(module.student.blocks[0]).__name__
    full = full_state_dict(module.student)
    full_ema = full_state_dict(module.ema_student)
    if rank == 0:
        save_safetensors_atomic(full, out / "final_full.safetensors")
        save_safetensors_atomic(full_ema, out / "final_full_ema.safetensors")

    mark("stage B uninterrupted")
    # 3. Interrupted mid-epoch with a sharded checkpoint, then resumed by a fresh module. The
    # 8 clips over 2 ranks at batch 2 make 2 batches per epoch: step 3 of 4 ends inside one.
    interrupt = args.steps - 1
    assert interrupt % 2, f"--steps {args.steps}: the interruption must fall mid-epoch"
    ckpt_dir = out / "checkpoints"
    L.seed_everything(0, verbose=False)
    module = stage_b_module(causal_dir)
    trainer(interrupt, [RecordDraws(draws, "first_half")], ckpt_dir).fit(module, data())
    torch.distributed.barrier()
    mark("stage B first half")
    L.seed_everything(0, verbose=False)
    module = stage_b_module(causal_dir)
    resumed = trainer(args.steps, [RecordDraws(draws, "resumed")])
    resumed.fit(module, data(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    full = full_state_dict(module.student)
    full_ema = full_state_dict(module.ema_student)
    if rank == 0:
        save_safetensors_atomic(full, out / "final_resumed.safetensors")
        save_safetensors_atomic(full_ema, out / "final_resumed_ema.safetensors")
        (out / "checkpoint_files.json").write_text(json.dumps(
            sorted(p.name for p in (ckpt_dir / "last.ckpt").iterdir())))
    (out / f"choices_rank{rank}.json").write_text(json.dumps(draws))
    torch.distributed.barrier()
    mark("stage B resumed")

    # 5. ODE initialisation, sharded, and stage B started from its export.
    grid = trajectory_grid(4, TINY_STUDENT.shift, student_sigmas(TINY_STUDENT.steps,
                                                                 TINY_STUDENT.shift))
    trajectories = build_trajectories(
        out / "trajectories", args.cache, str(causal_dir), grid, num_items=None,
        guidance_range=(1.0, TINY_STUDENT.guidance_max), seed=3, batch_size=3,
        trainer_kwargs={"accelerator": "cpu", "devices": 2, "strategy": ModelParallelStrategy(2, 1),
                        "enable_progress_bar": False})
    parallel = ParallelConfig(compute_dtype="bf16", teacher_dtype="bf16", activation_checkpointing=True)
    L.seed_everything(0, verbose=False)
    module_o = ODEInitModule(str(causal_dir), student_config_to_dict(TINY_STUDENT),
                             grid.sigmas[grid.keep].tolist(),
                             stage=ODEInitConfig(max_steps=2, batch_size=2, optim=QUICK),
                             parallel=parallel, seed=3)
    trainer(2).fit(module_o, TrajectoryDataModule(str(trajectories), args.cache, 2, seed=5))
    assert isinstance(module_o.student.blocks[0].self_attn.q.weight, DTensor), "not sharded"
    module_o.export_student_folder(out / "ode_student")
    torch.distributed.barrier()
    still = ConsistencyConfig(max_steps=0, batch_size=2, num_intervals=6,
                              optim=OptimConfig(lr=0.0, grad_clip=0.0))
    module = ConsistencyDistillationModule(str(causal_dir), student_config_to_dict(TINY_STUDENT),
                                           str(out / "ode_student"), still, parallel, seed=11)
    trainer(1).fit(module, data())
    start_b = full_state_dict(module.student)
    if rank == 0:
        save_safetensors_atomic(start_b, out / "stage_b_from_ode.safetensors")
    torch.distributed.barrier()
    mark("ODE init + stage B from it")

    # 6. Stage B of a two-network student's high-noise network, sharded: its last interval's
    #    target comes from the frozen low-noise partner (here the ODE student), which is sharded
    #    and stored like the teacher and must stay out of the checkpoint.
    L.seed_everything(0, verbose=False)
    module_h = ConsistencyDistillationModule(
        str(causal_dir), student_config_to_dict(TINY_STUDENT), str(out / "ode_student"),
        ConsistencyConfig(max_steps=0, batch_size=2, optim=QUICK, num_intervals=6), parallel,
        seed=11, expert="high", partner_init=str(out / "ode_student"))
    trainer(1, checkpoint_dir=out / "checkpoints_high").fit(module_h, data())
    partner = module_h._partner[0]
    partner_q = partner.blocks[0].self_attn.q.weight
    partner_full = full_state_dict(partner)
    if rank == 0:
        ode_state = load_student(out / "ode_student")[0].state_dict()
        (out / "high_network.json").write_text(json.dumps({
            "partner_sharded": isinstance(partner_q, DTensor),
            "partner_dtype": str(partner_q.dtype),
            "partner_trainable": any(p.requires_grad for p in partner.parameters()),
            "partner_is_ode_student": set(partner_full) == set(ode_state) and all(
                torch.equal(partner_full[k], v.to(partner_full[k].dtype))
                for k, v in ode_state.items()),
            "experts": sorted({e for _, e in module_h.chosen_experts}),
        }))
    torch.distributed.barrier()
    mark("stage B of the high-noise network with its partner")

    # 7. The latent cache again, by two ranks (the test process built it on one).
    build_latent_cache(out / "cache_two_ranks", CACHE_SOURCE, args.teacher, batch_size=3,
                       trainer_kwargs={"accelerator": "cpu", "devices": 2,
                                       "strategy": ModelParallelStrategy(2, 1),
                                       "enable_progress_bar": False})
    mark("latent cache on two ranks")


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------------------------
# Launcher used by the tests (runs in the pytest process).

_LAUNCHED: dict[str, object] = {}


def launch_two_process_run(steps: int = 4, timeout: float = 120.0) -> dict:
    """Prepare a tiny teacher and latent cache, run this worker on 2 CPU processes once per
    pytest session, and return {"out": folder, "seconds": wall time, "log": output}.

    Cached: test_distributed.py and test_expert_sync.py read the same run.
    """
    import subprocess
    import sys
    import tempfile
    import time

    from tests.tiny_teacher import tiny_models, write_official

    if "result" in _LAUNCHED:
        return _LAUNCHED["result"]
    root = Path(tempfile.mkdtemp(prefix="wan-distill-dist-"))
    teacher_dir = write_official(root / "teacher", tiny_models(seed=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = build_latent_cache(root / "cache", CACHE_SOURCE, str(teacher_dir), batch_size=8,
                                   trainer_kwargs={"accelerator": "cpu", "devices": 1,
                                                   "enable_progress_bar": False})
    finally:
        torch.set_num_threads(threads)
    out = root / "out"
    out.mkdir()
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_WAIT_POLICY": "PASSIVE",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
           str(Path(__file__).resolve()), "--teacher", str(teacher_dir), "--cache", str(cache),
           "--out", str(out), "--steps", str(steps)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"distributed worker failed (exit {proc.returncode}):\n{log[-6000:]}")
    _LAUNCHED["result"] = {"out": out, "cache": cache, "seconds": seconds, "log": log}
    return _LAUNCHED["result"]
