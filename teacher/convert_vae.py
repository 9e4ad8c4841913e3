"""Key and config conversion: official Wan2.1 VAE layout <-> Diffusers' ``AutoencoderKLWan``.

The official ``Wan2.1_VAE.pth`` uses the names of ``teacher.vae.WanVAE``; the Diffusers variant of
the teacher ships ``vae/`` in the ``AutoencoderKLWan`` layout. Table: reference ``wan22-a14b.md``
§1.2. Tensors pass through untouched (the same objects); only keys change.

The two layouts differ in structure only in the decoder: the official ``decoder.upsamples`` is
one flat list (per stage num_res_blocks+1 residual blocks, then an upsampler except after the
last stage); Diffusers nests it as ``decoder.up_blocks.{stage}.resnets.{j}`` and
``.upsamplers.0``. The stage period (num_res_blocks + 2) is derived from the keys themselves
(where the upsamplers sit, or the largest resnet index), so any dim_mult / num_res_blocks works,
not only the A14B [1,2,4,4] / 2. For a partial state dict pass ``num_res_blocks`` explicitly.
The encoder keeps its flat indices in both layouts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from teacher.config import VAEConfig
from teacher.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

# official residual-block suffix -> Diffusers WanResidualBlock suffix
_RESIDUAL_TO_DIFFUSERS = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_RESIDUAL_TO_OFFICIAL = {v: k for k, v in _RESIDUAL_TO_DIFFUSERS.items()}
# Resample suffixes are spelled the same in both layouts.
_RESAMPLE = {"resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias"}
_ATTENTION = {"norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias"}
_CONV = {"weight", "bias"}

# whole-key renames (both directions are the inverse of each other)
_FIXED_TO_DIFFUSERS = {
    "conv1": "quant_conv", "conv2": "post_quant_conv",
    "encoder.conv1": "encoder.conv_in", "decoder.conv1": "decoder.conv_in",
    "encoder.head.2": "encoder.conv_out", "decoder.head.2": "decoder.conv_out",
}
_FIXED_TO_OFFICIAL = {v: k for k, v in _FIXED_TO_DIFFUSERS.items()}

_OFFICIAL_UP = re.compile(r"decoder\.upsamples\.(\d+)\.(.+)")
_DIFFUSERS_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)")


def _bad(key: str, layout: str) -> KeyError:
    return KeyError(f"unknown {layout} Wan VAE key {key!r}; it belongs to another model or to a "
                    f"VAE variant this converter does not support (Wan2.1 VAE, attn_scales=[])")


def _rename_fixed(key: str, table: dict[str, str]) -> str | None:
    prefix, _, leaf = key.rpartition(".")
    if prefix in table and leaf in _CONV:
        return f"{table[prefix]}.{leaf}"
    return None


def _official_period(keys) -> int | None:
    """num_res_blocks + 2 from the flat indices of the official decoder's upsamplers."""
    ups = {int(m.group(1)) for k in keys
           if (m := _OFFICIAL_UP.fullmatch(k)) and m.group(2) in _RESAMPLE}
    return min(ups) + 1 if ups else None


def _diffusers_period(keys) -> int | None:
    """num_res_blocks + 2 from the largest Diffusers decoder resnet index."""
    js = [int(m.group(3)) for k in keys
          if (m := _DIFFUSERS_UP.fullmatch(k)) and m.group(3) is not None]
    return max(js) + 2 if js else None


