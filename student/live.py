"""Live streaming from scripts and the command line: load an engine, run a timed stream.

``load_engine_factory`` loads the student and the teacher parts it needs (tokenizer, text
encoder, VAE or the tiny decoder; never the 14B experts) once, and returns a factory that makes
one engine per session over the shared weights. ``run_stream`` drives one engine for a number of seconds of
video, switches prompts at given video times, and writes the MP4 while it generates: the file is a
fragmented MP4, so an interrupted run leaves a playable file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from student.checkpoint import load_student
from student.engine import StudentStreamEngine
from student.server.recording import Mp4Recorder
from student.tiny_decoder_checkpoint import TINY_DECODER_FOLDER, find_tiny_decoder, load_tiny_decoder
from teacher.checkpoint import load_teacher


def load_engine_factory(student_dir: str | Path, teacher_dir: str | Path, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        steps: int | None = None, width: int | None = None,
                        height: int | None = None,
                        decoder: str = "auto",
                        recache: bool = False) -> Callable[[], StudentStreamEngine]:
    """A factory of engines over one loaded student + teacher parts (shared, read-only).

    Frame size and fps default to the teacher's sampling defaults (64x64 at 8 fps for the shapes
    world; pass width/height for a real-size student). ``decoder``: "auto" (the tiny decoder in
    ``<teacher_dir>/tiny_decoder`` when it was trained for this teacher's VAE, else the VAE),
    "vae" (the teacher's), "tiny" (``<teacher_dir>/tiny_decoder``, or fail saying how to make
    it) or the folder of a tiny decoder trained for that VAE. ``recache``: see
    ``StudentStreamEngine``.
    """
    for name, path in (("student", student_dir), ("teacher", teacher_dir)):
        if not Path(path).is_dir():
            hint = ("run `wan-distill distill` to make the shapes student, or pass --student DIR"
                    if name == "student" else "pass --teacher-dir DIR")
            raise FileNotFoundError(f"{name} folder {path} does not exist; {hint}")
    device = torch.device(device)
    student, config = load_student(student_dir, dtype=dtype, device=device)
    parts = load_teacher(teacher_dir, dtype=dtype, experts=False)
    parts.text_encoder.to(device)
    parts.vae.to(device)
    frames_decoder = parts.vae
    if decoder == "auto":
        # The shapes teacher ships one (as good as the VAE on 1,400 prompts, 2x faster per
        # clip: BENCHMARKS.md, sessions 16-17); a real-size teacher has none, so it keeps its VAE.
        frames_decoder = find_tiny_decoder(teacher_dir, parts.vae, device=device)[0] or parts.vae
    elif decoder != "vae":
        folder = Path(teacher_dir) / TINY_DECODER_FOLDER if decoder == "tiny" else Path(decoder)
        if decoder != "tiny" and not folder.is_dir():
            raise FileNotFoundError(f"decoder {decoder!r} is not auto, vae, tiny or an existing "
                                    f"tiny decoder folder; pass one of those")
        frames_decoder = load_tiny_decoder(folder, parts.vae, device=device)
    s = parts.config.sampling

    def make() -> StudentStreamEngine:
        return StudentStreamEngine(student, config, parts.text_encoder, parts.tokenizer, frames_decoder,
                                   width=width or s.width, height=height or s.height, fps=s.fps,
                                   steps=steps, recache=recache)

    return make


@dataclass
class StreamSummary:
    """What a timed stream produced and how fast."""

    frames: int = 0
    chunks: int = 0
    seconds_of_video: float = 0.0
    wall_s: float = 0.0
    time_to_first_frame_s: float | None = None
    fps: float = 0.0  # frames generated per wall-clock second
    prompt_switches: list[tuple[int, str]] = field(default_factory=list)  # (frame index, prompt)
    # Switches asked for inside the last chunk: the stream ended at that chunk's boundary.
    unapplied_switches: list[tuple[float, str]] = field(default_factory=list)  # (seconds, prompt)
    out: Path | None = None


def parse_switch(text: str) -> tuple[float, str]:
    """'2.5:a blue square moving up' -> (2.5, 'a blue square moving up')."""
    seconds, sep, prompt = text.partition(":")
    try:
        at = float(seconds)
    except ValueError:
        at = -1.0
    if not sep or at < 0 or not prompt.strip():
        raise ValueError(f"--switch {text!r} is not SECONDS:PROMPT, e.g. 2.5:'a blue square moving up'")
    return at, prompt.strip()


def check_switches(switches: Sequence[tuple[float, str]], seconds: float) -> None:
    """Fail on a switch at or after the end of a ``seconds``-long stream, which could never
    take effect."""
    late = [at for at, _ in switches if at >= seconds]
    if late:
        raise ValueError(f"--switch at {late[0]:g} s comes after the stream's end ({seconds:g} s); "
                         f"switch earlier or stream longer")


def run_stream(engine: StudentStreamEngine, prompt: str, *, seconds: float, seed: int = 0,
               guidance: float | None = None, switches: Sequence[tuple[float, str]] = (),
               out: str | Path | None = None,
               on_chunk: Callable[[StreamSummary], None] | None = None) -> StreamSummary:
    """Generate ``seconds`` of video; switch prompts at video times; write ``out`` as it goes.

    A switch at time s takes effect at the first chunk boundary at or after frame s * fps; one
    inside the stream's last chunk ends up in ``unapplied_switches``.
    """
    if seconds <= 0:
        raise ValueError(f"seconds {seconds} must be positive")
    check_switches(switches, seconds)
    pending = sorted(switches)
    target = max(1, round(seconds * engine.fps))
    summary = StreamSummary(out=Path(out) if out else None)
    recorder = Mp4Recorder(out, engine.fps, engine.width, engine.height) if out else None
    current = prompt
    t0 = time.perf_counter()
    try:
        engine.start(prompt, seed=seed, guidance=guidance)
        while summary.frames < target:
            while pending and pending[0][0] * engine.fps <= summary.frames:
                _, current = pending.pop(0)
                engine.set_prompt(current)
                summary.prompt_switches.append((summary.frames, current))
            chunk = engine.next_chunk()
            if summary.time_to_first_frame_s is None:
                summary.time_to_first_frame_s = time.perf_counter() - t0
            if recorder is not None:
                recorder.append(chunk.frames, chunk.prompt_version, current)
            summary.frames += chunk.n_frames
            summary.chunks += 1
            summary.wall_s = time.perf_counter() - t0
            summary.seconds_of_video = summary.frames / engine.fps
            summary.fps = summary.frames / summary.wall_s
            if on_chunk is not None:
                on_chunk(summary)
    finally:
        if recorder is not None:
            recorder.close()
    summary.unapplied_switches = pending
    return summary
