"""WanModel (teacher DiT): parity with Diffusers, key converters, the A14B layout, RoPE, dtypes.

Parity is against Diffusers' independent ``WanTransformer3DModel`` (test oracle only) in fp32
on tiny random configs, weights moved by the project's own converter. Facts checked (key
names, shapes, counts) come from shared/reference/wan22-a14b.md §1.3/§1.4.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from teacher.config import DiTConfig
from teacher.convert_dit import (
    dit_config_from_diffusers,
    dit_diffusers_to_official,
    dit_official_to_diffusers,
)
from teacher.dit import WanModel, is_fp32_island, sinusoidal_embedding
from teacher.rope import WanRope3D, apply_rope, rope_axis_dims

# Parity bounds, relative to the output's max |value|. With the oracle's fp32 sinusoid patched
# to float64 both stacks compute the same math (measured ~2e-7); unpatched, the fp32 sinusoid
# (error up to 3.6e-5 at t=875, reference §6.3) moves the output by ~2e-5 of its scale.
TOL_PATCHED = 1e-5
TOL_UNPATCHED = 1e-4

TINY = dict(dim=24, ffn_dim=32, freq_dim=256, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
            text_len=8, eps=1e-6, text_dim=16)
# head_dim 20 gives an uneven RoPE split (t/h/w = 8/6/6 channels), like 44/42/42 at 128.
UNEVEN = dict(dim=40, ffn_dim=48, freq_dim=32, num_heads=2, num_layers=1, in_dim=4, out_dim=4,
              text_len=6, eps=1e-6, text_dim=8)


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every parameter, including the zero-initialised ones (biases, head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and name.endswith("weight"):  # Linear / Conv: unit-variance outputs
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:  # biases and modulation tables
                p.copy_(0.2 * noise)
    return module.eval()


def diffusers_twin(cfg: dict, seed: int):
    """A random Diffusers WanTransformer3DModel of the same shape as WanModel(**cfg)."""
    diffusers = pytest.importorskip("diffusers")
    head_dim = cfg["dim"] // cfg["num_heads"]
    torch.manual_seed(seed)
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg["num_heads"], attention_head_dim=head_dim,
        in_channels=cfg["in_dim"], out_channels=cfg["out_dim"], text_dim=cfg["text_dim"],
        freq_dim=cfg["freq_dim"], ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"],
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=cfg["eps"],
        rope_max_seq_len=32,
    )
    return randomise_(ref, seed)


def float64_sinusoid(freq_dim: int):
    """The official sinusoid (float64, cos first), written here to replace the oracle's fp32 one."""
    def embed(t: torch.Tensor) -> torch.Tensor:
        half = freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        args = t.to(torch.float64)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()
    return embed


def ours_from(ref, cfg: dict) -> WanModel:
    model = WanModel(**cfg).eval()
    model.load_state_dict(dit_diffusers_to_official(ref.state_dict()), strict=True)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    "cfg, shape, t, ctx_len",
    [
        (TINY, (1, 4, 2, 4, 4), [875], 3),
        (UNEVEN, (2, 4, 3, 4, 6), [999, 3], 4),  # batch of 2, distinct t, H != W
    ],
    ids=["tiny", "uneven-rope-split"],
)
@torch.no_grad()
def test_matches_diffusers(cfg, shape, t, ctx_len):
    ref = diffusers_twin(cfg, seed=1)
    model = ours_from(ref, cfg)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g)
    context = torch.randn(shape[0], ctx_len, cfg["text_dim"], generator=g)
    t = torch.tensor(t, dtype=torch.long)
    padded = F.pad(context, (0, 0, 0, cfg["text_len"] - ctx_len))  # Diffusers expects it padded

    ours = model(x, t, context)
    assert ours.shape == shape and ours.dtype == torch.float32
    unpatched = ref(x, t, padded, return_dict=False)[0]
    ref.condition_embedder.timesteps_proj.forward = float64_sinusoid(cfg["freq_dim"])
    patched = ref(x, t, padded, return_dict=False)[0]
    print(f"max|ref| {patched.abs().max():.3g}  rel err patched {rel_err(ours, patched):.2e}  "
          f"unpatched {rel_err(ours, unpatched):.2e}")
    assert rel_err(ours, patched) <= TOL_PATCHED
    assert rel_err(ours, unpatched) <= TOL_UNPATCHED


