"""The real-size GPU benchmark script runs end to end on tiny widths (``--tiny``), so it cannot rot
between the sessions that have a GPU: the 1.3B recipe's stage-B step through FSDP2 on a 1-rank
gloo mesh with bf16 mixed precision and activation checkpointing, and the teacher-vs-student
systems comparison. (The flex BlockMask path needs CUDA for its backward; the CPU runs the
dense-mask step.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_script_runs_on_tiny_widths(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "tests/benchmarks/bench_gpu_real_size.py", "--tiny", "--parts",
         "recipe-sdpa,systems", "--steps", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["part"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"recipe-sdpa", "systems"}, done.stdout[-3000:]

    recipe = results["recipe-sdpa"]
    assert len(recipe["losses"]) == 2 and all(math.isfinite(v) and v > 0 for v in recipe["losses"])
    # 9 frames at 64x48 -> 3 latent frames of 6x8, 2x2 patches: 12 tokens each, clean + noisy.
    assert recipe["tokens"] == 2 * 3 * 3 * 4

    systems = results["systems"]
    assert systems["student"]["frames"] == 9  # the tiny clip, decoded chunk by chunk
    assert systems["student"]["nfe"] == 4  # one chunk of 3 latent frames, 4 steps
    assert systems["teacher"]["measured"]["4"]["nfe"] < systems["teacher"]["measured"]["8"]["nfe"]
    # The BlockMask path computes what the dense path computes (bf16 rounding).
    assert systems["forward_rel_err"] < 2e-2 and systems["teacher_forcing_rel_err"] < 2e-2
