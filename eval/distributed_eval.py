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
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import CatMetric, Metric, SumMetric
from tqdm import tqdm

from eval.fvd import FVD_NUM_FRAMES, fvd, video_features
from eval.latency import cpu_threads, side_by_side, summarize
from eval.lpips_metric import lpips_per_video
from eval.clip_score import clip_score_per_video
from eval.oracle import judge
from eval.oracle_stats import (
    JOINT_BY_PROMPT,
    pair_verdicts,
    verdict_string,
    wilson_interval,
)
from eval.paired import paired_psnr_ssim
from eval.report import available, is_ok, not_applicable, unavailable
from eval.shapes_world import (COLOURS, LANGS, MOTIONS, SHAPES, caption_lang, parse_caption,
                                render, sample_spec)
from eval.systems import StudentSystem, TeacherSystem, VideoSystem
from student.causal_dit import CausalWanModel
from student.config import StudentConfig
from student.tiny_decoder import TinyDecoder
from teacher.checkpoint import TeacherModels
from teacher.video_io import read_video

WORLDS = ("shapes", "prompts")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")


# ---------------------------------------------------------------------------------------------
# Configuration (typed; a YAML in configs/eval/ sets these fields, see eval.run.load_config)


@dataclass(frozen=True)
class SystemSpec:
    """One system to evaluate.

    kind: "teacher" or "student". steps: sampler steps (teacher) or steps per chunk (student);
    None takes the model's default. solver: teacher only, "unipc" or "euler" (None: default).
    guidance: student only, the guidance scale it is given (None: its default); a guidance
    sweep is several student systems that differ only here.
    name: report name (default e.g. ``teacher-euler-4``, ``student-2step``, ``student-4step-g2``).
    decoder: "vae" (the teacher's VAE) or "tiny" (the tiny streaming decoder trained for it,
        ``<teacher_dir>/tiny_decoder``; the default name then ends in ``-tiny``).
    """

    kind: str
    steps: int | None = None
    solver: str | None = None
    name: str | None = None
    guidance: float | None = None
    decoder: str = "vae"


DEFAULT_SYSTEMS: tuple[SystemSpec, ...] = (
    SystemSpec("teacher"),  # the teacher's default sampler: UniPC, 40 steps, per-expert CFG
    SystemSpec("teacher", steps=4),  # its own sampler at 4 steps: the student's 4-step baseline
    SystemSpec("teacher", steps=4, solver="euler"),
    SystemSpec("teacher", steps=8, solver="euler"),
    SystemSpec("student", steps=1),
    SystemSpec("student", steps=2),
    SystemSpec("student", steps=4),
    # What `stream` and `serve` run by default where the teacher ships a tiny decoder (skipped,
    # with the reason, where it does not).
    SystemSpec("student", steps=4, decoder="tiny"),
)


@dataclass(frozen=True)
class FVDSettings:
    """FVD against real videos (eval.fvd protocol).

    weights: the I3D safetensors file (None: where ``wan-distill weights i3d`` installs it).
    num_videos: generated videos per system (and real videos) that enter FVD; None = all
        prompts, the same N as the oracle. On a CPU the I3D costs ~4 s per video.
    num_frames: frames per clip (16 is the standard protocol).
    bootstrap: resamples for the interval (0: none).
    """

    enabled: bool = True
    weights: str | None = None
    num_videos: int | None = None
    num_frames: int = FVD_NUM_FRAMES
    bootstrap: int = 1000
    confidence: float = 0.95
    batch_size: int = 8


@dataclass(frozen=True)
class LatencySettings:
    """Batch-1 timing of every system, side by side: ``warmup`` rounds discarded, ``repeats``
    rounds kept (round r uses prompt r of the list).

    threads: torch's CPU threads while timing on the CPU (the quality pass keeps the process's
        setting). 1 is what ``generate``, ``stream`` and ``serve`` use by default, so the report
        times what a user of those commands waits for; None leaves torch's setting. Ignored on
        a GPU.
    """

    warmup: int = 1
    repeats: int = 5
    threads: int | None = 1


