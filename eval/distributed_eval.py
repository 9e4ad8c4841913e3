"""The evaluation run: Lightning predict over prompts, metric states in torchmetrics.

One code path serves the embedded shapes world on one CPU process and the real A14B models on
many GPUs (``configs/eval/*.yaml``):

- the prompts are a dataset; Lightning's predict loop shards them over the processes with its
  unrepeated distributed sampler (every prompt is evaluated exactly once, none is padded in);
- each ``predict_step`` runs every system on the batch (the reference system first, so the
  others can be paired with it) and updates metric states; no video is kept;
- every metric state is a torchmetrics ``Metric``, so ``compute()`` gathers it over processes:
  counts and sums with ``dist_reduce_fx="sum"`` (oracle counts, seconds), per-video values and
  FVD features with ``"cat"`` (medians, spreads and the FVD bootstrap need the samples, not just
  their sums; 2048 x 400 float32 features are 3.3 MB, cheap to gather);
- before the prompts, every process times the systems side by side at batch 1
  (``eval.latency.side_by_side``); the samples of all processes are pooled.

Process 0 turns the gathered states into the per-system dicts of ``eval.report``.
"""

from __future__ import annotations

import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import CatMetric, SumMetric
from tqdm import tqdm

from eval.clip_score import clip_score_per_video
from eval.config import EvalConfig, SystemSpec, TrainerSettings
from eval.fvd import fvd, video_features
from eval.latency import cpu_threads, side_by_side, summarize
from eval.lpips_metric import lpips_per_video
from eval.metric_states import (
    MetricNetworks,
    OracleCounts,
    VideoFeatures,
    add_oracle_comparisons,
    cat_values,
    keep_verdicts,
    mean_std,
)
from eval.oracle_stats import JOINT_BY_PROMPT
from eval.paired import paired_psnr_ssim
from eval.prompt_data import PromptDataset, collate_prompts, real_video_files, shapes_real_videos
from eval.report import available, not_applicable, unavailable
from eval.systems import StudentSystem, TeacherSystem, VideoSystem
from student.causal_dit import CausalWanModel
from student.config import StudentConfig
from student.tiny_decoder import TinyDecoder
from teacher.checkpoint import TeacherModels
from teacher.video_io import read_video


# ---------------------------------------------------------------------------------------------
# The Lightning module


@dataclass
class LoadedModels:
    """What the caller loaded: the teacher and, when found, the student with its config."""

    teacher: TeacherModels
    student: CausalWanModel | None = None
    student_config: StudentConfig | None = None
    tiny_decoder: TinyDecoder | None = None


def system_name(spec: SystemSpec, teacher_models: TeacherModels, student_config) -> str:
    """The default name of a system spec (as ``TeacherSystem``/``StudentSystem`` name it)."""
    if spec.name:
        return spec.name
    suffix = "-tiny" if spec.decoder == "tiny" else ""
    if spec.kind == "teacher":
        s = teacher_models.config.sampling
        return f"teacher-{spec.solver or s.solver}-{spec.steps or s.steps}{suffix}"
    if spec.steps is None and student_config is None:  # a student that was not loaded
        return f"student-default{suffix}"
    name = f"student-{spec.steps if spec.steps is not None else student_config.steps}step"
    # Names key a ModuleDict, which refuses '.': guidance 1.5 is written g1p5.
    name = name if spec.guidance is None else f"{name}-g{spec.guidance:g}".replace(".", "p")
    return name + suffix


