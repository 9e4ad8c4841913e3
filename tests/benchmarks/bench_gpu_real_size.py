"""Real-size GPU benchmark (random weights: speed and memory do not depend on their values).

Three parts, each in its own process so that peak memory is measured in isolation:

1. ``recipe``: one stage-B training step of configs/distill/a14b-to-causal-1.3b.yaml at 832x480
   (81 frames = 21 latent frames = 7 chunks of 3): the causal-1.3b student (fp32 masters, bf16
   compute through FSDP2's MixedPrecisionPolicy, activation checkpointing per block), its EMA,
   BOTH frozen 14B causal teacher experts in bf16, AdamW, on a 1-rank FSDP2 mesh. Step time and
   the memory that would be sharded (divided by the recipe's 8 ranks) vs the transient peak.
   Run once with the flex-attention BlockMask (the default on CUDA) and once with the dense mask.
2. ``systems``: the teacher's default sampler (UniPC 40, CFG per expert) against the student
   (4 steps per chunk, streaming) for the same 81 frames at 832x480, A14B-size text encoder, VAE
   and experts, all resident. The teacher is timed at 4 and 8 steps and its 40-step latency is
   the linear fit (every step costs the same: one CFG forward of one 14B expert); the student
   is timed end to end. Also time to first frame and the flex-vs-dense numerics.
3. (from the systems process) the VAE decode of 81 frames alone.

    python tests/benchmarks/bench_gpu_real_size.py [--parts recipe-flex,systems,recipe-sdpa]
    python tests/benchmarks/bench_gpu_real_size.py --tiny   # smoke test of the script, any device
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GiB = 2**30
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = "--tiny" in sys.argv  # same code on tiny widths and a small clip (checks the script itself)
WIDTH, HEIGHT, FRAMES = (64, 48, 9) if TINY else (832, 480, 81)


def presets():
    """(student config, teacher config): causal-1.3b and A14B, or tiny stand-ins with --tiny."""
    from dataclasses import replace

    from student.config import student_preset
    from teacher.config import A14B, T5Config, VAEConfig

    student, teacher = student_preset("causal-1.3b"), A14B
    if TINY:
        small = dict(freq_dim=16, num_heads=2, num_layers=2, text_len=16, text_dim=16)
        teacher = replace(A14B, dit=replace(A14B.dit, dim=32, ffn_dim=64, **small),
                          t5=T5Config(vocab_size=300, dim=16, dim_attn=16, dim_ffn=32, num_heads=2,
                                      num_layers=1),
                          vae=VAEConfig(dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1))
        student = replace(student, dit=replace(student.dit, dim=24, ffn_dim=48, **small))
    return student, teacher


def randomise_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every floating tensor: N(0, 1/fan_in) weights, 1 +- noise norms, small biases."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            noise = torch.randn(local.shape, generator=g, device=local.device, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                local.copy_(1 + 0.1 * noise)
            elif local.ndim >= 2:
                local.copy_(noise / max(1, local[0].numel()) ** 0.5)
            else:
                local.copy_(0.02 * noise)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def peak_allocated() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


# ----- part 1: one training step of the 1.3B recipe --------------------------------------------

def recipe_step(backend: str, steps: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from distill.ar_adaptation import make_optimizer
    from distill.config import OptimConfig
    from distill.consistency import causal_cd_step, cd_schedule, ema_update_
    from distill.networks import causal_expert_config, ema_copy
    from distill.sharding import (
        mixed_precision,
        paired_local_tensors,
        reshard_all,
        shard_network,
    )
    from student.causal_dit import CausalWanModel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=0, world_size=1)
    mesh = init_device_mesh(DEVICE, (1,))
    device = torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device("cpu")
    config, A14B = presets()
    expert_config = causal_expert_config(config, A14B)

    def frozen_expert(seed):
        with torch.device("meta"):
            m = CausalWanModel.from_config(expert_config)
        m.to(torch.bfloat16).keep_fp32_islands()
        m.requires_grad_(False).eval()
        shard_network(m, mesh, trainable=False)
        m.to_empty(device=device)
        m.attention_backend = backend
        return randomise_(m, seed)

    experts = {"high": frozen_expert(1), "low": frozen_expert(2)}
    teacher_bytes = allocated()
    with torch.device("meta"):
        student = CausalWanModel.from_config(config)
    student.requires_grad_(True).train()
    shard_network(student, mesh, mp_policy=mixed_precision("bf16"), activation_checkpointing=True)
    student.to_empty(device=device)
    randomise_(student, 3)
    student.attention_backend = backend
    ema = ema_copy(student, config, device=device, mesh=mesh, compute_dtype="bf16")
    ema.attention_backend = backend
    optim = OptimConfig(lr=1e-5, betas=(0.9, 0.999), weight_decay=0.01, warmup_steps=100,
                        grad_clip=1.0)
    opt, sched = make_optimizer(student.parameters(), optim)
    schedule = cd_schedule(48, A14B.sampling.shift, A14B.sampling.boundary)
    offset = A14B.sampling.guidance_high - A14B.sampling.guidance_low
    g = torch.Generator(device=DEVICE).manual_seed(0)
    latent = (1, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    x0 = torch.randn(latent, device=device, generator=g)
    context = torch.randn(1, A14B.dit.text_len, A14B.dit.text_dim, device=device, generator=g)
    context[:, 40:] = 0  # a 40-token prompt, zero-padded like encode_text's output
    context_neg = torch.zeros_like(context)
    context_neg[:, :8] = torch.randn(1, 8, A14B.dit.text_dim, device=device, generator=g)

    def one_step(i):
        expert = ("high", "low")[i % 2]
        guidance = 1.0 + 4.0 * torch.rand(1, device=device, generator=g)
        result = causal_cd_step(
            student.forward_teacher_forcing, ema.forward_teacher_forcing,
            experts["high"].forward_teacher_forcing, experts["low"].forward_teacher_forcing,
            x0, context, context_neg, guidance, schedule, expert, g,
            chunk_frames=config.chunk_frames, guidance_offset=offset, loss="mse")
        for frozen in (ema, *experts.values()):
            reshard_all(frozen)
        opt.zero_grad(set_to_none=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), optim.grad_clip)
        opt.step()
        sched.step()
        ema_update_(*paired_local_tensors(ema, student), 0.99)
        return float(result.loss)

    start = time.perf_counter()
    first_loss = one_step(0)  # warm-up: AdamW state, kernels, flex compilation
    sync()
    warm_s = time.perf_counter() - start
    resident = allocated()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], [first_loss]
    for i in range(1, steps + 1):
        start = time.perf_counter()
        losses.append(one_step(i))
        sync()
        times.append(time.perf_counter() - start)
    peak = peak_allocated()
    student_params = sum(p.numel() for p in student.parameters())
    expert_params = sum(p.numel() for p in experts["high"].parameters())
    dist.destroy_process_group()
    ranks = 8
    return {
        "part": f"recipe-{backend}", "tokens": 2 * latent[2] * (latent[3] // 2) * (latent[4] // 2),
        "warmup_step_s": warm_s, "step_s": statistics.median(times), "steps": steps,
        "step_times_s": times, "losses": losses,
        "student_params": student_params, "expert_params": expert_params,
        "teacher_gib": teacher_bytes / GiB, "resident_gib": resident / GiB,
        "peak_gib": peak / GiB, "transient_gib": (peak - resident) / GiB,
        # Under FSDP2 over 8 ranks every resident tensor (params, grads, AdamW, EMA, teacher)
        # is sharded 8 ways; the transient part (activations, one gathered block) is not.
        "per_gpu_estimate_8_ranks_gib": resident / ranks / GiB + (peak - resident) / GiB,
    }


# ----- part 2: teacher vs student, same 81 frames ------------------------------------------------

def random_teacher_models():
    from teacher.checkpoint import TeacherModels
    from teacher.dit import WanModel
    from teacher.t5 import UMT5Encoder
    from teacher.tokenizer import ByteTokenizer
    from teacher.vae import WanVAE

    def build(cls, kwargs, dtype, seed):
        with torch.device("meta"):
            m = cls(**kwargs)
        if dtype != torch.float32:
            m.to(dtype)
            if hasattr(m, "keep_fp32_islands"):
                m.keep_fp32_islands()
        m.to_empty(device=DEVICE)
        return randomise_(m, seed).eval().requires_grad_(False)

    _, A14B = presets()

    # umT5's 256k vocabulary ids are not needed for timing: the byte tokenizer's ids fit in it,
    # and the encoder's cost depends only on text_len.
    return TeacherModels(
        config=A14B, tokenizer=ByteTokenizer(),
        text_encoder=build(UMT5Encoder, asdict(A14B.t5), torch.bfloat16, 10),
        vae=build(WanVAE, asdict(A14B.vae), torch.float32, 11),
        expert_high=build(WanModel, asdict(A14B.dit), torch.bfloat16, 12),
        expert_low=build(WanModel, asdict(A14B.dit), torch.bfloat16, 13))


def flex_vs_dense_numerics(student) -> dict:
    """Relative error of the flex path against the dense-mask path, bf16, on CUDA (3 chunks at
    240x416: a real-width network on a short sequence)."""
    g = torch.Generator(device=DEVICE).manual_seed(5)
    size = (4, 6) if TINY else (30, 52)
    x = torch.randn(1, 16, 9, *size, device=DEVICE, generator=g)
    x_clean = torch.randn_like(x)
    ctx = torch.randn(1, student.text_len, student.config.text_dim, device=DEVICE, generator=g)
    t = torch.tensor([[800, 500, 200]], device=DEVICE)
    out = {}
    for backend in ("sdpa", "flex"):
        student.attention_backend = backend
        with torch.no_grad():
            out[backend] = (student(x, t, ctx, 3.0),
                            student.forward_teacher_forcing(x_clean, x, t, ctx, 3.0))
    student.attention_backend = "auto"
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return {"forward_rel_err": rel(out["flex"][0], out["sdpa"][0]),
            "teacher_forcing_rel_err": rel(out["flex"][1], out["sdpa"][1])}


def systems() -> dict:
    from eval.systems import StudentSystem, TeacherSystem
    from student.causal_dit import CausalWanModel
    from teacher.pipeline import decode_latents

    models = random_teacher_models()
    config, _ = presets()
    with torch.device("meta"):
        student = CausalWanModel.from_config(config)
    student.to(torch.bfloat16).keep_fp32_islands()
    student.to_empty(device=DEVICE)
    student = randomise_(student, 14).eval().requires_grad_(False)
    weights_gib = allocated() / GiB
    prompt, seed = ["a corgi running on a beach at sunset"], [0]
    result = {"part": "systems", "weights_gib": weights_gib}
    result.update(flex_vs_dense_numerics(student))

    student_system = StudentSystem(student, config, models, width=WIDTH, height=HEIGHT, frames=FRAMES)
    student_system.generate(prompt, seed)  # warm-up
    runs = [student_system.generate(prompt, seed) for _ in range(3)]
    result["student"] = {"seconds": statistics.median(r.seconds for r in runs),
                         "first_frame_seconds": statistics.median(r.first_frame_seconds for r in runs),
                         "frames": int(runs[0].videos.shape[1]), "nfe": runs[0].nfe}
    result["student"]["fps"] = result["student"]["frames"] / result["student"]["seconds"]

    teacher = {}
    for steps in (4, 8):
        system = TeacherSystem(models, steps=steps, width=WIDTH, height=HEIGHT, frames=FRAMES,
                               device=DEVICE, offload=False)
        if steps == 4:
            system.generate(prompt, seed)  # warm-up
        out = system.generate(prompt, seed)
        teacher[steps] = {"seconds": out.seconds, "nfe": out.nfe}
    per_step = (teacher[8]["seconds"] - teacher[4]["seconds"]) / 4
    fixed = teacher[4]["seconds"] - 4 * per_step
    default_steps = models.config.sampling.steps
    result["teacher"] = {"measured": teacher, "per_step_s": per_step, "fixed_s": fixed,
                         "default_steps": default_steps,
                         "default_sampler_s": fixed + default_steps * per_step}
    latents = torch.randn(1, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    decode_latents(models, latents)
    sync()
    start = time.perf_counter()
    decode_latents(models, latents)
    sync()
    result["vae_decode_81_frames_s"] = time.perf_counter() - start
    result["student_speedup"] = result["teacher"]["default_sampler_s"] / result["student"]["seconds"]
    result["peak_gib"] = peak_allocated() / GiB
    return result


# ----- driver ------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="recipe-flex,systems,recipe-sdpa")
    ap.add_argument("--steps", type=int, default=3, help="timed recipe steps after a warm-up")
    ap.add_argument("--timeout", type=float, default=280, help="seconds per part")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--tiny", action="store_true", help="tiny widths: a smoke test of this script")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker.startswith("recipe-"):
            out = recipe_step(args.worker.split("-", 1)[1], args.steps)
        else:
            out = systems()
        print("RESULT " + json.dumps(out))
        return
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}{' (tiny)' if TINY else ''}", flush=True)
    results = []
    for part in args.parts.split(","):
        cmd = [sys.executable, __file__, "--worker", part, "--steps", str(args.steps)]
        cmd += ["--tiny"] if args.tiny else []
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if lines:
                results.append(json.loads(lines[-1][7:]))
                print(json.dumps(results[-1], indent=1), flush=True)
            else:
                print(f"{part} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"{part}: over {args.timeout:.0f} s, stopped", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    for r in results:
        if r["part"].startswith("recipe"):
            print(f"{r['part']}: step {r['step_s']:.2f} s (warm-up {r['warmup_step_s']:.0f} s), "
                  f"resident {r['resident_gib']:.1f} GiB, peak {r['peak_gib']:.1f} GiB, per GPU "
                  f"at 8 ranks ~{r['per_gpu_estimate_8_ranks_gib']:.1f} GiB")
        else:
            s, t = r["student"], r["teacher"]
            print(f"systems: teacher UniPC{t['default_steps']} {t['default_sampler_s']:.1f} s "
                  f"({t['per_step_s']:.2f} s/step), student {s['seconds']:.2f} s "
                  f"({s['fps']:.1f} fps, first frame {s['first_frame_seconds']:.2f} s): "
                  f"{r['student_speedup']:.1f}x; flex vs dense rel err "
                  f"{r['teacher_forcing_rel_err']:.1e}")


if __name__ == "__main__":
    main()
