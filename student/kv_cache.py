"""The causal student's streaming state: self-attention K/V of finished chunks, cross-attention
K/V of the prompt, and the clean latents needed to rebuild both.

Layout of the cached sequence (tokens frame-major, as the patch embedding orders them)::

    [ sink chunks | window chunks ]        positions 0 .. num_frames-1, in this order

Only WHOLE chunks enter and leave. The policy after every append: keep the first ``sink_chunks``
chunks forever and the latest ``window_chunks`` chunks; drop those in between. RoPE positions
are not stored with K: the model rotates K by its index in the cache (sink frames first, then the
window, then the chunk being generated), so positions stay below
``(sink + window + 1) * chunk_frames`` for an unbounded stream and equal the training positions
while nothing has been dropped. That is why K is kept UN-rotated; ``rotated`` is a derived copy
(rebuilt once per change of the cache, reused by every denoising step of the next chunk).

This module holds data and the window policy only; all model math is in ``student.causal_dit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def context_stamp(context: torch.Tensor) -> int | torch.Tensor:
    """What later tells whether ``context`` was changed in place: its version counter, or for an
    inference tensor (``torch.inference_mode``), which has none, a copy of its values."""
    if context.is_inference():
        return context.clone()
    return context._version


def stamp_matches(stamp: int | torch.Tensor | None, context: torch.Tensor) -> bool:
    if isinstance(stamp, torch.Tensor):
        return context.is_inference() and torch.equal(stamp, context)
    return not context.is_inference() and stamp == context._version


@dataclass(eq=False)
class LayerKV:
    """Self-attention K/V of the cached tokens of one block.

    k: [B, N, heads, head_dim] after ``norm_k``, NOT rotated, in the weight dtype.
    v: [B, N, heads, head_dim] in the weight dtype.
    """

    k: torch.Tensor
    v: torch.Tensor


@dataclass(eq=False)
class PendingChunk:
    """A finished chunk appended with ``defer=True`` whose K/V are not computed yet.

    latents: clean latents [B, C, chunk_frames, H, W] fp32.
    t: int64 [B], the timestep it runs at.
    guidance: float64 [B] or None, the guidance it runs with (its prompt is the cache's
        ``context``, whose cross-attention K/V ``cross`` hold).
    """

    latents: torch.Tensor
    t: torch.Tensor
    guidance: torch.Tensor | None


@dataclass(eq=False)
class KVCache:
    """Streaming state of one batch of videos through a ``CausalWanModel``.

    Create with ``CausalWanModel.new_cache``; fill with ``append_chunk``; read by
    ``forward_chunk``; rebuilt for a new prompt by ``recache``. One cache serves one stream: it is
    never shared between sessions, while the model is.

    Attributes:
        batch_size, chunk_frames, sink_chunks: fixed at creation.
        window_chunks: chunks of the rolling window (None: unbounded, nothing is dropped).
        device: where every tensor lives.
        layers: one ``LayerKV`` per block (empty until the first append).
        latents: clean latents of the cached frames [B, C, num_frames, H, W] fp32 (for recache).
        frame_index: int64 [num_frames], the global frame index of every cached frame.
        chunk_t: int64 [B, num_chunks], the timestep every cached chunk was run at (0: clean).
        chunks_seen: chunks appended since creation / ``clear`` (the next chunk's global index).
        grid_hw: (H', W') token grid of a frame, fixed by the first append.
        rotated: derived K rotated to the cache positions, one [B, N, heads, head_dim] tensor per
            block in the dtype of V, or None when stale.
        context / context_stamp / cross: the prompt the cross-attention K/V were computed for
            (held by reference and compared by identity and ``context_stamp``: its in-place
            version, or a copy of an inference tensor) and those K/V, one (k, v) pair of
            [B, text_len, heads, head_dim] per block.
        pending: a chunk appended with ``defer=True``, not yet in ``layers`` nor counted by
            ``num_frames``; the model computes its K/V within the next pass that reads the cache.
    """

    batch_size: int
    chunk_frames: int
    sink_chunks: int
    window_chunks: int | None
    device: torch.device
    layers: list[LayerKV] = field(default_factory=list)
    latents: torch.Tensor | None = None
    frame_index: torch.Tensor | None = None
    chunk_t: torch.Tensor | None = None
    chunks_seen: int = 0
    grid_hw: tuple[int, int] | None = None
    rotated: list[torch.Tensor] | None = None
    context: torch.Tensor | None = None
    context_stamp: int | torch.Tensor | None = None
    cross: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    pending: PendingChunk | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_frames < 1 or self.sink_chunks < 0:
            raise ValueError(f"KVCache: batch_size={self.batch_size}, chunk_frames="
                             f"{self.chunk_frames} must be >= 1 and sink_chunks="
                             f"{self.sink_chunks} >= 0")
        if self.window_chunks is not None and self.window_chunks < 1:
            raise ValueError(f"KVCache: window_chunks={self.window_chunks} must be >= 1, or None "
                             f"for an unbounded cache")
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            # Tensors report cuda:N; compare like with like.
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device

    # ------------------------------------------------------------------------- sizes
    @property
    def num_frames(self) -> int:
        """Latent frames in the cache (also the RoPE position of the next chunk's first frame)."""
        return 0 if self.latents is None else int(self.latents.shape[2])

    @property
    def num_chunks(self) -> int:
        return self.num_frames // self.chunk_frames

    @property
    def holds_chunks(self) -> bool:
        """Whether any chunk was appended since creation / ``clear``, pending or not."""
        return self.num_frames > 0 or self.pending is not None

    @property
    def tokens_per_frame(self) -> int:
        return 0 if self.grid_hw is None else self.grid_hw[0] * self.grid_hw[1]

    @property
    def capacity_chunks(self) -> int | None:
        """Most chunks the cache ever holds (None: unbounded)."""
        return None if self.window_chunks is None else self.sink_chunks + self.window_chunks

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (K, V, rotated K, latents, prompt K/V and its copy,
        indices)."""
        tensors: list[torch.Tensor] = [t for layer in self.layers for t in (layer.k, layer.v)]
        tensors += list(self.rotated or [])
        tensors += [t for pair in self.cross for t in pair]
        tensors += [t for t in (self.latents, self.frame_index, self.chunk_t, self.context_stamp)
                    if isinstance(t, torch.Tensor)]
        if self.pending is not None:
            tensors += [self.pending.latents, self.pending.t]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------------- updates
    def clear(self) -> None:
        """Forget every chunk and the prompt (a new video); the geometry stays."""
        self.layers, self.latents, self.frame_index, self.chunk_t = [], None, None, None
        self.chunks_seen, self.grid_hw, self.rotated = 0, None, None
        self.context, self.context_stamp, self.cross = None, None, []
        self.pending = None

    def extend(self, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], latents: torch.Tensor,
               t: torch.Tensor) -> None:
        """Append one finished chunk, then apply the sink + window policy.

        Args:
            layer_kv: per block (k un-rotated, v), each [B, chunk_frames * H'W', heads, head_dim].
            latents: the chunk's clean latents [B, C, chunk_frames, H, W].
            t: int64 [B], the timestep the chunk was run at.
        """
        if latents.shape[2] != self.chunk_frames:
            raise ValueError(f"a cached chunk has {self.chunk_frames} latent frames, got "
                             f"{latents.shape[2]}")
        # Cached context is stop-gradient (as in Self-Forcing's cache update): detaching also
        # keeps an autograd graph from staying alive across chunks of a long stream.
        layer_kv = [(k.detach(), v.detach()) for k, v in layer_kv]
        first = self.chunks_seen * self.chunk_frames
        index = torch.arange(first, first + self.chunk_frames, device=self.device)
        latents = latents.detach().float()
        if not self.layers:
            self.layers = [LayerKV(k, v) for k, v in layer_kv]
            self.latents, self.frame_index, self.chunk_t = latents, index, t[:, None].clone()
        else:
            self.layers = [LayerKV(torch.cat([old.k, k], 1), torch.cat([old.v, v], 1))
                           for old, (k, v) in zip(self.layers, layer_kv)]
            self.latents = torch.cat([self.latents, latents], 2)
            self.frame_index = torch.cat([self.frame_index, index])
            self.chunk_t = torch.cat([self.chunk_t, t[:, None]], 1)
        self.chunks_seen += 1
        self.rotated = None
        self._drop_outside_window()

    def kept_by_next_append(self) -> tuple[int, int]:
        """(head, tail): the cached chunks that stay after one more ``extend`` are the first
        ``head`` and the last ``tail`` (the policy of ``_drop_outside_window``, in advance: a
        deferred chunk's pass needs the layout its K/V will join)."""
        n = self.num_chunks
        capacity = self.capacity_chunks
        if capacity is None or n + 1 <= capacity:
            return n, 0
        return self.sink_chunks, self.window_chunks - 1

    def replace_kv(self, layer_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Swap in recomputed K/V for the same cached frames (prompt switch)."""
        n_tokens = self.num_frames * self.tokens_per_frame
        if len(layer_kv) != len(self.layers) or any(k.shape[1] != n_tokens for k, _ in layer_kv):
            raise ValueError("recomputed K/V do not cover the cached frames; this is a bug in the "
                             "caller (recache must run over cache.latents)")
        self.layers = [LayerKV(k.detach(), v.detach()) for k, v in layer_kv]
        self.rotated = None

    def _drop_outside_window(self) -> None:
        """Keep the first ``sink_chunks`` and the last ``window_chunks`` chunks."""
        capacity = self.capacity_chunks
        if capacity is None or self.num_chunks <= capacity:
            return
        frames_sink = self.sink_chunks * self.chunk_frames
        frames_window = self.window_chunks * self.chunk_frames
        tokens_sink = frames_sink * self.tokens_per_frame
        tokens_window = frames_window * self.tokens_per_frame

        def keep(x: torch.Tensor, dim: int, head: int, tail: int) -> torch.Tensor:
            # Slices of the old tensors are copied into one new tensor, so the dropped part is
            # freed (a view would keep the whole old storage alive and memory would grow).
            return torch.cat([x.narrow(dim, 0, head), x.narrow(dim, x.shape[dim] - tail, tail)], dim)

        self.layers = [LayerKV(keep(l.k, 1, tokens_sink, tokens_window),
                               keep(l.v, 1, tokens_sink, tokens_window)) for l in self.layers]
        self.latents = keep(self.latents, 2, frames_sink, frames_window)
        self.frame_index = keep(self.frame_index, 0, frames_sink, frames_window)
        self.chunk_t = keep(self.chunk_t, 1, self.sink_chunks, self.window_chunks)
