"""The Wan DiT (``WanModel``): one expert of Wan2.2-T2V-A14B, written from the reference.

Facts: shared/reference/wan22-a14b.md §1.3 (architecture, keys), §5 (precision map, pitfalls).
Parameter names equal the official checkpoint keys, so an official expert loads with
``load_state_dict(strict=True)``; ``teacher.convert_dit`` maps the Diffusers layout.

Precision policy (the official one, reproduced without autocast):

- Linear/conv layers run in their weight dtype: ``WeightDtypeLinear`` casts its input to it, so
  a bf16 model takes fp32 latents and context and runs its big matmuls in bf16.
- fp32 islands, kept fp32 even in a bf16 model (``WanModel.keep_fp32_islands``): the time
  embedding and projection, every modulation table (``blocks.N.modulation``, ``head.modulation``)
  and the head. Their math runs with autocast disabled, so an outer ``torch.autocast`` cannot
  round them either.
- Always fp32 or wider, whatever the weights: the sinusoid (float64), LayerNorms and the q/k
  RMSNorm statistics (fp32), RoPE (float64), modulation sums and the residual stream (fp32).
- Attention runs in the dtype of v (bf16 in a bf16 model, like the official flash-attention path).

Reuse by the causal student: the blocks take an optional boolean ``attn_mask`` for
self-attention and conditioning ``e0`` of shape ``[B, S, 6, dim]`` with one row per token group
(S = 1, one per latent frame, or one per token; ``grouped``), and the self-attention exposes
``project_qkv`` and ``attend`` separately so a KV cache can sit between them.
"""

from __future__ import annotations

import functools
import math
from contextlib import AbstractContextManager
from dataclasses import asdict, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from teacher.config import DiTConfig
from teacher.rope import WanRope3D, apply_rope

# Official config.json keys that carry no architecture information for this implementation.
_CONFIG_JSON_BOOKKEEPING = ("_class_name", "_diffusers_version")
# Fields every official config.json stores (the rest take the official constructor defaults).
_CONFIG_JSON_REQUIRED = ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "in_dim",
                         "out_dim", "text_len", "eps")

# Parameter-name prefixes of the official fp32 islands (reference §5, precision map).
FP32_ISLAND_PREFIXES = ("time_embedding.", "time_projection.", "head.")


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(on_cuda: bool):
    """flex_attention, compiled once on CUDA (eager flex materialises the scores; it is used on
    the CPU only by tests that check the BlockMask path against the dense one)."""
    return _compiled_flex_attention() if on_cuda else flex_attention


def is_fp32_island(name: str) -> bool:
    """True for a WanModel parameter the official code keeps in fp32 in a bf16 model.

    The time embedding/projection, the head, and every ``modulation`` table.
    """
    return name.startswith(FP32_ISLAND_PREFIXES) or name.endswith("modulation")


def _fp32_region(device: torch.device) -> AbstractContextManager:
    """Disable autocast: the official code forces fp32 here (autocast(dtype=float32))."""
    return torch.autocast(device_type=device.type, enabled=False)


