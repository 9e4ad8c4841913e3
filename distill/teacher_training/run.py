"""Train the embedded shapes-world teacher from a seed, in four resumable Lightning stages.

    python -m distill.teacher_training.run --config configs/teacher/shapes.yaml

1. ``vae``: WanVAE on rendered clips (foreground-weighted, edge-preserving loss).
2. ``latents``: the world encoded once; its statistics become latents_mean / latents_std.
3. ``text``: the text encoder pretrained so every caption token carries the caption's factors.
4. ``flow``: expert_high + expert_low by flow matching on the frozen text encoder (EMA weights
   are shipped); with ``flow.parallel_experts`` each expert trains in its own process, resumable
   from its own folder (``flow/high``, ``flow/low``).

Every stage writes its result into ``work_dir`` and is skipped when that result exists; an
interrupted Lightning stage resumes from its ``last.ckpt``. The teacher is written to ``out_dir``
in the official layout (``teacher.checkpoint.save_teacher``), each file atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import torch

from student.paths import embedded_teacher_dir, wan_distill_home
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file
from tqdm import tqdm

from distill.checkpointing import AtomicCheckpoint, resume_checkpoint
from distill.data.shapes import ShapesWorldDataModule
from distill.teacher_training.flow_module import (
    EXPERTS,
    FlowTeacherModule,
    LatentDataModule,
    expert_batch_sizes,
)
from distill.teacher_training.latents import (
    LATENTS_FILE,
    CaptionedLatents,
    LatentCache,
    encode_world,
    latent_statistics,
)
from distill.teacher_training.settings import (
    TeacherTrainingConfig,
    load_training_config,
    training_config_to_dict,
)
from distill.teacher_training.text import tokenize_captions
from distill.teacher_training.text_pretraining import (
    TextPretrainingModule,
    caption_loader,
    caption_table,
    per_token_factor_accuracy,
)
from distill.teacher_training.vae_module import (
    VAETrainingModule,
    identity_normalised,
    reconstruction_report,
    stack_clips,
)
from teacher.checkpoint import TeacherModels, save_teacher
from teacher.config import TeacherConfig, teacher_config_to_dict, teacher_preset
from teacher.dit import WanModel
from teacher.output_paths import OutputLocationError, check_output_folder, prepare_output_folder
from teacher.t5 import UMT5Encoder
from teacher.tokenizer import ByteTokenizer
from teacher.vae import WanVAE
from teacher.weight_files import save_safetensors_atomic, write_text_atomic

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "teacher" / "shapes.yaml"
RUN_FILE = "run.json"
VAE_WEIGHTS = "vae.safetensors"
STAGE_REPORT = "report.json"
FLOW_PARTS = ("text_encoder", "expert_high", "expert_low")
TEXT_WEIGHTS = "text_encoder.safetensors"


def teacher_config_for(config: TeacherTrainingConfig, base: TeacherConfig | None = None) -> TeacherConfig:
    """The preset named by the run (or ``base``), with the run's sampling overrides applied."""
    preset = base if base is not None else teacher_preset(config.preset)
    if config.sampling:
        try:
            sampling = replace(preset.sampling, **config.sampling)
        except TypeError as err:
            raise ValueError(f"sampling overrides {config.sampling} are not all SamplingConfig "
                             f"fields ({err})") from None
        preset = replace(preset, sampling=sampling)
    return preset


def _check_run_folder(work: Path, config: TeacherTrainingConfig, seed: int,
                      teacher: TeacherConfig) -> None:
    """A work folder belongs to one (config, seed, architecture): resuming another run's stages
    would mix them."""
    identity = {"seed": seed, "config": training_config_to_dict(replace(config, seed=seed)),
                "teacher": teacher_config_to_dict(teacher)}
    for key in ("out_dir", "work_dir", "num_threads"):  # where and how fast, not what
        identity["config"].pop(key)
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as read back from the file
    path = work / RUN_FILE
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != identity:
            raise ValueError(
                f"{work} holds stages of a different run ({path} differs from this config/seed); "
                f"pass another work_dir or delete {work}")
        return
    write_text_atomic(json.dumps(identity, indent=2), path)


