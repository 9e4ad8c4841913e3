"""CausalWanModel: the KV-cache path against the full block-causal forward, the teacher-forcing
layout, equality with WanModel for one chunk, strict loading, the rolling window, the real
causal-1.3b layout on meta, checkpoint folders and input errors.

All parity checks are fp32 on tiny random models with every parameter randomised (including the
zero-initialised guidance embedding and head, so no path can hide behind a zero).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from student.attention_masks import block_causal_mask, teacher_forcing_mask
from student.causal_dit import GUIDANCE_KEYS, CausalWanModel, is_student_fp32_island
from student.checkpoint import (
    load_student,
    save_student,
    student_from_expert_state_dict,
    student_from_wan_folder,
)
from student.config import (
    STUDENT_PRESETS,
    StudentConfig,
    student_config_from_dict,
    student_config_to_dict,
    student_preset,
)
from teacher.config import DiTConfig
from teacher.dit import WanModel
from teacher.weight_files import CheckpointError, save_safetensors_atomic

# Chunk-by-chunk vs full-sequence: the same math, only the attention sums run over differently
# shaped key sets; measured ~4e-7 of the output scale.
TOL = 1e-5

DIT = dict(dim=24, ffn_dim=32, freq_dim=16, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
           text_len=8, eps=1e-6, text_dim=16)




def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and name.endswith("weight"):
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return module.eval()


def student(chunk_frames: int = 2, seed: int = 0, **kw) -> CausalWanModel:
    return randomise(CausalWanModel(chunk_frames=chunk_frames, **{**DIT, **kw}), seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def inputs(batch=2, frames=6, h=4, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, h, w, generator=g)
    ctx = torch.randn(batch, 5, 16, generator=g)
    return x, ctx


# ----- equalities ---------------------------------------------------------------------------

@torch.no_grad()
def test_single_chunk_forward_equals_wanmodel_exactly():
    expert = randomise(WanModel(**DIT), seed=3)
    model = CausalWanModel(chunk_frames=3, **DIT).eval()
    model.load_expert_state_dict(expert.state_dict())
    x, ctx = inputs(frames=3)
    t = torch.tensor([875, 20])
    ref = expert(x, t, ctx)
    # A fresh student's guidance embedding adds exactly zero, whatever the scale.
    assert torch.equal(model(x, t[:, None], ctx, torch.tensor([3.0, 1.5])), ref)
    assert torch.equal(model(x, t, ctx, None), ref)


@torch.no_grad()
def test_kv_cache_chunk_by_chunk_equals_block_causal_forward():
    model = student(chunk_frames=2)
    x, ctx = inputs(frames=8)  # 4 chunks, all inside the (unbounded) window
    t = torch.tensor([[999, 700, 400, 0], [500, 500, 10, 999]])
    guidance = torch.tensor([3.0, 4.5])
    full = model(x, t, ctx, guidance)
    cache = model.new_cache(2)
    outs = []
    for c in range(4):
        chunk = x[:, :, 2 * c:2 * c + 2]
        outs.append(model.forward_chunk(chunk, t[:, c], ctx, guidance, cache))
        # Cached at the same t as in the full forward, so the two must agree.
        model.append_chunk(chunk, ctx, guidance, cache, t=t[:, c])
    assert rel_err(torch.cat(outs, 2), full) < TOL


@torch.no_grad()
def test_kv_cache_equals_full_forward_within_a_bounded_window():
    """With sink 1 + window 2 the policy has dropped nothing while <= 3 chunks are cached."""
    model = student(chunk_frames=1, sink_chunks=1, window_chunks=2)
    x, ctx = inputs(frames=4)
    t = torch.tensor([[900, 600, 300, 100]] * 2)
    full = model(x, t, ctx, 2.0)
    cache = model.new_cache(2)
    outs = []
    for c in range(4):
        outs.append(model.forward_chunk(x[:, :, c:c + 1], t[:, c], ctx, 2.0, cache))
        model.append_chunk(x[:, :, c:c + 1], ctx, 2.0, cache, t=t[:, c])
    assert rel_err(torch.cat(outs, 2), full) < TOL


@torch.no_grad()
def test_teacher_forcing_equals_cached_clean_chunks():
    model = student(chunk_frames=2)
    x_clean, ctx = inputs(frames=6, seed=1)
    x_noisy, _ = inputs(frames=6, seed=2)
    t = torch.tensor([[900, 500, 100], [250, 999, 600]])
    tf = model.forward_teacher_forcing(x_clean, x_noisy, t, ctx, 3.0)
    cache = model.new_cache(2)
    outs = []
    for c in range(3):
        outs.append(model.forward_chunk(x_noisy[:, :, 2 * c:2 * c + 2], t[:, c], ctx, 3.0, cache))
        model.append_chunk(x_clean[:, :, 2 * c:2 * c + 2], ctx, 3.0, cache)  # at t = 0
    assert rel_err(torch.cat(outs, 2), tf) < TOL


@torch.no_grad()
def test_forward_is_block_causal():
    model = student(chunk_frames=2)
    x, ctx = inputs(frames=6)
    t = torch.tensor([[900, 500, 100]] * 2)
    base = model(x, t, ctx, 3.0)
    x2 = x.clone()
    x2[:, :, 4:] += 1.0  # change only the last chunk
    moved = model(x2, t, ctx, 3.0)
    assert torch.equal(moved[:, :, :4], base[:, :, :4])
    assert (moved[:, :, 4:] - base[:, :, 4:]).abs().max() > 1e-3


def test_masks_match_their_definition():
    n, m = 3, 2
    causal = block_causal_mask(n, m, "cpu")
    tf = teacher_forcing_mask(n, m, "cpu")
    L = n * m
    for i in range(L):
        for j in range(L):
            ci, cj = i // m, j // m
            assert causal[i, j] == (cj <= ci)
            assert tf[i, j] == (cj <= ci)  # clean -> clean
            assert not tf[i, L + j]  # clean never sees noisy
            assert tf[L + i, j] == (cj < ci)  # noisy -> earlier clean
            assert tf[L + i, L + j] == (cj == ci)  # noisy -> itself only


def test_masks_and_rope_are_built_once_per_shape():
    model = student(chunk_frames=1)
    x, ctx = inputs(frames=3)
    with torch.no_grad():
        model(x, torch.zeros(2, 3, dtype=torch.int64), ctx)
        first = model._mask("causal", 3, 6, x.device)
        model(x, torch.zeros(2, 3, dtype=torch.int64), ctx)
    assert model._mask("causal", 3, 6, x.device) is first


@torch.no_grad()
def test_guidance_embedding_conditions_the_output():
    model = student(chunk_frames=1)
    x, ctx = inputs(frames=2)
    t = torch.tensor([500, 500])
    a, b = model(x, t, ctx, 2.0), model(x, t, ctx, 4.0)
    assert (a - b).abs().max() > 1e-3
    # Per-sample scales: sample 1 of a mixed batch equals sample 1 of the b batch.
    mixed = model(x, t, ctx, torch.tensor([2.0, 4.0]))
    assert rel_err(mixed[1], b[1]) < TOL and rel_err(mixed[0], a[0]) < TOL


# ----- cross-attention cache and recache ----------------------------------------------------

@torch.no_grad()
def test_cross_attention_kv_computed_once_per_prompt():
    model = student(chunk_frames=1)
    x, ctx = inputs(frames=1)
    cache = model.new_cache(2)
    model.forward_chunk(x, torch.tensor([500, 500]), ctx, 3.0, cache)
    kv = cache.cross
    model.forward_chunk(x, torch.tensor([300, 300]), ctx, 3.0, cache)
    assert cache.cross is kv  # same prompt tensor: reused
    ctx.mul_(2.0)  # changed in place: must be recomputed
    model.forward_chunk(x, torch.tensor([300, 300]), ctx, 3.0, cache)
    assert cache.cross is not kv


def test_streaming_runs_under_inference_mode_and_sees_in_place_prompt_changes():
    """Inference tensors carry no version counter: the cross-attention K/V are still reused for
    an unchanged prompt, recomputed after an in-place change, and the numbers equal no_grad's."""
    model = student(chunk_frames=1)
    x, ctx = inputs(frames=2)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        cache = model.new_cache(2)
        model.append_chunk(x[:, :, :1], ctx, 3.0, cache)
        want = model.forward_chunk(x[:, :, 1:], t, ctx, 3.0, cache)
    with torch.inference_mode():
        ctx_inf = ctx.clone()
        cache = model.new_cache(2)
        model.append_chunk(x[:, :, :1], ctx_inf, 3.0, cache)
        kv = cache.cross
        got = model.forward_chunk(x[:, :, 1:], t, ctx_inf, 3.0, cache)
        assert cache.cross is kv
        ctx_inf.mul_(2.0)
        changed = model.forward_chunk(x[:, :, 1:], t, ctx_inf, 3.0, cache)
        assert cache.cross is not kv
    assert torch.equal(got, want)
    assert (changed - want).abs().max() > 1e-4


