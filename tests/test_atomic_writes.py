"""teacher.weight_files.atomic_destination and the writers built on it: a finished write replaces
the file with normal permissions (0666 minus the umask, not mkstemp's 0600); a failed one leaves
the old file intact and no temporary file behind."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from teacher.video_io import read_video, write_mp4
from teacher.weight_files import (
    atomic_destination,
    save_safetensors_atomic,
    write_bytes_atomic,
    write_text_atomic,
)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def expected_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_writers_give_files_the_umask_mode(tmp_path):
    save_safetensors_atomic({"w": torch.arange(3.0)}, tmp_path / "a.safetensors")
    write_text_atomic("hello", tmp_path / "b.txt")
    write_bytes_atomic(b"\x00\x01", tmp_path / "c.bin")
    write_mp4(tmp_path / "d.mp4", np.zeros((5, 16, 16, 3), np.uint8), fps=8)
    for name in ("a.safetensors", "b.txt", "c.bin", "d.mp4"):
        assert mode_of(tmp_path / name) == expected_mode(), name
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["w"], torch.arange(3.0))
    assert (tmp_path / "b.txt").read_text() == "hello"
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert read_video(tmp_path / "d.mp4")[0].shape == (5, 16, 16, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.txt", "c.bin", "d.mp4"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.txt"
    write_text_atomic("old", target)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_destination(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["state.txt"]


def test_the_temporary_sits_beside_the_target_with_the_requested_suffix(tmp_path):
    with atomic_destination(tmp_path / "clip.mp4", suffix=".mp4") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".clip.mp4.") and tmp.suffix == ".mp4"
        tmp.write_bytes(b"x")
    assert (tmp_path / "clip.mp4").read_bytes() == b"x"
