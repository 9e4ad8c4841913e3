"""Run under ``python -m tests.fsdp_precision_worker`` (its own process: a 1-rank gloo group):
a tiny causal student sharded with FSDP2 and the bf16 policy of ``distill.sharding``, against
the same weights unsharded in the official bf16 precision (fp32 islands) with fp32 inputs. Prints one JSON line; ``tests/test_mixed_precision.py`` reads it."""

from __future__ import annotations

import copy
import json
import os
import socket

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from distill.sharding import mixed_precision, shard_network
from student.causal_dit import CausalWanModel, is_student_fp32_island

DIT = dict(dim=24, ffn_dim=32, freq_dim=16, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
           text_len=8, eps=1e-6, text_dim=16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def main() -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        model = CausalWanModel(chunk_frames=1, **DIT)
        with torch.no_grad():  # random everywhere, the zero-initialised layers included
            for p in model.parameters():
                p.copy_(torch.randn(p.shape) * 0.3)
        # What the bf16 policy computes with: bf16 weights, the fp32 islands (time embedding
        # and projection, guidance embedding, head) in fp32, the blocks' modulation tables
        # rounded to bf16 (they are gathered with their block).
        reference = copy.deepcopy(model)
        for name, param in reference.named_parameters():
            if name.startswith("blocks.") and name.endswith(".modulation"):
                param.data = param.data.bfloat16().float()
            elif not is_student_fp32_island(name):
                param.data = param.data.bfloat16()
        sharded = shard_network(copy.deepcopy(model), mesh, mp_policy=mixed_precision("bf16"))
        g = torch.Generator().manual_seed(1)
        x_clean, x_noisy = (torch.randn(2, 4, 3, 4, 4, generator=g) for _ in range(2))
        t = torch.tensor([[900, 500, 100], [700, 300, 20]])
        context = torch.randn(2, 5, 16, generator=g)
        guidance = torch.tensor([1.7, 2.9], dtype=torch.float64)
        with torch.no_grad():
            outs = {name: net.forward_teacher_forcing(x_clean, x_noisy, t, context, guidance)
                    for name, net in (("sharded", sharded), ("reference", reference),
                                      ("fp32", model),
                                      ("all_bf16", copy.deepcopy(model).to(torch.bfloat16)))}
        print(json.dumps({
            "equal_to_reference": torch.equal(outs["sharded"], outs["reference"]),
            "sharded_vs_fp32": rel_err(outs["sharded"], outs["fp32"]),
            "reference_vs_fp32": rel_err(outs["reference"], outs["fp32"]),
            "all_bf16_vs_fp32": rel_err(outs["all_bf16"], outs["fp32"]),
        }))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
