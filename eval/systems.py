"""Systems under evaluation: things that turn (prompts, seeds) into uint8 videos, timed.

A system is one sampler setting of a loaded model: the two-expert teacher at some solver and step
count (``TeacherSystem``), or the causal student at some steps per chunk, streaming chunk by
chunk against its KV cache (``StudentSystem``). Both are pure of I/O: they take loaded modules
and return tensors and timings; loading, devices and reporting are the caller's.

Paired protocol: prompt i with seed s gets the same initial noise in every system
(``teacher.pipeline.initial_noise``: one CPU generator per sample seeded with s), so the videos of
two systems can be compared frame by frame (``eval.paired``). The student continues drawing its
re-noising noise from the same per-sample generator, so its video too depends only on (prompt,
seed) and not on the batch it was generated in.

Timings per call (batch): ``seconds`` from the start of text encoding to the last frame decoded;
``first_frame_seconds`` to the first decoded frame (for the student: the first chunk, streaming;
for the teacher, which decodes only at the end, the whole video is the first frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from eval.latency import Stopwatch
from student.causal_dit import CausalWanModel
from student.config import StudentConfig
from student.moe import MoECache, MoEStudent
from student.sampler import sample_chunk, sampling_sigmas, stream_cache
from student.tiny_decoder import TinyDecoder
from teacher.checkpoint import TeacherModels
from teacher.pipeline import (
    DECODE_BATCH,
    GenerationRequest,
    decode_latents,
    encode_prompts,
    latent_shape,
    resolve_request,
    sample_latents,
    video_to_uint8,
)
from teacher.schedule import expert_for_timestep, sigmas_to_timesteps
from teacher.solvers import solver_sigmas


@dataclass
class SystemOutput:
    """One batch of a system's videos and what it cost.

    videos: uint8 [B, T, H, W, 3] on the CPU.
    seconds: wall time of the whole batch (text encoding to last frame decoded).
    first_frame_seconds: wall time until the first frame of the batch was decoded.
    nfe: denoiser evaluations per video (CFG counts two).
    forwards: DiT forward passes per video by kind (e.g. {"denoise": 80} or
        {"denoise": 20, "kv_append": 4}); a student forward covers one chunk's tokens, a teacher
        forward the whole clip's. A student's kv_append are chunks whose K/V were computed
        inside a denoise pass (deferred appends), not passes of their own.
    """

    videos: torch.Tensor
    seconds: float
    first_frame_seconds: float
    nfe: int
    forwards: dict[str, int] = field(default_factory=dict)


class VideoSystem(Protocol):
    """What the evaluation needs from a system."""

    name: str

    def info(self) -> dict:
        """JSON-ready description: kind, steps, solver, guidance, streaming, NFE, frames, size."""

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> SystemOutput:
        """Videos for ``prompts`` (one seed each), batched."""


def _check_batch(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if len(prompts) == 0 or len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt and at least one prompt; got "
                         f"{len(prompts)} prompts and {len(seeds)} seeds")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {p!r} is empty; every prompt must describe a video")


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def seeded_noise(shape: Sequence[int], seeds: Sequence[int]
                 ) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per-sample initial noise fp32 [B, *shape] and each sample's generator, advanced past it.

    The noise equals ``teacher.pipeline.initial_noise(shape, seeds)`` bit for bit (the first draw
    of a CPU generator seeded with the sample's seed), so teacher and student start from the same
    noise; the generators then supply the student's re-noising draws.
    """
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32)
                         for g in generators])
    return noise, generators


