"""Train a tiny streaming decoder (``student.tiny_decoder``) to reproduce a teacher VAE's decoder.

    wan-distill train-decoder                     # the shipped shapes decoder, from its seed
    wan-distill train-decoder --out DIR --steps 300

Data: shapes-world clips encoded by the teacher's VAE (normalised posterior means). Each clip's
latents get Gaussian noise of a standard deviation drawn from U[0, ``latent_noise``], and the
target is the VAE's own decode of those perturbed latents. So the tiny decoder learns the VAE's
decoder around the data, not only on it: a student's latents are near the encoded world, not on
it. The loss is the VAE stage's foreground-weighted L1 plus its edge L1
(``distill.teacher_training.vae_losses``: the outlines are what tells a square from a circle)
plus the same L1 on frame-to-frame differences (the motion between the frames of one latent).

The data is rendered, encoded and decoded once and kept in the run folder; training is a
Lightning run that resumes from its last checkpoint. The decoder is written atomically with the
fingerprint of the VAE it reproduces, so loading it beside another VAE fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file
from torch.utils.data import Dataset
from tqdm import tqdm

from distill.checkpointing import AtomicCheckpoint, resume_checkpoint
from distill.data.resumable import resumable_loader
from distill.data.shapes import video_to_tensor
from distill.teacher_training.vae_losses import edge_l1, foreground_weights, psnr, weighted_l1
from eval.oracle import accuracy
from eval.shapes_world import render, sample_spec
from student.paths import embedded_teacher_dir, wan_distill_home
from student.tiny_decoder import (
    TINY_DECODER_PRESETS,
    TinyDecoder,
    TinyDecoderConfig,
    vae_fingerprint,
)
from student.tiny_decoder_checkpoint import TINY_DECODER_FOLDER, save_tiny_decoder
from teacher.output_paths import OutputLocationError, check_output_folder
from teacher.pipeline import video_to_uint8
from teacher.weight_files import save_safetensors_atomic, write_text_atomic

DATA_FILE = "data.safetensors"
REPORT_FILE = "report.json"
# Seed streams of the shapes world, apart from the distillation data's (0, 1) and the teacher's
# latent stage (2): training clips and held-out clips for the report.
_TRAIN_STREAM, _VAL_STREAM = 5, 6


@dataclass(frozen=True)
class DecoderTrainingSettings:
    """What a ``train-decoder`` run does (defaults: the shipped shapes decoder)."""

    preset: str = "shapes"
    num_clips: int = 1024
    val_clips: int = 200
    latent_noise: float = 0.3
    steps: int = 4000
    batch_size: int = 16
    lr: float = 1e-3
    foreground_weight: float = 4.0
    boundary_weight: float = 4.0
    dilation: int = 2
    edge_weight: float = 1.0
    motion_weight: float = 1.0
    checkpoint_every: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset not in TINY_DECODER_PRESETS:
            raise ValueError(f"preset={self.preset!r}: choose one of {sorted(TINY_DECODER_PRESETS)}")
        for name in ("num_clips", "val_clips", "steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.batch_size > self.num_clips:
            raise ValueError(f"batch_size={self.batch_size} exceeds num_clips={self.num_clips}; "
                             f"lower it or render more clips")
        if self.latent_noise < 0 or self.lr <= 0:
            raise ValueError(f"latent_noise={self.latent_noise} must be >= 0 and lr={self.lr} > 0")


# ---------------------------------------------------------------------------------------------
# Data


@torch.no_grad()
def render_and_decode(vae, num_clips: int, seed: int, stream: int, latent_noise: float,
                      num_frames: int, batch_size: int = 32, progress=None) -> dict[str, torch.Tensor]:
    """Clips of the shapes world through ``vae``: normalised latents (noise added) and the VAE's
    decode of them.

    Clip i is ``sample_spec(default_rng([seed, stream, i]))``; its latent noise is drawn from
    ``torch.Generator().manual_seed(seed * 1_000_003 + stream)`` in clip order. Returns
    ``latents`` float32 [N, z, n, h, w], ``target`` uint8 [N, T, H, W, 3] (the VAE decode),
    ``clip`` uint8 (the rendered clip the latents encode) and ``factors`` ([shape, colour,
    motion] per clip).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + stream)
    latents, targets, clips, factors = [], [], [], []
    for start in range(0, num_clips, batch_size):
        specs = [sample_spec(np.random.default_rng([seed, stream, i]))
                 for i in range(start, min(num_clips, start + batch_size))]
        factors += [[s.shape, s.colour, s.motion] for s in specs]
        rendered = [render(s, num_frames) for s in specs]
        z = vae.encode(torch.stack([video_to_tensor(v) for v in rendered]))
        sigma = torch.rand(len(specs), generator=gen) * latent_noise
        z = z + sigma.view(-1, 1, 1, 1, 1) * torch.randn(z.shape, generator=gen)
        latents.append(z.float())
        targets.append(video_to_uint8(vae.decode(z)))
        clips.append(torch.from_numpy(np.stack(rendered)))
        if progress is not None:
            progress(len(specs))
    return {"latents": torch.cat(latents), "target": torch.cat(targets), "clip": torch.cat(clips),
            "factors": factors}