class EvalModule(L.LightningModule):
    """Runs the systems on every predict batch and accumulates metric states.

    Args:
        models: the loaded models (kept out of the module registry: Lightning must not move
            the experts; placement follows ``offload``).
        specs: the systems to evaluate (student specs need ``models.student``).
        reference: name of the system the others are paired with (evaluated first), or None.
        prompts: the whole prompt list (the latency phase uses its first prompts).
        config: the run's ``EvalConfig``.
        networks: FVD / LPIPS / CLIP networks or the reasons they are unavailable.
    After ``trainer.predict``, ``self.results`` holds the per-system report dicts (process 0;
    other processes hold None) and ``self.real_fvd_count`` the number of real videos.
    """

    def __init__(self, models: LoadedModels, specs: Sequence[SystemSpec], reference: str | None,
                 prompts: Sequence[str], config: EvalConfig, networks: MetricNetworks):
        super().__init__()
        self._models = models  # a plain dataclass: not registered, never moved by Lightning
        self.specs, self.reference, self.prompts = list(specs), reference, list(prompts)
        self.config, self._networks = config, networks
        self.systems: list[VideoSystem] = []
        self.fvd_limit = (len(self.prompts) if config.fvd.num_videos is None
                          else min(config.fvd.num_videos, len(self.prompts)))
        names = [system_name(s, models.teacher, models.student_config) for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"system names must be distinct, got {names}; set name: in the "
                             f"systems list")
        bad = [n for n in names if "." in n]
        if bad:
            raise ValueError(f"system names may not contain '.', got {bad}")
        self.names = names
        self.metric_states = nn.ModuleDict({n: self._new_states(n) for n in names})
        self.real_features = VideoFeatures()
        self.results: list[dict] | None = None
        self.real_fvd_count = 0
        self.phase_seconds: dict[str, float] = {}
        self._bar: tqdm | None = None
        self._clock = 0.0

    # ----- states -------------------------------------------------------------------------------

    def _new_states(self, name: str) -> nn.ModuleDict:
        states = {"latency": CatMetric(), "ttff": CatMetric(), "seconds": SumMetric(),
                  "videos": SumMetric(), "batch_seconds": CatMetric(), "clip": CatMetric(),
                  "fake": VideoFeatures()}
        if self.config.world == "shapes":
            states["oracle"] = OracleCounts()
        if name != self.reference:
            states.update(psnr=CatMetric(), ssim=CatMetric(), lpips=CatMetric())
        return nn.ModuleDict(states)

    # ----- placement ----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        teacher = self._models.teacher
        teacher.text_encoder.to(device)
        teacher.vae.to(device)
        if not self.config.offload or device.type == "cpu":
            teacher.expert_high.to(device)
            teacher.expert_low.to(device)
        if self._models.student is not None:
            self._models.student.to(device)
        if self._models.tiny_decoder is not None:
            self._models.tiny_decoder.to(device)
        self._networks.to(device)
        self.systems = [self._build(spec, name, device) for spec, name in zip(self.specs, self.names)]

    def _build(self, spec: SystemSpec, name: str, device: torch.device) -> VideoSystem:
        decoder = None
        if spec.decoder == "tiny":
            if self._models.tiny_decoder is None:
                raise ValueError(f"system {name} needs the tiny decoder but none was loaded")
            decoder = self._models.tiny_decoder
        if spec.kind == "teacher":
            return TeacherSystem(self._models.teacher, spec.steps, spec.solver, device=device,
                                 offload=self.config.offload, name=name, decoder=decoder,
                                 **self._size())
        if spec.kind == "student":
            if self._models.student is None:
                raise ValueError(f"system {name} needs a student but none was loaded")
            return StudentSystem(self._models.student, self._models.student_config,
                                 self._models.teacher, spec.steps, guidance=spec.guidance,
                                 name=name, decoder=decoder, **self._size())
        raise ValueError(f"system kind {spec.kind!r} must be 'teacher' or 'student'")

    def _size(self) -> dict:
        c = self.config
        return {"width": c.width, "height": c.height, "frames": c.frames}

    # ----- progress -----------------------------------------------------------------------------

    def _advance(self, n: int, what: str) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix_str(what, refresh=False)

    def on_predict_start(self) -> None:
        world = self.trainer.world_size
        lat = self.config.latency
        per_process = math.ceil(len(self.prompts) / world)
        total = (lat.warmup + lat.repeats + per_process) * len(self.systems)
        if self.config.progress and self.trainer.is_global_zero:
            self._bar = tqdm(total=total, desc="eval", unit="video", dynamic_ncols=True)
        start = time.perf_counter()
        self._measure_latency()
        self._clock = time.perf_counter()
        self.phase_seconds["latency"] = self._clock - start

    # ----- latency (batch 1, side by side) ------------------------------------------------------

    def _measure_latency(self) -> None:
        lat = self.config.latency
        seeds = [self.config.noise_seed + i for i in range(len(self.prompts))]

        def run(system: VideoSystem) -> Callable[[int], tuple[float, float]]:
            def one(r: int) -> tuple[float, float]:
                i = r % len(self.prompts)
                out = system.generate([self.prompts[i]], [seeds[i]])
                return out.seconds, out.first_frame_seconds
            return one

        runs = {s.name: run(s) for s in self.systems}
        with cpu_threads(lat.threads if self.device.type == "cpu" else None):
            samples = side_by_side(runs, lat.warmup, lat.repeats,
                                   on_run=lambda name, r, warm: self._advance(1, f"latency {name}"))
        for name, values in samples.items():
            states = self.metric_states[name]
            states["latency"].update(torch.tensor([v[0] for v in values], dtype=torch.float64))
            states["ttff"].update(torch.tensor([v[1] for v in values], dtype=torch.float64))

    # ----- the prompts --------------------------------------------------------------------------

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        indices, prompts, seeds = batch["index"], batch["prompt"], batch["seed"]
        in_fvd = [k for k, i in enumerate(indices) if i < self.fvd_limit]
        nets = self._networks
        if nets.fvd_model is not None and in_fvd and self.config.world == "shapes":
            real = shapes_real_videos([indices[k] for k in in_fvd], [prompts[k] for k in in_fvd],
                                      self.config.real_seed)
            self.real_features.update(self._features(real))
        reference_videos = None
        for system in self.systems:
            out = system.generate(prompts, seeds)
            states = self.metric_states[system.name]
            states["seconds"].update(out.seconds)
            states["videos"].update(len(prompts))
            # Per batch too: the median over batches is not moved by one slow (first) batch.
            states["batch_seconds"].update(out.seconds / len(prompts))
            if "oracle" in states:
                states["oracle"].update(out.videos, prompts, indices)
            if nets.fvd_model is not None and in_fvd:
                states["fake"].update(self._features(out.videos[in_fvd]))
            if nets.clip_metric is not None:
                # torchmetrics moves the CLIP model to the frames' device: give it ours.
                states["clip"].update(clip_score_per_video(
                    nets.clip_metric, out.videos.to(self.device), prompts,
                    self.config.clip_frames))
            if system.name == self.reference:
                reference_videos = out.videos
            elif reference_videos is not None:
                self._update_paired(states, out.videos, reference_videos)
            self._advance(len(prompts), system.name)

    def _features(self, videos: torch.Tensor) -> torch.Tensor:
        return video_features(videos, self._networks.fvd_model,
                              batch_size=self.config.fvd.batch_size,
                              num_frames=self.config.fvd.num_frames, device=self.device)

    def _update_paired(self, states: nn.ModuleDict, videos: torch.Tensor,
                       reference: torch.Tensor) -> None:
        if videos.shape != reference.shape:
            raise ValueError(f"videos {list(videos.shape)} cannot be paired with the reference's "
                             f"{list(reference.shape)}: systems must make clips of one size")
        distances = paired_psnr_ssim(videos, reference, device=self.device)
        states["psnr"].update(distances.psnr)
        states["ssim"].update(distances.ssim)
        if self._networks.lpips_model is not None:
            states["lpips"].update(lpips_per_video(self._networks.lpips_model, videos, reference))

    # ----- gathering ----------------------------------------------------------------------------

    def _embed_real_folder(self) -> None:
        """Prompts world: this process's share of the real folder (file k goes to process
        k mod world_size), the first ``fvd_limit`` files in sorted order."""
        files = real_video_files(self.config.real_videos_dir)[: self.fvd_limit]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        for path in files[rank::world]:
            frames, _ = read_video(path)
            self.real_features.update(self._features(torch.from_numpy(frames)[None]))

    def on_predict_epoch_end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.phase_seconds["quality"] = time.perf_counter() - self._clock
        start = time.perf_counter()
        nets = self._networks
        if nets.fvd_model is not None and self.config.world == "prompts":
            self._embed_real_folder()
        # Every process computes (gathers) every state in the same order; only process 0 keeps
        # the derived numbers (the FVD bootstrap is not repeated on every process).
        real = self.real_features.compute() if nets.fvd_model is not None else None
        gathered = {}
        for name in self.names:
            states = self.metric_states[name]
            gathered[name] = {key: (cat_values(m) if isinstance(m, CatMetric) else m.compute())
                              for key, m in states.items()}
        if not self.trainer.is_global_zero:
            return
        self.real_fvd_count = 0 if real is None else int(real.shape[0])
        resamples = self.config.fvd.bootstrap * len(self.systems) if real is not None else 0
        if self.config.progress and resamples > 0:
            # ~50 ms per resample on a free 2-core CPU: a minute per system at the default 1000.
            self._bar = tqdm(total=resamples, desc="FVD bootstrap", unit="resample",
                             dynamic_ncols=True)
        verdicts = {name: g["oracle"].pop(JOINT_BY_PROMPT) for name, g in gathered.items()
                    if "oracle" in g}
        self.results = [self._result(system, gathered[system.name], real)
                        for system in self.systems]
        add_oracle_comparisons(self.results, verdicts)
        keep_verdicts(self.results, verdicts, len(self.prompts))
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.phase_seconds["metrics"] = time.perf_counter() - start

    def _result(self, system: VideoSystem, g: dict, real: torch.Tensor | None) -> dict:
        entry = dict(system.info())
        entry["latency_s"] = summarize(g["latency"].tolist()).to_dict()
        entry["time_to_first_frame_s"] = summarize(g["ttff"].tolist()).to_dict()
        videos, by_batch = int(g["videos"]), g["batch_seconds"]
        entry["quality_pass"] = {
            "videos": videos, "batch_size": self.config.batch_size,
            "seconds_per_video": float(g["seconds"]) / max(videos, 1),
            "seconds_per_video_by_batch": (summarize(by_batch.tolist()).to_dict()
                                           if by_batch.numel() else None)}
        if "oracle" in g:
            entry["oracle"] = available(**g["oracle"])
        else:
            entry["oracle"] = not_applicable("no oracle for real-world prompts (shapes world only)")
        entry["fvd"] = self._fvd_slot(g["fake"], real)
        entry["paired"] = self._paired_slot(system.name, g)
        nets = self._networks
        if nets.clip_metric is None:
            entry["clip_score"] = unavailable(nets.clip_reason)
        else:
            entry["clip_score"] = available(
                network=nets.clip_network, frames_per_video=self.config.clip_frames,
                scale="100 * cosine, clamped at 0 per video", **mean_std(g["clip"]))
        return entry

    def _fvd_slot(self, fake: torch.Tensor, real: torch.Tensor | None) -> dict:
        nets, settings = self._networks, self.config.fvd
        if nets.fvd_model is None:
            return unavailable(nets.fvd_reason)
        if fake.shape[0] < 2 or real is None or real.shape[0] < 2:
            return unavailable(f"FVD needs >= 2 real and >= 2 generated videos; got "
                               f"{0 if real is None else real.shape[0]} real and "
                               f"{fake.shape[0]} generated (raise num_prompts / fvd.num_videos)")
        bar = self._bar
        result = fvd(real, fake, bootstrap=settings.bootstrap, seed=0,
                     confidence=settings.confidence,
                     on_resample=None if bar is None else lambda: bar.update(1))
        return available(network=nets.fvd_network, num_frames=settings.num_frames,
                         covariance="unbiased (N - 1)", **result.to_dict())

    def _paired_slot(self, name: str, g: dict) -> dict:
        if self.reference is None:
            return not_applicable("no reference system to pair with")
        if name == self.reference:
            return not_applicable("this is the reference system")
        psnr, ssim = g["psnr"], g["ssim"]
        if psnr.numel() == 0:
            return unavailable("no video was paired with the reference")
        slot = available(reference=self.reference, psnr_db=available(**mean_std(psnr)),
                         ssim=available(**mean_std(ssim)))
        nets = self._networks
        if nets.lpips_model is None:
            slot["lpips"] = unavailable(nets.lpips_reason)
        else:
            slot["lpips"] = available(network=nets.lpips_network, **mean_std(g["lpips"]))
        return slot


