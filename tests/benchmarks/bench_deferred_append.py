"""The student's 17-frame clip with its KV-cache appends as passes of their own (eager) against
appends deferred into the next chunk's first pass (``append_chunk(defer=True)``, what
``generate``, ``eval`` and ``stream`` run), side by side in one process at one CPU thread.

    python tests/benchmarks/bench_deferred_append.py --rounds 30

Each round makes one clip both ways, in alternating order, from the same prompt and seed
(prompt and seed change between rounds), with the VAE and with the tiny decoder; it prints the
median and quartiles per variant and the largest uint8 difference between the two ways' frames.
Needs the shipped student (``wan-distill distill``) and the shipped teacher's tiny decoder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from eval.shapes_world import eval_prompts  # noqa: E402
from eval.systems import seeded_noise  # noqa: E402
from student.sampler import sample_chunk, student_sigmas  # noqa: E402
from student.tiny_decoder_checkpoint import TINY_DECODER_FOLDER, load_tiny_decoder  # noqa: E402
from teacher.pipeline import encode_prompts, latent_shape, video_to_uint8  # noqa: E402
from tests.benchmarks.shipped_models import add_model_args, load_shipped  # noqa: E402


def make_clip(student, config, parts, decoder, prompt: str, seed: int, defer: bool, *,
              sigmas: torch.Tensor | None = None, new_cache=None):
    """(seconds, uint8 frames [1, T, H, W, 3]): text to last decoded frame, as eval times it.

    ``sigmas`` default to the training grid at ``config.steps``; ``new_cache()`` makes the KV
    cache (default: the model's, with every network's cache, at the config's sink and window).
    """
    start = time.perf_counter()
    context = encode_prompts(parts, [prompt], torch.device("cpu"))
    shape = latent_shape(parts, parts.config.sampling.frames, parts.config.sampling.height,
                         parts.config.sampling.width)
    noise, generators = seeded_noise(shape, [seed])
    if sigmas is None:
        sigmas = student_sigmas(config.steps, config.shift)
    cache = (new_cache() if new_cache is not None else
             student.new_cache(1, sink_chunks=config.sink_chunks,
                               window_chunks=config.window_chunks))
    decode_cache = decoder.new_decode_cache()
    cf, chunks = config.chunk_frames, shape[1] // config.chunk_frames
    frames = []
    for c in range(chunks):
        x0 = sample_chunk(student, noise[:, :, c * cf:(c + 1) * cf], sigmas, context,
                          config.guidance_default, cache, generators, config.num_train_timesteps)
        if c + 1 < chunks:
            student.append_chunk(x0, context, config.guidance_default, cache, defer=defer)
        frames.append(video_to_uint8(decoder.decode_chunk(x0, decode_cache)))
    return time.perf_counter() - start, torch.cat(frames, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    add_model_args(parser)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: quartiles need at least 2 rounds")
    torch.set_num_threads(1)
    parts, student, config = load_shipped(args)
    decoders = {"VAE": parts.vae,
                "tiny": load_tiny_decoder(Path(args.teacher_dir) / TINY_DECODER_FOLDER, parts.vae)}
    prompts = eval_prompts(args.rounds, seed=0)
    with torch.no_grad():
        for name, decoder in decoders.items():
            seconds = {False: [], True: []}
            largest = 0
            make_clip(student, config, parts, decoder, prompts[0], 0, True)  # warm-up
            for r in range(args.rounds):
                videos = {}
                for defer in ((False, True) if r % 2 == 0 else (True, False)):
                    s, videos[defer] = make_clip(student, config, parts, decoder, prompts[r], r,
                                                 defer)
                    seconds[defer].append(s)
                largest = max(largest, int((videos[True].int() - videos[False].int()).abs().max()))
            for defer in (False, True):
                q1, median, q3 = statistics.quantiles(seconds[defer], n=4)
                print(f"{name:4s} {'deferred' if defer else 'eager   '} appends: median "
                      f"{median * 1000:.1f} ms [IQR {q1 * 1000:.1f}, {q3 * 1000:.1f}] over "
                      f"{args.rounds} clips")
            print(f"{name:4s} largest uint8 difference between the two ways' frames: {largest}")


if __name__ == "__main__":
    main()
