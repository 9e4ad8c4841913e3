"""WanVAE (teacher/vae.py) and its Diffusers converter (teacher/convert_vae.py).

Oracle: Diffusers' independent ``AutoencoderKLWan`` (test-only) with random weights, mapped into
WanVAE by the project's converter. CPU, fp32, tiny widths.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest
import torch

from teacher.config import A14B, SHAPES, VAEConfig
from teacher.convert_vae import (
    vae_config_from_diffusers,
    vae_diffusers_to_official,
    vae_official_to_diffusers,
)
from teacher.vae import DecodeCache, EncodeCache, WanVAE
from teacher.vae_blocks import Decoder3d, Encoder3d

TINY = dict(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
            temperal_downsample=[False, True, True])




def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights, biases and norm gammas (gammas are ones and proj zeros at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return module.eval()


def tiny_vae(seed: int = 0, **overrides) -> WanVAE:
    return randomise(WanVAE(**{**TINY, "num_res_blocks": 1, **overrides}), seed)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------- parity
@torch.no_grad()
def test_encode_and_decode_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    oracle = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4],
                                        num_res_blocks=2, temperal_downsample=[False, True, True])
    randomise(oracle, seed=1)
    vae = WanVAE(**TINY).eval()
    vae.load_state_dict(vae_diffusers_to_official(oracle.state_dict()), strict=True)
    # Normalisation constants from Diffusers' own config: an independent copy of the official ones.
    mean = torch.tensor(oracle.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(oracle.config.latents_std).view(1, 16, 1, 1, 1)
    g = torch.Generator().manual_seed(2)
    video = torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1

    latents = vae.encode(video)
    expected = (oracle.encode(video).latent_dist.mean - mean) * inv_std
    assert latents.shape == (2, 16, 3, 4, 4)
    assert max_abs(latents, expected) <= 1e-5  # measured: 0 (bit-exact)

    z = torch.randn(2, 16, 3, 4, 4, generator=g)
    decoded = vae.decode(z)
    expected = oracle.decode(z / inv_std + mean).sample
    assert decoded.shape == (2, 3, 9, 32, 32)
    # Mostly unclamped, so the comparison means something.
    assert (decoded.abs() < 1).float().mean() > 0.5
    assert max_abs(decoded, expected) <= 1e-5  # measured: 0 (bit-exact)


# ---------------------------------------------------------------------------- streaming
def decode_in_chunks(vae: WanVAE, latents: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    cache, out, start = vae.new_decode_cache(), [], 0
    for n in sizes:
        out.append(vae.decode_chunk(latents[:, :, start:start + n], cache, clamp=False))
        start += n
    assert cache.frames_in == latents.shape[2] and cache.frames_out == sum(o.shape[2] for o in out)
    return out


@torch.no_grad()
def test_streaming_decode_equals_whole_clip():
    vae = tiny_vae()
    latents = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    whole = vae.decode(latents, clamp=False)
    assert whole.shape == (1, 3, 17, 32, 32)
    for sizes, frames in (([1, 2, 2], [1, 8, 8]), ([5], [17]), ([3, 2], [9, 8])):
        chunks = decode_in_chunks(vae, latents, sizes)
        assert [c.shape[2] for c in chunks] == frames
        assert torch.equal(torch.cat(chunks, dim=2), whole), sizes  # bit for bit by construction
    assert torch.equal(vae.decode(latents), whole.clamp(-1, 1))


@torch.no_grad()
def test_interleaved_decode_sessions_do_not_interfere():
    vae = tiny_vae()
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 16, 3, 4, 4, generator=g)
    cache_a, cache_b = vae.new_decode_cache(), vae.new_decode_cache()
    out_a, out_b = [], []
    for i in range(3):
        out_a.append(vae.decode_chunk(a[:, :, i:i + 1], cache_a))
        out_b.append(vae.decode_chunk(b[:, :, i:i + 1], cache_b))
    assert torch.equal(torch.cat(out_a, 2), vae.decode(a))
    assert torch.equal(torch.cat(out_b, 2), vae.decode(b))


@torch.no_grad()
def test_streaming_encode_equals_whole_clip():
    vae = tiny_vae()
    video = torch.rand(1, 3, 17, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    whole = vae.encode(video)
    assert whole.shape == (1, 16, 5, 4, 4)
    for sizes in ([1, 16], [5, 12], [9, 4, 4]):
        cache, out, start = vae.new_encode_cache(), [], 0
        for n in sizes:
            out.append(vae.encode_chunk(video[:, :, start:start + n], cache))
            start += n
        assert [o.shape[2] for o in out] == [1 + (sizes[0] - 1) // 4, *(n // 4 for n in sizes[1:])]
        assert torch.equal(torch.cat(out, 2), whole), sizes


@torch.no_grad()
def test_encoder_and_decoder_blocks_accept_any_chunking():
    """The causal blocks themselves take multi-frame chunks (the first one included); one pass vs
    chunks differ only by float rounding of differently shaped convolutions."""
    vae = tiny_vae()
    g = torch.Generator().manual_seed(6)
    latents = torch.randn(1, 16, 4, 4, 4, generator=g)
    video = torch.rand(1, 3, 9, 32, 32, generator=g) * 2 - 1
    for net, x, splits in ((vae.decoder, latents, ([1, 3], [2, 2], [3, 1])),
                           (vae.encoder, video, ([1, 8], [3, 6], [5, 4]))):
        assert isinstance(net, (Decoder3d, Encoder3d))
        one_pass = net(x, {})
        for sizes in splits:
            memory, out, start = {}, [], 0
            for n in sizes:
                out.append(net(x[:, :, start:start + n], memory))
                start += n
            joined = torch.cat(out, 2)
            assert joined.shape == one_pass.shape
            assert max_abs(joined, one_pass) <= 1e-5 * one_pass.abs().max().item(), sizes


# ------------------------------------------------------------------- real config and keys
def test_real_config_parameters_and_shapes_on_meta():
    with torch.device("meta"):
        vae = WanVAE(**asdict(A14B.vae))
    state = vae.state_dict()
    assert len(state) == 194
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531
    shapes = {
        "decoder.upsamples.3.time_conv.weight": [768, 384, 3, 1, 1],
        "decoder.upsamples.3.resample.1.weight": [192, 384, 3, 3],
        "decoder.upsamples.4.shortcut.weight": [384, 192, 1, 1, 1],
        "encoder.head.2.weight": [32, 384, 3, 3, 3],
        "encoder.middle.1.to_qkv.weight": [1152, 384, 1, 1],
        "encoder.middle.1.norm.gamma": [384, 1, 1],
    }
    for key, shape in shapes.items():
        assert list(state[key].shape) == shape, key
    assert "decoder.upsamples.11.time_conv.weight" not in state  # the last upsample is 2D only


@pytest.mark.parametrize("structure", [
    dict(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
         temperal_downsample=[False, True, True]),
    dict(dim=4, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=3, temperal_downsample=[True, False]),
])
def test_converter_keys_match_diffusers_model(structure):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = WanVAE(**structure)
        theirs = diffusers.AutoencoderKLWan(
            **{("base_dim" if k == "dim" else k): v for k, v in structure.items()})
    converted = vae_official_to_diffusers(ours.state_dict())
    expected = theirs.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    back = vae_diffusers_to_official(expected)
    assert set(back) == set(ours.state_dict())
    config = dict(theirs.config)
    if structure["z_dim"] != 16:  # Diffusers' defaults are the 16 official statistics
        with pytest.raises(ValueError, match="latents_mean has 16 values but z_dim is 4"):
            vae_config_from_diffusers(config)
        config = {k: v for k, v in config.items() if not k.startswith("latents_")}
    assert vae_config_from_diffusers(config) == VAEConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in structure.items()})


def test_converter_round_trip_keeps_tensors_and_rejects_unknown_keys():
    with torch.device("meta"):
        state = WanVAE(**asdict(A14B.vae)).state_dict()
    there = vae_official_to_diffusers(state)
    back = vae_diffusers_to_official(there)
    assert list(back) == list(state) and all(back[k] is state[k] for k in state)
    # A partial dict needs the config's num_res_blocks to place decoder blocks.
    part = {"decoder.upsamples.4.shortcut.weight": state["decoder.upsamples.4.shortcut.weight"]}
    assert list(vae_official_to_diffusers(part, num_res_blocks=2)) == [
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
    with pytest.raises(KeyError, match="encoder.bogus.weight"):
        vae_official_to_diffusers({**state, "encoder.bogus.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="decoder.up_blocks.0.attentions.0.norm.gamma"):
        vae_diffusers_to_official({**there,
                                   "decoder.up_blocks.0.attentions.0.norm.gamma": torch.zeros(1)})


def test_config_from_diffusers_rejects_other_vaes():
    assert vae_config_from_diffusers({"base_dim": 96}) == A14B.vae
    custom = vae_config_from_diffusers({"base_dim": 8, "z_dim": 4, "latents_mean": [0.0] * 4,
                                        "latents_std": [2.0] * 4})
    assert custom.latents_mean == (0.0,) * 4 and custom.latents_std == (2.0,) * 4
    for field, value in (("is_residual", True), ("attn_scales", [0.5]), ("decoder_base_dim", 64)):
        with pytest.raises(ValueError, match=field):
            vae_config_from_diffusers({"base_dim": 96, field: value})


# ---------------------------------------------------------------------------- bad input
def test_errors_name_the_problem():
    vae = tiny_vae()
    with pytest.raises(ValueError, match=r"4k\+1 frames.*got 8"):
        vae.encode(torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="height 30 and width 32 must be positive multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\].*\[1, 4, 5, 32, 32\]"):
        vae.encode(torch.zeros(1, 4, 5, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 16, n>=1, h, w\].*\[1, 4, 2, 4, 4\]"):
        vae.decode(torch.zeros(1, 4, 2, 4, 4))
    with pytest.raises(ValueError, match="another WanVAE"):
        vae.decode_chunk(torch.zeros(1, 16, 1, 4, 4), tiny_vae().new_decode_cache())
    with pytest.raises(TypeError, match="DecodeCache"):
        vae.decode_chunk(torch.zeros(1, 16, 1, 4, 4), vae.new_encode_cache())
    cache = vae.new_encode_cache()
    with torch.no_grad():
        vae.encode_chunk(torch.zeros(1, 3, 1, 32, 32), cache)
        with pytest.raises(ValueError, match="multiple of 4 frames, got 3"):
            vae.encode_chunk(torch.zeros(1, 3, 3, 32, 32), cache)
        with pytest.raises(ValueError, match="stream started with"):
            vae.encode_chunk(torch.zeros(2, 3, 4, 32, 32), cache)
    with pytest.raises(ValueError, match="one per downsampling stage"):
        WanVAE(dim=8, temperal_downsample=(True, True))
    with pytest.raises(ValueError, match="z_dim is 4"):
        WanVAE(dim=8, z_dim=4, latents_mean=[0.0] * 16, latents_std=[1.0] * 16)


# ------------------------------------------------------------------- embedded shapes world
@torch.no_grad()
def test_embedded_size_config():
    vae = tiny_vae(z_dim=4)
    assert isinstance(vae.new_decode_cache(), DecodeCache)
    assert isinstance(vae.new_encode_cache(), EncodeCache)
    video = torch.rand(1, 3, 17, 64, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    mu, log_var = vae.encode_moments(video)
    latents = vae.encode(video)
    assert latents.shape == log_var.shape == (1, 4, 5, 8, 8)
    assert torch.equal(latents, mu)  # z_dim != 16 and no statistics given: identity normalisation
    decoded = vae.decode(latents)
    assert decoded.shape == (1, 3, 17, 64, 64) and decoded.abs().max() <= 1
    # User statistics (same random weights) are applied as (mu - mean) / std, undone in decode.
    mean, std = [0.5, -0.5, 0.0, 1.0], [2.0, 1.0, 0.5, 4.0]
    scaled = tiny_vae(z_dim=4, latents_mean=mean, latents_std=std)
    clip = video[:, :, :5, :32, :32]
    mu = vae.encode_moments(clip)[0]
    expected = (mu - torch.tensor(mean).view(1, 4, 1, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1, 1)
    assert max_abs(scaled.encode(clip), expected) <= 1e-6
    assert max_abs(scaled.decode(expected), vae.decode(mu)) <= 1e-5
    # The 16-channel A14B VAE defaults to the official statistics; the 4-channel shapes preset
    # to the identity (its trained weights carry their own statistics).
    a14b = WanVAE(**asdict(replace(A14B.vae, dim=8)))  # narrow: only the statistics matter
    assert a14b.latents_mean is not None and len(a14b.latents_std) == 16
    shapes = WanVAE(**asdict(SHAPES.vae))
    assert shapes.z_dim == 4 and shapes.latents_mean is None and shapes.latents_std is None
