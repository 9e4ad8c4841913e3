"""Sharded predict runs (``distill.data.predict_shards``): batch ranges and their rank split, and
a run killed midway that resumes with the missing batches only."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from distill.data.latents import (
    MANIFEST_FILE,
    NEGATIVE_CONTEXT_FILE,
    EncodeVideosModule,
    LatentShardDataset,
    LatentSource,
    build_latent_cache,
)
from distill.data.predict_shards import (
    ShardWriter,
    batch_ranges,
    pending_ranges,
    run_sharded_predict,
    shard_name,
)
from tests.tiny_teacher import tiny_models, write_official

FORMAT = "test-shards-v1"
QUIET = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def test_batch_ranges_cover_every_item_once():
    assert batch_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_ranges(8, 4) == [(0, 4), (4, 8)]
    assert batch_ranges(0, 4) == []
    with pytest.raises(ValueError, match="batch_size=0"):
        batch_ranges(10, 0)


def test_pending_ranges_split_round_robin_and_skip_written_shards(tmp_path):
    ranges = batch_ranges(10, 2)  # 5 batches
    assert pending_ranges(tmp_path, ranges, 0, 2) == [(0, 2), (4, 6), (8, 10)]
    assert pending_ranges(tmp_path, ranges, 1, 2) == [(2, 4), (6, 8)]
    (tmp_path / shard_name(4, 6)).write_bytes(b"")
    assert pending_ranges(tmp_path, ranges, 0, 2) == [(0, 2), (8, 10)]
    # Three ranks after two: the same ranges, dealt again.
    assert pending_ranges(tmp_path, ranges, 1, 3) == [(2, 4), (8, 10)]
    assert pending_ranges(tmp_path, ranges, 2, 3) == []
    with pytest.raises(ValueError, match=r"rank=2 must lie in \[0, world_size=2\)"):
        pending_ranges(tmp_path, ranges, 2, 2)


class _Squares(Dataset):
    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.tensor(float(i)), "index": i}


def _collate(items: list[dict]) -> dict:
    return {"x": torch.stack([it["x"] for it in items]),
            "index": torch.tensor([it["index"] for it in items])}


class _Square(L.LightningModule):
    """Squares its batch and records which items it computed."""

    def __init__(self):
        super().__init__()
        self.computed: list[int] = []

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        self.computed += batch["index"].tolist()
        return {"y": batch["x"] ** 2, "index": batch["index"]}


def _writer(folder) -> ShardWriter:
    return ShardWriter(folder, FORMAT, lambda p: {"y": p["y"], "index": p["index"]},
                       lambda p: {"count": str(len(p["index"]))})


def _read(folder) -> dict[str, dict]:
    out = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[path.name] = {"y": f.get_tensor("y"), "index": f.get_tensor("index"),
                              "meta": f.metadata()}
    return out


def test_a_killed_run_resumes_with_the_missing_batches_only(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    module = _Square()
    run_sharded_predict(full, module, _Squares(), batch_size=3, collate_fn=_collate,
                        writer=_writer(full), trainer_kwargs=QUIET)
    assert module.computed == list(range(7))
    expected = _read(full)
    assert list(expected) == [shard_name(0, 3), shard_name(3, 6), shard_name(6, 7)]
    assert expected[shard_name(6, 7)]["meta"] == {"format": FORMAT, "count": "1"}
    torch.testing.assert_close(expected[shard_name(3, 6)]["y"], torch.tensor([9.0, 16.0, 25.0]))

    # What a kill leaves: whole shards (atomic writes), a temp file of the write in progress,
    # plus leftovers of other attempts: the former naming, another batch size.
    part.mkdir()
    (part / shard_name(0, 3)).write_bytes((full / shard_name(0, 3)).read_bytes())
    (part / f".{shard_name(3, 6)}.abc.tmp").write_bytes(b"half")
    (part / "shard-r000-b000001.safetensors").write_bytes(b"old")
    (part / shard_name(0, 2)).write_bytes((full / shard_name(0, 3)).read_bytes())
    module = _Square()
    run_sharded_predict(part, module, _Squares(), batch_size=3, collate_fn=_collate,
                        writer=_writer(part), trainer_kwargs=QUIET)
    assert module.computed == [3, 4, 5, 6]  # the missing ranges [3, 6) and [6, 7)
    assert sorted(p.name for p in part.iterdir()) == list(expected)
    got = _read(part)
    for name, shard in expected.items():
        torch.testing.assert_close(got[name]["y"], shard["y"])
        assert torch.equal(got[name]["index"], shard["index"])

    # Nothing left to do: no batch runs.
    module = _Square()
    run_sharded_predict(part, module, _Squares(), batch_size=3, collate_fn=_collate,
                        writer=_writer(part), trainer_kwargs=QUIET)
    assert module.computed == []


def test_latent_cache_resumes_after_a_kill(tmp_path, monkeypatch):
    teacher_dir = write_official(tmp_path / "teacher", tiny_models(seed=2))
    source = LatentSource(kind="shapes", num_clips=5, num_frames=5, seed=1)
    whole = build_latent_cache(tmp_path / "whole", source, str(teacher_dir), batch_size=2,
                               trainer_kwargs=QUIET)
    shards = sorted(p.name for p in whole.glob("shard-*.safetensors"))
    assert shards == [shard_name(0, 2), shard_name(2, 4), shard_name(4, 5)]

    # A kill after the first batch: its shard only, no negative context, no manifest.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / shards[0]).write_bytes((whole / shards[0]).read_bytes())
    encoded: list[int] = []
    predict_step = EncodeVideosModule.predict_step

    def counting(self, batch, batch_idx):
        encoded.extend(batch["index"].tolist())
        return predict_step(self, batch, batch_idx)

    monkeypatch.setattr(EncodeVideosModule, "predict_step", counting)
    build_latent_cache(killed, source, str(teacher_dir), batch_size=2, trainer_kwargs=QUIET)
    assert encoded == [2, 3, 4]
    assert (killed / MANIFEST_FILE).is_file() and (killed / NEGATIVE_CONTEXT_FILE).is_file()
    a, b = LatentShardDataset(whole), LatentShardDataset(killed)
    assert a.indices == b.indices == list(range(5))
    for i in range(5):
        assert torch.equal(a[i]["latents"], b[i]["latents"])
        assert torch.equal(a[i]["context"], b[i]["context"])
        assert a[i]["caption"] == b[i]["caption"]
    assert torch.equal(a.negative_context, b.negative_context)
