"""Key and config converters between the official WanModel layout and Diffusers' layout.

Source of the mapping: shared/reference/wan22-a14b.md §1.4 (table) and §6.1 (config). Two traps
the table encodes:

- norm names are swapped: the official ``norm3`` (affine cross-attention LayerNorm) is
  Diffusers' ``norm2``; the parameter-free FFN norm is official ``norm2`` / Diffusers ``norm3``
  and appears in no state dict;
- ``head.modulation`` is the top-level ``scale_shift_table`` while each block's ``modulation``
  is that block's ``scale_shift_table``.

Both directions are driven by the same two tables below, so they are inverse by construction;
tensors pass through untouched (same objects). Unknown keys raise a KeyError naming the key.
"""

from __future__ import annotations

import re

from teacher.config import DiTConfig

_PARAMS = ("weight", "bias")

# Keys outside the blocks: official -> diffusers.
_TOP_LEVEL: dict[str, str] = {
    "head.modulation": "scale_shift_table",
    **{f"patch_embedding.{p}": f"patch_embedding.{p}" for p in _PARAMS},
    **{f"time_embedding.0.{p}": f"condition_embedder.time_embedder.linear_1.{p}" for p in _PARAMS},
    **{f"time_embedding.2.{p}": f"condition_embedder.time_embedder.linear_2.{p}" for p in _PARAMS},
    **{f"time_projection.1.{p}": f"condition_embedder.time_proj.{p}" for p in _PARAMS},
    **{f"text_embedding.0.{p}": f"condition_embedder.text_embedder.linear_1.{p}" for p in _PARAMS},
    **{f"text_embedding.2.{p}": f"condition_embedder.text_embedder.linear_2.{p}" for p in _PARAMS},
    **{f"head.head.{p}": f"proj_out.{p}" for p in _PARAMS},
}


def _block_table() -> dict[str, str]:
    """Key suffixes inside ``blocks.N.``: official -> diffusers."""
    table = {"modulation": "scale_shift_table"}
    for official, diffusers in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        for p in _PARAMS:
            for proj in "qkv":
                table[f"{official}.{proj}.{p}"] = f"{diffusers}.to_{proj}.{p}"
            table[f"{official}.o.{p}"] = f"{diffusers}.to_out.0.{p}"
        for norm in ("norm_q", "norm_k"):
            table[f"{official}.{norm}.weight"] = f"{diffusers}.{norm}.weight"
    for p in _PARAMS:
        table[f"norm3.{p}"] = f"norm2.{p}"  # the swap: affine cross-attention norm
        table[f"ffn.0.{p}"] = f"ffn.net.0.proj.{p}"
        table[f"ffn.2.{p}"] = f"ffn.net.2.{p}"
    return table


_BLOCK = _block_table()
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(key: str, top: dict[str, str], block: dict[str, str], layout: str) -> str:
    if key in top:
        return top[key]
    match = _BLOCK_KEY.match(key)
    if match and match.group(2) in block:
        return f"blocks.{match.group(1)}.{block[match.group(2)]}"
    raise KeyError(f"{key!r} is not a key of the {layout} WanModel layout; the state dict belongs "
                   f"to another model (or was already converted)")


def _convert(state_dict: dict, top: dict[str, str], block: dict[str, str], layout: str) -> dict:
    return {_rename(k, top, block, layout): v for k, v in state_dict.items()}


def dit_official_to_diffusers(state_dict: dict) -> dict:
    """Official WanModel keys -> Diffusers ``WanTransformer3DModel`` keys (tensors unchanged)."""
    return _convert(state_dict, _TOP_LEVEL, _BLOCK, "official")


def dit_diffusers_to_official(state_dict: dict) -> dict:
    """Diffusers ``WanTransformer3DModel`` keys -> official WanModel keys (tensors unchanged)."""
    return _convert(state_dict, {v: k for k, v in _TOP_LEVEL.items()},
                    {v: k for k, v in _BLOCK.items()}, "Diffusers")


# Diffusers config keys that must hold these values for a text-to-video WanModel.
_DIFFUSERS_ABSENT_FEATURES = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
# Bookkeeping keys of any Diffusers config.json.
_DIFFUSERS_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path")
_DIFFUSERS_KEYS = {
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
    "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
    "rope_max_seq_len", *_DIFFUSERS_ABSENT_FEATURES,
}
_REQUIRED = ("num_attention_heads", "attention_head_dim", "in_channels", "freq_dim", "ffn_dim",
             "num_layers", "text_dim")


def dit_config_from_diffusers(cfg: dict, text_len: int = 512) -> DiTConfig:
    """A Diffusers transformer ``config.json`` dict -> DiTConfig.

    ``text_len`` is not in the Diffusers config (its pipeline pads the prompt features to
    ``max_sequence_length`` itself, 512 by default); pass it when the model was trained with
    another length. ``rope_max_seq_len`` is ignored: any value >= the largest grid axis gives
    the same result, and this implementation's table covers 1024 positions (the official one).

    Raises ValueError for unknown keys, missing fields, or features a text-to-video WanModel
    does not have (image embedding, added K/V projections, a qk_norm other than across heads).
    """
    name = cfg.get("_class_name", "WanTransformer3DModel")
    if name != "WanTransformer3DModel":
        raise ValueError(f"transformer config.json has _class_name {name!r}; expected "
                         f"'WanTransformer3DModel'")
    values = {k: v for k, v in cfg.items() if k not in _DIFFUSERS_BOOKKEEPING}
    unknown = sorted(set(values) - _DIFFUSERS_KEYS)
    if unknown:
        raise ValueError(f"transformer config.json: unknown key(s) {unknown}; known: "
                         f"{sorted(_DIFFUSERS_KEYS)}")
    missing = [k for k in _REQUIRED if k not in values]
    if missing:
        raise ValueError(f"transformer config.json lacks {missing}")
    for key in _DIFFUSERS_ABSENT_FEATURES:
        if values.get(key) is not None:
            raise ValueError(f"transformer config.json sets {key}={values[key]!r}: an image-"
                             f"conditioned variant, not the text-to-video WanModel")
    qk_norm = values.get("qk_norm", "rms_norm_across_heads")
    if qk_norm != "rms_norm_across_heads":
        # Diffusers' Wan attention applies an across-heads RMSNorm whatever this field says,
        # so no other value describes what its weights compute.
        raise ValueError(f"transformer config.json qk_norm={qk_norm!r}; only "
                         f"'rms_norm_across_heads' is supported")
    heads, head_dim = values["num_attention_heads"], values["attention_head_dim"]
    in_dim = values["in_channels"]
    return DiTConfig(
        dim=heads * head_dim,
        ffn_dim=values["ffn_dim"],
        freq_dim=values["freq_dim"],
        num_heads=heads,
        num_layers=values["num_layers"],
        in_dim=in_dim,
        # Diffusers treats a missing/None out_channels as in_channels.
        out_dim=values.get("out_channels") or in_dim,
        text_len=text_len,
        eps=values.get("eps", 1e-6),
        text_dim=values["text_dim"],
        patch_size=tuple(values.get("patch_size", (1, 2, 2))),
        qk_norm=True,
        cross_attn_norm=values.get("cross_attn_norm", True),
    )