@torch.no_grad()
def test_recache_equals_building_the_cache_with_the_new_prompt():
    model = student(chunk_frames=1)
    x, ctx_a = inputs(frames=4, seed=1)
    _, ctx_b = inputs(frames=4, seed=5)
    switched, fresh = model.new_cache(2), model.new_cache(2)
    for c in range(3):
        model.append_chunk(x[:, :, c:c + 1], ctx_a, 3.0, switched)
        model.append_chunk(x[:, :, c:c + 1], ctx_b, 2.0, fresh)
    before = switched.layers[0].k.clone()
    model.recache(switched, ctx_b, 2.0)
    assert (switched.layers[0].k - before).abs().max() > 1e-4  # the prompt changed K
    for got, want in zip(switched.layers, fresh.layers):
        assert rel_err(got.k, want.k) < TOL and rel_err(got.v, want.v) < TOL
    nxt = x[:, :, 3:4]
    t = torch.tensor([700, 700])
    assert rel_err(model.forward_chunk(nxt, t, ctx_b, 2.0, switched),
                   model.forward_chunk(nxt, t, ctx_b, 2.0, fresh)) < TOL


# ----- rolling window + sink ---------------------------------------------------------------

@torch.no_grad()
def test_rolling_window_keeps_cache_and_positions_bounded_over_50_chunks():
    model = student(chunk_frames=2, sink_chunks=1, window_chunks=2)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 5, 16, generator=g)
    cache = model.new_cache(1)
    per_chunk_k = []  # layer-0 K of every chunk as it was appended
    sizes = []
    for c in range(50):
        x0 = torch.randn(1, 4, 2, 4, 4, generator=g)
        assert cache.num_frames <= (1 + 2) * 2  # next chunk's RoPE start stays bounded
        model.forward_chunk(x0, torch.tensor([999]), ctx, 3.0, cache)
        model.append_chunk(x0, ctx, 3.0, cache)
        tokens = 2 * 4  # chunk_frames * (4/2) * (4/2) tokens per chunk
        per_chunk_k.append(cache.layers[0].k[:, -tokens:].clone())
        sizes.append(cache.nbytes())
        assert cache.num_chunks == min(c + 1, 3)
    assert len(set(sizes[3:])) == 1  # constant once the window is full
    # The sink (chunk 0) and the last two chunks, in order, with their global frame indices.
    assert cache.frame_index.tolist() == [0, 1, 96, 97, 98, 99]
    expected = torch.cat([per_chunk_k[0], per_chunk_k[48], per_chunk_k[49]], dim=1)
    assert torch.equal(cache.layers[0].k, expected)
    assert cache.chunks_seen == 50