def _trainer(stage_dir: Path, max_steps: int, checkpoint_every: int, progress: bool,
             callbacks: list | None = None, grad_clip: float = 0.0) -> L.Trainer:
    checkpoint = AtomicCheckpoint(dirpath=stage_dir / "checkpoints", save_last=True, save_top_k=0,
                                 every_n_train_steps=checkpoint_every)
    return L.Trainer(
        accelerator="auto", devices=1, max_steps=max_steps, max_epochs=-1,
        default_root_dir=stage_dir, logger=CSVLogger(stage_dir, name="logs"),
        callbacks=[checkpoint, *(callbacks or [])], limit_val_batches=0, num_sanity_val_steps=0,
        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=25,
        gradient_clip_val=grad_clip or None,
    )


def _resume_path(stage_dir: Path) -> str | None:
    return resume_checkpoint(stage_dir / "checkpoints" / "last.ckpt")


def _read_report(stage_dir: Path) -> dict | None:
    path = stage_dir / STAGE_REPORT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run_vae_stage(config: TeacherTrainingConfig, teacher: TeacherConfig, seed: int, work: Path,
                  progress: bool) -> dict:
    """Stage 1; returns its report (time, PSNR, oracle on reconstructions)."""
    stage_dir = work / "vae"
    report = _read_report(stage_dir)
    if report is not None and (stage_dir / VAE_WEIGHTS).is_file():
        return report
    s = config.vae
    start, cpu_start = time.perf_counter(), time.process_time()
    L.seed_everything(seed, verbose=False)
    module = VAETrainingModule(teacher.vae, s)
    data = ShapesWorldDataModule(
        batch_size=max(p.batch_size for p in s.phases), num_frames=max(p.frames for p in s.phases),
        seed=seed, num_train=max(1, s.steps) * max(p.batch_size for p in s.phases),
        num_val=s.val_clips)
    trainer = _trainer(stage_dir, s.steps, s.checkpoint_every, progress)
    # Only the training loader: clips for the report are taken from the validation set below.
    # Built here, outside fit, so the data module is given its trainer first: the loader's
    # position follows the trainer's restored step (distill.data.resumable).
    data.trainer = trainer
    trainer.fit(module, train_dataloaders=data.train_dataloader(), ckpt_path=_resume_path(stage_dir))
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    vae = module.vae.cpu().eval()
    save_safetensors_atomic(vae.state_dict(), stage_dir / VAE_WEIGHTS)
    videos, captions = stack_clips(data.val_set, s.val_clips)
    measured = reconstruction_report(vae, videos, captions)
    report = {"stage": "vae", "steps": s.steps, "train_s": train_s, "train_cpu_s": train_cpu_s,
              "wall_s": time.perf_counter() - start, **measured}
    write_text_atomic(json.dumps(report, indent=2), stage_dir / STAGE_REPORT)
    return report


def load_stage_vae(teacher: TeacherConfig, work: Path) -> WanVAE:
    """The stage-1 VAE with identity normalisation (its encode returns raw mu)."""
    vae = WanVAE(**asdict(identity_normalised(teacher.vae)))
    vae.load_state_dict(load_file(str(work / "vae" / VAE_WEIGHTS)))
    return vae.eval()


def run_latent_stage(config: TeacherTrainingConfig, teacher: TeacherConfig, seed: int, work: Path,
                     progress: bool) -> tuple[LatentCache, dict]:
    """Stage 2; returns the cache and its report (time, latent statistics)."""
    stage_dir = work / "latents"
    report = _read_report(stage_dir)
    if report is not None and (stage_dir / LATENTS_FILE).is_file():
        return LatentCache.load(stage_dir), report
    start = time.perf_counter()
    vae = load_stage_vae(teacher, work)
    n = config.latents.num_videos
    with tqdm(total=n, desc="encoding the world", unit="clip", disable=not progress) as bar:
        cache = encode_world(vae, n, seed, config.latents.batch_size,
                             num_frames=teacher.sampling.frames,
                             progress=lambda done, total: bar.update(done - bar.n))
    cache.save(stage_dir)
    mean, std = latent_statistics(cache)
    report = {"stage": "latents", "num_videos": n, "latents_mean": mean, "latents_std": std,
              "wall_s": time.perf_counter() - start}
    write_text_atomic(json.dumps(report, indent=2), stage_dir / STAGE_REPORT)
    return cache, report


