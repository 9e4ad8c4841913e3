"""umT5 encoder: parity with transformers' UMT5EncoderModel, buckets, real shapes, bf16, errors.

The oracle is transformers' independent implementation at a tiny random config, with the weights
mapped by this project's converter (so the key table is tested too). Tolerances are stated where
they are used.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from teacher.config import A14B, SHAPES
from teacher.convert_t5 import (
    t5_config_from_transformers,
    t5_official_to_transformers,
    t5_transformers_to_official,
)
from teacher.t5 import UMT5Encoder, encode_text, relative_position_bucket

TINY = dict(vocab_size=300, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, num_layers=2, num_buckets=32)
HF_TINY = dict(vocab_size=300, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", layer_norm_epsilon=1e-6,
               dropout_rate=0.0)


def tiny_encoder(seed: int = 0) -> UMT5Encoder:
    """Tiny encoder with every tensor random, norms and bias tables included, so a swapped key
    (norm1/norm2, gate/fc1, one layer's table for another's) changes the output."""
    torch.manual_seed(seed)
    model = UMT5Encoder(**TINY)
    with torch.no_grad():
        for block in model.blocks:
            block.norm1.weight.normal_(1.0, 0.2)
            block.norm2.weight.normal_(1.0, 0.2)
            block.pos_embedding.embedding.weight.normal_(0.0, 1.0)
        model.norm.weight.normal_(1.0, 0.2)
    return model.eval()


def padded_batch(lengths: list[int], vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids/mask [B, max(lengths)] with EOS (1) last and pad (0) after."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = torch.randint(3, vocab, (n - 1,), generator=g)
        ids[row, n - 1] = 1
        mask[row, :n] = 1
    return ids, mask


def bucket_by_integers(relative: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    """T5's bidirectional bucket, computed with integers only (no logs).

    Per direction: n = num_buckets/2 buckets, e = n/2 exact ones. For |d| >= e the bucket is
    e + floor((n - e) * log(|d|/e) / log(max_distance/e)) capped at n - 1; that floor is the
    largest k with (max_distance/e)^k <= (|d|/e)^(n-e), compared here as integer powers.
    """
    n = num_buckets // 2
    e = n // 2
    base = n if relative > 0 else 0
    d = abs(relative)
    if d < e:
        return base + d
    k = 0
    while max_distance ** (k + 1) * e ** (n - e) <= d ** (n - e) * e ** (k + 1):
        k += 1
    return base + min(e + k, n - 1)


def test_bucket_function_matches_integer_formula():
    relative = torch.arange(-600, 601)
    got = relative_position_bucket(relative, 32).tolist()
    want = [bucket_by_integers(r) for r in relative.tolist()]
    assert got == want
    # Spot checks of the table in reference 1.1: exact below 8, +16 for positive offsets, cap 15.
    assert got[600 + 7] == 16 + 7 and got[600 - 7] == 7
    assert got[600 + 128] == 31 and got[600 - 500] == 15
    assert got[600 + 8] == 16 + 8


def test_parity_with_transformers_umt5():
    transformers = pytest.importorskip("transformers")
    ours = tiny_encoder()
    config = transformers.UMT5Config(**HF_TINY)
    theirs = transformers.UMT5EncoderModel(config).eval()
    missing, unexpected = theirs.load_state_dict(t5_official_to_transformers(ours.state_dict()), strict=False)
    # The converter emits the embedding once, as shared.weight; transformers ties the other name.
    assert list(missing) == ["encoder.embed_tokens.weight"] and not unexpected
    assert torch.equal(theirs.encoder.embed_tokens.weight, ours.token_embedding.weight)

    # 200 tokens reach distances beyond max_distance 128 (the capped bucket) and the log buckets.
    ids, mask = padded_batch([200, 37, 5], TINY["vocab_size"])
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert got.shape == (3, 200, TINY["dim"]) and got.dtype == torch.float32
    valid = mask.bool()
    diff = (got - want)[valid].abs().max().item()
    # fp32, same maths in a different order; the reference measured 9e-7 at the real config.
    assert diff <= 1e-5, diff
    assert want[valid].abs().max() > 0.5  # the comparison is not between near-zero tensors

    # And back: transformers' own state dict (both tied names present) loads strictly into ours.
    back = UMT5Encoder(**TINY)
    back.load_state_dict(t5_transformers_to_official(theirs.state_dict()), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_padding_does_not_change_valid_rows():
    model = tiny_encoder(seed=3)
    ids, mask = padded_batch([12], TINY["vocab_size"], seed=4)
    wide_ids = torch.cat([ids, torch.randint(3, 300, (1, 20))], dim=1)  # garbage under the pad mask
    wide_mask = torch.cat([mask, torch.zeros(1, 20, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        short = model(ids, mask)
        wide = model(wide_ids, wide_mask.bool())
    torch.testing.assert_close(wide[:, :12], short, rtol=0, atol=1e-5)


def test_encode_text_returns_valid_rows():
    model = tiny_encoder(seed=5)
    ids, mask = padded_batch([9, 4, 6], TINY["vocab_size"])
    with torch.no_grad():
        rows = encode_text(model, ids, mask)
        full = model(ids, mask)
    assert [tuple(r.shape) for r in rows] == [(9, 32), (4, 32), (6, 32)]
    for i, r in enumerate(rows):
        assert torch.equal(r, full[i, : r.shape[0]])


def test_real_config_on_meta_device():
    with torch.device("meta"):
        model = UMT5Encoder(**dataclasses.asdict(A14B.t5))
    sd = model.state_dict()
    assert len(sd) == 242
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336
    shapes = {
        "token_embedding.weight": (256384, 4096),
        "norm.weight": (4096,),
    }
    for i in (0, 23):
        shapes |= {
            f"blocks.{i}.norm1.weight": (4096,),
            f"blocks.{i}.attn.q.weight": (4096, 4096),
            f"blocks.{i}.attn.k.weight": (4096, 4096),
            f"blocks.{i}.attn.v.weight": (4096, 4096),
            f"blocks.{i}.attn.o.weight": (4096, 4096),
            f"blocks.{i}.norm2.weight": (4096,),
            f"blocks.{i}.ffn.gate.0.weight": (10240, 4096),
            f"blocks.{i}.ffn.fc1.weight": (10240, 4096),
            f"blocks.{i}.ffn.fc2.weight": (4096, 10240),
            f"blocks.{i}.pos_embedding.embedding.weight": (32, 64),
        }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    per_block = {k.split(".", 2)[2] for k in sd if k.startswith("blocks.")}
    assert len(per_block) == 10 and "blocks.24.norm1.weight" not in sd


def test_bf16_forward_close_to_fp32():
    model = tiny_encoder(seed=6)
    ids, mask = padded_batch([40, 17], TINY["vocab_size"])
    with torch.no_grad():
        ref = model(ids, mask)
        half = model.to(torch.bfloat16)(ids, mask)
    assert half.dtype == torch.bfloat16
    valid = mask.bool()
    cos = torch.nn.functional.cosine_similarity(half.float()[valid], ref[valid], dim=-1)
    assert torch.isfinite(half[valid]).all()
    assert cos.min() > 0.99, cos.min()


def test_bad_inputs_raise():
    model = tiny_encoder()
    ids, mask = padded_batch([5, 3], TINY["vocab_size"])
    with pytest.raises(ValueError, match="mask shape"):
        model(ids, mask[:, :4])
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        model(ids[0], mask[0])
    with pytest.raises(TypeError, match="integer"):
        model(ids.float(), mask)
    with pytest.raises(ValueError, match="embedding has 300 rows"):
        model(ids + 300, mask)
    left_padded = mask.flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        encode_text(model, ids, left_padded)
    with pytest.raises(ValueError, match="num_buckets"):
        UMT5Encoder(**(TINY | {"num_buckets": 30}))


def test_converter_keys_and_errors():
    sd = tiny_encoder().state_dict()
    hf = t5_official_to_transformers(sd)
    assert len(hf) == len(sd)
    assert hf["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] is sd["blocks.1.ffn.gate.0.weight"]
    assert hf["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"] is sd["blocks.1.ffn.fc1.weight"]
    assert hf["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] is \
        sd["blocks.0.pos_embedding.embedding.weight"]
    assert hf["encoder.final_layer_norm.weight"] is sd["norm.weight"]
    assert t5_transformers_to_official(hf) == sd
    only_tied_name = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in hf.items()}
    assert t5_transformers_to_official(only_tied_name).keys() == sd.keys()
    with pytest.raises(KeyError, match="blocks.0.attn.q.bias"):
        t5_official_to_transformers({"blocks.0.attn.q.bias": torch.zeros(1)})
    with pytest.raises(KeyError, match="lm_head.weight"):
        t5_transformers_to_official({"lm_head.weight": torch.zeros(1)})
    clash = dict(hf) | {"encoder.embed_tokens.weight": hf["shared.weight"] + 1}
    with pytest.raises(ValueError, match="differ"):
        t5_transformers_to_official(clash)


def test_config_from_transformers():
    got = t5_config_from_transformers(HF_TINY | {"model_type": "umt5"})
    assert dataclasses.asdict(got) == TINY
    real = {"d_ff": 10240, "d_kv": 64, "d_model": 4096, "dense_act_fn": "gelu_new",
            "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "num_heads": 64,
            "num_layers": 24, "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "vocab_size": 256384, "model_type": "umt5"}
    assert t5_config_from_transformers(real) == A14B.t5
    for bad, match in (({"relative_attention_max_distance": 64}, "max_distance"),
                       ({"feed_forward_proj": "relu"}, "feed_forward_proj"),
                       ({"model_type": "t5"}, "model_type")):
        with pytest.raises(ValueError, match=match):
            t5_config_from_transformers(real | bad)
    with pytest.raises(ValueError, match="d_model"):
        t5_config_from_transformers({k: v for k, v in real.items() if k != "d_model"})


def test_shapes_preset_builds_and_runs():
    model = UMT5Encoder(**dataclasses.asdict(SHAPES.t5)).eval()
    ids, mask = padded_batch([10, 3], SHAPES.t5.vocab_size)
    with torch.no_grad():
        out = model(ids, mask)
    assert out.shape == (2, 10, SHAPES.t5.dim) and torch.isfinite(out).all()