@torch.no_grad()
def test_per_frame_timesteps_match_diffusers_per_token():
    """t [B, F] (one per latent frame, as the causal student uses) = Diffusers' per-token t."""
    cfg = UNEVEN
    ref = diffusers_twin(cfg, seed=3)
    ref.condition_embedder.timesteps_proj.forward = float64_sinusoid(cfg["freq_dim"])
    model = ours_from(ref, cfg)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 3, 4, 4, generator=g)
    context = torch.randn(1, cfg["text_len"], cfg["text_dim"], generator=g)
    t_frames = torch.tensor([[900, 500, 100]])
    ours = model(x, t_frames, context)
    t_tokens = t_frames.repeat_interleave(2 * 2, dim=1)  # 2x2 tokens per latent frame
    expected = ref(x, t_tokens, context, return_dict=False)[0]
    assert rel_err(ours, expected) <= TOL_PATCHED
    assert rel_err(model(x, t_tokens, context), expected) <= TOL_PATCHED


@torch.no_grad()
def test_uniform_per_frame_and_per_token_t_equal_scalar_t():
    model = randomise_(WanModel(**TINY), seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 3, 4, 4, generator=g)
    context = torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([700, 20])
    scalar = model(x, t, context)
    per_frame = model(x, t[:, None].expand(2, 3), context)
    per_token = model(x, t[:, None].expand(2, 3 * 2 * 2), context)
    torch.testing.assert_close(per_frame, scalar, rtol=0, atol=1e-5 * scalar.abs().max())
    torch.testing.assert_close(per_token, scalar, rtol=0, atol=1e-5 * scalar.abs().max())


@torch.no_grad()
def test_context_is_zero_padded_inside_and_padding_is_attended():
    model = randomise_(WanModel(**TINY), seed=7)
    g = torch.Generator().manual_seed(8)
    x, context = torch.randn(1, 4, 1, 4, 4, generator=g), torch.randn(1, 3, 16, generator=g)
    t = torch.tensor([500])
    out = model(x, t, context)
    assert torch.equal(out, model(x, t, F.pad(context, (0, 0, 0, TINY["text_len"] - 3))))
    # No mask: the embedded padding rows are attended, so a shorter text_len changes the output.
    shorter = WanModel(**{**TINY, "text_len": 3}).eval()
    shorter.load_state_dict(model.state_dict())
    assert (shorter(x, t, context) - out).abs().max() > 1e-3


def test_sinusoid_is_float64_cos_first():
    t = torch.tensor([875, 1])
    emb = sinusoidal_embedding(t, 8)
    assert emb.dtype == torch.float64 and emb.shape == (2, 8)
    j = torch.arange(4, dtype=torch.float64)
    angle = 875.0 * 10000.0 ** (-j / 4)
    torch.testing.assert_close(emb[0], torch.cat([angle.cos(), angle.sin()]), rtol=0, atol=1e-12)


# ----- converters --------------------------------------------------------------------------

def test_converter_round_trip_is_identity_on_keys_and_tensors():
    model = randomise_(WanModel(**TINY), seed=9)
    official = model.state_dict()
    diffusers = dit_official_to_diffusers(official)
    back = dit_diffusers_to_official(diffusers)
    assert list(back) == list(official)
    assert all(back[k] is official[k] for k in official)
    # The traps of reference §1.4, spelled out.
    assert diffusers["blocks.1.norm2.weight"] is official["blocks.1.norm3.weight"]
    assert diffusers["scale_shift_table"] is official["head.modulation"]
    assert diffusers["blocks.0.scale_shift_table"] is official["blocks.0.modulation"]
    assert diffusers["blocks.0.attn2.to_out.0.bias"] is official["blocks.0.cross_attn.o.bias"]
    assert diffusers["blocks.1.ffn.net.0.proj.weight"] is official["blocks.1.ffn.0.weight"]


@pytest.mark.parametrize("convert, key", [
    (dit_official_to_diffusers, "blocks.0.norm2.weight"),  # a Diffusers name in official input
    (dit_official_to_diffusers, "img_emb.proj.0.weight"),
    (dit_diffusers_to_official, "blocks.0.norm3.weight"),  # an official name in Diffusers input
    (dit_diffusers_to_official, "condition_embedder.image_embedder.ff.net.0.proj.weight"),
])
def test_converter_unknown_key_raises_naming_it(convert, key):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        convert({key: torch.zeros(1)})