def run_text_stage(config: TeacherTrainingConfig, teacher: TeacherConfig, seed: int, work: Path,
                   progress: bool) -> tuple[dict, dict]:
    """Stage 3; returns (the text encoder's state_dict, report with per-token factor accuracy)."""
    stage_dir = work / "text"
    report = _read_report(stage_dir)
    if report is not None and (stage_dir / TEXT_WEIGHTS).is_file():
        return load_file(str(stage_dir / TEXT_WEIGHTS)), report
    s = config.text
    start = time.perf_counter()
    L.seed_everything(seed + 3, verbose=False)
    module = TextPretrainingModule(teacher.t5, s)
    ids, mask, labels = caption_table(ByteTokenizer(), teacher.dit.text_len)
    if s.steps > 0:
        trainer = _trainer(stage_dir, s.steps, s.steps, progress)
        trainer.fit(module, train_dataloaders=caption_loader(ids, mask, labels, s, seed),
                    ckpt_path=_resume_path(stage_dir))
    encoder = module.text_encoder.cpu().eval()
    with torch.no_grad():
        accuracy = per_token_factor_accuracy(encoder(ids, mask), mask, labels, module.heads.cpu())
    save_safetensors_atomic(encoder.state_dict(), stage_dir / TEXT_WEIGHTS)
    report = {"stage": "text", "steps": s.steps, "wall_s": time.perf_counter() - start,
              "per_token_accuracy": accuracy}
    write_text_atomic(json.dumps(report, indent=2), stage_dir / STAGE_REPORT)
    return encoder.state_dict(), report