def vae_official_key_to_diffusers(key: str, period: int | None) -> str:
    """One official key -> its ``AutoencoderKLWan`` key; ``period`` = num_res_blocks + 2."""
    if (fixed := _rename_fixed(key, _FIXED_TO_DIFFUSERS)) is not None:
        return fixed
    for part in ("encoder", "decoder"):
        if key == f"{part}.head.0.gamma":
            return f"{part}.norm_out.gamma"
        if m := re.fullmatch(rf"{part}\.middle\.([012])\.(.+)", key):
            index, rest = int(m.group(1)), m.group(2)
            if index == 1 and rest in _ATTENTION:
                return f"{part}.mid_block.attentions.0.{rest}"
            if index != 1 and rest in _RESIDUAL_TO_DIFFUSERS:
                return f"{part}.mid_block.resnets.{index // 2}.{_RESIDUAL_TO_DIFFUSERS[rest]}"
    if m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key):
        rest = m.group(2)
        if rest in _RESIDUAL_TO_DIFFUSERS:
            return f"encoder.down_blocks.{m.group(1)}.{_RESIDUAL_TO_DIFFUSERS[rest]}"
        if rest in _RESAMPLE:
            return f"encoder.down_blocks.{m.group(1)}.{rest}"
    if m := _OFFICIAL_UP.fullmatch(key):
        flat, rest = int(m.group(1)), m.group(2)
        # Without upsamplers (a one-stage decoder) every flat index is a resnet of stage 0.
        stage, j = divmod(flat, period) if period else (0, flat)
        is_upsampler = period is not None and j == period - 1
        if is_upsampler and rest in _RESAMPLE:
            return f"decoder.up_blocks.{stage}.upsamplers.0.{rest}"
        if not is_upsampler and rest in _RESIDUAL_TO_DIFFUSERS:
            return f"decoder.up_blocks.{stage}.resnets.{j}.{_RESIDUAL_TO_DIFFUSERS[rest]}"
        raise KeyError(f"official key {key!r} does not fit a decoder whose stages are "
                       f"{period} entries long (num_res_blocks {period - 2 if period else '?'}); "
                       f"the state dict is not a Wan2.1 VAE or is incomplete (pass num_res_blocks)")
    raise _bad(key, "official")


def vae_diffusers_key_to_official(key: str, period: int | None) -> str:
    """One ``AutoencoderKLWan`` key -> its official key; ``period`` = num_res_blocks + 2."""
    if (fixed := _rename_fixed(key, _FIXED_TO_OFFICIAL)) is not None:
        return fixed
    for part in ("encoder", "decoder"):
        if key == f"{part}.norm_out.gamma":
            return f"{part}.head.0.gamma"
        if m := re.fullmatch(rf"{part}\.mid_block\.attentions\.0\.(.+)", key):
            if m.group(1) in _ATTENTION:
                return f"{part}.middle.1.{m.group(1)}"
        if m := re.fullmatch(rf"{part}\.mid_block\.resnets\.([01])\.(.+)", key):
            if m.group(2) in _RESIDUAL_TO_OFFICIAL:
                return f"{part}.middle.{2 * int(m.group(1))}.{_RESIDUAL_TO_OFFICIAL[m.group(2)]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        rest = m.group(2)
        if rest in _RESIDUAL_TO_OFFICIAL:
            return f"encoder.downsamples.{m.group(1)}.{_RESIDUAL_TO_OFFICIAL[rest]}"
        if rest in _RESAMPLE:
            return f"encoder.downsamples.{m.group(1)}.{rest}"
    if m := _DIFFUSERS_UP.fullmatch(key):
        stage, j, rest = int(m.group(1)), m.group(3), m.group(4)
        if j is not None and rest in _RESIDUAL_TO_OFFICIAL:
            if period is None or int(j) > period - 2:
                raise KeyError(f"Diffusers key {key!r}: resnet index {j} does not fit stages of "
                               f"num_res_blocks + 1 = {period - 1 if period else '?'} resnets")
            return f"decoder.upsamples.{stage * period + int(j)}.{_RESIDUAL_TO_OFFICIAL[rest]}"
        if j is None and rest in _RESAMPLE:
            if period is None:
                raise KeyError(f"Diffusers key {key!r}: cannot place an upsampler without "
                               f"knowing num_res_blocks (no decoder resnet keys given); pass "
                               f"num_res_blocks")
            return f"decoder.upsamples.{stage * period + period - 1}.{rest}"
    raise _bad(key, "Diffusers")


