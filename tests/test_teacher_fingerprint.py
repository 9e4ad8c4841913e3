"""The teacher's fingerprint keys the latent cache and the distillation stages: the same small
teacher keeps it wherever its folder lies, and any change to a file changes it."""

from __future__ import annotations

import os
import shutil

import distill.data.latents as latents
from distill.data.latents import teacher_fingerprint


def _teacher(folder):
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.json").write_text('{"a": 1}')
    (folder / "vae.safetensors").write_bytes(bytes(range(256)) * 4)
    return folder


def test_a_moved_copy_keeps_the_fingerprint_and_an_edit_changes_it(tmp_path):
    first = _teacher(tmp_path / "a")
    moved = tmp_path / "elsewhere" / "b"
    shutil.copytree(first, moved)  # new path, new mtimes: a re-clone
    os.utime(moved / "vae.safetensors", (1, 1))
    assert teacher_fingerprint(moved) == teacher_fingerprint(first)

    weights = bytearray((moved / "vae.safetensors").read_bytes())
    weights[100] ^= 1  # same size, one bit: retrained weights of the same shapes
    (moved / "vae.safetensors").write_bytes(bytes(weights))
    assert teacher_fingerprint(moved) != teacher_fingerprint(first)

    (first / "tokenizer" / "vocab.json").rename(first / "tokenizer" / "other.json")
    assert teacher_fingerprint(first) != teacher_fingerprint(_teacher(tmp_path / "c"))


def test_large_files_count_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(latents, "CONTENT_FINGERPRINT_MAX_BYTES", 100)
    folder = _teacher(tmp_path / "big")
    before = teacher_fingerprint(folder)
    os.utime(folder / "vae.safetensors", (1, 1))  # 1,024 bytes: over the limit here
    assert teacher_fingerprint(folder) != before
    touched = teacher_fingerprint(folder)
    os.utime(folder / "tokenizer" / "vocab.json", (1, 1))  # under it: its content counts
    assert teacher_fingerprint(folder) == touched