# ----- deferred appends (the K/V of a finished chunk computed in the next chunk's pass) -------

@pytest.mark.parametrize("chunk_frames, sink, window", [(1, 1, 2), (2, 0, 1), (1, 2, 3), (2, 1, None)])
@torch.no_grad()
def test_deferred_append_equals_append_pass_then_forward(chunk_frames, sink, window):
    """Seven chunks: from the fourth on the window drops chunks at every append (but for the
    unbounded case), so the pending chunk's own attention and the noisy chunk's see different
    cache layouts and RoPE positions. The first step of a chunk folds the append; the second
    reads the cache it committed."""
    model = student(chunk_frames=chunk_frames, sink_chunks=sink, window_chunks=window)
    g = torch.Generator().manual_seed(7)
    ctx = torch.randn(2, 5, 16, generator=g)
    guidance = torch.tensor([3.0, 1.5])
    eager, deferred = model.new_cache(2), model.new_cache(2)
    for c in range(7):
        x = torch.randn(2, 4, chunk_frames, 4, 6, generator=g)
        for t in ([900, 900], [600, 400]):
            t = torch.tensor(t)
            want = model.forward_chunk(x, t, ctx, guidance, eager)
            got = model.forward_chunk(x, t, ctx, guidance, deferred)
            assert deferred.pending is None
            assert rel_err(got, want) < TOL, (c, t)
        x0 = torch.randn(2, 4, chunk_frames, 4, 6, generator=g)
        model.append_chunk(x0, ctx, guidance, eager)
        model.append_chunk(x0, ctx, guidance, deferred, defer=True)
        assert deferred.pending is not None and deferred.holds_chunks
        assert deferred.num_chunks == eager.num_chunks - 1 or window is not None
    model.flush(deferred)
    assert deferred.frame_index.tolist() == eager.frame_index.tolist()
    assert torch.equal(deferred.chunk_t, eager.chunk_t)
    for got, want in zip(deferred.layers, eager.layers):
        assert rel_err(got.k, want.k) < TOL and rel_err(got.v, want.v) < TOL


