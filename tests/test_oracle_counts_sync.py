"""The per-prompt oracle verdicts survive torchmetrics' gather across 2 gloo processes, so a
multi-process evaluation pairs student and teacher on every prompt."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eval.metric_states import OracleCounts
from eval.oracle import judge
from eval.oracle_stats import JOINT_BY_PROMPT
from eval.shapes_world import eval_prompts, parse_caption, render, sample_spec

PROMPTS = eval_prompts(5, seed=4)


def videos_for(indices):
    videos = [render(sample_spec(50 + i, parse_caption(PROMPTS[i]))) for i in indices]
    if 2 in indices:  # a wrong video, so that some verdicts are False
        videos[indices.index(2)] = np.zeros_like(videos[0])
    return videos


def rank_main(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        # Rank 1 also judges prompt 0 again, as a padding DistributedSampler would.
        indices = [0, 2, 4] if rank == 0 else [1, 3, 0]
        metric = OracleCounts()
        metric.update(torch.from_numpy(np.stack(videos_for(indices))),
                      [PROMPTS[i] for i in indices], indices)
        result = metric.compute()
        with open(f"{out}.{rank}", "w") as f:
            json.dump({str(k): v for k, v in result[JOINT_BY_PROMPT].items()}, f)
    finally:
        dist.destroy_process_group()


def test_verdicts_of_every_process_reach_every_process(tmp_path):
    out = str(tmp_path / "verdicts")
    mp.spawn(rank_main, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    expected = {str(i): judge(v).matches(parse_caption(PROMPTS[i]))["joint"]
                for i, v in zip(range(5), videos_for(list(range(5))))}
    assert expected["2"] is False and expected["0"] is True
    for rank in (0, 1):
        with open(f"{out}.{rank}") as f:
            assert json.load(f) == expected
