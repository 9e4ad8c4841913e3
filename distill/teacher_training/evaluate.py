"""Prompt adherence of a trained shapes-world teacher, measured by the oracle.

    python -m distill.teacher_training.evaluate --teacher teacher/weights/shapes --prompts 200

Prompts come from ``eval.shapes_world.eval_prompts`` (balanced over shape, colour, motion and
language; 168 or more cover every combination in both languages), and prompt i is sampled from
its own noise seed ``noise_seed + i``, so a result does not depend on the batch size. Sampling
runs through ``teacher.pipeline.sample_latents`` (the two-expert CFG sampler), with the
teacher's defaults for every setting left None.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from eval.oracle import accuracy, judge
from eval.shapes_world import caption_lang, eval_prompts, parse_caption
from teacher.checkpoint import TeacherModels, load_teacher
from teacher.pipeline import (
    GenerationRequest,
    decode_latents,
    encode_prompts,
    initial_noise,
    latent_shape,
    resolve_request,
    sample_latents,
)
from teacher.weight_files import write_text_atomic

FACTORS = ("colour", "shape", "motion")


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def generate_videos(models: TeacherModels, prompts: list[str], seeds: list[int], *,
                    solver: str | None = None, steps: int | None = None, shift: float | None = None,
                    guidance_high: float | None = None, guidance_low: float | None = None,
                    batch_size: int = 50, device: str | torch.device = "cpu",
                    progress: bool = False) -> tuple[list, GenerationRequest, int]:
    """Sample one uint8 video [T, H, W, 3] (numpy) per prompt; returns (videos, settings, NFE per video)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    request = resolve_request(models, GenerationRequest(
        prompt=prompts[0], solver=solver, steps=steps, shift=shift, guidance_high=guidance_high,
        guidance_low=guidance_low))
    shape = latent_shape(models, request.frames, request.height, request.width)
    models.text_encoder.to(device)
    models.vae.to(device)
    negative = encode_prompts(models, [request.negative_prompt], device)
    videos, nfe = [], 0
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch",
                      disable=not progress):
        chunk = prompts[start: start + batch_size]
        context = encode_prompts(models, chunk, device)
        noise = initial_noise(shape, seeds[start: start + batch_size])
        latents, nfe = sample_latents(models, context, negative, noise,
                                      request, device=device, offload=False)
        videos.extend(decode_latents(models, latents).numpy())
    return videos, request, nfe


def _group_accuracy(videos: list, prompts: list[str], key) -> dict:
    groups = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[key(prompt)].append(i)
    return {name: _summary(accuracy([videos[i] for i in idx], [prompts[i] for i in idx]))
            for name, idx in sorted(groups.items())}


def _summary(result: dict) -> dict:
    return {k: result[k] for k in ("n", "colour", "shape", "motion", "joint", "not_found", "no_motion")}


def evaluate_teacher(teacher: str | Path | TeacherModels, *, num_prompts: int = 200,
                     prompt_seed: int = 0, noise_seed: int = 0, solver: str | None = None,
                     steps: int | None = None, shift: float | None = None,
                     guidance_high: float | None = None, guidance_low: float | None = None,
                     batch_size: int = 50, device: str | torch.device = "cpu",
                     progress: bool = True) -> dict:
    """Oracle accuracy of ``teacher`` (a folder or loaded models) for one sampler setting.

    Returns {"settings" (solver, steps, shift, guidance, NFE per video), "overall", "by_language"
    {"en", "zh"}, "by_factor_value" {factor: {value: accuracies of prompts with that value}},
    "confusion" {factor: {target: {recovered: count}}}, "seconds"}. Every accuracy dict has n,
    colour, shape, motion, joint (fractions), not_found and no_motion (counts).
    """
    models = load_teacher(teacher) if not isinstance(teacher, TeacherModels) else teacher
    prompts = eval_prompts(num_prompts, seed=prompt_seed)
    seeds = [noise_seed + i for i in range(num_prompts)]
    start = time.perf_counter()
    videos, request, nfe = generate_videos(
        models, prompts, seeds, solver=solver, steps=steps, shift=shift,
        guidance_high=guidance_high, guidance_low=guidance_low, batch_size=batch_size,
        device=device, progress=progress)
    seconds = time.perf_counter() - start
    confusion = {f: defaultdict(lambda: defaultdict(int)) for f in FACTORS}
    for video, prompt in zip(videos, prompts):
        verdict, target = judge(video), parse_caption(prompt)
        for f in FACTORS:
            confusion[f][getattr(target, f)][str(getattr(verdict, f))] += 1
    return {
        "settings": {"solver": request.solver, "steps": request.steps, "shift": request.shift,
                     "guidance_high": request.guidance_high, "guidance_low": request.guidance_low,
                     "negative_prompt": request.negative_prompt, "nfe_per_video": nfe,
                     "num_prompts": num_prompts, "prompt_seed": prompt_seed, "noise_seed": noise_seed},
        "overall": _summary(accuracy(videos, prompts)),
        "by_language": _group_accuracy(videos, prompts, caption_lang),
        "by_factor_value": {f: _group_accuracy(videos, prompts, lambda p, f=f: getattr(parse_caption(p), f))
                            for f in FACTORS},
        "confusion": {f: {k: dict(v) for k, v in table.items()} for f, table in confusion.items()},
        "seconds": seconds,
    }


def format_report(result: dict) -> str:
    """A few lines: the setting, overall and per-language accuracies, the weakest factor values."""
    s = result["settings"]
    row = lambda r: (f"joint {r['joint']:.1%}  colour {r['colour']:.1%}  shape {r['shape']:.1%}  "  # noqa: E731
                     f"motion {r['motion']:.1%}  (n={r['n']}, not found {r['not_found']})")
    lines = [f"{s['solver']} {s['steps']} steps, shift {s['shift']}, guidance "
             f"{s['guidance_high']}/{s['guidance_low']}, NFE {s['nfe_per_video']}, "
             f"{result['seconds']:.0f} s",
             f"  all: {row(result['overall'])}"]
    lines += [f"  {lang}:  {row(r)}" for lang, r in result["by_language"].items()]
    for f in FACTORS:
        values = result["by_factor_value"][f]
        lines.append(f"  {f} accuracy by value: " + ", ".join(f"{v} {r[f]:.0%}" for v, r in values.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Oracle accuracy of a shapes-world teacher.")
    parser.add_argument("--teacher", default=str(Path(__file__).resolve().parents[2] / "teacher"
                                                 / "weights" / "shapes"), help="teacher folder")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--prompt-seed", type=int, default=0)
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--solver", default=None, help="unipc or euler (default: the teacher's)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--shift", type=float, default=None)
    parser.add_argument("--guidance", type=float, nargs="+", default=None, metavar="G",
                        help="one value for both experts, or HIGH LOW")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the full result here")
    args = parser.parse_args(argv)
    if args.guidance is not None and len(args.guidance) not in (1, 2):
        parser.error("--guidance takes one value (both experts) or two (HIGH LOW)")
    g = args.guidance
    result = evaluate_teacher(
        args.teacher, num_prompts=args.prompts, prompt_seed=args.prompt_seed,
        noise_seed=args.noise_seed, solver=args.solver, steps=args.steps, shift=args.shift,
        guidance_high=g[0] if g else None, guidance_low=g[-1] if g else None,
        batch_size=args.batch_size, device=args.device)
    print(format_report(result))
    if args.json:
        write_text_atomic(json.dumps(result, indent=2, ensure_ascii=False), Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
