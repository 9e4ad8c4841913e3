"""Streaming benchmark on the CPU: time to first frame and sustained FPS of the shapes-size student.

Measures, in one run:
1. the server with 1, 2 and 4 concurrent WebSocket sessions (real clients on 127.0.0.1 granting a
   credit window): per session, time to first frame as the client sees it (start message sent ->
   first JPEG received) and the received frame rate, plus the server's own /metrics numbers;
2. the same stream as seen by the browser (headless Chromium through Playwright reading the
   page's painted-FPS and time-to-first-frame), when chromium and playwright are installed;
3. memory over a long stream: process RSS and the engine's cache bytes after 10,000 frames.

By default it serves what `wan-distill serve` serves: the shipped student (two networks, made
by `wan-distill distill`) with the embedded teacher's text encoder and the decoder that
`--decoder` picks (auto: the tiny decoder). ``--random`` serves a randomly initialised
one-network student of the shapes preset with random text encoder and VAE instead (speed does
not depend on the weights' values; the rows before session 17 were measured that way).

    python tests/benchmarks/bench_streaming.py [--seconds 20] [--frames 10000] [--threads 1]
    python tests/benchmarks/bench_streaming.py --random --parts server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from student.causal_dit import CausalWanModel  # noqa: E402
from student.config import student_preset  # noqa: E402
from student.engine import StudentStreamEngine  # noqa: E402
from teacher.config import SHAPES  # noqa: E402
from teacher.t5 import UMT5Encoder  # noqa: E402
from teacher.tokenizer import ByteTokenizer  # noqa: E402
from teacher.vae import WanVAE  # noqa: E402

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right",
           "a white circle moving down"]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def random_factory():
    """Engines over one random shapes-size student and random shapes teacher parts."""
    torch.manual_seed(0)
    config = student_preset("shapes")
    student = CausalWanModel.from_config(config).eval().requires_grad_(False)
    text_encoder = UMT5Encoder(**asdict(SHAPES.t5)).eval().requires_grad_(False)
    vae = WanVAE(**asdict(SHAPES.vae)).eval().requires_grad_(False)
    tokenizer = ByteTokenizer()
    s = SHAPES.sampling
    return lambda: StudentStreamEngine(student, config, text_encoder, tokenizer, vae,
                                       width=s.width, height=s.height, fps=s.fps)


async def ws_sessions(factory, n: int, seconds: float, window: int = 16) -> dict:
    from websockets.asyncio.client import connect

    from student.server import protocol as P
    from student.server import serve

    async with serve(factory, port=0, max_sessions=max(4, n)) as server:
        async def one(i: int) -> dict:
            async with connect(server.ws_url, origin=server.url.rstrip("/")) as ws:
                t0 = time.perf_counter()
                await ws.send(json.dumps({"type": "start", "prompt": PROMPTS[i % 4], "seed": i}))
                await ws.send(json.dumps({"type": "credit", "n": window}))
                first = last = None
                frames = 0
                deadline = t0 + seconds
                while time.perf_counter() < deadline:
                    try:
                        msg = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.perf_counter()))
                    except asyncio.TimeoutError:
                        break
                    if isinstance(msg, bytes):
                        P.unpack_frame(msg)
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        frames += 1
                        await ws.send(json.dumps({"type": "credit", "n": 1}))
                await ws.send(json.dumps({"type": "stop"}))
                rate = (frames - 1) / (last - first) if frames > 1 and last > first else 0.0
                return {"ttff_s": (first - t0) if first else None, "fps": rate, "frames": frames}

        clients = await asyncio.gather(*(one(i) for i in range(n)))
        metrics = server.metrics()
    return {"sessions": n, "clients": clients, "server": metrics}


def browser_session(factory, seconds: float) -> dict | None:
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not chromium:
        return None
    import threading

    from student.server.app import run_server

    ready: list[str] = []
    threading.Thread(target=run_server, args=(factory,), kwargs={"port": 0, "ready": ready.append},
                     daemon=True).start()
    for _ in range(200):
        if ready:
            break
        time.sleep(0.05)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(ready[0])
        page.fill("#prompt", PROMPTS[0])
        page.click("#start")
        time.sleep(seconds)
        read = {k: page.inner_text(f"#m-{k}") for k in ("ttff", "fps", "rxfps", "genfps", "frames", "drops")}
        browser.close()
    return read


def long_stream_memory(factory, frames: int) -> list[dict]:
    engine = factory()
    engine.start(PROMPTS[0], seed=0)
    marks, done, rows = {1000, frames // 2, frames}, 0, []
    rows.append({"frames": 0, "rss_mib": rss_mib(), "cache_bytes": 0})
    t0 = time.perf_counter()
    while done < frames:
        if done and done % 2000 < 4:
            engine.set_prompt(PROMPTS[(done // 2000) % 4])  # prompt switches along the way
        done += engine.next_chunk().n_frames
        if any(done >= m > done - 8 for m in marks) or done >= frames:
            rows.append({"frames": done, "rss_mib": rss_mib(),
                         "cache_bytes": sum(engine.cache_bytes().values()),
                         "fps": done / (time.perf_counter() - t0)})
            marks = {m for m in marks if m > done}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="per server/browser measurement")
    ap.add_argument("--frames", type=int, default=10_000, help="length of the memory run")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--parts", nargs="+", default=["server", "browser", "memory"],
                    choices=["server", "browser", "memory"])
    ap.add_argument("--random", action="store_true",
                    help="a random one-network student and random teacher parts, not the shipped")
    ap.add_argument("--decoder", default="auto", help="as `serve --decoder` (shipped student)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.random:
        factory, what = random_factory(), "random weights, VAE"
    else:
        from student.live import load_engine_factory
        from student.paths import default_student_dir, embedded_teacher_dir

        factory = load_engine_factory(default_student_dir("shapes"), embedded_teacher_dir(),
                                      decoder=args.decoder)
        what = f"shipped, decoded by {type(factory().vae).__name__}"
    print(f"shapes student ({what}), 64x64 at 8 fps, chunk 1 latent frame (4 frames), "
          f"{student_preset('shapes').steps} steps, CPU threads {args.threads}, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    for n in args.sessions if "server" in args.parts else ():
        r = asyncio.run(ws_sessions(factory, n, args.seconds))
        ttff = [c["ttff_s"] for c in r["clients"] if c["ttff_s"] is not None]
        fps = [c["fps"] for c in r["clients"]]
        server = r["server"]
        print(f"{n} session(s): client TTFF median {statistics.median(ttff) * 1000:.0f} ms, "
              f"client FPS per session {statistics.mean(fps):.1f} (total {sum(fps):.1f}); "
              f"server metrics: {json.dumps({k: v for k, v in server.items() if k != 'sessions'})}",
              flush=True)
    if "browser" in args.parts:
        seen = browser_session(factory, args.seconds)
        print(f"browser (1 session, {args.seconds:.0f} s): {seen}" if seen else
              "browser: skipped (chromium or playwright missing)", flush=True)
    for row in long_stream_memory(factory, args.frames) if "memory" in args.parts else ():
        print(f"long stream: {json.dumps(row)}", flush=True)


if __name__ == "__main__":
    main()
