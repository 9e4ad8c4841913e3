"""umT5 encoder (encoder only), as the Wan2.2 teacher runs it.

Module and parameter names equal the keys of the official ``models_t5_umt5-xxl-enc-bf16.pth``, so
that file loads with ``strict=True``. Numerics follow the official code (reference
``wan22-a14b.md`` section 1.1):

- pre-norm blocks ``x + attn(norm1(x))``, ``x + ffn(norm2(x))``, then a final RMS norm;
- T5 RMS norm: no mean subtraction, eps 1e-6, the mean square in fp32;
- attention without the 1/sqrt(head_dim) factor (T5 folds it into the initialisation of ``q``);
- a relative-position bias per layer (umT5 does not share it across layers), bidirectional
  buckets with ``max_dist`` 128;
- pad keys get ``finfo.min`` added before a softmax computed in fp32;
- gated GELU(tanh) feed-forward ``fc2(fc1(x) * gelu_tanh(gate(x)))``.

Dropout (0.1 in the official module) is left out: it is the identity at inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The official relative-position bias saturates at this distance (t5.py L223).
MAX_DISTANCE = 128
EPS = 1e-6


def relative_position_bucket(relative: torch.Tensor, num_buckets: int,
                             max_distance: int = MAX_DISTANCE) -> torch.Tensor:
    """Bidirectional T5 bucket of each relative position ``key_pos - query_pos``.

    Args:
        relative: int64 tensor of any shape.
    Returns:
        int64 tensor of the same shape with values in ``[0, num_buckets)``. Half of the buckets
        serve each direction; positive offsets (key after query) use the upper half. Within a
        direction, distances below ``num_buckets // 4`` get one bucket each; larger distances share
        log-spaced buckets up to ``max_distance``, beyond which they all fall in the last one.
    """
    half = num_buckets // 2
    exact = half // 2
    base = (relative > 0).long() * half
    distance = relative.abs()
    # Clamp before the log so distance 0 never produces -inf (those entries take the exact
    # branch anyway). The log is taken in fp32 like the official code, so bucket edges agree.
    far = distance.clamp(min=exact).float()
    log_bucket = exact + (torch.log(far / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return base + torch.where(distance < exact, distance, log_bucket)


class T5RMSNorm(nn.Module):
    """RMS norm without mean subtraction; ``weight`` [dim].

    The mean square is taken in fp32 because bf16 squares of a 4096-wide row lose too many bits;
    the normalised row is cast back to the weight's dtype when that is half precision (official
    T5LayerNorm), so a bf16 model keeps bf16 activations.
    """

    def __init__(self, dim: int, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim] (fp32 if the weight is fp32, else the weight's dtype)."""
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class GELUTanh(nn.Module):
    """The tanh approximation of GELU, written out as the official code does.

    Written out elementwise (rather than ``F.gelu(approximate='tanh')``, which evaluates in fp32
    internally) so that a bf16 model rounds at the same places as the official bf16 run.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5Attention(nn.Module):
    """Multi-head self-attention with bias-free q/k/v/o: [B, L, dim] -> [B, L, dim]."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; bias [B, heads, L, L] in x's dtype (position bias + key mask)."""
        b, n, h, d = x.shape[0], x.shape[1], self.num_heads, self.head_dim
        q = self.q(x).view(b, n, h, d).transpose(1, 2)
        k = self.k(x).view(b, n, h, d).transpose(1, 2)
        v = self.v(x).view(b, n, h, d).transpose(1, 2)
        # No 1/sqrt(d): T5 trains with unscaled logits (the scale lives in q's initialisation).
        logits = torch.matmul(q, k.transpose(-1, -2)) + bias
        # Softmax in fp32: bf16 exponentials of logits this large lose the small probabilities.
        weights = F.softmax(logits.float(), dim=-1).to(v.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, n, h * d)
        return self.o(out)