@dataclass(frozen=True)
class TrainerSettings:
    """Lightning Trainer knobs of the predict run ("auto": a GPU when one is visible)."""

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
    """Everything one evaluation run needs.

    world: "shapes" (prompts from ``eval.shapes_world.eval_prompts``, real videos rendered by the
        world, oracle accuracy) or "prompts" (a prompt file, a folder of real videos, no oracle).
    teacher_dir: the teacher folder (None: the embedded shapes teacher).
    student_dir: the student folder (None: ``student.paths.default_student_dir("shapes")``).
    systems: what to evaluate; reference: the system the others are paired with (None: the
        first teacher system).
    num_prompts: N (shapes: >= 168 covers every factor combination in both languages; prompts
        world: None = every line of the file).
    prompt_seed, noise_seed: prompt i is sampled from seed noise_seed + i in every system.
    real_seed: shapes world: real clip i is rendered from seed real_seed + i with prompt i's
        factors.
    batch_size: prompts per predict step and process.
    width, height, frames: clip size of every system (None: the teacher's default).
    dtype: "auto" (bf16 on a GPU, fp32 on the CPU), "fp32" or "bf16" for the DiTs and T5.
    offload: keep only the active teacher expert on the GPU.
    lpips_net, lpips_trunk: LPIPS backbone and its torchvision file (None: torch hub's cache).
    clip_dir: a local CLIP folder for the CLIP score (None: unavailable).
    clip_frames: frames per video for the CLIP score (evenly spaced).
    out: the report folder.
    """

    world: str = "shapes"
    teacher_dir: str | None = None
    student_dir: str | None = None
    systems: list[SystemSpec] = field(default_factory=lambda: list(DEFAULT_SYSTEMS))
    reference: str | None = None
    num_prompts: int | None = 200
    prompt_seed: int = 0
    noise_seed: int = 0
    prompts_file: str | None = None
    real_videos_dir: str | None = None
    real_seed: int = 1_000_000
    batch_size: int = 50
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    dtype: str = "auto"
    offload: bool = True
    fvd: FVDSettings = field(default_factory=FVDSettings)
    lpips_net: str = "alex"
    lpips_trunk: str | None = None
    clip_dir: str | None = None
    clip_frames: int = 8
    latency: LatencySettings = field(default_factory=LatencySettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    out: str = "eval_report"
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Metric networks (loaded by the caller; tests inject tiny random ones)


@dataclass
class MetricNetworks:
    """The networks behind FVD, LPIPS and CLIP score, or why each is unavailable.

    fvd_model maps float [B, 3, T, 224, 224] in [-1, 1] to features [B, D] (the I3D);
    ``*_network`` names what was loaded ("random-test" for the tests' random networks, which
    the report never prints under the metric's name).
    """

    fvd_model: Callable[[torch.Tensor], torch.Tensor] | None = None
    fvd_network: str = "i3d-kinetics400-tfhub"
    fvd_reason: str = ""
    lpips_model: nn.Module | None = None
    lpips_network: str = ""
    lpips_reason: str = ""
    clip_metric: Metric | None = None
    clip_network: str = ""
    clip_reason: str = ""

    def to(self, device: torch.device) -> MetricNetworks:
        for name in ("fvd_model", "lpips_model", "clip_metric"):
            module = getattr(self, name)
            if isinstance(module, nn.Module):
                setattr(self, name, module.to(device))
        return self


# ---------------------------------------------------------------------------------------------
# Metric states


class VideoFeatures(Metric):
    """Per-video feature vectors [N, dim], gathered over processes (for FVD and its bootstrap).

    Stored flattened (1-D) because torchmetrics pads a process without samples with a 1-D
    empty tensor before gathering; 1-D states of any length then gather alike.
    """

    full_state_update = False

    def __init__(self, dim: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor) -> None:
        if features.ndim != 2:
            raise ValueError(f"features must be [B, D], got {list(features.shape)}")
        if self.dim is None:
            self.dim = int(features.shape[1])
        if features.shape[1] != self.dim:
            raise ValueError(f"features have D={features.shape[1]}, expected {self.dim}")
        self.values.append(features.detach().to(self.dtype).reshape(-1))

    def compute(self) -> torch.Tensor:
        """float [N, dim] on the CPU (N = 0 when nothing was seen anywhere)."""
        values = self.values
        if isinstance(values, list):
            values = torch.cat(values) if values else torch.zeros(0)
        dim = self.dim or 1
        return values.detach().cpu().reshape(-1, dim)


ORACLE_FIELDS = ("n", "colour", "shape", "motion", "joint", "not_found", "no_motion")
# The values of each factor, in the order of the confusion tables' rows and columns.
FACTOR_VALUES = {"colour": COLOURS, "shape": SHAPES, "motion": MOTIONS}
NOT_RECOVERED = "none"  # the confusion column of videos whose factor the oracle could not read


class OracleCounts(Metric):
    """Oracle tallies, summed over processes: per caption language counts [len(LANGS), 7] (see
    ORACLE_FIELDS), equal to ``eval.oracle.accuracy`` on the same videos, and per factor a
    confusion table [values, values + 1] (captioned value x recovered value, last column: not
    recovered). The tables show what an aggregate hides, e.g. a system that draws every shape
    as a circle scores 33% shape accuracy with every square and triangle in the circle column.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("counts", default=torch.zeros(len(LANGS), len(ORACLE_FIELDS),
                                                     dtype=torch.int64), dist_reduce_fx="sum")
        for factor, values in FACTOR_VALUES.items():
            self.add_state(f"confusion_{factor}", dist_reduce_fx="sum",
                           default=torch.zeros(len(values), len(values) + 1, dtype=torch.int64))
        # Each prompt's joint verdict, so that two systems pair up prompt by prompt.
        self.add_state("prompt_index", default=[], dist_reduce_fx="cat")
        self.add_state("prompt_joint", default=[], dist_reduce_fx="cat")

    def update(self, videos: torch.Tensor, prompts: Sequence[str],
               indices: Sequence[int] | None = None) -> None:
        """videos uint8 [B, T, H, W, 3]; prompts: shapes-world captions (either language);
        indices: the prompts' positions in the evaluation's list (for the paired comparison)."""
        if len(videos) != len(prompts):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
        if indices is not None and len(indices) != len(prompts):
            raise ValueError(f"{len(indices)} indices but {len(prompts)} prompts")
        targets = [parse_caption(p) for p in prompts]  # all checked before anything is counted
        joint = []
        for video, prompt, target in zip(videos.cpu().numpy(), prompts, targets):
            verdict = judge(video)
            hits = verdict.matches(target)
            joint.append(bool(hits["joint"]))
            row = [1, hits["colour"], hits["shape"], hits["motion"], hits["joint"],
                   not verdict.found, verdict.found and verdict.motion is None]
            self.counts[LANGS.index(caption_lang(prompt))] += torch.tensor(
                [int(v) for v in row], device=self.counts.device)
            for factor, values in FACTOR_VALUES.items():
                recovered = getattr(verdict, factor)
                column = values.index(recovered) if recovered is not None else len(values)
                table = getattr(self, f"confusion_{factor}")
                table[values.index(getattr(target, factor)), column] += 1
        if indices is not None:
            self.prompt_index.append(torch.as_tensor(list(indices), dtype=torch.int64,
                                                     device=self.counts.device))
            self.prompt_joint.append(torch.tensor(joint, dtype=torch.bool,
                                                  device=self.counts.device))

    def compute(self) -> dict:
        counts = self.counts.cpu()

        def summary(row: torch.Tensor) -> dict:
            values = dict(zip(ORACLE_FIELDS, (int(v) for v in row)))
            n = values["n"]
            result = {"n": n}
            for key in ("colour", "shape", "motion", "joint"):
                result[key] = values[key] / n if n else float("nan")
            result["correct"] = {k: values[k] for k in ("colour", "shape", "motion", "joint")}
            result.update(not_found=values["not_found"], no_motion=values["no_motion"])
            return result

        result = summary(counts.sum(dim=0))
        if result["n"]:
            result["joint_ci95"] = list(wilson_interval(result["correct"]["joint"], result["n"]))
        result["by_language"] = {lang: summary(counts[i]) for i, lang in enumerate(LANGS)}
        result["by_value"], result["confusion"] = {}, {}
        for factor, values in FACTOR_VALUES.items():
            table = getattr(self, f"confusion_{factor}").cpu()
            columns = (*values, NOT_RECOVERED)
            # Accuracy among the prompts that ask for each value (values never asked for: absent).
            result["by_value"][factor] = {
                value: int(table[i, i]) / int(table[i].sum())
                for i, value in enumerate(values) if table[i].sum() > 0}
            result["confusion"][factor] = {
                value: {columns[j]: int(c) for j, c in enumerate(table[i].tolist()) if c}
                for i, value in enumerate(values) if table[i].sum() > 0}
        result[JOINT_BY_PROMPT] = self._joint_by_prompt()
        return result

    def _joint_by_prompt(self) -> dict[int, bool]:
        """{prompt index: joint verdict}. A prompt seen twice keeps its first verdict (it is
        the same video); Lightning's predict sampler does not repeat prompts, a padding
        DistributedSampler would."""
        index, joint = self.prompt_index, self.prompt_joint
        if isinstance(index, list):  # not synced: this process's batches, or none at all
            if not index:
                return {}
            index, joint = torch.cat(index), torch.cat(joint)
        verdicts: dict[int, bool] = {}
        for i, ok in zip(index.cpu().tolist(), joint.cpu().tolist()):
            verdicts.setdefault(int(i), bool(ok))
        return verdicts


def add_oracle_comparisons(results: list[dict], verdicts: dict[str, dict[int, bool]]) -> None:
    """Each student's oracle slot gains ``versus``: per teacher system, the exact McNemar
    comparison on the prompts both were judged on (``eval.oracle_stats.paired_comparison``)."""
    teachers = [r["name"] for r in results if r.get("kind") == "teacher" and r["name"] in verdicts]
    for entry in results:
        name = entry["name"]
        if entry.get("kind") != "student" or name not in verdicts or not is_ok(entry.get("oracle")):
            continue
        pairs = {teacher: pair_verdicts(verdicts[name], verdicts[teacher]) for teacher in teachers}
        entry["oracle"]["versus"] = {t: c for t, c in pairs.items() if c is not None}


def keep_verdicts(results: list[dict], verdicts: dict[str, dict[int, bool]], n: int) -> None:
    """Each oracle slot keeps its per-prompt verdicts as a string (``verdict_string``), so that
    another run's report can be paired with this one (``eval.compare``)."""
    for entry in results:
        if entry["name"] in verdicts and is_ok(entry.get("oracle")):
            entry["oracle"][JOINT_BY_PROMPT] = verdict_string(verdicts[entry["name"]], n)


def _cat(metric: CatMetric) -> torch.Tensor:
    values = metric.compute()
    if isinstance(values, list):  # torchmetrics returns [] when no value was seen anywhere
        return torch.zeros(0)
    return values.detach().cpu().reshape(-1).double()


def mean_std(values: torch.Tensor) -> dict:
    """{"mean", "std" (with N - 1; 0 for one value), "n"} of a 1-D tensor (inf propagates)."""
    n = int(values.numel())
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = float(values.mean())
    std = float(values.std(unbiased=True)) if n > 1 and math.isfinite(mean) else 0.0
    return {"mean": mean, "std": std, "n": n}


# ---------------------------------------------------------------------------------------------
# Prompts and real videos


class PromptDataset(Dataset):
    """Prompt i with its noise seed; items are {"index", "prompt", "seed"}."""

    def __init__(self, prompts: Sequence[str], noise_seed: int):
        self.prompts, self.noise_seed = list(prompts), int(noise_seed)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "prompt": self.prompts[i], "seed": self.noise_seed + i}


