"""The evaluation's typed configuration: the systems to evaluate and the run's knobs.

A YAML in configs/eval/ sets these fields (``eval.run.load_config``); their defaults are the
embedded shapes-world evaluation (configs/eval/shapes.yaml repeats them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eval.fvd import FVD_NUM_FRAMES

WORLDS = ("shapes", "prompts")


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
class StreamSettings:
    """Long streams of every student system, judged 2 s at a time (``eval.long_streams``).

    num_streams: streams per student system, the first num_streams prompts of the evaluation's
        prompt seed (0: none; shapes world only). They run at ``latency.threads``, as `stream`
        does; a 30-s stream of the shapes student takes a few seconds on one CPU thread.
    seconds: video seconds per stream (8 fps in the shapes world: 30 s = 241 frames).
    switch_frame: where each stream switches to a prompt that differs in colour, shape and
        motion (a window start, 17 + 16k, e.g. 65 = 8.1 s); None: no switch.
    """

    num_streams: int = 0
    seconds: float = 30.0
    switch_frame: int | None = None


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
    streams: long streams of the student systems (off by default).
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
    streams: StreamSettings = field(default_factory=StreamSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    out: str = "eval_report"
    progress: bool = True