A14B_OFFICIAL_JSON = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "model_type": "t2v",
                      "text_len": 512, "in_dim": 16, "dim": 5120, "ffn_dim": 13824, "freq_dim": 256,
                      "out_dim": 16, "num_heads": 40, "num_layers": 40, "eps": 1e-06}
A14B_DIFFUSERS_JSON = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.0",
                       "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128,
                       "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
                       "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True,
                       "qk_norm": "rms_norm_across_heads", "eps": 1e-06, "image_dim": None,
                       "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
                       "pos_embed_seq_len": None}


def test_configs_from_official_and_diffusers_json():
    assert WanModel.config_from_json(A14B_OFFICIAL_JSON) == DiTConfig()
    assert dit_config_from_diffusers(A14B_DIFFUSERS_JSON) == DiTConfig()
    tiny = DiTConfig(**TINY)
    assert WanModel.config_from_json(WanModel.config_to_json(tiny)) == tiny
    with pytest.raises(ValueError, match="window_size"):
        WanModel.config_from_json({**A14B_OFFICIAL_JSON, "window_size": [8, 8]})
    with pytest.raises(ValueError, match="attn_mode"):
        WanModel.config_from_json({**A14B_OFFICIAL_JSON, "attn_mode": "x"})
    with pytest.raises(ValueError, match="lacks.*dim"):
        WanModel.config_from_json({k: v for k, v in A14B_OFFICIAL_JSON.items() if k != "dim"})
    with pytest.raises(ValueError, match="image_dim"):
        dit_config_from_diffusers({**A14B_DIFFUSERS_JSON, "image_dim": 1280})
    with pytest.raises(ValueError, match="foo"):
        dit_config_from_diffusers({**A14B_DIFFUSERS_JSON, "foo": 1})


# ----- the real A14B layout on the meta device --------------------------------------------

def test_a14b_expert_layout_on_meta():
    with torch.device("meta"):
        model = WanModel(**asdict(DiTConfig()))
    state = model.state_dict()
    assert len(state) == 1095
    assert sum(v.numel() for v in state.values()) == 14_288_491_584
    expected_shapes = {
        "patch_embedding.weight": (5120, 16, 1, 2, 2), "patch_embedding.bias": (5120,),
        "text_embedding.0.weight": (5120, 4096), "text_embedding.2.weight": (5120, 5120),
        "time_embedding.0.weight": (5120, 256), "time_embedding.2.weight": (5120, 5120),
        "time_projection.1.weight": (30720, 5120), "time_projection.1.bias": (30720,),
        "blocks.0.modulation": (1, 6, 5120), "blocks.39.modulation": (1, 6, 5120),
        "blocks.0.self_attn.q.weight": (5120, 5120), "blocks.0.self_attn.o.bias": (5120,),
        "blocks.0.self_attn.norm_q.weight": (5120,), "blocks.0.cross_attn.norm_k.weight": (5120,),
        "blocks.0.norm3.weight": (5120,), "blocks.0.norm3.bias": (5120,),
        "blocks.0.ffn.0.weight": (13824, 5120), "blocks.0.ffn.2.weight": (5120, 13824),
        "head.modulation": (1, 2, 5120), "head.head.weight": (64, 5120), "head.head.bias": (64,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(("rope", "blocks.0.norm1", "blocks.0.norm2", "head.norm")) for k in state)

    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**{k: v for k, v in A14B_DIFFUSERS_JSON.items()
                                                 if not k.startswith("_")})
    ref_official = dit_diffusers_to_official(ref.state_dict())
    assert set(ref_official) == set(state)
    assert all(ref_official[k].shape == state[k].shape for k in state)


# ----- RoPE -------------------------------------------------------------------------------

def test_rope_axis_split():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(20) == (8, 6, 6)
    assert rope_axis_dims(12) == (4, 4, 4)
    for bad in (4, 13):
        with pytest.raises(ValueError, match="head_dim"):
            rope_axis_dims(bad)


