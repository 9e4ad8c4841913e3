"""``wan-distill eval``: evaluate quality against latency and write one report.

With no arguments it evaluates the embedded shapes world (``configs/eval/shapes.yaml``, whose
values are also ``EvalConfig``'s defaults): the teacher at its default sampler (UniPC, 40 steps,
per-expert CFG) and at 4 and 8 Euler steps, the student at 1, 2 and 4 steps per chunk, on 200
seeded prompts in English and Chinese. ``--config configs/eval/a14b.yaml`` runs the real models
from a prompt file on several GPUs. The run writes report.json, report.md and
quality_vs_latency.png to ``--out`` and prints a one-line summary.

The lead's CLI calls ``add_eval_arguments(parser)`` to declare the flags and
``run_from_args(args)`` to run; scripts call ``evaluate_main(config)``.
"""

from __future__ import annotations

import os

# Before torch is imported (libgomp reads it once): spinning OpenMP workers thrash when another
# process holds a core, which on a shared CPU would turn timing noise into the measurement
# (distill/run.py measured 12.9 s vs 1.0 s per step). An explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from jsonargparse import ArgumentError, ArgumentParser  # noqa: E402

from student.paths import default_student_dir, embedded_teacher_dir  # noqa: E402
from student.tiny_decoder_checkpoint import find_tiny_decoder  # noqa: E402
from eval.clip_score import load_clip_score  # noqa: E402
from eval.config import WORLDS, EvalConfig, SystemSpec  # noqa: E402
from eval.distributed_eval import (  # noqa: E402
    EvalModule,
    LoadedModels,
    machine_info,
    make_trainer,
    resolve_accelerator,
    run_predict,
    system_name,
)
from eval.i3d_weights import INSTALL_COMMAND, load_i3d  # noqa: E402
from eval.latency import cpu_threads  # noqa: E402
from eval.long_streams import check_stream_settings, stream_long  # noqa: E402
from eval.lpips_metric import load_lpips  # noqa: E402
from eval.metric_states import MetricNetworks  # noqa: E402
from eval.prompt_data import read_prompt_file  # noqa: E402
from eval.report import RANDOM_TEST_NETWORK, build_report, summary_line, write_report  # noqa: E402
from eval.shapes_world import FPS, eval_prompts  # noqa: E402
from eval.unavailable import MetricUnavailable  # noqa: E402
from student.checkpoint import STUDENT_CONFIG_FILE, load_student  # noqa: E402
from student.engine import StudentStreamEngine  # noqa: E402
from teacher.checkpoint import load_teacher  # noqa: E402
from teacher.output_paths import OutputLocationError, prepare_output_folder  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "eval" / "shapes.yaml"
MAKE_STUDENT = "wan-distill distill"
MAKE_TEACHER = "wan-distill train-teacher"


# ---------------------------------------------------------------------------------------------
# Configuration


def build_config_parser() -> ArgumentParser:
    """Typed parser of an eval YAML: ``--config FILE`` plus dotted overrides; unknown keys and
    wrong types are errors naming the key."""
    parser = ArgumentParser(prog="wan-distill eval", default_config_files=[], exit_on_error=False)
    parser.add_argument("--config", action="config", help="an eval YAML (configs/eval/*.yaml)")
    parser.add_class_arguments(EvalConfig, nested_key=None, fail_untyped=True)
    return parser


def load_config(config_path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> EvalConfig:
    """A YAML (default: none, i.e. ``EvalConfig()``, the shapes world) plus ``key=value``
    overrides with dotted keys (``fvd.num_videos=64``) -> ``EvalConfig``."""
    args: list[str] = []
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"eval config {path} does not exist; see configs/eval/ for "
                                    f"examples (shapes.yaml, a14b.yaml)")
        args += ["--config", str(path)]
    args += [o if o.startswith("--") else f"--{o}" for o in overrides]
    parser = build_config_parser()
    try:
        built = parser.instantiate(parser.parse_args(args))
    except ArgumentError as err:  # unknown key, wrong type: name it instead of exiting
        where = f"eval config {config_path}" if config_path is not None else "eval options"
        raise ValueError(f"{where}: {err}") from None
    values = {k: getattr(built, k) for k in EvalConfig.__dataclass_fields__}
    values["systems"] = [s if isinstance(s, SystemSpec) else SystemSpec(**s)
                         for s in values["systems"]]
    return EvalConfig(**values)


