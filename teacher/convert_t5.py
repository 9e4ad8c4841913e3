"""Key and config conversion between the official umT5 layout and transformers' ``UMT5EncoderModel``.

The official file ``models_t5_umt5-xxl-enc-bf16.pth`` uses the names of ``teacher.t5.UMT5Encoder``;
the Diffusers variant of the teacher ships a transformers ``UMT5EncoderModel`` in
``text_encoder/``. Table from reference ``wan22-a14b.md`` section 1.1. Tensors are passed through
untouched (same objects), only keys change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from teacher.config import T5Config

# transformers ties ``encoder.embed_tokens.weight`` to ``shared.weight``; files carry either or both.
_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")

# official per-block suffix -> transformers per-block suffix
_BLOCK_TO_TRANSFORMERS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_TO_OFFICIAL = {v: k for k, v in _BLOCK_TO_TRANSFORMERS.items()}

_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_TRANSFORMERS_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")


def t5_official_key_to_transformers(key: str) -> str:
    """One official key -> its transformers key; KeyError naming the key if it is unknown."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    match = _OFFICIAL_BLOCK.fullmatch(key)
    if match and match.group(2) in _BLOCK_TO_TRANSFORMERS:
        return f"encoder.block.{match.group(1)}.{_BLOCK_TO_TRANSFORMERS[match.group(2)]}"
    raise KeyError(f"unknown official umT5 key {key!r}; expected token_embedding.weight, "
                   f"norm.weight or blocks.<i>.{{{', '.join(_BLOCK_TO_TRANSFORMERS)}}}")


def t5_transformers_key_to_official(key: str) -> str:
    """One transformers ``UMT5EncoderModel`` key -> its official key; KeyError if unknown."""
    if key in _EMBED_KEYS:
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    match = _TRANSFORMERS_BLOCK.fullmatch(key)
    if match and match.group(2) in _BLOCK_TO_OFFICIAL:
        return f"blocks.{match.group(1)}.{_BLOCK_TO_OFFICIAL[match.group(2)]}"
    raise KeyError(f"unknown transformers UMT5EncoderModel key {key!r}; expected shared.weight, "
                   f"encoder.embed_tokens.weight, encoder.final_layer_norm.weight or "
                   f"encoder.block.<i>.{{{', '.join(_BLOCK_TO_OFFICIAL)}}}")


def t5_official_to_transformers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official state dict -> ``UMT5EncoderModel`` state dict (one key out per key in).

    The embedding goes to ``shared.weight`` only; transformers ties ``encoder.embed_tokens.weight``
    to it when loading.
    """
    return {t5_official_key_to_transformers(k): v for k, v in sd.items()}


def t5_transformers_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``UMT5EncoderModel`` state dict -> official state dict.

    ``shared.weight`` and ``encoder.embed_tokens.weight`` may both be present (a tied copy); they
    must then agree in shape and, for real tensors, in value.
    """
    out: dict[str, torch.Tensor] = {}
    embeds = [k for k in _EMBED_KEYS if k in sd]
    if len(embeds) == 2:
        a, b = sd[embeds[0]], sd[embeds[1]]
        differ = a.shape != b.shape or (
            a.device.type != "meta" and b.device.type != "meta" and not torch.equal(a, b))
        if differ:
            raise ValueError(
                "shared.weight and encoder.embed_tokens.weight differ; umT5 ties them, so the "
                "file is inconsistent: keep one of them"
            )
    for key, value in sd.items():
        if key == "encoder.embed_tokens.weight" and "shared.weight" in sd:
            continue
        out[t5_transformers_key_to_official(key)] = value
    return out


def t5_config_from_transformers(cfg: Mapping) -> T5Config:
    """A transformers ``UMT5Config`` dict (``text_encoder/config.json``) -> ``T5Config``.

    Raises ValueError for configs this encoder does not implement (another max distance, another
    feed-forward, another norm eps, or a non-umT5 model type whose layers share one bias table).
    """
    where = "text encoder config.json"
    missing = [k for k in ("d_model", "d_kv", "d_ff", "num_heads", "num_layers", "vocab_size")
               if k not in cfg]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; is this a UMT5Config?")
    model_type = cfg.get("model_type", "umt5")
    if model_type != "umt5":
        raise ValueError(
            f"{where}: model_type {model_type!r} is not 'umt5'; T5/mT5 share one relative-position "
            f"table across layers while umT5 (what Wan uses) has one per layer"
        )
    max_distance = cfg.get("relative_attention_max_distance", 128)
    if max_distance != 128:
        raise ValueError(
            f"{where}: relative_attention_max_distance={max_distance}; this encoder implements "
            f"the umT5/Wan value 128 only"
        )
    ffn = cfg.get("feed_forward_proj", "gated-gelu")
    if ffn != "gated-gelu":
        raise ValueError(
            f"{where}: feed_forward_proj={ffn!r}; this encoder implements 'gated-gelu' "
            f"(gated GELU-tanh, as umT5-XXL) only"
        )
    act = cfg.get("dense_act_fn", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{where}: dense_act_fn={act!r}; this encoder implements the tanh GELU "
                         f"('gelu_new') only")
    eps = cfg.get("layer_norm_epsilon", 1e-6)
    if eps != 1e-6:
        raise ValueError(f"{where}: layer_norm_epsilon={eps}; this encoder implements 1e-6 only")
    return T5Config(
        vocab_size=int(cfg["vocab_size"]),
        dim=int(cfg["d_model"]),
        dim_attn=int(cfg["d_kv"]) * int(cfg["num_heads"]),
        dim_ffn=int(cfg["d_ff"]),
        num_heads=int(cfg["num_heads"]),
        num_layers=int(cfg["num_layers"]),
        num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
    )
