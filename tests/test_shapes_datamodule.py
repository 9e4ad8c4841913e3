"""The shapes-world LightningDataModule: batch layout, determinism, languages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")

from distill.data import ShapesWorldDataModule, ShapesWorldDataset  # noqa: E402
from eval.oracle import judge  # noqa: E402
from eval.shapes_world import Factors, caption_lang, parse_caption  # noqa: E402


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """float [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (the oracle's layout)."""
    return ((video + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def _module(**overrides) -> ShapesWorldDataModule:
    kwargs = dict(batch_size=4, num_frames=5, seed=3, num_train=16, num_val=8)
    kwargs.update(overrides)
    return ShapesWorldDataModule(**kwargs)


def test_batch_layout_dtype_and_range():
    batch = next(iter(_module().train_dataloader()))
    video = batch["video"]
    assert video.shape == (4, 3, 5, 64, 64) and video.dtype == torch.float32
    # Black background is exactly -1 and palette channels at full coverage exactly +1.
    assert video.min().item() == -1.0 and video.max().item() == 1.0
    assert set(batch) == {"video", "caption", "lang", "factors", "index"}
    assert len(batch["caption"]) == len(batch["lang"]) == 4
    assert set(batch["factors"]) == {"shape", "colour", "motion"}
    for i in range(4):
        factors = Factors(**{k: v[i] for k, v in batch["factors"].items()})
        assert parse_caption(batch["caption"][i]) == factors
        assert caption_lang(batch["caption"][i]) == batch["lang"][i]


def test_videos_show_their_captions():
    dataset = ShapesWorldDataset(num_samples=12, num_frames=17, seed=5)
    for i in range(len(dataset)):
        item = dataset[i]
        verdict = judge(_to_uint8(item["video"]))
        assert verdict.matches(item["caption"])["joint"], (item["caption"], verdict)


def test_two_instances_give_identical_data_and_seeds_differ():
    a, b, c = _module(), _module(), _module(seed=4)
    for x, y in zip(a.train_dataloader(), b.train_dataloader()):
        torch.testing.assert_close(x["video"], y["video"], rtol=0, atol=0)
        assert x["caption"] == y["caption"] and torch.equal(x["index"], y["index"])
    val_a, val_c = next(iter(a.val_dataloader())), next(iter(c.val_dataloader()))
    assert not torch.equal(val_a["video"], val_c["video"])


def test_validation_is_fixed_in_order_and_apart_from_training():
    module = _module()
    first = [b["caption"] for b in module.val_dataloader()]
    again = [b["caption"] for b in module.val_dataloader()]
    assert first == again and sum(len(c) for c in first) == 8
    val_video = module.val_set[0]["video"]
    assert not any(torch.equal(val_video, module.train_set[i]["video"]) for i in range(16))
    indices = torch.cat([b["index"] for b in module.val_dataloader()])
    assert indices.tolist() == list(range(8))


def test_sample_depends_only_on_seed_and_index():
    dataset = ShapesWorldDataset(num_samples=1000, num_frames=5, seed=9)
    late = dataset[999]
    # Reading other samples first (as another worker or rank would) changes nothing.
    for i in range(5):
        dataset[i]
    again = ShapesWorldDataset(num_samples=1000, num_frames=5, seed=9)[999]
    assert torch.equal(late["video"], again["video"]) and late["caption"] == again["caption"]


def test_workers_give_the_same_validation_batches():
    serial = [b["caption"] for b in _module().val_dataloader()]
    parallel = [b["caption"] for b in _module(num_workers=2).val_dataloader()]
    assert serial == parallel


def test_both_languages_appear_and_weights_select_them():
    mixed = ShapesWorldDataset(num_samples=64, num_frames=1, seed=0)
    langs = [mixed[i]["lang"] for i in range(64)]
    assert set(langs) == {"en", "zh"} and 16 <= langs.count("zh") <= 48
    only_en = ShapesWorldDataset(num_samples=16, num_frames=1, language_weights=(1.0, 0.0))
    assert {only_en[i]["lang"] for i in range(16)} == {"en"}
    only_zh = ShapesWorldDataset(num_samples=16, num_frames=1, languages=("zh",))
    assert {only_zh[i]["lang"] for i in range(16)} == {"zh"}


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        _module(num_frames=16)
    with pytest.raises(ValueError, match="subset of"):
        _module(languages=("en", "fr"))
    with pytest.raises(ValueError, match="language_weights"):
        _module(language_weights=(1.0,))
    with pytest.raises(ValueError, match="raise num_train"):
        _module(num_train=2)
    with pytest.raises(IndexError):
        ShapesWorldDataset(num_samples=3)[3]
