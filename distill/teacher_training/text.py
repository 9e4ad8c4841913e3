"""Caption -> DiT context for training, equal to what the sampler feeds the experts.

The DiT sees the text encoder's output with every row past the caption's valid length (EOS
included) set to zero, as the official pipeline feeds it (trim, then zero-pad to text_len);
``teacher.pipeline.encode_text`` does this at sampling time. Training works on pre-tokenized
captions (tokenized once per run), so it splits the same computation into tokenize + encode;
the tests check that both give the same context, or guidance would meet contexts the experts
never saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from teacher.t5 import UMT5Encoder
from teacher.tokenizer import TextTokenizer


def context_from_ids(encoder: UMT5Encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token ids [B, L] and mask [B, L] -> context [B, L, dim] with padded rows zeroed."""
    hidden = encoder(ids, mask)
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


def tokenize_captions(tokenizer: TextTokenizer, texts: Sequence[str], text_len: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (ids, mask) [B, text_len] int64; the empty caption is EOS alone (the
    unconditional input of classifier-free guidance)."""
    return tokenizer(list(texts), text_len=text_len, allow_empty=True)