@torch.no_grad()
def test_deferred_chunk_keeps_the_prompt_and_guidance_it_was_appended_with():
    """A forward_chunk with another prompt tensor or guidance, an in-place change of the
    prompt, a recache or a second append first run the pending chunk on its own, with what it
    was appended with: the numbers stay those of eager appends."""
    model = student(chunk_frames=1)
    x, ctx_a = inputs(frames=6, seed=1)
    _, ctx_b = inputs(frames=6, seed=2)
    eager, deferred = model.new_cache(2), model.new_cache(2)
    t = torch.tensor([700, 700])

    def append(c, ctx, guidance):
        model.append_chunk(x[:, :, c:c + 1], ctx, guidance, eager)
        model.append_chunk(x[:, :, c:c + 1], ctx, guidance, deferred, defer=True)

    def same_velocity(c, ctx, guidance):
        want = model.forward_chunk(x[:, :, c:c + 1], t, ctx, guidance, eager)
        got = model.forward_chunk(x[:, :, c:c + 1], t, ctx, guidance, deferred)
        assert deferred.pending is None
        assert rel_err(got, want) < TOL

    append(0, ctx_a, 3.0)
    same_velocity(1, ctx_b, 3.0)  # another prompt tensor
    append(1, ctx_b, 3.0)
    same_velocity(2, ctx_b, 2.0)  # another guidance
    ctx_c = ctx_b.clone()
    append(2, ctx_c, 2.0)
    ctx_c.mul_(2.0)  # changed in place after the append: the chunk keeps the old values
    same_velocity(3, ctx_c, 2.0)
    append(3, ctx_a, 2.0)
    append(4, ctx_a, 2.0)  # a second append runs the first
    assert deferred.num_chunks == 4 and deferred.pending is not None
    model.recache(eager, ctx_b, 1.5)
    model.recache(deferred, ctx_b, 1.5)
    assert deferred.pending is None and deferred.num_chunks == 5
    for got, want in zip(deferred.layers, eager.layers):
        assert rel_err(got.k, want.k) < TOL and rel_err(got.v, want.v) < TOL
    same_velocity(5, ctx_b, 1.5)


@torch.no_grad()
def test_deferred_append_checks_its_chunk_at_once():
    model = student(chunk_frames=2)
    cache = model.new_cache(2)
    x, ctx = inputs(frames=4)
    with pytest.raises(ValueError, match="has 4 latent frames; one chunk is chunk_frames=2"):
        model.append_chunk(x, ctx, 3.0, cache, defer=True)
    assert cache.pending is None
    model.append_chunk(x[:, :, :2], ctx, 3.0, cache, defer=True)
    with pytest.raises(ValueError, match=r"\(1, 1\) token grid per frame but the cached frames \(2, 3\)"):
        model.forward_chunk(x[:, :, 2:, :2, :2], torch.tensor([500, 500]), ctx, 3.0, cache)


# ----- loading and checkpoints -------------------------------------------------------------