class TeacherSystem:
    """The two-expert teacher at one sampler setting (``teacher.pipeline``).

    Args:
        models: the loaded teacher (``teacher.checkpoint.load_teacher``).
        steps, solver: sampler setting; None takes the teacher's default (A14B and shapes: UniPC,
            40 steps). Guidance, shift and negative prompt are always the teacher's defaults
            (per-expert CFG).
        width, height, frames: clip size; None takes the teacher's default.
        device: where the experts run (the text encoder and VAE run where their weights are).
        offload: keep only the active expert on ``device`` (the official single-GPU policy).
        name: report name; default ``teacher-<solver>-<steps>``.
        decoder: a ``student.tiny_decoder.TinyDecoder`` to decode with instead of the VAE.
    """

    kind = "teacher"

    def __init__(self, models: TeacherModels, steps: int | None = None,
                 solver: str | None = None, *, width: int | None = None,
                 height: int | None = None, frames: int | None = None,
                 device: torch.device | str = "cpu", offload: bool = True,
                 name: str | None = None, decoder: TinyDecoder | None = None):
        if decoder is not None:
            decoder.config.check_vae(models.vae)
        self.models, self.decoder = models, decoder
        self.device = torch.device(device)
        self.offload = offload
        # A placeholder prompt only resolves the sampler defaults (and validates the settings).
        self.request = resolve_request(models, GenerationRequest(
            prompt="settings", steps=steps, solver=solver, width=width, height=height,
            frames=frames))
        self.name = name or f"teacher-{self.request.solver}-{self.request.steps}"

    def _nfe(self) -> int:
        """Denoiser evaluations per video, from the schedule (CFG doubles a step)."""
        s = self.models.config.sampling
        r = self.request
        sigmas = solver_sigmas(r.solver, r.steps, r.shift, s.num_train_timesteps)
        nfe = 0
        for t in sigmas_to_timesteps(sigmas[:-1], s.num_train_timesteps).tolist():
            high = expert_for_timestep(int(t), s.boundary, s.num_train_timesteps) == "high"
            g = r.guidance_high if high else r.guidance_low
            nfe += 1 if g == 1 else 2
        return nfe

    def info(self) -> dict:
        r = self.request
        return {"name": self.name, "kind": self.kind, "solver": r.solver, "steps": r.steps,
                "shift": r.shift, "guidance_high": r.guidance_high,
                "guidance_low": r.guidance_low, "streaming": False, "nfe": self._nfe(),
                "frames": r.frames, "width": r.width, "height": r.height,
                "fps": self.models.config.sampling.fps,
                "decoder": "vae" if self.decoder is None else "tiny"}

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> SystemOutput:
        _check_batch(prompts, seeds)
        r = self.request
        batch = len(prompts)
        watch = Stopwatch(self.device).start()
        context = encode_prompts(self.models, [*prompts, r.negative_prompt], self.device)
        shape = latent_shape(self.models, r.frames, r.height, r.width)
        noise, _ = seeded_noise(shape, seeds)
        latents, nfe = sample_latents(self.models, context[:batch], context[batch:], noise, r,
                                      device=self.device, offload=self.offload)
        if self.decoder is None:
            videos = decode_latents(self.models, latents)
        else:
            videos = video_to_uint8(self.decoder.decode(latents.to(_device_of(self.decoder))))
        seconds = watch.elapsed()
        return SystemOutput(videos=videos, seconds=seconds, first_frame_seconds=seconds,
                            nfe=nfe, forwards={"denoise": nfe})