def grouped(x: torch.Tensor, rows: int) -> torch.Tensor:
    """View tokens [B, L, ...] as [B, rows, L/rows, ...]: groups sharing one conditioning row.

    Conditioning (timestep) rows apply to consecutive equal groups of tokens: 1 row for all
    tokens (the teacher), one per latent frame (tokens are frame-major, so a frame's H'*W'
    tokens are consecutive), or one per token. Broadcasting per group instead of repeating the
    rows keeps per-frame conditioning at [B, F, 6, dim] (a per-token e0 of an A14B expert at
    720p would be 75,600 x 30,720 fp32 values, 9.3 GB).
    """
    if x.shape[1] % rows != 0:
        raise ValueError(f"{rows} conditioning rows do not divide the {x.shape[1]} tokens")
    return x.unflatten(1, (rows, x.shape[1] // rows))


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep sinusoid ``[*t.shape, dim]``, float64, cos half first.

    ``emb[..., j] = cos(t * 10000**(-j/half))`` and ``emb[..., half + j] = sin(...)``.
    float64 on purpose: computed in fp32 (as Diffusers does) the embedding is off by up to
    3.6e-5 at t=875, which moves the model output visibly in a parity test (reference §6.3).
    """
    if dim % 2 != 0:
        raise ValueError(f"freq_dim={dim} must be even (cos and sin halves)")
    half = dim // 2
    freqs = torch.pow(
        torch.tensor(10000.0, dtype=torch.float64, device=t.device),
        -torch.arange(half, dtype=torch.float64, device=t.device) / half,
    )
    args = t.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class WeightDtypeLinear(nn.Linear):
    """``nn.Linear`` that first casts its input to its weight dtype.

    Why: the official model runs its Linears in bf16 via autocast while the residual stream and
    modulated activations are fp32; without autocast, an fp32 input meeting bf16 weights would
    be a dtype error. Same parameter names as ``nn.Linear`` (``weight``, ``bias``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class WeightDtypeConv3d(nn.Conv3d):
    """``nn.Conv3d`` that first casts its input (fp32 latents) to its weight dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (also for bf16 inputs/weights), returned in the input dtype.

    Official behaviour: ``layer_norm(x.float()).type_as(x)``. Keeping the input dtype matters
    once: the patch embedding output of a bf16 model is bf16, so the first block's norm1 output
    is rounded to bf16 exactly as in the official code; afterwards the stream is fp32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class WanRMSNorm(nn.Module):
    """RMSNorm over the whole last axis (for q/k: across ALL heads, weight ``[dim]``).

    The mean square is taken in fp32 (a bf16 sum of 5120 squares loses digits); the normalised
    value is cast back to the input dtype before the weight multiplies it, as officially.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class WanSelfAttention(nn.Module):
    """Multi-head self-attention with q/k RMSNorm across heads and 3D RoPE.

    Keys: ``q``, ``k``, ``v``, ``o`` (Linear dim->dim with bias), ``norm_q``, ``norm_k``
    (weight ``[dim]``; absent when ``qk_norm=False``).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q = WeightDtypeLinear(dim, dim)
        self.k = WeightDtypeLinear(dim, dim)
        self.v = WeightDtypeLinear(dim, dim)
        self.o = WeightDtypeLinear(dim, dim)
        # The norms act on the full dim-wide vector BEFORE the split into heads (reference §5
        # item 5): a per-head norm would be a different model.
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def project_qkv(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [B, L, dim] -> q, k, v, each [B, L, heads, head_dim].

        q and k are normed and rotated (fp32 out of RoPE); v stays in the weight dtype.
        ``rope`` is ``(cos, sin)`` float64 [L, head_dim/2] for these L tokens.
        """
        q = apply_rope(self._heads(self.norm_q(self.q(x))), *rope)
        k = apply_rope(self._heads(self.norm_k(self.k(x))), *rope)
        v = self._heads(self.v(x))
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        """Scaled dot-product attention; q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] -> [B, Lq, dim].

        ``attn_mask``: bool, True = may attend, broadcastable to [B, H, Lq, Lk] (SDPA's
        convention); or a flex-attention ``BlockMask`` (the causal student's long training
        sequences on CUDA); None attends everywhere (the teacher). Runs in v's dtype: the
        official flash-attention path casts q/k (fp32 after RoPE) to the half dtype the same way.
        Softmax scale 1/sqrt(head_dim) (the SDPA default, as officially).
        """
        dtype = v.dtype
        q, k, v = q.to(dtype).transpose(1, 2), k.to(dtype).transpose(1, 2), v.transpose(1, 2)
        if isinstance(attn_mask, BlockMask):
            out = _flex_attention(q.is_cuda)(q, k, v, block_mask=attn_mask)
            return out.transpose(1, 2).flatten(2)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be bool (True = attend), got {attn_mask.dtype}")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.transpose(1, 2).flatten(2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` [B, L, dim] -> [B, L, dim] in the weight dtype."""
        return self.o(self.attend(*self.project_qkv(x, rope), attn_mask))


class WanCrossAttention(WanSelfAttention):
    """Attention from video tokens to the embedded text: no RoPE and NO mask.

    All ``text_len`` context rows are attended to, including the embedded zero padding (whose
    rows are non-zero after the text MLP's biases): that is how the official model was trained.
    """

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded context [B, Lc, dim] -> k, v [B, Lc, heads, head_dim] (reusable across steps)."""
        return self._heads(self.norm_k(self.k(context))), self._heads(self.v(context))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``x`` [B, L, dim], ``context`` [B, text_len, dim] -> [B, L, dim]."""
        q = self._heads(self.norm_q(self.q(x)))
        k, v = self.project_kv(context)
        return self.o(self.attend(q, k, v))


class WanAttentionBlock(nn.Module):
    """One DiT block: modulated self-attention, plain cross-attention, modulated FFN.

    Keys: ``modulation`` [1, 6, dim] (fp32 island), ``self_attn.*``, ``cross_attn.*``,
    ``norm3.{weight,bias}`` (the affine cross-attention LayerNorm: the official name; Diffusers
    calls it norm2), ``ffn.0``/``ffn.2``. ``norm1`` (before self-attention) and ``norm2``
    (before the FFN) have no parameters.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: bool,
                 cross_attn_norm: bool, eps: float):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            WeightDtypeLinear(dim, ffn_dim), nn.GELU(approximate="tanh"), WeightDtypeLinear(ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def modulation_terms(self, e0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``e0`` [B, S, 6, dim] -> six fp32 tensors [B, S, 1, dim] (broadcast over a token
        group, see ``grouped``), in the order shift_attn, scale_attn, gate_attn, shift_ffn,
        scale_ffn, gate_ffn.

        The table is ADDED to the projected time (reference §5 item 3), in fp32.
        """
        terms = self.modulation.float().unsqueeze(0) + e0.float()  # [B, S, 6, dim]
        return terms.unsqueeze(2).unbind(dim=3)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            x: [B, L, dim] residual stream (fp32, or the patch-embedding dtype before block 0).
            e0: [B, S, 6, dim] fp32 projected time (``WanModel.time_conditioning``); each of the
                S rows conditions L/S consecutive tokens: S = 1 (one timestep), F' (one per
                latent frame) or L (one per token).
            context: [B, text_len, dim] embedded text.
            rope: (cos, sin) float64 [L, head_dim/2].
            attn_mask: optional bool self-attention mask (True = attend), broadcastable to
                [B, heads, L, L]; None for the teacher.
        Returns [B, L, dim] fp32.
        """
        # Only elementwise math below is fp32 by construction (explicit .float(), type
        # promotion); the Linears inside attention/FFN run in their weight dtype (or whatever an
        # outer autocast picks), as in the official block.
        rows = e0.shape[1]
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation_terms(e0)
        # (1 + scale), not scale; the modulated input is fp32.
        h = grouped(self.norm1(x).float(), rows) * (1 + scale_a) + shift_a
        y = self.self_attn(h.flatten(1, 2), rope, attn_mask)
        # A bf16 y times the fp32 gate promotes: the residual stream is fp32 from here on.
        x = (grouped(x, rows) + grouped(y, rows) * gate_a).flatten(1, 2)
        # Cross-attention has no modulation and no gate.
        x = x + self.cross_attn(self.norm3(x), context)
        h = grouped(self.norm2(x).float(), rows) * (1 + scale_f) + shift_f
        y = self.ffn(h.flatten(1, 2))
        return (grouped(x, rows) + grouped(y, rows) * gate_f).flatten(1, 2)


class WanHead(nn.Module):
    """Final modulated LayerNorm + Linear to patch pixels (fp32 island).

    Keys: ``modulation`` [1, 2, dim], ``head.{weight,bias}`` [out_dim * prod(patch), dim].
    """

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.head = WeightDtypeLinear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``x`` [B, L, dim], ``e`` [B, S, dim] time embedding -> [B, L, out_dim*prod(patch)] fp32.

        Uses ``e`` (time_embedding output), not SiLU(e) and not e0 (reference §5 item 2). Each of
        the S rows conditions L/S consecutive tokens (see ``grouped``).
        """
        with _fp32_region(x.device):
            terms = self.modulation.float().unsqueeze(0) + e.float().unsqueeze(2)  # [B, S, 2, dim]
            shift, scale = terms.unsqueeze(2).unbind(dim=3)  # each [B, S, 1, dim]
            h = grouped(self.norm(x).float(), e.shape[1]) * (1 + scale) + shift
            return self.head(h.flatten(1, 2)).float()


class WanModel(nn.Module):
    """Wan text-to-video DiT (one expert). Keyword arguments = ``teacher.config.DiTConfig`` fields.

    ``forward(x, t, context)``: latents [B, in_dim, F, H, W], integer timesteps, text features
    [B, L<=text_len, text_dim] -> predicted flow velocity [B, out_dim, F, H, W] float32.

    Mixed precision: after ``model.to(torch.bfloat16)`` call ``model.keep_fp32_islands()`` to
    put the official fp32 parts back (``teacher.checkpoint`` loads them fp32 directly).
    """

    def __init__(
        self,
        *,
        dim: int,
        ffn_dim: int,
        freq_dim: int,
        num_heads: int,
        num_layers: int,
        in_dim: int,
        out_dim: int,
        text_len: int,
        eps: float,
        text_dim: int = 4096,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
    ):
        super().__init__()
        self.config = DiTConfig(dim=dim, ffn_dim=ffn_dim, freq_dim=freq_dim, num_heads=num_heads,
                                num_layers=num_layers, in_dim=in_dim, out_dim=out_dim,
                                text_len=text_len, eps=eps, text_dim=text_dim,
                                patch_size=tuple(patch_size), qk_norm=qk_norm,
                                cross_attn_norm=cross_attn_norm)
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if freq_dim % 2 != 0:
            raise ValueError(f"freq_dim={freq_dim} must be even (cos and sin halves)")
        if len(self.config.patch_size) != 3:
            raise ValueError(f"patch_size={patch_size} must have 3 entries (t, h, w)")
        self.dim, self.freq_dim, self.text_len = dim, freq_dim, text_len
        self.in_dim, self.out_dim, self.patch_size = in_dim, out_dim, self.config.patch_size

        self.patch_embedding = WeightDtypeConv3d(in_dim, dim, kernel_size=self.patch_size,
                                                 stride=self.patch_size)
        self.text_embedding = nn.Sequential(
            WeightDtypeLinear(text_dim, dim), nn.GELU(approximate="tanh"), WeightDtypeLinear(dim, dim)
        )
        self.time_embedding = nn.Sequential(
            WeightDtypeLinear(freq_dim, dim), nn.SiLU(), WeightDtypeLinear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), WeightDtypeLinear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            WanAttentionBlock(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps)
            for _ in range(num_layers)
        )
        self.head = WanHead(dim, out_dim, self.patch_size, eps)
        # Plain attribute, not a buffer: float64 tables outside the state dict (see teacher.rope).
        self.rope = WanRope3D(dim // num_heads)
        self.init_weights()

    # ----- configuration <-> official config.json -------------------------------------------

    @staticmethod
    def config_from_json(data: dict) -> DiTConfig:
        """An official expert ``config.json`` dict -> DiTConfig.

        Drops ``_class_name`` / ``_diffusers_version`` (bookkeeping), accepts ``model_type``
        only as 't2v' and ``window_size`` only as global (-1, -1); any other unknown key is an
        error. Fields the official file omits (text_dim, patch_size, qk_norm, cross_attn_norm)
        take the official constructor defaults.
        """
        values = {k: v for k, v in data.items() if k not in _CONFIG_JSON_BOOKKEEPING}
        if data.get("_class_name", "WanModel") != "WanModel":
            raise ValueError(
                f"config.json has _class_name {data['_class_name']!r}, not 'WanModel'; a Diffusers "
                f"transformer config goes through teacher.convert_dit.dit_config_from_diffusers"
            )
        model_type = values.pop("model_type", "t2v")
        if model_type != "t2v":
            raise ValueError(f"config.json model_type {model_type!r}: only 't2v' is supported")
        window = values.pop("window_size", (-1, -1))
        if tuple(window) != (-1, -1):
            raise ValueError(f"config.json window_size {window!r}: only global attention (-1, -1) "
                             f"is supported")
        known = {f.name for f in fields(DiTConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config.json: unknown key(s) {unknown}; known: {sorted(known)}")
        missing = [k for k in _CONFIG_JSON_REQUIRED if k not in values]
        if missing:
            raise ValueError(f"config.json lacks {missing}; an official WanModel config stores them")
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        return DiTConfig(**values)

    @staticmethod
    def config_to_json(config: DiTConfig) -> dict:
        """DiTConfig -> an official-style ``config.json`` dict (all fields written, lists for tuples)."""
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
        return {"_class_name": "WanModel", "model_type": "t2v", **values}

    # ----- dtype policy --------------------------------------------------------------------

    def keep_fp32_islands(self) -> WanModel:
        """Cast the official fp32 islands back to fp32 after e.g. ``model.to(torch.bfloat16)``.

        Islands (``is_fp32_island``): time_embedding, time_projection, head (its Linear and its
        modulation) and every block's modulation. Returns ``self``.
        """
        for name, param in self.named_parameters():
            if is_fp32_island(name) and param.is_floating_point():
                param.data = param.data.float()
        return self

    # ----- initialisation --------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Training-from-scratch init (loading a checkpoint overwrites all of it).

        Xavier-uniform Linears with zero bias; the text/time embedders N(0, 0.02) (their inputs
        are not unit-variance features); the patch embedding Xavier over its flattened kernel;
        a zero head so a fresh model predicts zero velocity; modulation tables N(0, 1/dim).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for embedder in (self.text_embedding, self.time_embedding):
            for module in embedder:
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        nn.init.zeros_(self.head.head.weight)
        for block in self.blocks:
            block.modulation.normal_(std=self.dim**-0.5)
        self.head.modulation.normal_(std=self.dim**-0.5)

    # ----- pieces of the forward pass (reused by the causal student) -----------------------

    def embed_video(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Latents [B, in_dim, F, H, W] -> tokens [B, L, dim] (weight dtype), grid (F', H', W').

        L = F'*H'*W' with F' = F/pt etc.; tokens ordered f, h, w (w fastest).
        """
        tokens = self.patch_embedding(x)
        grid = tuple(tokens.shape[2:])
        return tokens.flatten(2).transpose(1, 2), grid

    def time_conditioning(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [B] or [B, S] -> ``e`` [B, S', dim] and ``e0`` [B, S', 6, dim], fp32.

        S' = 1 for t of shape [B] (one row for all tokens), else S (one row per latent frame or
        per token; the blocks broadcast each row over its token group, see ``grouped``). All
        fp32 with autocast off: the float64 sinusoid feeds the fp32 time embedding and
        projection (official islands).
        """
        t = t.unsqueeze(1) if t.ndim == 1 else t
        with _fp32_region(t.device):
            e = self.time_embedding(sinusoidal_embedding(t, self.freq_dim).float())
            e0 = self.time_projection(e).unflatten(-1, (6, self.dim))
        return e.float(), e0.float()

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Text features [B, L, text_dim] (L <= text_len) -> [B, text_len, dim].

        Zero-pads to exactly ``text_len`` rows BEFORE the MLP and applies no mask anywhere:
        the padded rows become bias-driven non-zero tokens that cross-attention sees, as in the
        official model (feeding unpadded context changes the output a lot, reference §5 item 1).
        """
        if context.ndim != 3 or context.shape[1] > self.text_len:
            raise ValueError(
                f"context has shape {list(context.shape)}; expected [B, L, text_dim] with "
                f"L <= text_len={self.text_len}; truncate the prompt features to text_len rows"
            )
        padded = F.pad(context, (0, 0, 0, self.text_len - context.shape[1]))
        return self.text_embedding(padded)

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Head output [B, L, pt*ph*pw*out_dim] -> [B, out_dim, F'*pt, H'*ph, W'*pw].

        The head's output channels are ordered (pt, ph, pw, c) with c fastest (this must agree
        with the rows of ``head.head.weight``).
        """
        (f, h, w), (pt, ph, pw) = grid, self.patch_size
        x = out.reshape(out.shape[0], f, h, w, pt, ph, pw, self.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # B, c, f, pt, h, ph, w, pw
        return x.reshape(out.shape[0], self.out_dim, f * pt, h * ph, w * pw)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_dim:
            raise ValueError(f"x has shape {list(x.shape)}; expected [B, in_dim={self.in_dim}, F, H, W]")
        for size, p, axis in zip(x.shape[2:], self.patch_size, "FHW"):
            if size % p != 0:
                raise ValueError(f"x has {axis}={size}, not divisible by the patch size {p} "
                                 f"(patch_size={self.patch_size}); crop or pad the latents")
        batch = x.shape[0]
        if t.dtype in (torch.bool, torch.float16, torch.bfloat16) or t.is_complex():
            # Half floats cannot hold timesteps exactly (bf16 rounds 875 to 872 or 880).
            raise TypeError(f"t has dtype {t.dtype}; pass integer (int64) timesteps")
        f, h, w = (size // p for size, p in zip(x.shape[2:], self.patch_size))
        if t.ndim not in (1, 2) or t.shape[0] != batch or (t.ndim == 2 and t.shape[1] not in (f, f * h * w)):
            raise ValueError(
                f"t has shape {list(t.shape)}; expected [B={batch}], [B, frames={f}] (one per "
                f"latent frame) or [B, tokens={f * h * w}] (one per token)"
            )
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.config.text_dim:
            raise ValueError(f"context has shape {list(context.shape)}; expected [B={batch}, L, "
                             f"text_dim={self.config.text_dim}]")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            x: latents [B, in_dim, F, H, W], any float dtype (cast to the weight dtype).
            t: timesteps, int64 [B] (the teacher: sigma*1000 truncated); also [B, F'] (one per
               latent frame) or [B, F'*H'*W'] (one per token).
            context: text features [B, L, text_dim] with L <= text_len, unpadded or padded with
               zeros (padding happens here; no mask).
        Returns:
            [B, out_dim, F, H, W] float32.
        """
        self._check_inputs(x, t, context)
        tokens, grid = self.embed_video(x)
        e, e0 = self.time_conditioning(t)
        text = self.embed_text(context)
        rope = self.rope.cos_sin(grid, device=x.device)
        for block in self.blocks:
            tokens = block(tokens, e0, text, rope)
        return self.unpatchify(self.head(tokens, e), grid)
