"""A 2-process CPU distillation (gloo, ModelParallelStrategy(2, 1), FSDP2): sharded checkpoint,
interruption in the middle of an epoch, resume with ckpt_path, and the same end as an
uninterrupted run.

The worker (tests/distributed_worker.py) runs under ``python -m torch.distributed.run
--nproc_per_node=2``: multi-process Trainers must never start inside pytest itself.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed_worker import TINY_STUDENT, launch_two_process_run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def run():
    return launch_two_process_run(steps=4)


def test_resumed_run_ends_where_the_uninterrupted_run_ends(run):
    out = run["out"]
    for name in ("", "_ema"):
        full = load_file(out / f"final_full{name}.safetensors")
        resumed = load_file(out / f"final_resumed{name}.safetensors")
        assert set(full) == set(resumed)
        for key in full:
            # Same draws (derived from the step), same data order, restored AdamW/EMA/scheduler
            # state, deterministic CPU kernels: bit-identical.
            assert torch.equal(full[key], resumed[key]), key


def test_training_moved_the_student(run):
    full = load_file(run["out"] / "final_full.safetensors")
    init = load_file(run["out"] / "causal_teacher" / "low_noise_model"
                     / "diffusion_pytorch_model.safetensors")
    moved = [k for k in init if not torch.equal(full[k], init[k])]
    assert len(moved) > len(init) // 2
    # The student has exactly the expert's keys plus the guidance embedding.
    assert set(full) - set(init) == {f"guidance_embedding.{i}.{p}" for i in (0, 2)
                                     for p in ("weight", "bias")}


def test_sharded_checkpoint_holds_no_teacher(run):
    out = run["out"]
    files = json.loads((out / "checkpoint_files.json").read_text())
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt", ".metadata"} <= set(files)
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(out / "checkpoints" / "last.ckpt")).read_metadata().state_dict_metadata
    model_keys = {k for k in keys if k.startswith("state_dict.")}
    assert model_keys and all(k.startswith(("state_dict.student.", "state_dict.ema_student."))
                              for k in model_keys)
    assert len(model_keys) == 2 * len(load_file(out / "final_full.safetensors"))


def test_run_is_bounded_in_time(run):
    assert run["seconds"] < 60, f"the 2-process run took {run['seconds']:.1f} s"


def test_sharded_stage_a_export_loads(run):
    from student.checkpoint import load_student

    model, config = load_student(run["out"] / "causal_teacher" / "high_noise_model")
    assert config.guidance_embedding is False and config.dit == TINY_STUDENT.dit
    assert model.guidance_embedding is None


def test_sharded_ode_init_export_starts_stage_b(run):
    # The ODE-initialised student (trained sharded, exported by a gather) is where stage B's
    # sharded student starts, guidance embedding included (lr 0: nothing moved it since).
    from student.checkpoint import load_student

    ode, config = load_student(run["out"] / "ode_student")
    assert config == TINY_STUDENT and ode.guidance_embedding[-1].weight.abs().sum() > 0
    start_b = load_file(run["out"] / "stage_b_from_ode.safetensors")
    assert set(start_b) == set(ode.state_dict())
    for key, value in ode.state_dict().items():
        assert torch.equal(start_b[key], value), key
    # Two steps moved it away from the stage-A expert it started from.
    init = load_file(run["out"] / "causal_teacher" / "high_noise_model"
                     / "diffusion_pytorch_model.safetensors")
    assert sum(not torch.equal(start_b[k], init[k]) for k in init) > len(init) // 2


def test_sharded_high_network_keeps_its_partner_frozen_and_out_of_checkpoints(run):
    # Stage B of a two-network student's high-noise network under FSDP2: the low-noise partner
    # that supplies the last interval's target is sharded and stored like the teacher (bf16,
    # frozen), holds exactly the weights it was given, and only the trained network is saved.
    out = run["out"]
    high = json.loads((out / "high_network.json").read_text())
    assert high == {"partner_sharded": True, "partner_dtype": "torch.bfloat16",
                    "partner_trainable": False, "partner_is_ode_student": True,
                    "experts": ["high"]}
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(out / "checkpoints_high" / "last.ckpt")).read_metadata()
    model_keys = {k for k in keys.state_dict_metadata if k.startswith("state_dict.")}
    assert model_keys and all(k.startswith(("state_dict.student.", "state_dict.ema_student."))
                              for k in model_keys)
    assert len(model_keys) == 2 * len(load_file(out / "final_full.safetensors"))


def test_two_rank_predict_runs_write_each_batch_once(run):
    # Batches of 3 over 8 items: ranges [0, 3) and [6, 8) on rank 0, [3, 6) on rank 1.
    from distill.data.latents import LatentShardDataset
    from distill.data.predict_shards import shard_name
    from distill.data.trajectories import TrajectoryDataset

    expected = [shard_name(0, 3), shard_name(3, 6), shard_name(6, 8)]
    for folder in (run["out"] / "trajectories", run["out"] / "cache_two_ranks"):
        assert sorted(p.name for p in folder.glob("shard-*.safetensors")) == expected, folder
    assert TrajectoryDataset(run["out"] / "trajectories", run["cache"]).indices == list(range(8))
    # The latent cache of two ranks equals the one the test process built alone, in batches of
    # 8 (the VAE's batched convolutions agree to rounding).
    one, two = LatentShardDataset(run["cache"]), LatentShardDataset(run["out"] / "cache_two_ranks")
    assert one.indices == two.indices == list(range(8))
    for i in range(8):
        torch.testing.assert_close(two[i]["latents"], one[i]["latents"], rtol=0, atol=1e-5)
        torch.testing.assert_close(two[i]["context"], one[i]["context"], rtol=0, atol=1e-6)
        assert two[i]["caption"] == one[i]["caption"]
    torch.testing.assert_close(two.negative_context, one.negative_context)
