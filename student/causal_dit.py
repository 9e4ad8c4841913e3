"""The causal few-step student: a WanModel with block-causal attention over chunks of latent
frames, per-chunk timesteps, a guidance-scale embedding and a KV cache for streaming.

Anchors: shared/reference/distill-anchors.md §2.2 (block-causal
masks, KV cache, rolling window + sink, KV re-cache on a prompt switch, cache-relative RoPE).

Parameter names equal ``teacher.dit.WanModel``'s (the official checkpoint keys) plus
``guidance_embedding.{0,2}.{weight,bias}``, so an expert or the official Wan2.1-T2V-1.3B state
dict loads strictly with only those four keys new. The guidance embedding's last Linear starts at
zero: a fresh student computes exactly what its initialising expert computes.

Three ways to run the same network:

- ``forward``: the whole clip at once, chunk c attending to chunks <= c (a dense mask with SDPA,
  or a flex-attention BlockMask on CUDA: ``student.attention_masks``).
- ``forward_teacher_forcing``: training layout [clean chunks | noisy chunks]; noisy chunk c
  attends to clean chunks < c and to itself, clean chunks run at t = 0.
- ``new_cache`` / ``forward_chunk`` / ``append_chunk`` / ``recache``: streaming, one chunk at a
  time against a ``KVCache`` of finished chunks (equal to the full forward while the stream fits
  the window, tested to 1e-5 in fp32).

Masks and RoPE tables are built once per shape and memoised on the model (bounded, derived data,
never in the state dict); caches are the caller's, so one model serves many streams.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from contextlib import AbstractContextManager

import torch
from torch import nn

from teacher.dit import WanModel, WeightDtypeLinear, grouped, is_fp32_island, sinusoidal_embedding
from teacher.rope import apply_rope
from teacher.weight_files import CheckpointError
from student.attention_masks import (
    AttentionBackend,
    MaskKind,
    dense_mask,
    flex_block_mask,
    resolve_backend,
)
from student.config import StudentConfig
from student.kv_cache import KVCache, PendingChunk, context_stamp, stamp_matches

GUIDANCE_PREFIX = "guidance_embedding."
GUIDANCE_KEYS = tuple(f"{GUIDANCE_PREFIX}{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))
# The guidance scale enters the sinusoid multiplied by this, as timesteps enter it in units of
# 1/1000 of the noise level: the frequency ladder was designed for arguments of order 1..1000,
# so a scale in [1, 10] would otherwise only excite its lowest, almost constant frequencies.
GUIDANCE_SINUSOID_SCALE = 1000.0

# new_cache(window_chunks=MODEL_POLICY) takes the model's window (None means unbounded).
MODEL_POLICY = object()
_MEMO_SIZE = 32  # masks / RoPE tables kept per model (shapes seen in a run are few)


def is_student_fp32_island(name: str) -> bool:
    """The teacher's fp32 islands plus the guidance embedding (it feeds the time embedding)."""
    return is_fp32_island(name) or name.startswith(GUIDANCE_PREFIX)


def _fp32_region(device: torch.device) -> AbstractContextManager:
    """Disable autocast: the conditioning path is fp32 by the official precision policy."""
    return torch.autocast(device_type=device.type, enabled=False)