def uint8_to_video(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float32 [B, 3, T, H, W] in [-1, 1]."""
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


class _Pairs(Dataset):
    def __init__(self, latents: torch.Tensor, target: torch.Tensor):
        self.latents, self.target = latents, target

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict:
        return {"latents": self.latents[index], "target": self.target[index]}


# ---------------------------------------------------------------------------------------------
# Training


def motion_l1(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted L1 between frame-to-frame differences of output and target [B, 3, T, H, W].

    Why: without it the decoder drew the two frames its head makes from one feature map alike,
    so objects moved in steps every other frame, and the oracle, which reads the median
    frame-to-frame speed, saw no motion in 25 of 200 held-out clips (86.0% joint against the
    VAE's 100%).
    """
    pair = torch.maximum(weights[:, :, :-1], weights[:, :, 1:])
    return weighted_l1(output.diff(dim=2), target.diff(dim=2), pair)


def decoder_loss(decoded: torch.Tensor, target: torch.Tensor,
                 settings: DecoderTrainingSettings) -> torch.Tensor:
    """Foreground-weighted L1 + ``edge_weight`` x edge L1 + ``motion_weight`` x frame-difference
    L1 of video [B, 3, T, H, W] in [-1, 1]."""
    weights = foreground_weights(target, settings.foreground_weight, settings.dilation,
                                 settings.boundary_weight)
    return (weighted_l1(decoded, target, weights)
            + settings.edge_weight * edge_l1(decoded, target, weights)
            + settings.motion_weight * motion_l1(decoded, target, weights))


class TinyDecoderTraining(L.LightningModule):
    """Fits a ``TinyDecoder`` to (latents, VAE decode) pairs with Adam."""

    def __init__(self, config: TinyDecoderConfig, settings: DecoderTrainingSettings):
        super().__init__()
        self.decoder = TinyDecoder(config)
        self.settings = settings

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        decoded = self.decoder.decode(batch["latents"], clamp=False)
        loss = decoder_loss(decoded, uint8_to_video(batch["target"]), self.settings)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.decoder.parameters(), lr=self.settings.lr)


