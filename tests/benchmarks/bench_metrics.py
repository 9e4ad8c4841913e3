"""Cost of each evaluation metric per video on this machine (shapes-world videos: 17 frames 64x64).

A network's cost does not depend on its weights' values, so LPIPS (AlexNet trunk) and CLIP score
(ViT-B/32) are timed with random weights of the real architectures; FVD uses the real I3D when
installed (else random weights, same cost). The numbers timed here are costs, never metric values.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_metrics.py [--videos 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=8)
    args = ap.parse_args()
    from eval.clip_score import _FeatureTensors, clip_score_per_video
    from eval.fvd import video_features
    from eval.i3d import I3D
    from eval.i3d_weights import load_i3d
    from eval.lpips_metric import lpips_per_video
    from eval.oracle import judge
    from eval.paired import paired_psnr_ssim
    from eval.shapes_world import render, sample_spec

    n = args.videos
    videos = torch.from_numpy(__import__("numpy").stack([render(sample_spec(i)) for i in range(n)]))
    other = torch.from_numpy(__import__("numpy").stack([render(sample_spec(100 + i)) for i in range(n)]))
    rows = {}
    rows["oracle (judge)"] = timed(lambda: [judge(v.numpy()) for v in videos]) / n
    rows["paired PSNR+SSIM (torchmetrics)"] = timed(lambda: paired_psnr_ssim(videos, other)) / n
    import lpips

    net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    rows["LPIPS alex, per frame, paired"] = timed(lambda: lpips_per_video(net, videos, other)) / n
    try:
        i3d, i3d_kind = load_i3d(), "real TF-Hub weights"
    except Exception:
        i3d, i3d_kind = I3D().eval(), "random weights"
    rows[f"FVD features (I3D {i3d_kind}, 16 frames at 224)"] = timed(
        lambda: video_features(videos, model=i3d, batch_size=n), repeats=1) / n
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    import tempfile

    d = Path(tempfile.mkdtemp())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(),
                              tokenizer=CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")))
    clip = CLIPModel(CLIPConfig()).eval()  # the default config is ViT-B/32
    metric = CLIPScore(model_name_or_path=lambda: (_FeatureTensors(clip), processor))
    prompts = ["a red circle moving left"] * n
    rows["CLIP score ViT-B/32, 8 frames"] = timed(
        lambda: clip_score_per_video(metric, videos, prompts, frames_per_video=8), repeats=1) / n
    print(f"{n} videos of 17 frames 64x64, CPU threads {torch.get_num_threads()}")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1000:.1f} ms per video |")


if __name__ == "__main__":
    main()