def _with_prefix(prefix: tuple[torch.Tensor, torch.Tensor] | None, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of an attention: a cached prefix (rotated K, V), if any, then ``k, v``."""
    if prefix is None:
        return k, v
    return torch.cat([prefix[0], k.to(prefix[0].dtype)], 1), torch.cat([prefix[1], v], 1)


def _block_start(block, x: torch.Tensor, e0: torch.Tensor):
    """A ``WanAttentionBlock`` up to its self-attention K/V, in the teacher block's order.

    Returns (h: the modulated, normed input [B, L, dim]; the remaining modulation terms
    (gate_attn, shift_ffn, scale_ffn, gate_ffn) for ``_after_self_attention``; K after
    ``norm_k``, not rotated; V), K and V [B, L, heads, head_dim].
    """
    rows = e0.shape[1]
    shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = block.modulation_terms(e0)
    h = (grouped(block.norm1(x).float(), rows) * (1 + scale_a) + shift_a).flatten(1, 2)
    attn = block.self_attn
    heads = (attn.num_heads, attn.head_dim)
    k = attn.norm_k(attn.k(h)).unflatten(-1, heads)
    return h, (gate_a, shift_f, scale_f, gate_f), k, attn.v(h).unflatten(-1, heads)


def _after_self_attention(block, x: torch.Tensor, attention: torch.Tensor, cross_kv,
                          terms: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The rest of a ``WanAttentionBlock`` once its self-attention output [B, L, dim] is known:
    output projection and gate, cross-attention against the prompt's cached K/V, modulated FFN
    and gate, in the teacher block's order. ``terms``: (gate_attn, shift_ffn, scale_ffn,
    gate_ffn), one row per group of tokens (see ``teacher.dit.grouped``)."""
    gate_a, shift_f, scale_f, gate_f = terms
    rows = gate_a.shape[1]
    x = (grouped(x, rows) + grouped(block.self_attn.o(attention), rows) * gate_a).flatten(1, 2)
    cross = block.cross_attn
    heads = (cross.num_heads, cross.head_dim)
    q_text = cross.norm_q(cross.q(block.norm3(x))).unflatten(-1, heads)
    x = x + cross.o(cross.attend(q_text, *cross_kv))
    h = (grouped(block.norm2(x).float(), rows) * (1 + scale_f) + shift_f).flatten(1, 2)
    return (grouped(x, rows) + grouped(block.ffn(h), rows) * gate_f).flatten(1, 2)


class CausalWanModel(WanModel):
    """Block-causal WanModel over chunks of ``chunk_frames`` latent frames (see module doc).

    Args:
        chunk_frames: latent frames per chunk (all frames of a chunk share its timestep).
        guidance_embedding: add the guidance-scale embedding (keys ``guidance_embedding.*``).
        sink_chunks, window_chunks: default cache policy of ``new_cache`` (window None: the cache
            keeps every chunk).
        **dit_kwargs: ``teacher.config.DiTConfig`` fields (as ``WanModel``); temporal patch 1.
    """

    def __init__(self, *, chunk_frames: int = 1, guidance_embedding: bool = True,
                 sink_chunks: int = 1, window_chunks: int | None = None, **dit_kwargs):
        super().__init__(**dit_kwargs)
        if self.patch_size[0] != 1:
            raise ValueError(f"patch_size={self.patch_size}: the causal student needs a temporal "
                             f"patch of 1 so that chunks are whole latent frames")
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames={chunk_frames} must be >= 1")
        # Validates the policy now rather than at the first new_cache call.
        KVCache(1, chunk_frames, sink_chunks, window_chunks, "cpu")
        self.chunk_frames = chunk_frames
        self.sink_chunks, self.window_chunks = sink_chunks, window_chunks
        self.guidance_embedding = (
            nn.Sequential(WeightDtypeLinear(self.freq_dim, self.dim), nn.SiLU(),
                          WeightDtypeLinear(self.dim, self.dim))
            if guidance_embedding else None
        )
        self.init_guidance_embedding()
        self._memo: OrderedDict[Hashable, object] = OrderedDict()
        # Masks of the full-sequence training paths: "auto" = flex BlockMasks on CUDA, dense
        # bool masks with SDPA elsewhere (student.attention_masks). Not a config field: it
        # changes no number beyond rounding, only speed and memory.
        self.attention_backend: AttentionBackend = "auto"

    @classmethod
    def from_config(cls, config: StudentConfig) -> CausalWanModel:
        """Build (randomly initialised) from a ``StudentConfig``."""
        return cls(**config.model_kwargs())

    # ----- initialisation and loading --------------------------------------------------------

    @torch.no_grad()
    def init_guidance_embedding(self) -> None:
        """(Re)initialise the guidance embedding: first Linear N(0, 0.02) like the time
        embedder, LAST Linear ZERO so the embedding adds exactly 0 until trained.

        Parameters still on the meta device (a model built on meta and filled from an expert)
        are first allocated on the device of the patch embedding, in fp32 (an fp32 island).
        """
        if self.guidance_embedding is None:
            return
        if any(p.is_meta for p in self.guidance_embedding.parameters()):
            device = self.patch_embedding.weight.device
            self.guidance_embedding.to_empty(device=device)
            self.guidance_embedding.float()
        first, last = self.guidance_embedding[0], self.guidance_embedding[2]
        nn.init.normal_(first.weight, std=0.02)
        nn.init.zeros_(first.bias)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def keep_fp32_islands(self) -> CausalWanModel:
        """As ``WanModel.keep_fp32_islands``, plus the guidance embedding."""
        for name, param in self.named_parameters():
            if is_student_fp32_island(name) and param.is_floating_point():
                param.data = param.data.float()
        return self

    def load_expert_state_dict(self, state_dict: dict[str, torch.Tensor], *,
                               assign: bool = False) -> CausalWanModel:
        """Load an expert's (or Wan2.1-T2V-1.3B's) state dict; strict but for the guidance keys.

        Every key of the state dict must be a student key and every student key must be in it,
        except ``guidance_embedding.*``, which are (re)initialised so the embedding adds zero.
        ``assign=True`` takes the tensors without copying (for a model built on meta).

        Raises:
            CheckpointError naming unexpected or missing keys; RuntimeError (from
            ``load_state_dict``) on a shape mismatch.
        """
        result = self.load_state_dict(state_dict, strict=False, assign=assign)
        expected_new = set(GUIDANCE_KEYS) if self.guidance_embedding is not None else set()
        if result.unexpected_keys:
            raise CheckpointError(
                f"expert state dict has key(s) the student lacks: {sorted(result.unexpected_keys)[:5]}"
                f"; it is not a WanModel of this shape (or already a student: load it with "
                f"load_state_dict(strict=True))")
        missing = set(result.missing_keys) - expected_new
        if missing:
            raise CheckpointError(
                f"expert state dict lacks {len(missing)} key(s) of the student: "
                f"{sorted(missing)[:5]}; the file is incomplete or of another architecture")
        self.init_guidance_embedding()
        return self

    @classmethod
    def from_expert_state_dict(cls, state_dict: dict[str, torch.Tensor], *,
                               chunk_frames: int = 1, guidance_embedding: bool = True,
                               sink_chunks: int = 1, window_chunks: int | None = None,
                               **dit_kwargs) -> CausalWanModel:
        """Build a student of the given shape and load an expert's weights into it (strict,
        only the guidance keys new; see ``load_expert_state_dict``)."""
        model = cls(chunk_frames=chunk_frames, guidance_embedding=guidance_embedding,
                    sink_chunks=sink_chunks, window_chunks=window_chunks, **dit_kwargs)
        return model.load_expert_state_dict(state_dict)

    # ----- input checks ------------------------------------------------------------------------

    def _check_latents(self, x: torch.Tensor, name: str) -> int:
        """Validate [B, in_dim, F, H, W] with F a multiple of chunk_frames; returns n_chunks."""
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != self.in_dim:
            raise ValueError(f"{name} has shape {list(getattr(x, 'shape', []))}; expected "
                             f"[B, in_dim={self.in_dim}, F, H, W]")
        if not x.is_floating_point():
            raise TypeError(f"{name} has dtype {x.dtype}; pass floating-point latents")
        frames, h, w = x.shape[2:]
        if frames == 0 or frames % self.chunk_frames:
            raise ValueError(f"{name} has {frames} latent frames, not a positive multiple of "
                             f"chunk_frames={self.chunk_frames}; pad or crop the clip")
        ph, pw = self.patch_size[1:]
        if h % ph or w % pw:
            raise ValueError(f"{name} has H={h}, W={w}, not divisible by the patch size "
                             f"{self.patch_size[1:]}; crop or pad the latents")
        return frames // self.chunk_frames

    def _check_t(self, t: torch.Tensor, batch: int, n_chunks: int, name: str = "t") -> torch.Tensor:
        """t [B, n_chunks] (or [B]: one t for all chunks) -> [B, n_chunks]."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of timesteps, got {type(t).__name__}")
        if t.dtype in (torch.bool, torch.float16, torch.bfloat16) or t.is_complex():
            # Half floats cannot hold timesteps exactly (bf16 rounds 875 to 872 or 880).
            raise TypeError(f"{name} has dtype {t.dtype}; pass integer (int64) timesteps")
        if t.ndim == 1 and t.shape[0] == batch:
            return t[:, None].expand(batch, n_chunks)
        if t.ndim != 2 or tuple(t.shape) != (batch, n_chunks):
            raise ValueError(f"{name} has shape {list(t.shape)}; expected [B={batch}, "
                             f"n_chunks={n_chunks}] (one timestep per chunk) or [B={batch}]")
        return t

    def _check_context(self, context: torch.Tensor, batch: int) -> None:
        if (not isinstance(context, torch.Tensor) or context.ndim != 3
                or context.shape[0] != batch or context.shape[2] != self.config.text_dim):
            raise ValueError(f"context has shape {list(getattr(context, 'shape', []))}; expected "
                             f"[B={batch}, L<={self.text_len}, text_dim={self.config.text_dim}]")

    def _guidance(self, guidance, batch: int, device: torch.device) -> torch.Tensor | None:
        """None, a float, or [B] -> float64 [B] on ``device`` (or None)."""
        if guidance is None:
            return None
        if self.guidance_embedding is None:
            raise ValueError("this model has no guidance embedding (guidance_embedding=False); "
                             "pass guidance=None")
        g = torch.as_tensor(guidance, dtype=torch.float64, device=device)
        if g.ndim == 0:
            g = g.expand(batch)
        if g.shape != (batch,):
            raise ValueError(f"guidance has shape {list(g.shape)}; expected [B={batch}] or a scalar")
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"guidance {g.tolist()} must be finite")
        return g

    # ----- shared pieces -------------------------------------------------------------------------

    def conditioning(self, t: torch.Tensor, guidance: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, S] integer timesteps, guidance float64 [B] or None -> e [B, S, dim],
        e0 [B, S, 6, dim], fp32.

        The guidance embedding is added to the time embedding ``e`` BEFORE ``time_projection``,
        so it modulates every block (through e0) and the head (through e), like the timestep.
        With guidance None, or a zero last layer, this equals ``WanModel.time_conditioning``.
        """
        with _fp32_region(t.device):
            e = self.time_embedding(sinusoidal_embedding(t, self.freq_dim).float())
            if guidance is not None:
                g = sinusoidal_embedding(guidance * GUIDANCE_SINUSOID_SCALE, self.freq_dim)
                e = e + self.guidance_embedding(g.float()).unsqueeze(1)
            e0 = self.time_projection(e).unflatten(-1, (6, self.dim))
        return e.float(), e0.float()

    def _memoised(self, key: Hashable, build):
        """A small LRU of derived tensors (masks, RoPE tables), keyed by shape and device."""
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        value = build()
        self._memo[key] = value
        if len(self._memo) > _MEMO_SIZE:
            self._memo.popitem(last=False)
        return value

    def _rope(self, grid: tuple[int, int, int], frame_start: int, device: torch.device):
        return self._memoised(("rope", grid, frame_start, device),
                              lambda: self.rope.cos_sin(grid, frame_start, device))

    def _mask(self, kind: MaskKind, n_chunks: int, tokens_per_chunk: int, device: torch.device,
              *, allow_flex: bool = True):
        """The self-attention mask of a full-sequence path (memoised per shape and device).

        ``allow_flex=False`` keeps a dense mask whatever the backend: ``recache`` runs a few
        small, varying shapes, where compiling a flex kernel per shape would cost a live
        stream more than the dense mask ever does.
        """
        backend = resolve_backend(self.attention_backend, torch.device(device))
        if backend == "flex" and allow_flex:
            return self._memoised(("flex", kind, n_chunks, tokens_per_chunk, device),
                                  lambda: flex_block_mask(kind, n_chunks, tokens_per_chunk, device))
        return self._memoised((kind, n_chunks, tokens_per_chunk, device),
                              lambda: dense_mask(kind, n_chunks, tokens_per_chunk, device))

    # ----- full-sequence paths (training) ---------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """Block-causal velocity of a whole clip.

        Args:
            x: latents [B, in_dim, F, H, W], F a multiple of ``chunk_frames``.
            t: int64 [B, n_chunks] (one timestep per chunk) or [B] (the same for all chunks).
            context: text features [B, L <= text_len, text_dim] (zero-padded inside).
            guidance: float [B], a scalar, or None (no guidance term).
        Returns:
            velocity [B, out_dim, F, H, W] float32; chunk c depends only on chunks <= c. With a
            single chunk it is bit-identical to ``WanModel.forward`` while the guidance embedding
            adds zero (fresh student).
        """
        n_chunks = self._check_latents(x, "x")
        batch = x.shape[0]
        t = self._check_t(t, batch, n_chunks)
        self._check_context(context, batch)
        tokens, grid = self.embed_video(x)
        e, e0 = self.conditioning(t, self._guidance(guidance, batch, x.device))
        text = self.embed_text(context)
        rope = self._rope(grid, 0, x.device)
        # One chunk attends everywhere: no mask, so the teacher's exact kernel path runs.
        mask = (None if n_chunks == 1 else
                self._mask("causal", n_chunks, tokens.shape[1] // n_chunks, x.device))
        for block in self.blocks:
            tokens = block(tokens, e0, text, rope, mask)
        return self.unpatchify(self.head(tokens, e), grid)

    def forward_teacher_forcing(self, x_clean: torch.Tensor, x_noisy: torch.Tensor,
                                t: torch.Tensor, context: torch.Tensor,
                                guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """Velocity of ``x_noisy`` with clean context (training layout of the causal student).

        The sequence is [clean chunks | noisy chunks]; noisy chunk c attends to clean chunks < c
        and to itself, clean chunk c to clean chunks <= c. Clean chunks run at t = 0 (context
        noise 0, as at inference). Clean and noisy chunk c share RoPE frame positions (they are
        the same frames).

        Args:
            x_clean, x_noisy: [B, in_dim, F, H, W] (same shape).
            t: int64 [B, n_chunks] (or [B]) timesteps of the noisy chunks.
            context, guidance: as ``forward``.
        Returns:
            velocity of x_noisy [B, out_dim, F, H, W] float32.
        """
        n_chunks = self._check_latents(x_noisy, "x_noisy")
        self._check_latents(x_clean, "x_clean")
        if x_clean.shape != x_noisy.shape:
            raise ValueError(f"x_clean {list(x_clean.shape)} and x_noisy {list(x_noisy.shape)} "
                             f"must have the same shape")
        batch = x_noisy.shape[0]
        t = self._check_t(t, batch, n_chunks)
        self._check_context(context, batch)
        clean, grid = self.embed_video(x_clean)
        noisy, _ = self.embed_video(x_noisy)
        tokens = torch.cat([clean, noisy], dim=1)
        # 2 * n_chunks conditioning rows, each over one chunk's tokens: clean at 0, noisy at t.
        t_all = torch.cat([torch.zeros_like(t), t], dim=1)
        e, e0 = self.conditioning(t_all, self._guidance(guidance, batch, x_noisy.device))
        text = self.embed_text(context)
        cos, sin = self._rope(grid, 0, x_noisy.device)
        rope = (torch.cat([cos, cos]), torch.cat([sin, sin]))
        mask = self._mask("teacher_forcing", n_chunks, clean.shape[1] // n_chunks, x_noisy.device)
        for block in self.blocks:
            tokens = block(tokens, e0, text, rope, mask)
        n = clean.shape[1]
        return self.unpatchify(self.head(tokens[:, n:], e[:, n_chunks:]), grid)

    # ----- streaming paths (inference) ---------------------------------------------------------

    def new_cache(self, batch_size: int, device: torch.device | str | None = None, *,
                  sink_chunks: int | None = None, window_chunks=MODEL_POLICY) -> KVCache:
        """An empty ``KVCache`` for ``batch_size`` streams.

        ``device`` defaults to the model's; ``sink_chunks``/``window_chunks`` default to the
        model's policy (``window_chunks=None`` explicitly asks for an unbounded cache).
        """
        device = self.patch_embedding.weight.device if device is None else torch.device(device)
        return KVCache(batch_size=batch_size, chunk_frames=self.chunk_frames,
                       sink_chunks=self.sink_chunks if sink_chunks is None else sink_chunks,
                       window_chunks=self.window_chunks if window_chunks is MODEL_POLICY else window_chunks,
                       device=device)

    def _check_chunk(self, x: torch.Tensor, cache: KVCache, name: str) -> tuple[int, int]:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from new_cache(), got {type(cache).__name__}")
        n_chunks = self._check_latents(x, name)
        if n_chunks != 1:
            raise ValueError(f"{name} has {x.shape[2]} latent frames; one chunk is "
                             f"chunk_frames={self.chunk_frames}")
        if x.shape[0] != cache.batch_size:
            raise ValueError(f"{name} has batch {x.shape[0]} but the cache was made for "
                             f"{cache.batch_size} streams")
        if x.device != cache.device:
            raise ValueError(f"{name} is on {x.device} but the cache on {cache.device}")
        grid_hw = (x.shape[3] // self.patch_size[1], x.shape[4] // self.patch_size[2])
        if cache.grid_hw is not None and cache.grid_hw != grid_hw:
            raise ValueError(f"{name} has a {grid_hw} token grid per frame but the cached frames "
                             f"{cache.grid_hw}; start a new cache for a new resolution")
        return grid_hw

    def _cross_kv(self, context: torch.Tensor, cache: KVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-block cross-attention K/V of ``context``, computed once per prompt.

        Reused while the caller passes the same tensor object unchanged in place (identity and
        ``context_stamp`` are compared; the cache holds a reference, so the identity cannot be
        recycled).
        """
        self._check_context(context, cache.batch_size)
        if (cache.context is context and cache.cross
                and stamp_matches(cache.context_stamp, context)):
            return cache.cross
        text = self.embed_text(context)
        cache.cross = [block.cross_attn.project_kv(text) for block in self.blocks]
        cache.context, cache.context_stamp = context, context_stamp(context)
        return cache.cross

    def _rotated_prefix(self, cache: KVCache) -> list[torch.Tensor] | None:
        """Cached K rotated to positions 0..num_frames-1 (sink first, then window), per block.

        Rebuilt only when the cache changed, so the steps of one chunk share one rotation.
        """
        if cache.num_frames == 0:
            return None
        if cache.rotated is None:
            cos, sin = self._rope((cache.num_frames, *cache.grid_hw), 0, cache.device)
            cache.rotated = [apply_rope(layer.k, cos, sin).to(layer.v.dtype) for layer in cache.layers]
        return cache.rotated

    def _block_kv(self, block, x, e0, cross_kv, rope, prefix_k=None, prefix_v=None,
                  attn_mask=None, need_output=True):
        """``WanAttentionBlock.forward`` with its self-attention K/V exposed.

        Same operations in the same order as the teacher's block (its ``project_qkv`` and
        ``attend``, its cross-attention with precomputed ``project_kv``), with K/V of earlier
        tokens (``prefix_k`` rotated, ``prefix_v``) prepended to the keys. Returns (x or None,
        (k un-rotated, v)) of this block's tokens.
        """
        h, terms, k_raw, v = _block_start(block, x, e0)
        if not need_output:
            return None, (k_raw, v)
        attn = block.self_attn
        q = apply_rope(attn.norm_q(attn.q(h)).unflatten(-1, (attn.num_heads, attn.head_dim)),
                       *rope)
        k = apply_rope(k_raw, *rope)
        v_all = v
        if prefix_k is not None:
            # attend() casts k to v's dtype anyway; the cached rotated K is stored in it.
            k = torch.cat([prefix_k, k.to(prefix_k.dtype)], dim=1)
            v_all = torch.cat([prefix_v, v], dim=1)
        x = _after_self_attention(block, x, attn.attend(q, k, v_all, attn_mask), cross_kv, terms)
        return x, (k_raw, v)

    def _run_against_cache(self, x_chunk, t, g, cross, cache, want_kv: bool):
        """One chunk's pass against the cache (validated inputs: ``t`` [B, 1], ``g`` float64 [B]
        or None, ``cross`` the prompt's per-block K/V). Returns (velocity or None, new K/V)."""
        tokens, grid = self.embed_video(x_chunk)
        e, e0 = self.conditioning(t, g)
        rope = self._rope(grid, cache.num_frames, x_chunk.device)
        prefix = self._rotated_prefix(cache)
        new_kv = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # Appending needs only K/V: the last block's attention output, FFN and the head
            # would be computed for nothing.
            tokens, kv = self._block_kv(
                block, tokens, e0, cross[i], rope,
                prefix[i] if prefix else None, cache.layers[i].v if prefix else None,
                need_output=not (want_kv and i == last))
            if want_kv:
                new_kv.append(kv)
        velocity = None if want_kv else self.unpatchify(self.head(tokens, e), grid)
        return velocity, new_kv

    def _block_with_pending(self, block, x, e0, cross_kv, n, ropes, prefix_pre, prefix_post,
                            is_last):
        """``_block_kv`` over [pending | noisy] tokens (``n`` each): one pass, two attentions.

        The pending rows attend as their own append pass would (to the cache as it is, at their
        position in it); the noisy rows as the next ``forward_chunk`` would after that append
        (to the cache once the pending chunk has joined it and the window policy has run).
        Every other operation is per token and runs once over both. Returns (x, or only the
        noisy rows in the last block, where the pending rows' output is never read; (k
        un-rotated, v) of the pending rows).
        """
        rope_pending, rope_pending_post, rope_noisy = ropes
        h, terms, k_raw, v = _block_start(block, x, e0)
        attn = block.self_attn
        q_raw = attn.norm_q(attn.q(h)).unflatten(-1, (attn.num_heads, attn.head_dim))
        k_pending, v_pending = k_raw[:, :n], v[:, :n]
        own_k = torch.cat([apply_rope(k_pending, *rope_pending_post),
                           apply_rope(k_raw[:, n:], *rope_noisy)], 1)
        y = attn.attend(apply_rope(q_raw[:, n:], *rope_noisy), *_with_prefix(prefix_post, own_k, v))
        if is_last:
            x, terms = x[:, n:], tuple(m[:, 1:] for m in terms)
        else:
            y_pending = attn.attend(
                apply_rope(q_raw[:, :n], *rope_pending),
                *_with_prefix(prefix_pre, apply_rope(k_pending, *rope_pending), v_pending))
            y = torch.cat([y_pending, y], 1)
        return _after_self_attention(block, x, y, cross_kv, terms), (k_pending, v_pending)

    def _forward_with_pending(self, x_chunk, t, g, cross, cache):
        """The velocity of ``x_chunk`` and the K/V of the cache's pending chunk in one pass,
        then the pending chunk committed: what ``flush`` then ``forward_chunk`` compute, with
        one pass of 2n tokens instead of two of n. At streaming sizes on a CPU a pass is mostly
        per-operation overhead, paid here once (shapes student: 7.1 ms for the joint pass
        against 4.3 + 5.6 ms for the two it replaces)."""
        pending = cache.pending
        device = x_chunk.device
        tokens_pending, grid = self.embed_video(pending.latents)
        tokens_noisy, _ = self.embed_video(x_chunk)
        n = tokens_pending.shape[1]
        e, e0 = self.conditioning(torch.stack([pending.t, t[:, 0]], 1), g)
        # Where the frames sit after the append: the pending chunk after the old chunks the
        # window keeps, the noisy chunk after it (cache-relative RoPE, see student.kv_cache).
        head, tail = cache.kept_by_next_append()
        kept_frames = (head + tail) * self.chunk_frames
        ropes = (self._rope(grid, cache.num_frames, device),
                 self._rope(grid, kept_frames, device),
                 self._rope(grid, kept_frames + self.chunk_frames, device))
        rotated = self._rotated_prefix(cache)
        prefix_pre = (None if rotated is None else
                      [(k, layer.v) for k, layer in zip(rotated, cache.layers)])
        if head + tail == cache.num_chunks:  # the append drops nothing
            prefix_post = prefix_pre
        elif kept_frames == 0:
            prefix_post = None
        else:
            per_chunk = self.chunk_frames * cache.tokens_per_frame
            cos, sin = self._rope((kept_frames, *cache.grid_hw), 0, device)

            def kept(x: torch.Tensor) -> torch.Tensor:
                return torch.cat([x[:, :head * per_chunk], x[:, x.shape[1] - tail * per_chunk:]], 1)

            prefix_post = [(apply_rope(kept(layer.k), cos, sin).to(layer.v.dtype), kept(layer.v))
                           for layer in cache.layers]
        x = torch.cat([tokens_pending, tokens_noisy], 1)
        pending_kv = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, kv = self._block_with_pending(
                block, x, e0, cross[i], n, ropes,
                prefix_pre[i] if prefix_pre else None, prefix_post[i] if prefix_post else None,
                i == last)
            pending_kv.append(kv)
        velocity = self.unpatchify(self.head(x, e[:, 1:]), grid)
        cache.pending = None
        cache.extend(pending_kv, pending.latents, pending.t)
        return velocity

    def _check_stream_inputs(self, x_chunk, t, guidance, cache, name):
        """Validated (t [B, 1], guidance float64 [B] or None, token grid) of a chunk call."""
        grid_hw = self._check_chunk(x_chunk, cache, name)
        batch = x_chunk.shape[0]
        return (self._check_t(t, batch, 1), self._guidance(guidance, batch, x_chunk.device),
                grid_hw)

    def _can_fold(self, cache: KVCache, context: torch.Tensor, g: torch.Tensor | None) -> bool:
        """Whether the pending chunk runs with this call's prompt and guidance (else it is
        flushed first, with its own)."""
        pending = cache.pending
        same_guidance = (pending.guidance is None and g is None) or (
            pending.guidance is not None and g is not None and torch.equal(pending.guidance, g))
        return (same_guidance and cache.context is context and bool(cache.cross)
                and stamp_matches(cache.context_stamp, context))

    def forward_chunk(self, x_chunk: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      guidance: torch.Tensor | float | None, cache: KVCache) -> torch.Tensor:
        """Velocity of the next chunk, attending to the cached chunks and to itself.

        Args:
            x_chunk: [B, in_dim, chunk_frames, H, W] noisy latents of the chunk.
            t: int64 [B] (or [B, 1]) timestep of the chunk.
            context: [B, L, text_dim]; its cross-attention K/V are cached in ``cache`` and
                reused while the same tensor is passed.
            guidance: float [B], a scalar or None.
            cache: the stream's ``KVCache``. Not modified, except the derived caches and a
                pending chunk (``append_chunk(defer=True)``), whose K/V this pass computes
                alongside and appends.
        Returns:
            velocity [B, out_dim, chunk_frames, H, W] float32. The chunk's RoPE frame positions
            start at ``cache.num_frames`` (cache-relative, bounded).
        """
        t, g, _ = self._check_stream_inputs(x_chunk, t, guidance, cache, "x_chunk")
        if cache.pending is not None:
            self._check_context(context, cache.batch_size)
            if self._can_fold(cache, context, g):
                return self._forward_with_pending(x_chunk, t, g, cache.cross, cache)
            self.flush(cache)
        cross = self._cross_kv(context, cache)
        velocity, _ = self._run_against_cache(x_chunk, t, g, cross, cache, False)
        return velocity

    def append_chunk(self, x0_chunk: torch.Tensor, context: torch.Tensor,
                     guidance: torch.Tensor | float | None, cache: KVCache, *,
                     t: torch.Tensor | None = None, defer: bool = False) -> None:
        """Run a finished chunk and append its K/V (and latents) to ``cache``.

        Args:
            x0_chunk: [B, in_dim, chunk_frames, H, W] clean latents of the chunk.
            context, guidance: as ``forward_chunk``.
            cache: updated in place; the sink + window policy is applied after the append.
            t: int64 [B] timestep to run the chunk at; default 0 (context noise 0, Self-Forcing).
            defer: keep the chunk pending instead: the next ``forward_chunk`` computes its K/V in
                its own pass (one pass saved per chunk; same numbers up to float rounding). Any
                other use of the cache (``append_chunk``, ``recache``, ``flush``), or a
                ``forward_chunk`` with another prompt tensor or guidance, first runs it on its
                own with the prompt and guidance given here.
        """
        if t is None:
            t = torch.zeros(x0_chunk.shape[0], dtype=torch.int64, device=x0_chunk.device)
        self.flush(cache)
        t, g, grid_hw = self._check_stream_inputs(x0_chunk, t, guidance, cache, "x0_chunk")
        cross = self._cross_kv(context, cache)
        cache.grid_hw = grid_hw
        if defer:
            cache.pending = PendingChunk(x0_chunk.detach().float(), t[:, 0], g)
            return
        _, new_kv = self._run_against_cache(x0_chunk, t, g, cross, cache, True)
        cache.extend(new_kv, x0_chunk, t[:, 0])

    def flush(self, cache: KVCache) -> None:
        """Compute the K/V of a pending chunk (``append_chunk(defer=True)``) on their own and
        append them, with the prompt and guidance it was appended with; nothing if none."""
        pending = cache.pending
        if pending is None:
            return
        cache.pending = None
        _, new_kv = self._run_against_cache(pending.latents, pending.t[:, None], pending.guidance,
                                            cache.cross, cache, True)
        cache.extend(new_kv, pending.latents, pending.t)

    def recache(self, cache: KVCache, context: torch.Tensor,
                guidance: torch.Tensor | float | None) -> None:
        """Recompute every cached chunk's K/V for a new prompt (and guidance): LongLive's KV
        re-cache, so a prompt switch continues smoothly from the same clean frames.

        The cached clean latents run as one block-causal sequence (cached chunk c attends to
        cached chunks <= c) at their stored timesteps and cache-relative positions. The
        cross-attention K/V of ``context`` replace the old prompt's. A pending chunk is first
        appended with its own prompt (then recomputed with the others).
        """
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from new_cache(), got {type(cache).__name__}")
        self.flush(cache)
        cross = self._cross_kv(context, cache)
        if cache.num_frames == 0:
            return
        x = cache.latents
        n_chunks = cache.num_chunks
        g = self._guidance(guidance, cache.batch_size, x.device)
        tokens, grid = self.embed_video(x)
        e, e0 = self.conditioning(cache.chunk_t, g)
        rope = self._rope(grid, 0, x.device)
        mask = (None if n_chunks == 1 else
                self._mask("causal", n_chunks, tokens.shape[1] // n_chunks, x.device,
                           allow_flex=False))
        new_kv = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            tokens, kv = self._block_kv(block, tokens, e0, cross[i], rope, attn_mask=mask,
                                        need_output=i != last)
            new_kv.append(kv)
        cache.replace_kv(new_kv)


def build_student(config: StudentConfig) -> CausalWanModel:
    """A randomly initialised student of ``config`` (wrap in ``torch.device('meta')`` to only
    describe it)."""
    return CausalWanModel.from_config(config)