class StudentSystem:
    """The causal student streaming a clip chunk by chunk with its KV cache.

    Args:
        student: the loaded ``CausalWanModel`` or two-network ``MoEStudent`` (eval mode); it
            runs where its weights are.
        config: its ``StudentConfig`` (chunking, shift, default guidance, cache policy).
        teacher_parts: the teacher whose tokenizer, text encoder and VAE the student shares, and
            whose default clip size and length it generates (experts are not used).
        steps: student steps per chunk (default ``config.steps``).
        guidance: the guidance scale (default ``config.guidance_default``).
        width, height, frames: clip size; None takes the teacher's default.
        name: report name; default ``student-<steps>step``.
        decoder: a ``student.tiny_decoder.TinyDecoder`` to decode with instead of the VAE.

    Per chunk: few-step sampling against the cache (``student.sampler.sample_chunk``), append
    the clean chunk to the cache (skipped for the clip's last chunk, which nothing reads), decode
    it at once with the streaming decoder (the VAE's or the tiny one), so the first frames exist
    after one chunk.
    """

    kind = "student"

    def __init__(self, student: CausalWanModel | MoEStudent, config: StudentConfig,
                 teacher_parts: TeacherModels, steps: int | None = None, *,
                 guidance: float | None = None, width: int | None = None,
                 height: int | None = None, frames: int | None = None,
                 name: str | None = None, decoder: TinyDecoder | None = None):
        if decoder is not None:
            decoder.config.check_vae(teacher_parts.vae)
        self.decoder = teacher_parts.vae if decoder is None else decoder
        if student.chunk_frames != config.chunk_frames or student.config != config.dit:
            raise ValueError(f"the student (chunk_frames {student.chunk_frames}) does not match "
                             f"its config {config.name!r}; pass the config it was loaded with")
        if teacher_parts.config.dit.in_dim != student.in_dim:
            raise ValueError(f"the teacher's latents have {teacher_parts.config.dit.in_dim} "
                             f"channels but the student takes {student.in_dim}; pair the student "
                             f"with the teacher it was distilled from")
        self.student, self.config, self.parts = student, config, teacher_parts
        self.steps = config.steps if steps is None else int(steps)
        if self.steps < 1:
            raise ValueError(f"student steps={self.steps} must be >= 1")
        self.guidance = config.guidance_default if guidance is None else float(guidance)
        low, high = config.guidance_range
        if not low <= self.guidance <= high:
            raise ValueError(f"guidance {self.guidance} is outside the student's trained range "
                             f"[{low:g}, {high:g}]")
        self.sigmas = sampling_sigmas(config, self.steps)
        # The teacher's request resolution validates the size (VAE stride x patch multiples).
        size = resolve_request(teacher_parts, GenerationRequest(
            prompt="settings", width=width, height=height, frames=frames))
        self.frames, self.width, self.height = size.frames, size.width, size.height
        self.fps = teacher_parts.config.sampling.fps
        self.latent_shape = latent_shape(teacher_parts, self.frames, self.height, self.width)
        if self.latent_shape[1] % config.chunk_frames:
            raise ValueError(f"{self.frames} frames are {self.latent_shape[1]} latent frames, not "
                             f"a multiple of chunk_frames={config.chunk_frames}; pick frames = "
                             f"1 + 4k with k + 1 a multiple of it")
        self.num_chunks = self.latent_shape[1] // config.chunk_frames
        self.name = name or f"student-{self.steps}step"

    def info(self) -> dict:
        return {"name": self.name, "kind": self.kind, "solver": "multistep-consistency",
                "steps": self.steps, "sigmas": [round(float(x), 6) for x in self.sigmas],
                "guidance": self.guidance,
                "streaming": True, "chunk_frames": self.config.chunk_frames,
                "num_chunks": self.num_chunks, "nfe": self.steps * self.num_chunks,
                "frames": self.frames, "width": self.width, "height": self.height,
                "fps": self.fps,
                "decoder": "tiny" if isinstance(self.decoder, TinyDecoder) else "vae"}

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> SystemOutput:
        _check_batch(prompts, seeds)
        device = _device_of(self.student)
        decoder = self.decoder
        decoder_device = _device_of(decoder)
        batch, cf = len(prompts), self.config.chunk_frames
        watch = Stopwatch(device).start()
        context = encode_prompts(self.parts, list(prompts), device)
        noise, generators = seeded_noise(self.latent_shape, seeds)
        noise = noise.to(device)
        cache = stream_cache(self.student, self.sigmas, batch, device,
                             self.config.num_train_timesteps, sink_chunks=self.config.sink_chunks,
                             window_chunks=self.config.window_chunks)
        # One streaming decode cache per slice of DECODE_BATCH clips: the decoder, like
        # teacher.pipeline.decode_latents, is faster per clip on small batches.
        decode_caches = [decoder.new_decode_cache() for _ in range(0, batch, DECODE_BATCH)]
        chunks, first_frame_seconds = [], 0.0
        for c in range(self.num_chunks):
            x0 = sample_chunk(self.student, noise[:, :, c * cf:(c + 1) * cf], self.sigmas,
                              context, self.guidance, cache, generators,
                              self.config.num_train_timesteps)
            if c + 1 < self.num_chunks:
                self.student.append_chunk(x0, context, self.guidance, cache, defer=True)
            chunks.append(torch.cat([
                video_to_uint8(decoder.decode_chunk(part, decode_cache))
                for part, decode_cache in zip(x0.to(decoder_device).split(DECODE_BATCH),
                                              decode_caches)]))
            if c == 0:
                first_frame_seconds = watch.elapsed()
        seconds = watch.elapsed()
        info = self.info()
        # A finished chunk is appended to the cache of every network the steps run.
        networks = len(cache.present()) if isinstance(cache, MoECache) else 1
        return SystemOutput(videos=torch.cat(chunks, dim=1), seconds=seconds,
                            first_frame_seconds=first_frame_seconds, nfe=info["nfe"],
                            forwards={"denoise": info["nfe"],
                                      "kv_append": (self.num_chunks - 1) * networks})