def collate_prompts(items: list[dict]) -> dict:
    return {key: [item[key] for item in items] for key in ("index", "prompt", "seed")}


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts_file {path} does not exist; give a text file with one "
                                f"prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts_file {path} holds no prompt")
    return prompts


def real_video_files(folder: str | os.PathLike) -> list[Path]:
    """The video files of ``folder`` (recursively), sorted by path."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"real_videos_dir {root} does not exist; give a folder of real "
                                f"videos ({', '.join(VIDEO_SUFFIXES)}) for FVD")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"real_videos_dir {root} holds no video file ({', '.join(VIDEO_SUFFIXES)})")
    return files


def shapes_real_videos(indices: Sequence[int], prompts: Sequence[str], real_seed: int
                       ) -> torch.Tensor:
    """Real clips of the shapes world with the prompts' factors: uint8 [B, 17, 64, 64, 3]."""
    clips = [render(sample_spec(real_seed + int(i), parse_caption(p)))
             for i, p in zip(indices, prompts)]
    return torch.from_numpy(np.stack(clips))


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
                  "videos": SumMetric(), "clip": CatMetric(), "fake": VideoFeatures()}
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
            gathered[name] = {key: (_cat(m) if isinstance(m, CatMetric) else m.compute())
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
        videos = int(g["videos"])
        entry["quality_pass"] = {"videos": videos, "batch_size": self.config.batch_size,
                                 "seconds_per_video": float(g["seconds"]) / max(videos, 1)}
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