def check_config(config: EvalConfig) -> None:
    """Errors that need no weights: name the key, the value and the fix."""
    if config.world not in WORLDS:
        raise ValueError(f"world={config.world!r} must be one of {list(WORLDS)}")
    if config.num_prompts is not None and config.num_prompts < 1:
        raise ValueError(f"num_prompts={config.num_prompts} must be >= 1 (or null for every "
                         f"line of prompts_file)")
    if config.world == "shapes" and config.num_prompts is None:
        raise ValueError("num_prompts must be set in the shapes world (e.g. 200)")
    if config.world == "prompts" and not config.prompts_file:
        raise ValueError("world=prompts needs prompts_file: a text file with one prompt per line")
    if config.batch_size < 1:
        raise ValueError(f"batch_size={config.batch_size} must be >= 1")
    if config.dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"dtype={config.dtype!r} must be auto, fp32 or bf16")
    if config.fvd.num_videos is not None and config.fvd.num_videos < 0:
        raise ValueError(f"fvd.num_videos={config.fvd.num_videos} must be >= 0 or null (all)")
    if config.latency.warmup < 0 or config.latency.repeats < 1:
        raise ValueError(f"latency.warmup={config.latency.warmup} must be >= 0 and "
                         f"latency.repeats={config.latency.repeats} >= 1")
    threads = config.latency.threads
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ValueError(f"latency.threads={threads} must be >= 1 (1: as generate, stream and "
                         f"serve run), or null to keep torch's setting")
    if not config.systems:
        raise ValueError("systems is empty; list at least one system to evaluate")
    streams = config.streams
    if streams.num_streams < 0:
        raise ValueError(f"streams.num_streams={streams.num_streams} must be >= 0 (0: none)")
    if streams.num_streams:
        if config.world != "shapes":
            raise ValueError("streams are judged by the shapes oracle: set streams.num_streams=0 "
                             "outside the shapes world")
        try:
            check_stream_settings(stream_frame_count(streams.seconds), streams.switch_frame)
        except ValueError as err:
            raise ValueError(f"streams (seconds={streams.seconds:g}, switch_frame="
                             f"{streams.switch_frame}): {err}") from None
    for spec in config.systems:
        if spec.kind not in ("teacher", "student"):
            raise ValueError(f"systems: kind={spec.kind!r} must be 'teacher' or 'student'")
        if spec.kind == "student" and spec.solver is not None:
            raise ValueError(f"systems: a student has no solver choice (got solver="
                             f"{spec.solver!r}); remove it")
        if spec.kind == "teacher" and spec.guidance is not None:
            raise ValueError(f"systems: guidance={spec.guidance} is a student setting (the "
                             f"teacher uses its per-expert defaults); remove it")
        if spec.steps is not None and spec.steps < 1:
            raise ValueError(f"systems: steps={spec.steps} must be >= 1")
        if spec.decoder not in ("vae", "tiny"):
            raise ValueError(f"systems: decoder={spec.decoder!r} must be 'vae' (the teacher's "
                             f"VAE) or 'tiny' (<teacher_dir>/tiny_decoder)")


# ---------------------------------------------------------------------------------------------
# Loading