@pytest.mark.parametrize("head_dim", [128, 20])
def test_rope_matches_complex_polar_per_axis(head_dim):
    """Independent form: per token (f, h, w) in nested-loop order, multiply complex pairs."""
    grid = (3, 2, 4)
    d_hw = 2 * (head_dim // 6)
    axis_dims = (head_dim - 2 * d_hw, d_hw, d_hw)
    rows = []
    for f in range(grid[0]):
        for h in range(grid[1]):
            for w in range(grid[2]):  # w fastest
                parts = []
                for pos, d in zip((f, h, w), axis_dims):
                    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
                    parts.append(torch.polar(torch.ones(d // 2, dtype=torch.float64), pos * inv))
                rows.append(torch.cat(parts))
    freqs = torch.stack(rows)  # [L, head_dim/2] complex128
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, freqs.shape[0], 3, head_dim, generator=g)  # [B, L, heads, head_dim]
    expected = torch.view_as_real(
        torch.view_as_complex(x.double().reshape(2, -1, 3, head_dim // 2, 2)) * freqs[None, :, None]
    ).flatten(-2)

    cos, sin = WanRope3D(head_dim).cos_sin(grid)
    assert cos.dtype == torch.float64 and cos.shape == (24, head_dim // 2)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float(), rtol=0, atol=1e-6)
    # The pair formula in real arithmetic, on a non-contiguous slice of the tokens.
    x0, x1 = x.double()[:, 1::2, :, 0::2], x.double()[:, 1::2, :, 1::2]
    c, s = cos[1::2, None], sin[1::2, None]
    pairs = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).float()
    torch.testing.assert_close(apply_rope(x[:, 1::2], cos[1::2], sin[1::2]), pairs, rtol=0,
                               atol=1e-6)
    # bf16 input: still rotated in float64, returned fp32.
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.float32
    # Tables rounded to a half dtype are refused, not used.
    with pytest.raises(TypeError, match="torch.bfloat16/torch.bfloat16, not float64"):
        apply_rope(x, cos.bfloat16(), sin.bfloat16())


def test_rope_frame_start_shifts_frame_positions_only():
    rope = WanRope3D(20)
    whole = rope.angles((5, 2, 3))
    tail = rope.angles((2, 2, 3), frame_start=3)
    assert torch.equal(tail, whole[3 * 6:])
    with pytest.raises(ValueError, match="out of range"):
        rope.angles((2, 2, 3), frame_start=1023)


# ----- errors ----------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    model = WanModel(**TINY).eval()
    x, t, context = torch.zeros(1, 4, 2, 4, 4), torch.tensor([10]), torch.zeros(1, 3, 16)
    with pytest.raises(ValueError, match="text_len=8"):
        model(x, t, torch.zeros(1, 9, 16))
    with pytest.raises(ValueError, match="in_dim=4"):
        model(torch.zeros(1, 5, 2, 4, 4), t, context)
    with pytest.raises(ValueError, match="W=5, not divisible"):
        model(torch.zeros(1, 4, 2, 4, 5), t, context)
    with pytest.raises(ValueError, match="text_dim=16"):
        model(x, t, torch.zeros(1, 3, 12))
    with pytest.raises(TypeError, match="int64"):
        model(x, t.bfloat16(), context)
    with pytest.raises(ValueError, match=r"expected \[B=1\]"):
        model(x, torch.tensor([10, 10]), context)
    with pytest.raises(ValueError, match=r"frames=2\] .*tokens=8\]"):
        model(x, torch.tensor([[10, 10, 10]]), context)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        WanModel(**{**TINY, "num_heads": 5})
    with pytest.raises(ValueError, match="head_dim=4"):
        WanModel(**{**TINY, "dim": 8})


# ----- bf16 ------------------------------------------------------------------------------

@torch.no_grad()
def test_bf16_with_fp32_islands_runs_and_stays_close():
    model = randomise_(WanModel(**TINY), seed=11)
    g = torch.Generator().manual_seed(12)
    x, context = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 5, 16, generator=g)
    t = torch.tensor([875])
    reference = model(x, t, context)
    model.to(torch.bfloat16).keep_fp32_islands()
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if is_fp32_island(name) else torch.bfloat16), name
    assert model.rope.cos_sin((1, 1, 1))[0].dtype == torch.float64
    out = model(x, t, context)
    assert out.dtype == torch.float32
    cosine = F.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    print(f"bf16 vs fp32 cosine {cosine:.5f}, rel err {rel_err(out, reference):.2e}")
    assert cosine > 0.99
