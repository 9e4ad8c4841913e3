"""Time per denoising step and peak memory of a small teacher expert: this project vs diffusers.

One step = one CFG evaluation (conditional + unconditional, batched as 2) of one expert, which is
what a teacher sampling step costs. Both implementations get identical weights (mapped by the
project's converter) and identical inputs; each runs in its own subprocess, alternating rounds,
so memory is measured in isolation and timing drift hits both alike.

    python tests/benchmarks/bench_teacher_step.py            # CPU, small config
    python tests/benchmarks/bench_teacher_step.py --a14b --device cuda --size 832*480   # GPU

diffusers is a test-only dependency, so this script lives under tests/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(dim=512, ffn_dim=2048, freq_dim=256, num_heads=8, num_layers=4, in_dim=16, out_dim=16,
             text_len=512, text_dim=512)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def flops_per_forward(cfg: dict, tokens: int, text_len: int) -> float:
    """Matmul FLOPs of one WanModel forward (2*MAC): projections, FFN, both attentions."""
    d, f, layers = cfg["dim"], cfg["ffn_dim"], cfg["num_layers"]
    per_block = 2 * tokens * (4 * d * d + 2 * d * f)  # self-attn qkvo + FFN
    per_block += 2 * tokens * 2 * d * d + 2 * text_len * 2 * d * d  # cross-attn q,o and k,v
    per_block += 2 * 2 * tokens * tokens * d + 2 * 2 * tokens * text_len * d  # QK^T and AV
    return layers * per_block


def worker(impl: str, cfg: dict, latent: list[int], steps: int, device: str, dtype: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from teacher.convert_dit import dit_official_to_diffusers
    from teacher.dit import WanModel

    torch.manual_seed(0)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    meta_build = device != "cpu"
    with torch.device("meta" if meta_build else "cpu"):
        ours = WanModel(**cfg)
    if meta_build:  # random weights straight on the device (timing needs no trained weights)
        ours = ours.to_empty(device=device)
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0, 0.02)
    if impl == "ours":
        model = ours.to(device=device, dtype=torch_dtype)
        if torch_dtype != torch.float32:
            model.keep_fp32_islands()
    else:
        from diffusers import WanTransformer3DModel

        # Built on the target device in the target dtype (its RoPE buffers cannot live on meta).
        torch.set_default_dtype(torch_dtype)
        with torch.device(device):
            model = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=cfg["num_heads"],
                attention_head_dim=cfg["dim"] // cfg["num_heads"], in_channels=cfg["in_dim"],
                out_channels=cfg["out_dim"], text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"],
                ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"], cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
        torch.set_default_dtype(torch.float32)
        model.load_state_dict(dit_official_to_diffusers(ours.state_dict()))
        model = model.to(device=device, dtype=torch_dtype)
    del ours
    model.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn([2] + latent, generator=g).to(device)
    ctx = torch.zeros(2, cfg["text_len"], cfg["text_dim"])
    ctx[:, :20] = torch.randn(2, 20, cfg["text_dim"], generator=g)
    ctx = ctx.to(device, torch_dtype)
    t = torch.tensor([900, 900], device=device)

    def step():
        if impl == "ours":
            return model(x, t, ctx)
        return model(hidden_states=x.to(torch_dtype), timestep=t, encoder_hidden_states=ctx,
                     return_dict=False)[0]

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        # Baseline before any forward: the peak then includes activations of a step (a warm-up
        # step's freed memory stays in the process RSS, so a baseline after it would hide them).
        rss0 = rss_bytes()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        step(), sync()  # warm-up (allocator, kernels)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0)
    return {"impl": impl, "step_s": statistics.median(times), "steps": steps,
            "peak_bytes": peak, "peak_kind": "cuda max_memory_allocated" if device.startswith("cuda")
            else "peak RSS growth over the weights"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a14b", action="store_true", help="one real A14B expert (random weights)")
    ap.add_argument("--size", default="128*128", help="video WIDTH*HEIGHT (latent = /8)")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for utilisation")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from teacher.config import DiTConfig

    cfg = asdict(DiTConfig() if args.a14b else DiTConfig(**SMALL))
    w, h = (int(v) for v in args.size.split("*"))
    latent = [cfg["in_dim"], (args.frames - 1) // 4 + 1, h // 8, w // 8]
    dtype = args.dtype or ("bf16" if args.device != "cpu" else "fp32")
    if args.worker:
        print(json.dumps(worker(args.worker, cfg, latent, args.steps, args.device, dtype)))
        return
    results: dict[str, list[dict]] = {"ours": [], "diffusers": []}
    for _ in range(args.rounds):
        for impl in ("ours", "diffusers"):
            cmd = [sys.executable, __file__, "--worker", impl, "--size", args.size, "--frames",
                   str(args.frames), "--steps", str(args.steps), "--device", args.device,
                   "--dtype", dtype] + (["--a14b"] if args.a14b else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            results[impl].append(json.loads(out.strip().splitlines()[-1]))
    tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
    flops = 2 * flops_per_forward(cfg, tokens, cfg["text_len"])  # CFG: batch of 2
    shown = {k: cfg[k] for k in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim")}
    print(f"config: {'A14B expert' if args.a14b else 'small'} {shown}, latent {latent} "
          f"({tokens} tokens), device {args.device}, {dtype}, CFG batch 2, "
          f"{args.rounds} rounds x {args.steps} steps")
    summary = {}
    for impl, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        peak = max(r["peak_bytes"] for r in runs)
        tflops = flops / step / 1e12
        util = f", {100 * tflops / args.peak_tflops:.0f}% of peak" if args.peak_tflops else ""
        summary[impl] = step
        print(f"{impl:10s} step {step * 1000:8.1f} ms   peak {peak / 2**20:8.1f} MiB "
              f"({runs[0]['peak_kind']})   {tflops:.3f} TFLOP/s{util}")
    print(f"ratio diffusers/ours step time: {summary['diffusers'] / summary['ours']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