@torch.no_grad()
def decode_all(decoder, latents: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """uint8 [N, T, H, W, 3] of a decoder (tiny or the VAE) over latents [N, z, n, h, w]."""
    return torch.cat([video_to_uint8(decoder.decode(latents[i:i + batch_size]))
                      for i in range(0, len(latents), batch_size)])


@torch.no_grad()
def decode_ms_per_clip(decoder, latents: torch.Tensor, repeats: int = 5) -> float:
    """Median milliseconds to stream-decode one clip (batch 1, one latent frame at a time)."""
    one = latents[:1]

    def run() -> None:
        cache = decoder.new_decode_cache()
        for i in range(one.shape[2]):
            decoder.decode_chunk(one[:, :, i:i + 1], cache)

    run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1000


def decoder_report(tiny: TinyDecoder, vae, val: dict[str, torch.Tensor]) -> dict:
    """Held-out clips: oracle joint accuracy of the rendered clip, the VAE decode and the tiny
    decode, PSNR of the tiny decode against the VAE's, and stream-decode time at one thread."""
    from eval.shapes_world import Factors

    factors = [Factors(*f) for f in val["factors"]]
    tiny_frames = decode_all(tiny, val["latents"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny_ms = decode_ms_per_clip(tiny, val["latents"])
        vae_ms = decode_ms_per_clip(vae, val["latents"])
    finally:
        torch.set_num_threads(threads)
    return {
        "val_clips": len(factors),
        "oracle_joint": {
            "clip": accuracy(val["clip"].numpy(), factors)["joint"],
            "vae": accuracy(val["target"].numpy(), factors)["joint"],
            "tiny": accuracy(tiny_frames.numpy(), factors)["joint"],
        },
        "psnr_tiny_vs_vae_db": psnr(uint8_to_video(tiny_frames), uint8_to_video(val["target"])),
        "decode_ms_per_clip_1_thread": {"tiny": tiny_ms, "vae": vae_ms},
    }


def _load_or_build_data(work: Path, vae, settings: DecoderTrainingSettings, num_frames: int,
                        progress: bool) -> tuple[dict, dict]:
    """Training and held-out data, built once and kept in ``work`` (deterministic in the seed)."""
    path = work / DATA_FILE
    if path.is_file():
        data = load_file(str(path))
        meta = json.loads((work / "data.json").read_text(encoding="utf-8"))
        train = {"latents": data["train_latents"], "target": data["train_target"]}
        val = {"latents": data["val_latents"], "target": data["val_target"],
               "clip": data["val_clip"], "factors": meta["val_factors"]}
        return train, val
    total = settings.num_clips + settings.val_clips
    with tqdm(total=total, desc="encoding and decoding clips", unit="clip",
              disable=not progress) as bar:
        train = render_and_decode(vae, settings.num_clips, settings.seed, _TRAIN_STREAM,
                                  settings.latent_noise, num_frames, progress=bar.update)
        # Held-out clips without latent noise: the report measures the decoder on the world.
        val = render_and_decode(vae, settings.val_clips, settings.seed, _VAL_STREAM, 0.0,
                                num_frames, progress=bar.update)
    write_text_atomic(json.dumps({"val_factors": val["factors"]}), work / "data.json")
    save_safetensors_atomic({"train_latents": train["latents"], "train_target": train["target"],
                             "val_latents": val["latents"], "val_target": val["target"],
                             "val_clip": val["clip"]}, path)
    return train, val


def _check_run_folder(work: Path, identity: dict) -> None:
    """A run folder belongs to one set of settings and one VAE; refuse to mix runs."""
    path = work / "run.json"
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != identity:
            changed = sorted(k for k in identity if stored.get(k) != identity[k])
            raise SystemExit(f"error: {work} holds a decoder run with other settings "
                             f"({', '.join(changed)} differ); pass another --work-dir or "
                             f"delete it to start over")
    else:
        work.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(identity, indent=2), path)


def train_decoder(teacher_dir: str | Path | None = None, out: str | Path | None = None,
                  work_dir: str | Path | None = None,
                  settings: DecoderTrainingSettings = DecoderTrainingSettings(),
                  progress: bool = True) -> dict:
    """Train a tiny decoder for a teacher's VAE and write it to ``out``; returns the report.

    Defaults: the embedded shapes teacher, written beside it (``teacher/weights/shapes/
    tiny_decoder``), the run folder under ``<home>/runs/tiny-decoder-<preset>``.
    """
    from distill.data.latents import load_text_and_vae

    start = time.perf_counter()
    teacher_dir = Path(teacher_dir) if teacher_dir else embedded_teacher_dir()
    out = Path(out) if out else teacher_dir / TINY_DECODER_FOLDER
    work = Path(work_dir) if work_dir else wan_distill_home() / "runs" / f"tiny-decoder-{settings.preset}"
    try:  # the decoder is written last, after ~40 minutes: a place it cannot go fails now
        check_output_folder(out, "--out")
        check_output_folder(work, "--work-dir")
    except OutputLocationError as err:
        raise SystemExit(f"error: {err}") from None
    teacher_config, _, _, vae = load_text_and_vae(teacher_dir)
    if teacher_config.name != "shapes":
        raise SystemExit(f"error: train-decoder renders shapes-world clips, which only fit the "
                         f"shapes teacher; {teacher_dir} holds {teacher_config.name!r}")
    fingerprint = vae_fingerprint(vae)
    config = TinyDecoderConfig(**{**TINY_DECODER_PRESETS[settings.preset].to_dict(),
                                  "vae_fingerprint": fingerprint})
    config.check_vae(vae)
    # The step budget may grow between runs of one folder (resume and train on); the data and
    # the optimisation may not.
    same_run = {k: v for k, v in settings.__dict__.items() if k not in ("steps", "checkpoint_every")}
    _check_run_folder(work, {**same_run, "vae_fingerprint": fingerprint})
    L.seed_everything(settings.seed, verbose=False)
    train, val = _load_or_build_data(work, vae, settings, teacher_config.sampling.frames, progress)
    module = TinyDecoderTraining(config, settings)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=settings.steps, max_epochs=-1,
        default_root_dir=work, logger=CSVLogger(work, name="logs"),
        callbacks=[AtomicCheckpoint(dirpath=work / "checkpoints", save_last=True, save_top_k=0,
                                    every_n_train_steps=settings.checkpoint_every)],
        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=25, use_distributed_sampler=False)
    loader = resumable_loader(_Pairs(train["latents"], train["target"]), settings.batch_size,
                              settings.seed, trainer)
    trainer.fit(module, train_dataloaders=loader,
                ckpt_path=resume_checkpoint(work / "checkpoints" / "last.ckpt"))
    tiny = module.decoder.cpu().eval().requires_grad_(False)
    save_tiny_decoder(out, tiny)
    report = {"out": str(out), "steps": settings.steps,
              "final_loss": float(trainer.callback_metrics.get("loss", float("nan"))),
              **decoder_report(tiny, vae, val), "wall_s": time.perf_counter() - start}
    write_text_atomic(json.dumps(report, indent=2), work / REPORT_FILE)
    return report


def summary_line(report: dict) -> str:
    joint, ms = report["oracle_joint"], report["decode_ms_per_clip_1_thread"]
    minutes, seconds = divmod(int(round(report["wall_s"])), 60)
    return (f"trained the tiny decoder in {minutes}m{seconds:02d}s ({report['steps']} steps, loss "
            f"{report['final_loss']:.4f}): oracle joint on {report['val_clips']} held-out clips "
            f"{joint['tiny']:.1%} tiny vs {joint['vae']:.1%} VAE, PSNR vs the VAE "
            f"{report['psnr_tiny_vs_vae_db']:.1f} dB, decode {ms['tiny']:.0f} ms vs "
            f"{ms['vae']:.0f} ms per clip at one thread; wrote {report['out']}")


def main(argv: list[str] | None = None) -> int:
    defaults = DecoderTrainingSettings()
    parser = argparse.ArgumentParser(
        prog="wan-distill train-decoder",
        description="train a tiny streaming decoder that reproduces the shapes teacher's VAE")
    parser.add_argument("--teacher-dir", default=None, help="default: the embedded shapes teacher")
    parser.add_argument("--out", default=None, help="default: <teacher-dir>/tiny_decoder")
    parser.add_argument("--work-dir", default=None,
                        help="run folder (data, checkpoints); default: <home>/runs/tiny-decoder-shapes")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--num-clips", type=int, default=defaults.num_clips)
    parser.add_argument("--val-clips", type=int, default=defaults.val_clips)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for training")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        settings = DecoderTrainingSettings(steps=args.steps, num_clips=args.num_clips,
                                           val_clips=args.val_clips, batch_size=args.batch_size,
                                           seed=args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.threads < 1:
        raise SystemExit(f"error: --threads {args.threads} must be >= 1")
    torch.set_num_threads(args.threads)
    report = train_decoder(args.teacher_dir, args.out, args.work_dir, settings,
                           progress=not args.quiet)
    print(summary_line(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
