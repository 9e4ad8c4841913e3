"""student.attention_masks: the flex-attention mask rule equals the dense masks element by element,
the student's BlockMask path computes what its dense-mask path computes (eager flex on the CPU;
the compiled CUDA kernel is checked by tests/benchmarks/bench_gpu_real_size.py), backend choice
and errors."""

from __future__ import annotations

import pytest
import torch

from student.attention_masks import (
    block_causal_mask,
    dense_mask,
    flex_block_mask,
    mask_mod,
    resolve_backend,
    teacher_forcing_mask,
)
from student.causal_dit import CausalWanModel
from tests.test_causal_dit import DIT, inputs, randomise


@pytest.mark.parametrize("kind", ["causal", "teacher_forcing"])
@pytest.mark.parametrize("n_chunks,tokens_per_chunk", [(1, 3), (3, 2), (4, 5), (7, 13)])
def test_mask_mod_equals_the_dense_mask(kind, n_chunks, tokens_per_chunk):
    dense = dense_mask(kind, n_chunks, tokens_per_chunk, "cpu")
    length = dense.shape[0]
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    from_rule = mask_mod(kind, n_chunks, tokens_per_chunk)(0, 0, q, k)
    assert from_rule.dtype == torch.bool and from_rule.shape == dense.shape
    assert torch.equal(from_rule, dense)


def test_dense_masks_are_the_named_builders():
    assert torch.equal(dense_mask("causal", 3, 4, "cpu"), block_causal_mask(3, 4, "cpu"))
    assert torch.equal(dense_mask("teacher_forcing", 3, 4, "cpu"), teacher_forcing_mask(3, 4, "cpu"))


def test_block_mask_skips_blocks_that_the_rule_masks_out():
    # 4 chunks of 128 tokens, teacher forcing: 8 x 8 blocks of 128; a clean query block never
    # reaches a noisy key block, and a noisy query block only its own noisy block.
    block_mask = flex_block_mask("teacher_forcing", 4, 128, "cpu")
    blocks = block_mask.to_dense()[0, 0].bool()  # [q blocks, kv blocks], True = visited
    expected = teacher_forcing_mask(4, 1, "cpu")  # one block per chunk: the same pattern
    assert torch.equal(blocks, expected)


# Eager flex on the CPU warns that it materialises the scores: that is the point of this check.
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@torch.no_grad()
@pytest.mark.parametrize("frames,chunk_frames", [(6, 2), (6, 3)])
def test_student_flex_path_equals_the_dense_path(frames, chunk_frames):
    model = randomise(CausalWanModel(chunk_frames=chunk_frames, **DIT), seed=11)
    x, ctx = inputs(frames=frames)
    n_chunks = frames // chunk_frames
    t = torch.tensor([[900, 500, 100][:n_chunks]] * 2)
    x_clean = torch.randn_like(x)
    model.attention_backend = "sdpa"
    ref_full = model(x, t, ctx, 2.0)
    ref_tf = model.forward_teacher_forcing(x_clean, x, t, ctx, 2.0)
    model.attention_backend = "flex"
    full = model(x, t, ctx, 2.0)
    tf = model.forward_teacher_forcing(x_clean, x, t, ctx, 2.0)
    scale = ref_full.abs().max()
    assert float((full - ref_full).abs().max() / scale) < 1e-5
    assert float((tf - ref_tf).abs().max() / ref_tf.abs().max()) < 1e-5
    # The flex path really ran: its memo holds BlockMasks, not dense masks.
    tokens_per_chunk = (x.shape[-2] // 2) * (x.shape[-1] // 2) * chunk_frames  # patch (1, 2, 2)
    assert ("flex", "teacher_forcing", n_chunks, tokens_per_chunk, x.device) in model._memo


def test_recache_keeps_a_dense_mask_under_flex():
    model = CausalWanModel(chunk_frames=1, **DIT)
    model.attention_backend = "flex"
    assert isinstance(model._mask("causal", 3, 4, torch.device("cpu"), allow_flex=False), torch.Tensor)
    assert not isinstance(model._mask("causal", 3, 4, torch.device("cpu")), torch.Tensor)


def test_backend_resolution_and_errors():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "flex"
    assert resolve_backend("sdpa", torch.device("cuda", 0)) == "sdpa"
    with pytest.raises(ValueError, match="attention_backend='xformers'"):
        resolve_backend("xformers", torch.device("cpu"))
    with pytest.raises(ValueError, match="mask kind 'full'"):
        mask_mod("full", 2, 2)
    with pytest.raises(ValueError, match="mask kind 'full'"):
        dense_mask("full", 2, 2, "cpu")


@pytest.mark.parametrize("kind", ["causal", "teacher_forcing"])
@pytest.mark.parametrize("n_chunks,tokens_per_chunk", [(3, 100), (4, 128), (7, 45)])
def test_block_mask_equals_torch_create_block_mask(kind, n_chunks, tokens_per_chunk):
    # The slice-by-slice build against torch's own (all pairs at once): same partial and full
    # block lists, block by block, including the padded last block.
    from torch.nn.attention.flex_attention import create_block_mask

    ours = flex_block_mask(kind, n_chunks, tokens_per_chunk, "cpu")
    length = n_chunks * tokens_per_chunk * (2 if kind == "teacher_forcing" else 1)
    ref = create_block_mask(mask_mod(kind, n_chunks, tokens_per_chunk), None, None, length, length,
                            device="cpu")
    assert ours.seq_lengths == ref.seq_lengths
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        counts = getattr(ref, num)[0, 0]
        for row, n in enumerate(counts.tolist()):
            assert sorted(getattr(ours, idx)[0, 0, row, :n].tolist()) == \
                sorted(getattr(ref, idx)[0, 0, row, :n].tolist()), (idx, row)