def fit_flow_experts(config: TeacherTrainingConfig, teacher: TeacherConfig, seed: int,
                     stage_dir: Path, cache: LatentCache, text_state: dict,
                     experts: tuple[str, ...], progress: bool) -> tuple[dict, dict]:
    """Train ``experts`` (both, or one) by flow matching in this process, resuming from
    ``stage_dir``'s last checkpoint; returns ({"text_encoder" and "expert_<name>": EMA
    state_dict}, final metrics).

    One expert gets a whole batch of its share of ``flow.batch_size`` per step, so the recipe's
    samples per expert per step are the same whether the experts train together or apart.
    """
    s = config.flow
    share = dict(zip(EXPERTS, expert_batch_sizes(s.batch_size, s.high_fraction)))
    batch_size = s.batch_size if len(experts) == 2 else share[experts[0]]
    # Each expert trained apart draws its own noise, timesteps and batches.
    offset = 0 if len(experts) == 2 else 1 + EXPERTS.index(experts[0])
    L.seed_everything(seed + 1 + offset, verbose=False)
    tokenizer = ByteTokenizer()
    text_len = teacher.dit.text_len
    dataset = CaptionedLatents(cache, teacher.vae.latents_mean, teacher.vae.latents_std, tokenizer,
                               text_len)
    empty_ids, empty_mask = tokenize_captions(tokenizer, [""], text_len)
    module = FlowTeacherModule(teacher, s, empty_ids[0], empty_mask[0], text_state, experts)
    ema = EMAWeightAveraging(decay=s.ema_decay, update_starting_at_step=s.ema_start_step)
    trainer = _trainer(stage_dir, s.steps, s.checkpoint_every, progress, callbacks=[ema],
                       grad_clip=s.grad_clip)
    trainer.fit(module, LatentDataModule(dataset, batch_size, seed + offset),
                ckpt_path=_resume_path(stage_dir))
    # The averaged weights, taken the way the callback writes them into a checkpoint: fit copies
    # them into the module only when its loop runs, not when it resumes at max_steps.
    checkpoint = {"state_dict": module.state_dict()}
    ema.on_save_checkpoint(trainer, module, checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    module = module.cpu()
    states = {part: getattr(module, part).state_dict()
              for part in ("text_encoder", *(f"expert_{name}" for name in experts))}
    return states, {k: float(v) for k, v in trainer.callback_metrics.items()}


def _expert_process(config: TeacherTrainingConfig, teacher: TeacherConfig, seed: int, work: Path,
                    expert: str, progress: bool, num_threads: int) -> None:
    """One expert's flow training in a child process; writes its EMA weights and final metrics
    into work/flow/<expert>/ (skipped when they are there)."""
    torch.set_num_threads(num_threads)
    expert_dir = work / "flow" / expert
    weights = expert_dir / f"expert_{expert}.safetensors"
    if _read_report(expert_dir) is not None and weights.is_file():
        return
    cache = LatentCache.load(work / "latents")
    text_state = load_file(str(work / "text" / TEXT_WEIGHTS))
    states, metrics = fit_flow_experts(config, teacher, seed, expert_dir, cache, text_state,
                                       (expert,), progress)
    save_safetensors_atomic(states[f"expert_{expert}"], weights)
    write_text_atomic(json.dumps({"expert": expert, "final_metrics": metrics}, indent=2),
                      expert_dir / STAGE_REPORT)


def _fit_experts_in_parallel(config: TeacherTrainingConfig, teacher: TeacherConfig, seed: int,
                             work: Path, progress: bool) -> tuple[dict, dict]:
    """Both experts at once, one process each with half the threads; only expert_high's process
    shows a progress bar (the two advance at the same pace). With num_threads 1 the two
    processes run one after the other: the same weights, within the thread budget."""
    concurrent = config.num_threads >= 2
    threads = max(1, config.num_threads // 2)
    context = torch.multiprocessing.get_context("spawn")
    processes = [context.Process(target=_expert_process, name=f"flow-{name}",
                                 args=(config, teacher, seed, work, name,
                                       progress and (name == "high" or not concurrent), threads))
                 for name in EXPERTS]
    for process in processes:
        process.start()
        if not concurrent:
            process.join()
    for process in processes:
        process.join()
    failed = [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"flow stage: {', '.join(failed)} failed, see the error printed above; "
                           f"rerun the same command to resume from the checkpoints in {work / 'flow'}")
    states, metrics = {}, {}
    for name in EXPERTS:
        expert_dir = work / "flow" / name
        states[f"expert_{name}"] = load_file(str(expert_dir / f"expert_{name}.safetensors"))
        found = _read_report(expert_dir)["final_metrics"]
        # Absent when the process resumed with no step left to run: nothing was measured.
        metrics[f"flow/loss_{name}"] = found.get(f"flow/loss_{name}", float("nan"))
    metrics["flow/loss"] = sum(metrics[f"flow/loss_{name}"] * share for name, share in
                               zip(EXPERTS, expert_batch_sizes(config.flow.batch_size,
                                                               config.flow.high_fraction))
                               ) / config.flow.batch_size
    return states, metrics


def run_flow_stage(config: TeacherTrainingConfig, teacher: TeacherConfig, seed: int, work: Path,
                   cache: LatentCache, text_state: dict, progress: bool) -> tuple[dict, dict]:
    """Stage 4; returns ({part: state_dict} of the EMA weights, report)."""
    stage_dir = work / "flow"
    report = _read_report(stage_dir)
    files = {part: stage_dir / f"{part}.safetensors" for part in FLOW_PARTS}
    if report is not None and all(f.is_file() for f in files.values()):
        return {part: load_file(str(f)) for part, f in files.items()}, report
    s = config.flow
    start, cpu_start = time.perf_counter(), time.process_time()
    if s.parallel_experts:
        experts, metrics = _fit_experts_in_parallel(config, teacher, seed, work, progress)
        states = {"text_encoder": text_state, **experts}  # frozen: text_lr is 0 in this mode
    else:
        states, metrics = fit_flow_experts(config, teacher, seed, stage_dir, cache, text_state,
                                           EXPERTS, progress)
    for part, state in states.items():
        save_safetensors_atomic(state, files[part])
    report = {"stage": "flow", "steps": s.steps, "wall_s": time.perf_counter() - start,
              "train_cpu_s": time.process_time() - cpu_start, "final_metrics": metrics}
    write_text_atomic(json.dumps(report, indent=2), stage_dir / STAGE_REPORT)
    return states, report


def export_teacher(teacher: TeacherConfig, work: Path, flow_states: dict, out_dir: Path) -> Path:
    """Write the trained teacher to ``out_dir`` in the official layout (+ wan_distill.json)."""
    vae = WanVAE(**asdict(teacher.vae))
    vae.load_state_dict(load_file(str(work / "vae" / VAE_WEIGHTS)))
    text_encoder = UMT5Encoder(**asdict(teacher.t5))
    text_encoder.load_state_dict(flow_states["text_encoder"])
    experts = []
    for part in ("expert_high", "expert_low"):
        expert = WanModel(**asdict(teacher.dit))
        expert.load_state_dict(flow_states[part])
        experts.append(expert.eval())
    models = TeacherModels(config=teacher, tokenizer=ByteTokenizer(), text_encoder=text_encoder.eval(),
                           vae=vae.eval(), expert_high=experts[0], expert_low=experts[1])
    return save_teacher(out_dir, models)


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def train_teacher(config: str | Path | dict | TeacherTrainingConfig = DEFAULT_CONFIG,
                  out_dir: str | Path | None = None, seed: int | None = None, *,
                  work_dir: str | Path | None = None, progress: bool = True,
                  teacher_config: TeacherConfig | None = None) -> dict:
    """Run all stages and write the teacher; returns the summary (also printed as one line).

    Args:
        config: a YAML path (e.g. ``configs/teacher/shapes.yaml``), a dict or a config object.
        out_dir, seed, work_dir: override the config's values. The work folder holds the stage
            results and Lightning checkpoints; rerunning the same command resumes from it.
        progress: show Lightning's progress bars.
        teacher_config: an architecture to train instead of the preset the config names (tests
            train a tiny one); the run's sampling overrides still apply.
    Returns:
        {"out_dir", "seed", "stage_s" {vae, latents, text, flow, export}, "total_s", "vae" (PSNR
        and oracle on reconstructions), "latents_mean", "latents_std", "text" (per-token factor
        accuracy), "flow" (final metrics), "size_mb"}.
    """
    cfg = load_training_config(config)
    seed = cfg.seed if seed is None else int(seed)
    out = Path(out_dir or cfg.out_dir or embedded_teacher_dir())
    work = Path(work_dir or cfg.work_dir or wan_distill_home() / "runs" / "teacher-shapes")
    # The teacher is written last, after ~53 minutes: a place it cannot go fails now.
    check_output_folder(out, "--out")
    prepare_output_folder(work, "--work-dir")
    teacher = teacher_config_for(cfg, teacher_config)
    _check_run_folder(work, cfg, seed, teacher)
    torch.set_num_threads(cfg.num_threads)
    start = time.perf_counter()

    vae_report = run_vae_stage(cfg, teacher, seed, work, progress)
    cache, latent_report = run_latent_stage(cfg, teacher, seed, work, progress)
    teacher = replace(teacher, vae=replace(teacher.vae, latents_mean=tuple(latent_report["latents_mean"]),
                                           latents_std=tuple(latent_report["latents_std"])))
    text_state, text_report = run_text_stage(cfg, teacher, seed, work, progress)
    flow_states, flow_report = run_flow_stage(cfg, teacher, seed, work, cache, text_state, progress)
    export_start = time.perf_counter()
    export_teacher(teacher, work, flow_states, out)
    export_s = time.perf_counter() - export_start

    stage_s = {"vae": vae_report["wall_s"], "latents": latent_report["wall_s"],
               "text": text_report["wall_s"], "flow": flow_report["wall_s"], "export": export_s}
    summary = {
        "out_dir": str(out), "seed": seed, "stage_s": stage_s, "total_s": sum(stage_s.values()),
        "this_call_s": time.perf_counter() - start,
        "vae": {k: vae_report[k] for k in ("psnr", "psnr_foreground", "oracle")},
        "latents_mean": latent_report["latents_mean"], "latents_std": latent_report["latents_std"],
        "text": text_report["per_token_accuracy"], "flow": flow_report["final_metrics"],
        "size_mb": _folder_mb(out),
    }
    write_text_atomic(json.dumps(summary, indent=2), work / "summary.json")
    oracle = vae_report["oracle"]
    print(
        f"teacher written to {out} ({summary['size_mb']:.1f} MB), seed {seed}, "
        f"{summary['total_s'] / 60:.1f} min: vae {stage_s['vae'] / 60:.1f} min (PSNR "
        f"{vae_report['psnr']:.1f} dB, object {vae_report['psnr_foreground']:.1f} dB, oracle on "
        f"reconstructions joint {oracle['joint']:.0%} shape {oracle['shape']:.0%}), latents "
        f"{stage_s['latents'] / 60:.1f} min, text {stage_s['text'] / 60:.1f} min (per-token motion "
        f"accuracy {text_report['per_token_accuracy']['motion']:.0%}), flow "
        f"{stage_s['flow'] / 60:.1f} min (loss "
        f"{summary['flow'].get('flow/loss', float('nan')):.3f}), export {export_s:.1f} s"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wan-distill train-teacher", description="Train the embedded shapes-world teacher.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run recipe (YAML)")
    parser.add_argument("--out", default=None, help="teacher folder to write (default: the config's)")
    parser.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    parser.add_argument("--work-dir", default=None, help="stage results and checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    try:
        train_teacher(args.config, args.out, args.seed, work_dir=args.work_dir,
                      progress=not args.no_progress)
    except OutputLocationError as err:
        raise SystemExit(f"error: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