def test_expert_state_dict_loads_strictly_with_only_guidance_keys_new():
    expert = randomise(WanModel(**DIT), seed=4)
    model = CausalWanModel(chunk_frames=1, **DIT)
    assert set(model.state_dict()) - set(expert.state_dict()) == set(GUIDANCE_KEYS)
    model.load_expert_state_dict(expert.state_dict())
    for k, v in expert.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.count_nonzero(model.guidance_embedding[2].weight) == 0
    state = expert.state_dict()
    with pytest.raises(CheckpointError, match="lacks 1 key"):
        model.load_expert_state_dict({k: v for k, v in state.items() if k != "blocks.1.ffn.0.bias"})
    with pytest.raises(CheckpointError, match="img_emb.proj"):
        model.load_expert_state_dict({**state, "img_emb.proj.0.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_expert_state_dict({**state, "head.head.bias": torch.zeros(3)})
    # A model without the embedding takes the expert's keys exactly.
    bare = CausalWanModel(chunk_frames=1, guidance_embedding=False, **DIT)
    bare.load_expert_state_dict(state)


def tiny_config(**kw) -> StudentConfig:
    dit = DiTConfig(**{**DIT, "patch_size": (1, 2, 2)})
    return StudentConfig(name="tiny", dit=dit, chunk_frames=2, sink_chunks=1, window_chunks=2,
                         shift=3.0, guidance_default=3.0, guidance_max=5.0, **kw)


def test_student_folder_round_trip_and_init_from_wan_folder(tmp_path):
    config = tiny_config()
    model = randomise(CausalWanModel.from_config(config), seed=6)
    save_student(tmp_path / "s", model, config)
    assert {p.name for p in (tmp_path / "s").iterdir()} == {
        "config.json", "diffusion_pytorch_model.safetensors", "wan_distill_student.json"}
    assert json.loads((tmp_path / "s" / "config.json").read_text())["_class_name"] == "WanModel"
    loaded, cfg = load_student(tmp_path / "s")
    assert cfg == config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # Official single-DiT folder (Wan2.1-T2V-1.3B layout): config.json + safetensors.
    expert = randomise(WanModel(**DIT), seed=7)
    folder = tmp_path / "wan"
    save_safetensors_atomic(expert.state_dict(), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(WanModel.config_to_json(config.dit)))
    init = student_from_wan_folder(folder, config, dtype=torch.bfloat16)
    assert init.guidance_embedding[2].weight.dtype == torch.float32  # fp32 island
    assert init.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert torch.equal(init.blocks[1].self_attn.q.weight, expert.blocks[1].self_attn.q.weight.bfloat16())
    assert torch.count_nonzero(init.guidance_embedding[2].weight) == 0
    from_state = student_from_expert_state_dict(config, expert.state_dict())
    x, ctx = inputs(frames=2)
    with torch.no_grad():
        assert torch.equal(from_state(x, torch.tensor([[900], [100]]), ctx, 3.0),
                           expert(x, torch.tensor([900, 100]), ctx))
    # A wrong shape in the folder's config is named.
    (folder / "config.json").write_text(json.dumps({**WanModel.config_to_json(config.dit), "dim": 48}))
    with pytest.raises(CheckpointError, match="dim: expected 24, found 48"):
        student_from_wan_folder(folder, config)


def test_bf16_student_keeps_fp32_islands():
    model = CausalWanModel(chunk_frames=1, **DIT).to(torch.bfloat16).keep_fp32_islands()
    for name, p in model.named_parameters():
        assert (p.dtype == torch.float32) == is_student_fp32_island(name), name
    x, ctx = inputs(frames=2)
    with torch.no_grad():
        assert model(x, torch.tensor([500, 500]), ctx, 3.0).dtype == torch.float32


# ----- the real presets ------------------------------------------------------------------

def wan_param_count(d: DiTConfig) -> int:
    """Parameters of a Wan T2V DiT, counted from the architecture (reference §1.3)."""
    dim, ffn, patch = d.dim, d.ffn_dim, d.patch_size[0] * d.patch_size[1] * d.patch_size[2]
    linear = lambda i, o: i * o + o  # noqa: E731
    per_block = (4 * linear(dim, dim) + 2 * dim  # self-attention q,k,v,o + norm_q/k
                 + 4 * linear(dim, dim) + 2 * dim  # cross-attention
                 + 2 * dim  # norm3 (affine)
                 + linear(dim, ffn) + linear(ffn, dim)
                 + 6 * dim)  # modulation
    return (d.in_dim * patch * dim + dim  # patch embedding
            + linear(d.text_dim, dim) + linear(dim, dim)  # text embedding
            + linear(d.freq_dim, dim) + linear(dim, dim)  # time embedding
            + linear(dim, 6 * dim)  # time projection
            + d.num_layers * per_block
            + 2 * dim + linear(dim, d.out_dim * patch))  # head


def test_causal_1_3b_preset_parameter_count_on_meta():
    config = student_preset("causal-1.3b")
    with torch.device("meta"):
        model = CausalWanModel.from_config(config)
    d = config.dit
    base = wan_param_count(d)
    guidance = (d.freq_dim * d.dim + d.dim) + (d.dim * d.dim + d.dim)
    assert sum(p.numel() for p in model.parameters()) == base + guidance
    # The commonly quoted Wan2.1-T2V-1.3B size; the formula above and Diffusers below agree with it.
    assert base == 1_418_996_800
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=d.num_heads,
            attention_head_dim=d.dim // d.num_heads, in_channels=d.in_dim, out_channels=d.out_dim,
            text_dim=d.text_dim, freq_dim=d.freq_dim, ffn_dim=d.ffn_dim, num_layers=d.num_layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=d.eps)
    assert sum(p.numel() for p in ref.parameters()) == base


def test_presets_are_consistent():
    assert set(STUDENT_PRESETS) == {"shapes", "causal-1.3b", "causal-14b"}
    shapes = student_preset("shapes")
    assert shapes.chunk_frames == 1 and shapes.max_attended_frames == 5  # one 17-frame clip
    assert student_preset("causal-1.3b").max_attended_frames == 18  # <= 21 trained frames
    assert student_preset("causal-14b").dit == DiTConfig()
    with pytest.raises(ValueError, match="known presets"):
        student_preset("causal-5b")
    with pytest.raises(ValueError, match="guidance_default"):
        replace(shapes, guidance_default=9.0)
    with pytest.raises(ValueError, match="temporal patch"):
        replace(shapes, dit=replace(shapes.dit, patch_size=(2, 2, 2)))
    # A span beyond the RoPE table would index past it at inference: refused at construction.
    with pytest.raises(ValueError, match="1025 frames, beyond the 1024 RoPE positions"):
        replace(shapes, sink_chunks=1, window_chunks=1023)
    assert replace(shapes, sink_chunks=1, window_chunks=1022).max_attended_frames == 1024


def test_guidance_min_sets_the_accepted_range_and_is_written_only_when_raised(tmp_path):
    config = tiny_config()
    assert config.guidance_range == (1.0, 5.0)
    # Left out at its default: student folders and run identities written before the field
    # existed read back as the same config.
    assert "guidance_min" not in student_config_to_dict(config)
    raised = tiny_config(guidance_min=2.0)
    assert raised.guidance_range == (2.0, 5.0)
    assert student_config_to_dict(raised)["guidance_min"] == 2.0
    assert student_config_from_dict(student_config_to_dict(raised)) == raised
    save_student(tmp_path / "s", randomise(CausalWanModel.from_config(raised), seed=1), raised)
    assert load_student(tmp_path / "s")[1].guidance_range == (2.0, 5.0)
    with pytest.raises(ValueError, match=r"guidance_min \(3.5\) <= guidance_default \(3.0\)"):
        tiny_config(guidance_min=3.5)
    with pytest.raises(ValueError, match=r"1 <= guidance_min \(0.5\)"):
        tiny_config(guidance_min=0.5)


# ----- bad input ---------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    model = student(chunk_frames=2)
    x, ctx = inputs(frames=4)
    t = torch.tensor([[500, 500]] * 2)
    with pytest.raises(ValueError, match="multiple of chunk_frames=2"):
        model(x[:, :, :3], t, ctx)
    with pytest.raises(ValueError, match="n_chunks=2"):
        model(x, torch.tensor([[1, 2, 3]] * 2), ctx)
    with pytest.raises(TypeError, match="int64"):
        model(x, t.bfloat16(), ctx)
    with pytest.raises(ValueError, match="text_dim=16"):
        model(x, t, ctx[..., :8])
    with pytest.raises(ValueError, match="guidance has shape"):
        model(x, t, ctx, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="finite"):
        model(x, t, ctx, float("nan"))
    with pytest.raises(ValueError, match="same shape"):
        model.forward_teacher_forcing(x, x[:, :, :2], t, ctx)
    bare = CausalWanModel(chunk_frames=2, guidance_embedding=False, **DIT)
    with pytest.raises(ValueError, match="no guidance embedding"):
        bare(x, t, ctx, 3.0)
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="one chunk is chunk_frames=2"):
        model.forward_chunk(x, t[:, 0], ctx, 3.0, cache)
    with pytest.raises(ValueError, match="made for 2 streams"):
        model.forward_chunk(x[:1, :, :2], t[:1, 0], ctx[:1], 3.0, cache)
    with pytest.raises(TypeError, match="KVCache"):
        model.forward_chunk(x[:, :, :2], t[:, 0], ctx, 3.0, cache={})
    with torch.no_grad():
        model.append_chunk(x[:, :, :2], ctx, 3.0, cache)
    with pytest.raises(ValueError, match="new resolution"):
        model.forward_chunk(torch.randn(2, 4, 2, 8, 8), t[:, 0], ctx, 3.0, cache)
    with pytest.raises(ValueError, match="window_chunks=0"):
        CausalWanModel(chunk_frames=1, window_chunks=0, **DIT)
    with pytest.raises(ValueError, match="temporal patch"):
        CausalWanModel(chunk_frames=1, **{**DIT, "patch_size": (2, 2, 2)})