def _convert(sd: Mapping, rename, period: int | None, direction: str) -> dict:
    out: dict = {}
    for key, value in sd.items():
        new = rename(key, period)
        if new in out:
            raise ValueError(f"{direction}: two keys map to {new!r}; the state dict mixes layouts")
        out[new] = value
    return out


def vae_official_to_diffusers(sd: Mapping, num_res_blocks: int | None = None) -> dict:
    """Official ``Wan2.1_VAE.pth`` state dict -> ``AutoencoderKLWan`` state dict (same tensors).

    ``num_res_blocks`` (the config's) is needed only for a partial dict; otherwise it is derived
    from where the decoder's upsamplers sit. Unknown keys raise KeyError naming the key.
    """
    period = num_res_blocks + 2 if num_res_blocks is not None else _official_period(sd)
    return _convert(sd, vae_official_key_to_diffusers, period, "official -> Diffusers")


def vae_diffusers_to_official(sd: Mapping, num_res_blocks: int | None = None) -> dict:
    """``AutoencoderKLWan`` state dict -> official (``WanVAE``) state dict (same tensors).

    ``num_res_blocks`` is derived from the largest decoder resnet index unless given.
    Unknown keys raise KeyError naming the key.
    """
    period = num_res_blocks + 2 if num_res_blocks is not None else _diffusers_period(sd)
    return _convert(sd, vae_diffusers_key_to_official, period, "Diffusers -> official")


# Diffusers config fields whose non-default values describe a VAE other than Wan2.1's.
_MUST_EQUAL = {"attn_scales": [], "is_residual": False, "in_channels": 3, "out_channels": 3,
               "patch_size": None, "dropout": 0.0}


def vae_config_from_diffusers(cfg: Mapping) -> VAEConfig:
    """An ``AutoencoderKLWan`` config.json dict -> ``VAEConfig``.

    base_dim -> dim; z_dim, dim_mult, num_res_blocks, temperal_downsample keep their names
    (Diffusers defaults fill absent fields). latents_mean/std are kept, or None where absent or
    equal to the official Wan2.1 constants (the preset's spelling of them). Fields that would
    describe another VAE (Wan2.2's residual VAE, attention at other scales, a separate decoder
    width, patching, dropout) raise ValueError; other fields are ignored, the strict weight load
    catches anything left.
    """
    for name, allowed in _MUST_EQUAL.items():
        if name in cfg and cfg[name] != allowed:
            raise ValueError(f"VAE config field {name}={cfg[name]!r} is not supported; the Wan2.1 "
                             f"VAE has {name}={allowed!r}")
    base_dim = cfg.get("base_dim", 96)
    if cfg.get("decoder_base_dim") not in (None, base_dim):
        raise ValueError(f"VAE config decoder_base_dim={cfg['decoder_base_dim']} differs from "
                         f"base_dim={base_dim}; the Wan2.1 VAE has one width")
    z_dim = cfg.get("z_dim", 16)
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    for name, values in (("latents_mean", mean), ("latents_std", std)):
        if values is not None and len(values) != z_dim:
            raise ValueError(f"VAE config {name} has {len(values)} values but z_dim is {z_dim}; "
                             f"give {z_dim} values or drop the field")
    if mean is not None and std is not None and z_dim == 16:
        if tuple(mean) == WAN21_LATENTS_MEAN and tuple(std) == WAN21_LATENTS_STD:
            mean = std = None
    return VAEConfig(
        dim=base_dim,
        z_dim=z_dim,
        dim_mult=tuple(cfg.get("dim_mult", (1, 2, 4, 4))),
        num_res_blocks=cfg.get("num_res_blocks", 2),
        temperal_downsample=tuple(cfg.get("temperal_downsample", (False, True, True))),
        latents_mean=None if mean is None else tuple(float(v) for v in mean),
        latents_std=None if std is None else tuple(float(v) for v in std),
    )
