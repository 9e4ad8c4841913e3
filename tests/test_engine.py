"""StudentStreamEngine: chunk boundaries and frame accounting, prompt switches, reset,
pause/resume, seeds, guidance, bounded memory over a long stream, determinism, errors.

Tiny random parts (umT5 encoder, Wan VAE, causal student) stand in for trained ones: every claim
here is about the engine's bookkeeping and numerics, not picture quality.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from student.causal_dit import CausalWanModel
from student.config import StudentConfig
from student.engine import StudentStreamEngine, stream
from student.moe import MoECache, MoEStudent
from student.stream_types import StreamEngine
from teacher.config import DiTConfig, T5Config
from teacher.t5 import UMT5Encoder
from teacher.tokenizer import ByteTokenizer
from teacher.vae import WanVAE

FPS = 8.0




def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def make_config(chunk_frames: int = 2, sink: int = 1, window: int = 2) -> StudentConfig:
    dit = DiTConfig(dim=16, ffn_dim=24, freq_dim=16, num_heads=2, num_layers=2, in_dim=4,
                    out_dim=4, text_len=16, eps=1e-6, text_dim=16)
    return StudentConfig(name="tiny", dit=dit, chunk_frames=chunk_frames, sink_chunks=sink,
                         window_chunks=window, steps=2, shift=3.0, guidance_default=3.0,
                         guidance_max=5.0)


@pytest.fixture(scope="module")
def parts():
    """Shared modules (as the server shares them between sessions)."""
    encoder = _randomise(UMT5Encoder(**asdict(T5Config(vocab_size=259, dim=16, dim_attn=16,
                                                       dim_ffn=24, num_heads=2, num_layers=1,
                                                       num_buckets=8))), 0)
    vae = _randomise(WanVAE(dim=4, z_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1,
                            temperal_downsample=(False, True, True)), 1)
    students = {}
    for cf in (1, 2):
        config = make_config(chunk_frames=cf)
        # Randomised everywhere, the guidance embedding included, so guidance matters.
        students[cf] = (_randomise(CausalWanModel.from_config(config), 2 + cf), config)
    return encoder, ByteTokenizer(), vae, students


def engine(parts, chunk_frames: int = 2, width: int = 32, height: int = 32,
           recache: bool = False) -> StudentStreamEngine:
    encoder, tokenizer, vae, students = parts
    model, config = students[chunk_frames]
    return StudentStreamEngine(model, config, encoder, tokenizer, vae, width=width, height=height,
                               fps=FPS, recache=recache)


def run(eng: StudentStreamEngine, n: int) -> list:
    return [eng.next_chunk() for _ in range(n)]


def test_implements_the_stream_engine_protocol(parts):
    eng = engine(parts)
    assert isinstance(eng, StreamEngine)
    assert (eng.width, eng.height, eng.fps) == (32, 32, FPS)


@pytest.mark.parametrize("chunk_frames", [1, 2])
def test_chunk_boundaries_and_frame_accounting(parts, chunk_frames):
    eng = engine(parts, chunk_frames)
    eng.start("a red circle moving left", seed=1)
    chunks = run(eng, 4)
    sizes = [c.n_frames for c in chunks]
    assert sizes == [1 + 4 * (chunk_frames - 1)] + [4 * chunk_frames] * 3
    starts = [c.first_frame_index for c in chunks]
    assert starts == [0, *np.cumsum(sizes)[:-1].tolist()]
    for c in chunks:
        assert c.frames.dtype == np.uint8 and c.frames.shape[1:] == (32, 32, 3)
        assert c.frames.flags["C_CONTIGUOUS"]
        np.testing.assert_allclose(c.timestamps, (c.first_frame_index + np.arange(c.n_frames)) / FPS)
        assert c.prompt_version == 0 and c.gen_seconds > 0


def test_each_latent_chunk_is_decoded_once_and_equals_a_whole_clip_decode(parts):
    encoder, tokenizer, vae, _ = parts
    eng = engine(parts, 1)  # window sink 1 + 2: 3 chunks are all still cached
    eng.start("a blue square", seed=3)
    frames = np.concatenate([c.frames for c in run(eng, 3)])
    with torch.no_grad():
        eng.student.flush(eng.kv_cache)  # the last chunk's append waits for a next chunk
    latents = eng.kv_cache.latents
    assert eng.stats()["latent_frames_decoded"] == 3  # three latent frames went through the decoder, once each
    with torch.no_grad():
        video = vae.decode(latents)
    whole = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 3, 0).numpy()
    np.testing.assert_array_equal(frames, whole)


def test_prompt_switch_applies_at_the_next_chunk_only(parts):
    ref = engine(parts)
    ref.start("a red circle", seed=5)
    base = run(ref, 4)
    eng = engine(parts, recache=True)
    eng.start("a red circle", seed=5)
    first = run(eng, 2)
    eng.set_prompt("a green triangle moving up")
    rest = run(eng, 2)
    assert [c.prompt_version for c in first + rest] == [0, 0, 1, 1]
    for a, b in zip(first, base[:2]):
        np.testing.assert_array_equal(a.frames, b.frames)
    assert np.abs(rest[0].frames.astype(int) - base[2].frames.astype(int)).max() > 0
    assert rest[0].first_frame_index == base[2].first_frame_index  # the video continues
    assert eng.stats()["recaches"] == 1


def test_recache_uses_the_new_prompt_for_the_cached_window(parts):
    eng = engine(parts, recache=True)
    eng.start("a red circle", seed=2)
    run(eng, 2)
    eng.set_prompt("a white square")
    run(eng, 1)
    model = eng.student
    fresh = model.new_cache(1, sink_chunks=1, window_chunks=2)
    latents, ctx = eng.kv_cache.latents, eng.encode_prompt("a white square")
    with torch.no_grad():
        for c in range(latents.shape[2] // 2):
            model.append_chunk(latents[:, :, 2 * c:2 * c + 2], ctx, 3.0, fresh)
    # The two re-cached chunks equal a cache built with the new prompt from the same latents.
    n = 2 * 2 * 4  # 2 chunks x 2 frames x 4 tokens
    got, want = eng.kv_cache.layers[1].k[:, :n], fresh.layers[1].k[:, :n]
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_by_default_a_switch_keeps_the_cached_chunks_as_they_were_made(parts):
    encoder, tokenizer, vae, students = parts
    model, config = students[2]
    keep = StudentStreamEngine(model, config, encoder, tokenizer, vae, width=32, height=32,
                               fps=FPS)
    assert keep.recache is False
    keep.start("a red circle", seed=2)
    before = run(keep, 2)
    keep.set_prompt("a white square")
    after = run(keep, 2)
    assert keep.stats()["recaches"] == 0 and [c.prompt_version for c in after] == [1, 1]
    # The cached chunks hold the K/V the old prompt made, as in a stream that never switched.
    ref = engine(parts)
    ref.start("a red circle", seed=2)
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(before, run(ref, 3)))
    n = 2 * 2 * 4  # 2 chunks x 2 frames x 4 tokens
    got, want = keep.kv_cache.layers[1].k[:, :n], ref.kv_cache.layers[1].k[:, :n]
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    # With the re-cache, the same switch makes another video.
    recached = engine(parts, recache=True)
    recached.start("a red circle", seed=2)
    run(recached, 2)
    recached.set_prompt("a white square")
    assert recached.stats()["recaches"] == 0
    other = run(recached, 2)
    assert recached.stats()["recaches"] == 1
    assert np.abs(other[1].frames.astype(int) - after[1].frames.astype(int)).max() > 0


def test_reset_restarts_at_frame_zero_with_the_frames_of_a_fresh_engine(parts):
    eng = engine(parts)
    eng.start("a red circle", seed=9)
    run(eng, 2)
    eng.set_prompt("a cyan circle")
    run(eng, 1)
    eng.reset()
    after = run(eng, 2)
    fresh = engine(parts)
    fresh.start("a cyan circle", seed=9)
    expected = run(fresh, 2)
    assert [c.first_frame_index for c in after] == [0, 5]
    assert all(c.prompt_version == 1 for c in after)  # reset keeps the prompt version
    for a, b in zip(after, expected):
        np.testing.assert_array_equal(a.frames, b.frames)


def test_pause_and_resume(parts):
    ref = engine(parts)
    ref.start("a yellow circle", seed=4)
    base = run(ref, 3)
    eng = engine(parts)
    eng.start("a yellow circle", seed=4)
    first = eng.next_chunk()
    eng.pause()
    assert eng.next_chunk() is None and eng.next_chunk() is None
    eng.resume()
    rest = run(eng, 2)
    assert [c.first_frame_index for c in [first, *rest]] == [b.first_frame_index for b in base]
    for a, b in zip([first, *rest], base):
        np.testing.assert_array_equal(a.frames, b.frames)


def test_seed_determinism_and_set_seed_at_the_boundary(parts):
    a, b = engine(parts), engine(parts)
    a.start("a magenta square", seed=11)
    b.start("a magenta square", seed=11)
    ca, cb = run(a, 2), run(b, 1)
    np.testing.assert_array_equal(ca[0].frames, cb[0].frames)
    np.testing.assert_array_equal(ca[1].frames, b.next_chunk().frames)
    c = engine(parts)
    c.start("a magenta square", seed=11)
    first = c.next_chunk()
    c.set_seed(12)
    second = c.next_chunk()
    np.testing.assert_array_equal(first.frames, ca[0].frames)
    assert np.abs(second.frames.astype(int) - ca[1].frames.astype(int)).max() > 0
    other = engine(parts)
    other.start("a magenta square", seed=12)
    assert np.abs(other.next_chunk().frames.astype(int) - ca[0].frames.astype(int)).max() > 0


def test_guidance_default_and_changes(parts):
    eng = engine(parts)
    eng.start("a red circle", seed=1)
    assert eng.guidance == 3.0
    default = run(eng, 2)
    explicit = engine(parts, recache=True)
    explicit.start("a red circle", seed=1, guidance=3.0)
    np.testing.assert_array_equal(explicit.next_chunk().frames, default[0].frames)
    explicit.set_guidance(4.5)
    changed = explicit.next_chunk()
    assert explicit.guidance == 4.5 and explicit.stats()["recaches"] == 1
    assert np.abs(changed.frames.astype(int) - default[1].frames.astype(int)).max() > 0
    with pytest.raises(ValueError, match=r"trained range \[1, 5\]"):
        explicit.set_guidance(7.0)


def test_memory_stays_flat_over_200_chunks(parts):
    eng = engine(parts, chunk_frames=1, width=16, height=16)
    sizes, total = [], 0
    for k, chunk in enumerate(stream(eng, "a white triangle moving right", seed=0, max_chunks=200)):
        assert chunk.first_frame_index == total
        total += chunk.n_frames
        sizes.append(eng.cache_bytes())
        assert eng.kv_cache.num_chunks <= 1 + 2
        assert eng.kv_cache.num_frames <= 3  # the next chunk's RoPE start: bounded
    assert total == 1 + 4 * 199
    assert all(s == sizes[3] for s in sizes[3:])  # constant once the window is full
    with torch.no_grad():
        eng.student.flush(eng.kv_cache)  # the last chunk's append waits for a next chunk
    assert eng.kv_cache.frame_index.tolist() == [0, 198, 199]  # sink + rolling window
    stats = eng.stats()
    assert stats["chunks"] == 200 and stats["frames"] == total
    assert stats["gen_fps"] > 0 and stats["time_to_first_frame_s"] > 0


def test_stream_iterator_with_a_prompt_schedule(parts):
    eng = engine(parts)
    chunks = list(stream(eng, "a red circle", seed=2, max_chunks=4,
                         prompt_schedule={2: "a blue circle"}))
    assert [c.prompt_version for c in chunks] == [0, 0, 1, 1]
    timings = eng.last_timings
    assert {"text_s", "denoise_s", "kv_append_s", "decode_s", "total_s"} <= set(timings)


def test_bad_use_raises_clear_errors(parts):
    eng = engine(parts)
    with pytest.raises(RuntimeError, match="before start"):
        eng.next_chunk()
    with pytest.raises(ValueError, match="empty"):
        eng.start("   ")
    with pytest.raises(ValueError, match="trained range"):
        eng.start("a red circle", guidance=0.5)
    eng.start("a red circle")
    with pytest.raises(ValueError, match="empty"):
        eng.set_prompt("")
    encoder, tokenizer, vae, students = parts
    model, config = students[2]
    with pytest.raises(ValueError, match="multiples of 16"):
        StudentStreamEngine(model, config, encoder, tokenizer, vae, width=40, height=32, fps=FPS)
    with pytest.raises(ValueError, match="does not match"):
        StudentStreamEngine(model, make_config(chunk_frames=1), encoder, tokenizer, vae,
                            width=32, height=32, fps=FPS)


def test_two_network_student_streams_and_recaches_both_caches(parts):
    encoder, tokenizer, vae, students = parts
    model, config = students[2]
    twin = copy.deepcopy(model)
    moe = MoEStudent(model, twin, boundary=0.875)
    moe_config = replace(config, boundary=0.875)

    def frames(student, cfg, after_switch: int = 2):
        eng = StudentStreamEngine(student, cfg, encoder, tokenizer, vae, width=32, height=32,
                                  fps=FPS, recache=True)
        eng.start("a red circle", seed=4)
        chunks = run(eng, 2)
        eng.set_prompt("a white square")
        return eng, chunks + run(eng, after_switch)

    # Two copies of one network stream what that network streams alone, prompt switch
    # included: the steps are routed and both caches appended and re-cached alike. Up to float
    # rounding, one uint8 level: the low network computes a chunk's deferred K/V in its first
    # step (the third), the single network in the first, so their passes differ in length.
    eng, moe_chunks = frames(moe, moe_config)
    _, single_chunks = frames(model, config)
    for a, b in zip(moe_chunks, single_chunks):
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1
    assert isinstance(eng.kv_cache, MoECache) and eng.stats()["recaches"] == 1
    assert eng.cache_bytes()["kv"] == eng.kv_cache.high.nbytes() + eng.kv_cache.low.nbytes()
    # With different networks each cache holds its own network's K/V of the new prompt (the
    # two chunks re-cached at the switch, before the window rolls).
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.05)
    eng, _ = frames(moe, moe_config, after_switch=1)
    ctx = eng.encode_prompt("a white square")
    for name in ("high", "low"):
        network, cache = getattr(moe, name), getattr(eng.kv_cache, name)
        fresh = network.new_cache(1, sink_chunks=1, window_chunks=2)
        with torch.no_grad():
            for c in range(cache.latents.shape[2] // 2):
                network.append_chunk(cache.latents[:, :, 2 * c:2 * c + 2], ctx, 3.0, fresh)
        got, want = cache.layers[1].k[:, :16], fresh.layers[1].k[:, :16]
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert (eng.kv_cache.high.layers[1].k - eng.kv_cache.low.layers[1].k).abs().max() > 1e-3


def test_engine_samples_on_the_configs_grid_and_caches_only_the_networks_it_runs(parts):
    encoder, tokenizer, vae, students = parts
    model, config = students[2]
    tuned = replace(config, sampling_grids=((1.0, 0.5),))
    eng = StudentStreamEngine(model, tuned, encoder, tokenizer, vae, width=32, height=32, fps=FPS)
    torch.testing.assert_close(eng.sigmas, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    # A 1-step two-network stream runs only the high-noise network: no low-noise cache, and a
    # prompt switch re-caches the one there is.
    moe = MoEStudent(model, copy.deepcopy(model), boundary=0.875)
    eng = StudentStreamEngine(moe, replace(config, boundary=0.875), encoder, tokenizer, vae,
                              width=32, height=32, fps=FPS, steps=1, recache=True)
    eng.start("a red circle", seed=4)
    run(eng, 2)
    eng.set_prompt("a white square")
    run(eng, 2)
    assert eng.kv_cache.low is None and eng.kv_cache.high.num_chunks > 0
    assert eng.stats()["recaches"] == 1
    assert eng.cache_bytes()["kv"] == eng.kv_cache.high.nbytes()
