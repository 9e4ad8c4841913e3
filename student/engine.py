"""The streaming engine: the causal student + text encoder + VAE as a live chunk iterator.

``StudentStreamEngine`` implements ``student.stream_types.StreamEngine`` for one session
(the server makes one per session; the loaded modules are shared, every piece of mutable state
lives in the engine). Design: shared/reference/streaming.md §3 (VAE streaming rules), §4.9
(TTFF/FPS), §6.2 (the core iterator).

Per chunk (``next_chunk``):

1. apply the pending controls (prompt, seed, guidance, pause/resume, reset): controls never
   interrupt a chunk, they land at the next chunk boundary;
2. on a new prompt or guidance with frames already cached, the cached chunks keep the K/V they
   were made with, and the chunks from the switch on see the new prompt. ``recache=True``
   re-caches the window from its clean latents with the new prompt instead
   (``CausalWanModel.recache``, LongLive's KV re-cache); the distilled shapes student never saw
   re-cached K/V in training, and with them 11% of its switched streams went blank
   (BENCHMARKS.md, "Session 20");
3. few-step sampling of one latent chunk against the KV cache (``student.sampler``);
4. append the chunk to the KV cache (sink + rolling window: memory stays flat forever),
   deferred: its K/V are computed within the next chunk's first step, one pass instead of two;
5. decode the chunk ONCE through the VAE's streaming decoder with this session's decode cache
   (the first chunk after a start/reset gives 1 + 4(chunk_frames - 1) frames, later ones
   4 * chunk_frames); a prompt switch keeps the decode cache, so pixels stay continuous.

Noise comes from one CPU generator per session, seeded at start/reset/set_seed, so a seed and a
prompt schedule give the same frames on every run. ``stream(...)`` wraps the engine as a plain
Python iterator for scripts.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from teacher.pipeline import encode_text, video_to_uint8
from teacher.vae import WanVAE
from student.causal_dit import CausalWanModel
from student.config import StudentConfig
from student.kv_cache import KVCache
from student.moe import MoECache, MoEStudent
from student.sampler import draw_noise, sample_chunk, sampling_sigmas, stream_cache
from student.stream_types import FrameChunk, frame_timestamps


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_bytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


class StudentStreamEngine:
    """A live text-to-video stream of the causal student (one session).

    Args:
        student: the loaded ``CausalWanModel`` or two-network ``MoEStudent`` (eval mode; shared
            between engines).
        config: its ``StudentConfig`` (steps, shift, guidance default/range, sink and window).
        text_encoder, tokenizer: the teacher's umT5 encoder and tokenizer (``teacher.t5``,
            ``teacher.tokenizer``).
        vae: the teacher's ``WanVAE``, or a ``student.tiny_decoder.TinyDecoder`` trained for it
            (both decode a stream chunk by chunk with ``new_decode_cache`` / ``decode_chunk``).
        width, height: frame size in pixels (multiples of VAE stride x patch size, e.g. 16).
        fps: video frames per second of video time (timestamps are index / fps).
        steps: student steps per chunk (default ``config.steps``).
        prompt_cache_size: encoded prompts kept (a switch back to a recent prompt is free).
        recache: on a new prompt or guidance, recompute the cached chunks' K/V with it
            (LongLive's KV re-cache, for students trained with it). Default False: the cached
            chunks keep the K/V they were made with, and the chunks from the switch on see the
            new prompt (see step 2 above).

    Devices are the caller's: the student, the encoder and the VAE run where their parameters
    are (latents move between them).
    """

    def __init__(self, student: CausalWanModel | MoEStudent, config: StudentConfig,
                 text_encoder: nn.Module, tokenizer, vae: WanVAE, *, width: int, height: int,
                 fps: float,
                 steps: int | None = None, prompt_cache_size: int = 8, recache: bool = False):
        if not isinstance(student, (CausalWanModel, MoEStudent)):
            raise TypeError(f"student must be a CausalWanModel or MoEStudent, got "
                            f"{type(student).__name__}")
        if student.chunk_frames != config.chunk_frames or student.config != config.dit:
            raise ValueError(f"the student (chunk_frames {student.chunk_frames}) does not match "
                             f"its config {config.name!r} (chunk_frames {config.chunk_frames}); "
                             f"pass the config the student was loaded with")
        if vae.z_dim != student.in_dim:
            raise ValueError(f"the VAE has z_dim={vae.z_dim} but the student in_dim="
                             f"{student.in_dim}; use the teacher's VAE")
        multiple = vae.spatial_factor * student.patch_size[1]
        if width <= 0 or height <= 0 or width % multiple or height % multiple:
            raise ValueError(f"width {width} and height {height} must be positive multiples of "
                             f"{multiple} (VAE stride x patch size)")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        steps = config.steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        self.student, self.config = student, config
        self.text_encoder, self.tokenizer, self.vae = text_encoder, tokenizer, vae
        self.width, self.height, self.fps = int(width), int(height), float(fps)
        self.steps = steps
        self.recache = bool(recache)
        self.sigmas = sampling_sigmas(config, steps)
        self.device = _device_of(student)
        self._latent_shape = (student.in_dim, config.chunk_frames, height // vae.spatial_factor,
                              width // vae.spatial_factor)
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prompt_cache_size = max(1, prompt_cache_size)
        self._started = False
        self._pending: dict[str, object] = {}
        self._clear_stats()

    # ----- controls (stored now, applied at the next chunk boundary) -------------------------

    def start(self, prompt: str, seed: int = 0, guidance: float | None = None) -> None:
        """(Re)start from scratch: caches cleared, frame index 0, prompt_version 0."""
        self._check_prompt(prompt)
        self.check_guidance(guidance)
        self._started, self._paused = True, False
        self._pending = {}
        self._prompt, self._seed = prompt, int(seed)
        self._guidance = None if guidance is None else float(guidance)
        self._prompt_version = 0
        self._restart_video()
        self._clear_stats()

    def set_prompt(self, prompt: str) -> None:
        """Switch the prompt from the next chunk on; prompt_version grows by one per call."""
        self._check_prompt(prompt)
        self._pending["prompt"] = prompt
        self._pending["prompt_bumps"] = int(self._pending.get("prompt_bumps", 0)) + 1

    def set_seed(self, seed: int) -> None:
        """Draw the noise of the chunks from the next one on from ``seed`` (the video goes on)."""
        self._pending["seed"] = int(seed)

    def set_guidance(self, g: float | None) -> None:
        """Set the guidance scale from the next chunk on (None = ``config.guidance_default``)."""
        self.check_guidance(g)
        self._pending["guidance"] = None if g is None else float(g)

    def pause(self) -> None:
        """``next_chunk`` returns None from the next call until ``resume``; state is kept."""
        self._pending["paused"] = True

    def resume(self) -> None:
        self._pending["paused"] = False

    def reset(self) -> None:
        """Restart the video (frame index 0, caches cleared) with the current prompt, seed and
        guidance; prompt_version is kept. Gives the frames a fresh ``start`` with them gives."""
        self._pending["reset"] = True

    # ----- generation ------------------------------------------------------------------------

    def next_chunk(self) -> FrameChunk | None:
        """Generate and decode the next chunk (blocking), or None while paused."""
        if not self._started:
            raise RuntimeError("next_chunk() called before start(prompt); start the stream first")
        self._apply_pending()
        if self._paused:
            return None
        with torch.no_grad():
            return self._generate_chunk()

    def _generate_chunk(self) -> FrameChunk:
        timings: dict[str, float] = {}
        clock = _Clock(self.device, timings)
        guidance = self.guidance
        with clock("text_s"):
            context = self.encode_prompt(self._prompt)
        if (self.recache and self._kv.holds_chunks
                and (self._kv_prompt, self._kv_guidance) != (self._prompt, guidance)):
            with clock("recache_s"):
                self.student.recache(self._kv, context, guidance)
            self._recaches += 1
        self._kv_prompt, self._kv_guidance = self._prompt, guidance
        with clock("denoise_s"):
            noise = draw_noise(self._latent_shape, [self._generator], 1, self.device)
            x0 = sample_chunk(self.student, noise, self.sigmas, context, guidance, self._kv,
                              [self._generator], self.config.num_train_timesteps)
        with clock("kv_append_s"):
            # Deferred: the next chunk's first step computes this chunk's K/V in its own pass.
            self.student.append_chunk(x0, context, guidance, self._kv, defer=True)
        vae_device = _device_of(self.vae)
        with clock("decode_s"):
            video = self.vae.decode_chunk(x0.to(vae_device), self._decode)
            frames = np.ascontiguousarray(video_to_uint8(video)[0].numpy())
        gen_seconds = sum(timings.values())
        timings["total_s"] = gen_seconds
        chunk = FrameChunk(frames=frames, first_frame_index=self._frame_index,
                           timestamps=frame_timestamps(self._frame_index, len(frames), self.fps),
                           prompt_version=self._prompt_version, gen_seconds=gen_seconds)
        if self._frame_index == 0:
            self._first_chunk_seconds = gen_seconds
        self._frame_index += len(frames)
        self._chunk_index += 1
        self._chunks_total += 1
        self._frames_total += len(frames)
        self._gen_seconds_total += gen_seconds
        self.last_timings = timings
        return chunk

    # ----- state ------------------------------------------------------------------------------

    @property
    def guidance(self) -> float:
        """The guidance scale in effect (the user's, or the config default)."""
        return self.config.guidance_default if self._guidance is None else float(self._guidance)

    @property
    def kv_cache(self) -> KVCache | MoECache:
        """This session's KV cache (read-only use: tests and memory reports)."""
        return self._kv

    def cache_bytes(self) -> dict[str, int]:
        """Bytes held by this session's caches: KV cache, VAE decode cache, encoded prompts."""
        return {"kv": self._kv.nbytes(),
                "vae_decode": _tensor_bytes(self._decode.memory.values()),
                "prompts": _tensor_bytes(self._prompt_cache.values())}

    def stats(self) -> dict[str, float | int | str]:
        """Numbers for /metrics: chunks and frames since start, generation FPS (frames per
        second of wall time spent generating, decode included), time to first frame (the first
        chunk's generation time after start/reset, text encoding included), cache sizes."""
        mean = self._gen_seconds_total / self._chunks_total if self._chunks_total else 0.0
        fps = self._frames_total / self._gen_seconds_total if self._gen_seconds_total else 0.0
        sizes = self.cache_bytes() if self._started else {"kv": 0, "vae_decode": 0, "prompts": 0}
        return {"chunks": self._chunks_total, "frames": self._frames_total,
                "mean_gen_seconds": mean, "gen_fps": fps,
                "time_to_first_frame_s": self._first_chunk_seconds,
                "last_chunk_seconds": self.last_timings.get("total_s", 0.0),
                "recaches": self._recaches, "kv_cache_bytes": sizes["kv"],
                "vae_cache_bytes": sizes["vae_decode"],
                "latent_frames_decoded": self._decode.frames_in if self._started else 0,
                "device": str(self.device),
                "steps": self.steps, "chunk_frames": self.config.chunk_frames}

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, {}
        if "prompt" in pending:
            self._prompt = str(pending["prompt"])
            self._prompt_version += int(pending["prompt_bumps"])
        if "guidance" in pending:
            self._guidance = pending["guidance"]
        if "paused" in pending:
            self._paused = bool(pending["paused"])
        if "seed" in pending:
            self._seed = int(pending["seed"])
            self._generator = torch.Generator().manual_seed(self._seed)
        if pending.get("reset"):
            self._restart_video()

    def _restart_video(self) -> None:
        """Fresh KV and VAE caches, frame index 0, noise generator at the seed's start."""
        self._kv = stream_cache(self.student, self.sigmas, 1, self.device,
                                self.config.num_train_timesteps,
                                sink_chunks=self.config.sink_chunks,
                                window_chunks=self.config.window_chunks)
        self._decode = self.vae.new_decode_cache()
        self._kv_prompt: str | None = None
        self._kv_guidance: float | None = None
        self._generator = torch.Generator().manual_seed(self._seed)
        self._frame_index = 0
        self._chunk_index = 0
        self._first_chunk_seconds = 0.0

    def _clear_stats(self) -> None:
        self._chunks_total = self._frames_total = self._recaches = 0
        self._gen_seconds_total = self._first_chunk_seconds = 0.0
        # Seconds per phase of the last chunk: text_s, recache_s (after a prompt or guidance
        # change), denoise_s, kv_append_s, decode_s and their sum total_s. Appends are deferred,
        # so kv_append_s is only their bookkeeping: a chunk's K/V are computed inside the next
        # chunk's first pass per network and counted in that chunk's denoise_s.
        self.last_timings: dict[str, float] = {}

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt -> context [1, text_len, text_dim] on the student's device (LRU-cached).

        The same tensor object is returned for a cached prompt, which is what lets the student
        reuse its cross-attention K/V across chunks.
        """
        if prompt in self._prompt_cache:
            self._prompt_cache.move_to_end(prompt)
            return self._prompt_cache[prompt]
        context = encode_text(self.tokenizer, self.text_encoder, [prompt], self.student.text_len,
                              self.device)
        self._prompt_cache[prompt] = context
        if len(self._prompt_cache) > self._prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return context

    @staticmethod
    def _check_prompt(prompt: str) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {prompt!r} is empty; give a description such as "
                             f"'a red circle moving left'")

    def check_guidance(self, g: float | None) -> None:
        """Raise ValueError naming the trained range if ``g`` (None: the default) is outside it."""
        if g is None:
            return
        try:
            value = float(g)
        except (TypeError, ValueError):
            raise TypeError(f"guidance must be a number or None, got {type(g).__name__}") from None
        low, high = self.config.guidance_range
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"guidance {g!r} is outside the trained range [{low:g}, {high:g}] "
                             f"of student {self.config.name!r}; "
                             f"pass a value in it, or leave it unset for the default "
                             f"{self.config.guidance_default}")


class _Clock:
    """Adds the wall time of ``with clock(name):`` blocks to ``timings[name]`` (GPU-synced)."""

    def __init__(self, device: torch.device, timings: dict[str, float]):
        self.device, self.timings, self._name, self._t0 = device, timings, "", 0.0

    def __call__(self, name: str) -> _Clock:
        self._name = name
        return self

    def __enter__(self) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        self.timings[self._name] = self.timings.get(self._name, 0.0) + time.perf_counter() - self._t0


def stream(engine: StudentStreamEngine, prompt: str, *, seed: int = 0,
           guidance: float | None = None, max_chunks: int | None = None,
           prompt_schedule: Mapping[int, str] | None = None) -> Iterator[FrameChunk]:
    """Iterate over the chunks of a fresh stream (for scripts; the server drives the engine's
    controls itself).

    Args:
        engine: a ``StudentStreamEngine`` (restarted here).
        prompt, seed, guidance: as ``start``.
        max_chunks: stop after this many chunks (None: run until the caller stops iterating).
        prompt_schedule: {chunk number: prompt}: switch to that prompt from that chunk on.
    Yields:
        ``FrameChunk`` per latent chunk, frame indices contiguous from 0.
    """
    schedule = dict(prompt_schedule or {})
    engine.start(prompt, seed=seed, guidance=guidance)
    produced = 0
    while max_chunks is None or produced < max_chunks:
        if produced in schedule:
            engine.set_prompt(schedule[produced])
        chunk = engine.next_chunk()
        if chunk is None:  # paused by another caller of the same engine
            return
        yield chunk
        produced += 1