class T5FeedForward(nn.Module):
    """Gated GELU(tanh) FFN: [B, L, dim] -> [B, L, dim]; ``gate.0`` is the GELU branch."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), GELUTanh())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5RelativeBias(nn.Module):
    """Per-layer relative-position bias table ``embedding.weight`` [num_buckets, num_heads]."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets [L, L] int64 -> bias [1, heads, L, L] in the table's dtype."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # The official block clamps fp16 activations that overflowed to inf; bf16/fp32 never need it.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5Block(nn.Module):
    """Pre-norm encoder block with its own relative-position bias table."""

    def __init__(self, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_buckets: int):
        super().__init__()
        self.norm1 = T5RMSNorm(dim)
        self.attn = T5Attention(dim, dim_attn, num_heads)
        self.norm2 = T5RMSNorm(dim)
        self.ffn = T5FeedForward(dim, dim_ffn)
        self.pos_embedding = T5RelativeBias(num_buckets, num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_mask_bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; buckets [L, L]; key_mask_bias [B, 1, 1, L] (0 or finfo.min)."""
        pos_bias = self.pos_embedding(buckets).to(x.dtype)
        # As in the official code, pad keys get finfo.min in place of the position bias, so their
        # softmax weight underflows to exactly 0 while the row's normaliser stays finite.
        bias = torch.where(key_mask_bias < 0, key_mask_bias, pos_bias)
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """umT5 encoder: token ids [B, L] -> hidden states [B, L, dim].

    Built from the fields of ``teacher.config.T5Config``. The A14B text encoder is
    ``UMT5Encoder(vocab_size=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64,
    num_layers=24, num_buckets=32)`` (5,680,910,336 parameters, 242 tensors).
    """

    def __init__(self, vocab_size: int, dim: int, dim_attn: int, dim_ffn: int, num_heads: int,
                 num_layers: int, num_buckets: int):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("dim_attn", dim_attn),
                            ("dim_ffn", dim_ffn), ("num_heads", num_heads),
                            ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"UMT5Encoder: {name}={value} must be >= 1")
        if num_buckets < 4 or num_buckets % 4:
            raise ValueError(
                f"UMT5Encoder: num_buckets={num_buckets} must be a positive multiple of 4 "
                f"(half per direction, half of those exact); umT5 uses 32"
            )
        self.dim = dim
        self.num_buckets = num_buckets
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            T5Block(dim, dim_attn, dim_ffn, num_heads, num_buckets) for _ in range(num_layers)
        )
        self.norm = T5RMSNorm(dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """T5's initialisation (used only when training from scratch, e.g. the shapes world).

        Every projection gets std fan_in^-0.5; ``q`` is further divided by sqrt(dim_attn) because
        the logits are never scaled at run time, and ``o`` by sqrt(num_heads) so the sum over heads
        keeps unit variance. Unit-variance token embeddings suit the RMS-normalised blocks.
        """
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        for block in self.blocks:
            attn, ffn = block.attn, block.ffn
            dim, dim_attn = attn.q.in_features, attn.q.out_features
            nn.init.normal_(attn.q.weight, std=(dim * dim_attn) ** -0.5)
            nn.init.normal_(attn.k.weight, std=dim ** -0.5)
            nn.init.normal_(attn.v.weight, std=dim ** -0.5)
            nn.init.normal_(attn.o.weight, std=(attn.num_heads * dim_attn) ** -0.5)
            nn.init.normal_(ffn.gate[0].weight, std=dim ** -0.5)
            nn.init.normal_(ffn.fc1.weight, std=dim ** -0.5)
            nn.init.normal_(ffn.fc2.weight, std=ffn.fc2.in_features ** -0.5)
            table = block.pos_embedding.embedding.weight
            nn.init.normal_(table, std=(2 * table.shape[0] * table.shape[1]) ** -0.5)
            nn.init.ones_(block.norm1.weight)
            nn.init.ones_(block.norm2.weight)
        nn.init.ones_(self.norm.weight)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode a padded batch.

        Args:
            ids: [B, L] integer token ids (int64), each in ``[0, vocab_size)``.
            mask: [B, L] bool or 0/1 integers; 0 marks pad tokens, which are never attended to
                (their own output rows are computed but meaningless).
        Returns:
            [B, L, dim] in the parameters' dtype (bf16 for the official checkpoint).
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, L], got shape {tuple(ids.shape)}")
        if mask.shape != ids.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} differs from ids shape {tuple(ids.shape)}; pass "
                f"the attention mask the tokenizer returned with these ids"
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor (int64), got {ids.dtype}")
        vocab = self.token_embedding.num_embeddings
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(
                f"token ids span [{int(ids.min())}, {int(ids.max())}] but the embedding has "
                f"{vocab} rows; the tokenizer does not belong to this text encoder"
            )
        x = self.token_embedding(ids)
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)
        # Buckets depend only on L, so they are computed once and shared by every layer's table.
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.num_buckets)
        key_mask_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        key_mask_bias = key_mask_bias.masked_fill(mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for block in self.blocks:
            x = block(x, buckets, key_mask_bias)
        return self.norm(x)


def encode_text(encoder: UMT5Encoder, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Encode and keep only each sample's valid rows, as the official pipeline does.

    Args:
        ids, mask: [B, L] as returned by a project tokenizer (right padding).
    Returns:
        B tensors [L_i, dim], ``L_i = mask[i].sum()`` (EOS included), in the encoder's dtype.
    """
    if mask.shape != ids.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from ids shape {tuple(ids.shape)}")
    valid = mask != 0
    lengths = valid.sum(dim=1)
    # Trimming to the first L_i rows is only right for right-padded masks (1...1 0...0).
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(valid, expected):
        raise ValueError("mask is not right-padded (ones then zeros) in every row; "
                         "use the mask the project tokenizer returns")
    hidden = encoder(ids, mask)
    return [h[:n] for h, n in zip(hidden, lengths.tolist())]
