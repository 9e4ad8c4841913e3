"""The student's block-structured self-attention masks, dense (SDPA) or as flex-attention BlockMasks.

Two layouts, both over chunks of ``tokens_per_chunk`` tokens:

- block-causal (``forward``, ``recache``): chunk c attends to chunks <= c;
- teacher forcing (``forward_teacher_forcing``), the sequence [clean chunks | noisy chunks]:
  clean chunk c attends to clean chunks <= c; noisy chunk c to clean chunks < c and to itself.

A dense bool mask costs L^2 bytes and, in SDPA, rules out the flash kernels: at 832x480 the
teacher-forcing sequence of the 1.3B recipe is 2 x 21 x 1560 = 65,520 tokens, a 4.3 GB mask per
network (measured: the recipe step took 2.7x longer and held 12 GiB more, BENCHMARKS.md). A flex-attention ``BlockMask`` describes
the same pattern in (L/128)^2 block entries and skips the masked-out blocks entirely, so on CUDA
the student uses it (``attention_backend="auto"``). Both forms come from the same chunk rule and
a test checks them equal element by element.
"""

from __future__ import annotations

from typing import Literal

import torch

MaskKind = Literal["causal", "teacher_forcing"]
MASK_KINDS: tuple[str, ...] = ("causal", "teacher_forcing")
AttentionBackend = Literal["auto", "sdpa", "flex"]
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flex")


def _check_kind(kind: str) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind {kind!r} must be one of {list(MASK_KINDS)}")


def block_causal_mask(n_chunks: int, tokens_per_chunk: int, device: torch.device | str) -> torch.Tensor:
    """bool [L, L] (True = attend), L = n_chunks * tokens_per_chunk: chunk c sees chunks <= c."""
    chunk = torch.arange(n_chunks * tokens_per_chunk, device=device) // tokens_per_chunk
    return chunk[None, :] <= chunk[:, None]


def teacher_forcing_mask(n_chunks: int, tokens_per_chunk: int,
                         device: torch.device | str) -> torch.Tensor:
    """bool [2L, 2L] for the sequence [clean chunks | noisy chunks] (see module doc)."""
    chunk = torch.arange(n_chunks * tokens_per_chunk, device=device) // tokens_per_chunk
    q, k = chunk[:, None], chunk[None, :]
    clean_clean = k <= q
    noisy_clean = k < q
    noisy_noisy = k == q
    top = torch.cat([clean_clean, torch.zeros_like(clean_clean)], dim=1)
    bottom = torch.cat([noisy_clean, noisy_noisy], dim=1)
    return torch.cat([top, bottom], dim=0)


def mask_mod(kind: MaskKind, n_chunks: int, tokens_per_chunk: int):
    """The mask as a flex-attention ``mask_mod(b, h, q_idx, kv_idx) -> bool``: the same rule as
    ``block_causal_mask`` / ``teacher_forcing_mask``, written on token indices."""
    _check_kind(kind)
    n = n_chunks * tokens_per_chunk  # tokens of one half in the teacher-forcing layout

    def causal(b, h, q_idx, kv_idx):
        return kv_idx // tokens_per_chunk <= q_idx // tokens_per_chunk

    def teacher_forcing(b, h, q_idx, kv_idx):
        q_noisy, k_noisy = q_idx >= n, kv_idx >= n
        q_chunk = torch.where(q_noisy, q_idx - n, q_idx) // tokens_per_chunk
        k_chunk = torch.where(k_noisy, kv_idx - n, kv_idx) // tokens_per_chunk
        clean_query = ~q_noisy & ~k_noisy & (k_chunk <= q_chunk)
        noisy_query = q_noisy & ((~k_noisy & (k_chunk < q_chunk)) | (k_noisy & (k_chunk == q_chunk)))
        return clean_query | noisy_query

    return causal if kind == "causal" else teacher_forcing


def dense_mask(kind: MaskKind, n_chunks: int, tokens_per_chunk: int,
               device: torch.device | str) -> torch.Tensor:
    """The dense bool mask of ``kind``."""
    _check_kind(kind)
    build = block_causal_mask if kind == "causal" else teacher_forcing_mask
    return build(n_chunks, tokens_per_chunk, device)


def flex_block_mask(kind: MaskKind, n_chunks: int, tokens_per_chunk: int,
                    device: torch.device | str, block_size: int = 128):
    """The flex-attention ``BlockMask`` of ``kind`` (shared by every batch row and head).

    Built one row of blocks at a time: ``create_block_mask`` evaluates the rule over all L^2
    pairs at once and reduces them in int64, which at the 1.3B recipe's 65,520 tokens asked a
    140 GB GPU for another 32 GiB. Here the peak is one [block_size, L] slice. A kv block is
    "full" when every pair in the tile attends (the kernel then skips the mask rule), "partial"
    when some do, absent when none do.
    """
    from torch.nn.attention.flex_attention import BlockMask

    rule = mask_mod(kind, n_chunks, tokens_per_chunk)
    length = n_chunks * tokens_per_chunk * (2 if kind == "teacher_forcing" else 1)
    n_blocks = -(-length // block_size)
    keys = torch.arange(length, device=device)
    pad = n_blocks * block_size - length
    any_rows, all_rows = [], []
    for start in range(0, length, block_size):
        queries = torch.arange(start, min(start + block_size, length), device=device)
        tile = rule(0, 0, queries[:, None], keys[None, :])
        # Padded keys count as masked: a tile holding them is never "full", so the kernel
        # applies the rule (and the sequence length) there.
        tile = torch.nn.functional.pad(tile, (0, pad), value=False).view(len(queries), n_blocks,
                                                                          block_size)
        any_rows.append(tile.any(dim=2).any(dim=0))
        all_rows.append(tile.all(dim=2).all(dim=0) & (len(queries) == block_size))
    visited, full = torch.stack(any_rows), torch.stack(all_rows)
    partial = visited & ~full

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Per row of blocks: how many kv blocks, and their indices first (the kernel's layout).
        dense = dense.to(torch.int32)
        count = dense.sum(dim=-1).to(torch.int32)
        indices = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
        return count[None, None].contiguous(), indices[None, None].contiguous()

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block_size,
                                    mask_mod=rule, seq_lengths=(length, length))


def resolve_backend(backend: AttentionBackend, device: torch.device) -> str:
    """"auto" -> "flex" on CUDA (BlockMask, masked blocks skipped), else "sdpa" (dense mask)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={backend!r} must be one of {list(ATTENTION_BACKENDS)}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return backend
