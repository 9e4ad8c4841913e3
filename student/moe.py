"""A two-expert student: one causal network for the high-noise steps, one for the low-noise steps.

Why: the teacher is two experts switched by timestep, and a single student network of an
expert's size has to learn both jobs (the layout and motion that expert_high decides, the sharp
detail that expert_low adds). On the shapes world one network drew every square round however it
was trained; a network per noise range, each started from its own adapted expert, keeps both
(BENCHMARKS.md, "Two-expert student"). The Wan2.2 distillations do the same: Wan2.2-Lightning /
LightX2V and TurboDiffusion ship a high- and a low-noise student, and FastVideo's causal
Wan2.2 runs two causal transformers, each with its own KV cache
(shared/reference/distill-anchors.md 2.3).

The student's step at timestep t runs ``high`` when t >= boundary * num_train_timesteps, else
``low``, exactly the teacher's rule. Each network keeps its own KV cache of the finished chunks
(``MoECache``): a finished chunk is appended to both, since both read the past, unless the cache
was made for steps that never run one of them (``new_cache(timesteps=...)``: the 1-step student
runs only ``high``, and appending to ``low`` would cost it a pass per chunk that nothing reads).
``MoEStudent`` has the single student's streaming interface (``new_cache``, ``forward_chunk``,
``append_chunk``, ``recache``, ``forward_teacher_forcing``), so the sampler, the streaming engine
and the evaluation take either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from student.causal_dit import CausalWanModel
from student.kv_cache import KVCache
from teacher.schedule import expert_high_mask

VelocityFn = Callable[..., torch.Tensor]


def _single_range(is_high: torch.Tensor) -> str | None:
    """"high" or "low" when every timestep lies on that side of the boundary, else None."""
    if bool(is_high.all()):
        return "high"
    return None if bool(is_high.any()) else "low"


def route_by_timestep(high: VelocityFn, low: VelocityFn, x_clean: torch.Tensor,
                      x_noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      guidance, boundary: float, chunk_frames: int,
                      num_train_timesteps: int = 1000) -> torch.Tensor:
    """Teacher-forcing velocity of a two-network student, each chunk from its own network.

    ``high``/``low``: ``(x_clean, x_noisy, t, context, guidance) -> v``; ``t`` int64
    [B, n_chunks]; the teacher's rule picks the network (``teacher.schedule.expert_high_mask``).
    A batch inside one range runs one network; a mixed batch (a consistency target straddling
    the boundary) runs both and keeps each chunk's own.
    """
    t = t if t.ndim == 2 else t[:, None].expand(-1, x_noisy.shape[2] // chunk_frames)
    is_high = expert_high_mask(t, boundary, num_train_timesteps)
    single = _single_range(is_high)
    if single is not None:
        return (high if single == "high" else low)(x_clean, x_noisy, t, context, guidance)
    v_high = high(x_clean, x_noisy, t, context, guidance)
    v_low = low(x_clean, x_noisy, t, context, guidance)
    per_frame = is_high.repeat_interleave(chunk_frames, dim=1)[:, None, :, None, None]
    return torch.where(per_frame, v_high, v_low)


@dataclass
class MoECache:
    """The two networks' KV caches of one batch of streams (same chunks, different K/V).

    A network the stream's steps never run has None: nothing reads its past.
    """

    high: KVCache | None
    low: KVCache | None

    def present(self) -> list[KVCache]:
        """The caches that exist (they hold the same chunks)."""
        return [c for c in (self.high, self.low) if c is not None]

    @property
    def num_chunks(self) -> int:
        return self.present()[0].num_chunks

    @property
    def holds_chunks(self) -> bool:
        return self.present()[0].holds_chunks

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.present())


class MoEStudent(nn.Module):
    """Two ``CausalWanModel`` of the same shape, switched by timestep (see module doc).

    Args:
        high, low: the networks of t >= boundary * num_train_timesteps and below.
        boundary: the switch as a fraction of ``num_train_timesteps`` (the teacher's).
    """

    def __init__(self, high: CausalWanModel, low: CausalWanModel, boundary: float,
                 num_train_timesteps: int = 1000):
        super().__init__()
        if high.config != low.config or high.chunk_frames != low.chunk_frames:
            raise ValueError(f"the high and low networks must have one shape and chunking, got "
                             f"{high.config} (chunk_frames {high.chunk_frames}) and {low.config} "
                             f"(chunk_frames {low.chunk_frames})")
        if not 0.0 < boundary < 1.0:
            raise ValueError(f"boundary={boundary!r} must lie strictly between 0 and 1 (the "
                             f"teacher's expert switch as a fraction of the timesteps, A14B: 0.875)")
        self.high, self.low = high, low
        self.boundary, self.num_train_timesteps = float(boundary), int(num_train_timesteps)

    # The single student's descriptive attributes, read by the engine and the evaluation.
    @property
    def config(self):
        return self.low.config

    @property
    def chunk_frames(self) -> int:
        return self.low.chunk_frames

    @property
    def in_dim(self) -> int:
        return self.low.in_dim

    @property
    def patch_size(self):
        return self.low.patch_size

    @property
    def text_len(self) -> int:
        return self.low.text_len

    def network_of(self, t: torch.Tensor) -> CausalWanModel:
        """The network of a chunk step whose timesteps ``t`` lie in one range."""
        single = _single_range(expert_high_mask(t, self.boundary, self.num_train_timesteps))
        if single is None:
            raise ValueError(f"timesteps {t.flatten().tolist()} straddle the boundary "
                             f"{self.boundary * self.num_train_timesteps:g}; a streaming step "
                             f"runs one network")
        return self.high if single == "high" else self.low

    def networks_run_at(self, timesteps: torch.Tensor) -> tuple[str, ...]:
        """Which networks ("high", "low", in that order) steps at ``timesteps`` (int) run."""
        is_high = expert_high_mask(timesteps, self.boundary, self.num_train_timesteps)
        if is_high.numel() == 0:
            raise ValueError("timesteps is empty; pass the timesteps of the stream's steps")
        return tuple(name for name, runs in (("high", bool(is_high.any())),
                                             ("low", not bool(is_high.all()))) if runs)

    def new_cache(self, batch_size: int, device=None, *, timesteps: torch.Tensor | None = None,
                  **policy) -> MoECache:
        """Both networks' caches, or with ``timesteps`` (int, the timesteps the stream's steps
        run at) only those of the networks the steps run."""
        runs = ("high", "low") if timesteps is None else self.networks_run_at(timesteps)
        return MoECache(*(self.expert(name).new_cache(batch_size, device, **policy)
                          if name in runs else None for name in ("high", "low")))

    def expert(self, name: str) -> CausalWanModel:
        return self.high if name == "high" else self.low

    def _pairs(self, cache: MoECache) -> list[tuple[CausalWanModel, KVCache]]:
        return [(network, own) for network, own in ((self.high, cache.high), (self.low, cache.low))
                if own is not None]

    def forward_chunk(self, x_chunk: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      guidance, cache: MoECache) -> torch.Tensor:
        network = self.network_of(t)
        name = "high" if network is self.high else "low"
        own = getattr(cache, name)
        if own is None:
            raise ValueError(f"timesteps {t.flatten().tolist()} run the {name}-noise network, "
                             f"but this cache was made for steps that never run it; make it with "
                             f"new_cache(timesteps=...) of every step the stream takes")
        return network.forward_chunk(x_chunk, t, context, guidance, own)

    def append_chunk(self, x0_chunk: torch.Tensor, context: torch.Tensor, guidance,
                     cache: MoECache, *, t: torch.Tensor | None = None,
                     defer: bool = False) -> None:
        # Deferred, each network computes the chunk's K/V in its own next step's pass: the
        # high one in the next chunk's first step, the low one in its first low-noise step.
        for network, own in self._pairs(cache):
            network.append_chunk(x0_chunk, context, guidance, own, t=t, defer=defer)

    def flush(self, cache: MoECache) -> None:
        for network, own in self._pairs(cache):
            network.flush(own)

    def recache(self, cache: MoECache, context: torch.Tensor, guidance) -> None:
        for network, own in self._pairs(cache):
            network.recache(own, context, guidance)

    def forward_teacher_forcing(self, x_clean: torch.Tensor, x_noisy: torch.Tensor,
                                t: torch.Tensor, context: torch.Tensor,
                                guidance=None) -> torch.Tensor:
        return route_by_timestep(self.high.forward_teacher_forcing,
                                 self.low.forward_teacher_forcing, x_clean, x_noisy, t, context,
                                 guidance, self.boundary, self.chunk_frames,
                                 self.num_train_timesteps)