def _dtype(config: EvalConfig, accelerator: str) -> torch.dtype:
    name = config.dtype if config.dtype != "auto" else ("bf16" if accelerator == "gpu" else "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def resolve_teacher_dir(config: EvalConfig) -> Path:
    path = Path(config.teacher_dir) if config.teacher_dir else embedded_teacher_dir()
    if not path.is_dir():
        if config.teacher_dir is None:
            raise FileNotFoundError(
                f"the embedded shapes teacher is not installed at {path}; train it with "
                f"`{MAKE_TEACHER}` or pass --teacher DIR")
        raise FileNotFoundError(f"teacher folder {path} does not exist (teacher_dir / "
                                f"--teacher); pass the Wan2.2-T2V-A14B folder or a shapes teacher")
    return path


def resolve_student_dir(config: EvalConfig) -> Path | None:
    """The student folder to use: the configured one, else (shapes world) the default where
    ``wan-distill distill`` exports it (``student.paths.default_student_dir("shapes")``)."""
    if config.student_dir:
        return Path(config.student_dir)
    return default_student_dir("shapes") if config.world == "shapes" else None


def load_student_if_present(folder: Path | None, dtype: torch.dtype):
    """(student, config, None) or (None, None, reason) when the folder holds no student."""
    if folder is None:
        return None, None, "no student_dir given in the eval config"
    if not (folder / STUDENT_CONFIG_FILE).is_file():
        return None, None, (f"student not found at {folder} (no {STUDENT_CONFIG_FILE}); make it "
                            f"with `{MAKE_STUDENT}`")
    student, student_config = load_student(folder, dtype=dtype)
    return student, student_config, None


def load_metric_networks(config: EvalConfig) -> MetricNetworks:
    """Load I3D, LPIPS and CLIP from local files on the CPU; each missing one becomes a reason."""
    nets = MetricNetworks()
    if not config.fvd.enabled:
        nets.fvd_reason = "disabled in this run (fvd.enabled: false or --no-fvd)"
    elif config.fvd.num_videos == 0:
        nets.fvd_reason = "disabled in this run (fvd.num_videos = 0)"
    else:
        try:
            nets.fvd_model = load_i3d(config.fvd.weights)
        except (FileNotFoundError, ValueError) as err:
            nets.fvd_reason = str(err)
    try:
        nets.lpips_model = load_lpips(config.lpips_net, config.lpips_trunk)
        nets.lpips_network = f"lpips-{config.lpips_net}-v0.1"
    except (MetricUnavailable, ImportError) as err:
        nets.lpips_reason = str(err)
    try:
        # Scores are taken per video with the metric's own compute(); a gather there would wait
        # for processes holding other numbers of videos, so per-video scores are gathered by the
        # eval module's CatMetric instead.
        nets.clip_metric = load_clip_score(config.clip_dir, sync_on_compute=False)
        nets.clip_network = Path(config.clip_dir).name
    except MetricUnavailable as err:
        nets.clip_reason = str(err)
    return nets


def _quiet_lightning() -> None:
    """Keep the console to the progress bar and the summary."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# The run


def _protocol(config: EvalConfig, fvd_limit: int, reference: str | None,
              fvd_network: str | None, fvd_reason: str = "") -> list[str]:
    """The report's protocol lines; ``fvd_network`` None: FVD was not computed (why:
    ``fvd_reason``)."""
    lat, f = config.latency, config.fvd
    lines = [
        f"Latency: one video at batch 1, prompt text to last decoded frame (text encoding, "
        f"sampling, VAE decode), wall clock (perf_counter, CUDA-synchronised on GPUs); "
        f"{lat.warmup} warm-up round(s) discarded, then {lat.repeats} rounds visiting every "
        f"system in rotated order on the same machine; median and quartiles over rounds and "
        f"processes; on a CPU at "
        + (f"{lat.threads} torch thread(s) (generate, stream and serve default to 1)."
           if lat.threads is not None else "torch's thread setting (see Machine)."),
        "Time to first frame: the student streams, so its first chunk (one latent chunk, "
        "decoded) is the first frame; the teacher decodes only at the end, so its whole video "
        "is its first frame.",
        "NFE: denoiser evaluations per video (teacher: whole-clip DiT passes, CFG counts two; "
        "student: one chunk's passes, guidance is embedded so there is no CFG pass; a finished "
        "chunk's KV-cache append rides in the next chunk's first pass of each network, counted "
        "under forwards as kv_append but no pass of its own).",
        "Quality pass: every prompt once in every system, batched; prompt i uses noise seed "
        "noise_seed + i in every system (same initial noise), so videos pair across systems.",
        f"Batched ms/video: throughput, each quality-pass batch's generation seconds (the same "
        f"clock as latency) over its videos, median over the batches of all processes (n), in "
        f"batches of {config.batch_size} per process, every system on the same batch in turn, "
        f"at the process's thread setting (see Machine); no warm-up batch. At batch 1 a small "
        f"model pays mostly per-operation overhead; a batch spreads it over its videos.",
    ]
    if config.world == "shapes":
        lines.append("Oracle: eval.oracle recovers colour, shape and motion from each video; "
                     "accuracy per factor and joint (all three right), with N and per language.")
    if fvd_network is None:
        lines.append(f"FVD: not computed: {fvd_reason}.")
    else:
        lines.append(
            f"FVD: the first {f.num_frames} frames, TF1 bilinear resize to 224x224, [-1, 1], "
            f"features of {fvd_network} (the standard: i3d-kinetics400-tfhub, the TF-Hub "
            f"I3D's 400-d logits averaged over time); Gaussians with N - 1 covariances; "
            f"N = {fvd_limit} generated videos per system against the same number of real videos ("
            + ("rendered by eval.shapes_world with the prompts' factors" if config.world == "shapes"
               else f"the first files of {config.real_videos_dir}")
            + f"); interval: {f.bootstrap} bootstrap resamples of both sets, bias-corrected "
            f"(eval.fvd.bootstrap_interval), {f.confidence:.0%}. Small-N FVD is biased upward: "
            f"compare values only at equal N.")
    if reference:
        lines.append(f"Paired distances against {reference}: PSNR and SSIM (torchmetrics, "
                     "0..255 scale, SSIM 11x11 Gaussian window) and LPIPS per frame, averaged "
                     "per video; mean ± std over videos.")
    lines.append(f"CLIP score: 100 * cosine of frame and prompt embeddings, {config.clip_frames} "
                 "evenly spaced frames per video, averaged; mean ± std over videos.")
    return lines


def evaluate_main(options: EvalConfig | str | os.PathLike | None = None,
                  overrides: Sequence[str] = (), *, networks: MetricNetworks | None = None,
                  verbose: bool = True) -> dict | None:
    """Run an evaluation and write its report; returns the report dict (None on processes
    other than 0 of a multi-process run).

    Args:
        options: an ``EvalConfig``, a YAML path, or None for the shapes default.
        overrides: dotted ``key=value`` overrides of a YAML (``num_prompts=50``).
        networks: FVD/LPIPS/CLIP networks to use instead of loading the installed ones (tests
            pass tiny random networks tagged "random-test").
        verbose: print the notes and the closing one-line summary (process 0).
    """
    config = (options if isinstance(options, EvalConfig)
              else load_config(options, overrides))
    if isinstance(options, EvalConfig) and overrides:
        raise ValueError("overrides apply to YAML configs; use dataclasses.replace on an EvalConfig")
    check_config(config)
    # The report is written last: a folder that cannot be written fails now, not after the run.
    prepare_output_folder(config.out, "--out")
    _quiet_lightning()
    start = time.perf_counter()
    accelerator = resolve_accelerator(config.trainer.accelerator)
    dtype = _dtype(config, accelerator)
    teacher_dir = resolve_teacher_dir(config)
    teacher = load_teacher(teacher_dir, dtype=dtype)

    if config.world == "shapes":
        prompts = eval_prompts(config.num_prompts, seed=config.prompt_seed)
        prompt_source = (f"eval.shapes_world.eval_prompts(n={config.num_prompts}, "
                         f"seed={config.prompt_seed}), English and Chinese")
    else:
        prompts = read_prompt_file(config.prompts_file)[: config.num_prompts]
        prompt_source = f"{config.prompts_file} (first {len(prompts)} prompts)"

    notes: list[str] = []
    skipped: list[dict] = []
    student_dir = resolve_student_dir(config)
    specs = list(config.systems)
    student = student_config = None
    if any(s.kind == "student" for s in specs):
        student, student_config, reason = load_student_if_present(student_dir, dtype)
        if reason is not None:
            for s in specs:
                if s.kind == "student":
                    skipped.append({"name": system_name(s, teacher, None), "reason": reason})
            specs = [s for s in specs if s.kind != "student"]
            notes.append(f"Student systems were not evaluated: {reason}.")
    tiny_decoder = None
    if any(s.decoder == "tiny" for s in specs):
        tiny_decoder, reason = find_tiny_decoder(teacher_dir, teacher.vae)
        if reason is not None:
            for s in specs:
                if s.decoder == "tiny":
                    skipped.append({"name": system_name(s, teacher, student_config),
                                    "reason": reason})
            specs = [s for s in specs if s.decoder != "tiny"]
            notes.append(f"Systems with the tiny decoder were not evaluated: {reason}.")
    if not specs:
        raise ValueError("no system left to evaluate (the student was not found and no teacher "
                         "system is listed)")
    names = [system_name(s, teacher, student_config) for s in specs]
    reference = config.reference
    if reference is None:
        reference = next((n for s, n in zip(specs, names) if s.kind == "teacher"), None)
    elif reference not in names:
        raise ValueError(f"reference={reference!r} is none of the evaluated systems {names}")
    if reference is not None:  # the reference runs first in each batch, so others can pair
        order = sorted(range(len(specs)), key=lambda i: names[i] != reference)
        specs = [specs[i] for i in order]

    nets = networks if networks is not None else load_metric_networks(config)
    loaded = LoadedModels(teacher, student, student_config, tiny_decoder)
    module = EvalModule(loaded, specs, reference, prompts, config, nets)
    trainer = make_trainer(config.trainer)
    if verbose and trainer.is_global_zero:
        for note in notes:
            print(note, flush=True)
        if (nets.fvd_model is not None and nets.fvd_network != RANDOM_TEST_NETWORK
                and accelerator == "cpu" and module.fvd_limit):
            clips = module.fvd_limit * (len(specs) + 1)
            print(f"FVD on the CPU: {clips} clips through the I3D at several seconds each; pass "
                  f"--fvd-videos K to cap N or --no-fvd to skip it", flush=True)
    load_seconds = time.perf_counter() - start
    run_predict(module, config, trainer)
    if not trainer.is_global_zero:
        return None
    streams = None
    if config.streams.num_streams and student is not None:
        phase = time.perf_counter()
        # At the latency phase's threads: what `stream` runs at (one thread by default).
        on_cpu = next(student.parameters()).device.type == "cpu"
        with cpu_threads(config.latency.threads if on_cpu else None):
            streams = long_streams(config, specs, loaded, verbose)
        module.phase_seconds["streams"] = time.perf_counter() - phase

    device = trainer.strategy.root_device
    seconds = {"load": load_seconds, **module.phase_seconds,
               "total": time.perf_counter() - start}
    settings = {
        "num_prompts": len(prompts), "prompt_source": prompt_source,
        "prompt_seed": config.prompt_seed, "noise_seed": config.noise_seed,
        "batch_size": config.batch_size, "dtype": str(dtype).replace("torch.", ""),
        "offload": config.offload, "latency": asdict(config.latency),
        "fvd": {**asdict(config.fvd),
                "num_videos_used": module.fvd_limit if nets.fvd_model is not None else 0,
                "num_real_videos": module.real_fvd_count},
        "clip_frames": config.clip_frames,
        "protocol": _protocol(config, module.fvd_limit, reference,
                              nets.fvd_network if nets.fvd_model is not None else None,
                              nets.fvd_reason),
    }
    weights = {"teacher": str(teacher_dir), "teacher_preset": teacher.config.name,
               "student": str(student_dir) if student is not None else None}
    report = build_report(
        world=config.world, systems=module.results, settings=settings,
        machine=machine_info(device, trainer.world_size), weights=weights, notes=notes,
        skipped=skipped, reference=reference, seconds=seconds,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), streams=streams)
    paths = write_report(report, config.out)
    if verbose:
        print(summary_line(report, paths), flush=True)
    return report


def stream_frame_count(seconds: float) -> int:
    """Frames of a ``seconds``-long stream of the shapes world (1 + seconds * fps)."""
    return int(round(seconds * FPS)) + 1


def long_streams(config: EvalConfig, specs: Sequence[SystemSpec], models: LoadedModels,
                 verbose: bool) -> dict:
    """Stream ``config.streams.num_streams`` prompts through every student system, as
    ``wan-distill stream`` does (its steps, guidance and decoder), and judge the streams
    (``eval.long_streams.stream_long``). Prompt i of the evaluation's list, noise seed
    noise_seed + i."""
    settings, teacher = config.streams, models.teacher
    sampling = teacher.config.sampling
    num_frames = stream_frame_count(settings.seconds)
    prompts = eval_prompts(settings.num_streams, seed=config.prompt_seed)
    seeds = [config.noise_seed + i for i in range(len(prompts))]
    systems = {}
    for spec in specs:
        if spec.kind != "student":
            continue
        name = system_name(spec, teacher, models.student_config)
        engine = StudentStreamEngine(
            models.student, models.student_config, teacher.text_encoder, teacher.tokenizer,
            models.tiny_decoder if spec.decoder == "tiny" else teacher.vae,
            width=config.width or sampling.width, height=config.height or sampling.height,
            fps=FPS, steps=spec.steps)
        start = time.perf_counter()
        if verbose:
            print(f"long streams: {name}, {len(prompts)} x {settings.seconds:g} s", flush=True)
        systems[name] = {**stream_long(engine, prompts, seeds, num_frames,
                                       switch_frame=settings.switch_frame, guidance=spec.guidance,
                                       progress=config.progress and verbose),
                         "seconds": time.perf_counter() - start}
    return {**asdict(settings), "num_frames": num_frames, "fps": FPS,
            "noise_seed": config.noise_seed, "systems": systems}


# ---------------------------------------------------------------------------------------------
# CLI


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``wan-distill eval``'s flags on ``parser`` (a subcommand parser)."""
    parser.add_argument("--config", default=None,
                        help="an eval YAML (configs/eval/shapes.yaml, configs/eval/a14b.yaml); "
                             "default: the shapes world")
    parser.add_argument("--out", default=None, help="report folder (default: ./eval_report)")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="N prompts for the oracle and FVD (shapes default: 200)")
    parser.add_argument("--teacher", default=None,
                        help="teacher folder (default: the embedded shapes teacher)")
    parser.add_argument("--student", default=None,
                        help="student folder (default: where `wan-distill distill` exports it)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts per batch in the quality pass (shapes default: 50)")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "gpu", "cuda"],
                        help="where to run (default: a GPU when one is visible)")
    parser.add_argument("--fvd-videos", type=int, default=None, metavar="K",
                        help="cap FVD at K videos per system (default: all N)")
    parser.add_argument("--no-fvd", action="store_true", help="skip FVD")
    parser.add_argument("--i3d", default=None,
                        help=f"I3D weights file (default: where `{INSTALL_COMMAND}` installs it)")
    parser.add_argument("--clip-dir", default=None, help="local CLIP folder for the CLIP score")
    parser.add_argument("--lpips-trunk", default=None,
                        help="torchvision AlexNet file for LPIPS (default: torch hub's cache)")
    parser.add_argument("--latency-repeats", type=int, default=None,
                        help="timed batch-1 rounds per system (default: 5)")
    parser.add_argument("--seed", type=int, default=None, help="prompt seed (default: 0)")
    parser.add_argument("--streams", type=int, default=None, metavar="N",
                        help="also stream N prompts per student system for --stream-seconds, "
                             "judged 2 s at a time (default: 0, none)")
    parser.add_argument("--stream-seconds", type=float, default=None,
                        help="video seconds per stream (default: 30)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config field, dotted (e.g. fvd.bootstrap=200); repeatable")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` overrides the flags stand for (flags left unset give none)."""
    pairs = {"out": args.out, "num_prompts": args.num_prompts, "teacher_dir": args.teacher,
             "student_dir": args.student, "batch_size": args.batch_size,
             "fvd.num_videos": args.fvd_videos, "fvd.weights": args.i3d,
             "clip_dir": args.clip_dir, "lpips_trunk": args.lpips_trunk,
             "latency.repeats": args.latency_repeats, "prompt_seed": args.seed,
             "streams.num_streams": args.streams, "streams.seconds": args.stream_seconds}
    out = [f"{k}={v}" for k, v in pairs.items() if v is not None]
    if args.device is not None:
        out.append(f"trainer.accelerator={'gpu' if args.device == 'cuda' else args.device}")
    if args.no_fvd:
        out.append("fvd.enabled=false")
    if args.quiet:
        out.append("progress=false")
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"error: --set {item!r} is not KEY=VALUE (e.g. fvd.bootstrap=200)")
        out.append(item)
    return out


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``wan-distill eval`` from parsed flags; returns the exit code."""
    try:
        config = load_config(args.config, overrides_from_args(args))
        check_config(config)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    try:
        evaluate_main(config)
    except (FileNotFoundError, OutputLocationError) as err:  # a missing input, a bad --out
        raise SystemExit(f"error: {err}") from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m eval.run [flags]`` (the same flags as ``wan-distill eval``)."""
    parser = argparse.ArgumentParser(prog="wan-distill eval", description=__doc__.splitlines()[0])
    add_eval_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