# ---------------------------------------------------------------------------------------------
# Running it


def resolve_accelerator(requested: str) -> str:
    """"auto" -> "gpu" when CUDA is visible, else "cpu"; other values pass through."""
    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return requested


def make_trainer(settings: TrainerSettings) -> L.Trainer:
    """A predict-only Trainer: no logger, checkpoints or Lightning progress bar (the module
    draws its own), gradients off by ``torch.no_grad`` inside the systems.

    ``inference_mode=False``: the student's KV cache recognises a prompt's context by the
    tensor's version counter, which inference-mode tensors do not have.
    """
    return L.Trainer(accelerator=resolve_accelerator(settings.accelerator),
                     devices=settings.devices, num_nodes=settings.num_nodes,
                     strategy=settings.strategy, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     inference_mode=False, use_distributed_sampler=True)


def run_predict(module: EvalModule, config: EvalConfig, trainer: L.Trainer | None = None
                ) -> EvalModule:
    """Evaluate every prompt of ``module.prompts`` with Lightning predict; returns the module
    (``module.results`` on process 0)."""
    trainer = trainer or make_trainer(config.trainer)
    loader = DataLoader(PromptDataset(module.prompts, config.noise_seed),
                        batch_size=config.batch_size, shuffle=False, num_workers=0,
                        collate_fn=collate_prompts)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*called before the ``update`` method.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        warnings.filterwarnings("ignore", message=".*predict returned None.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    return module


def machine_info(device: torch.device, world_size: int) -> dict:
    """Where the numbers were measured."""
    info = {"device": str(device), "world_size": world_size, "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
    return info
