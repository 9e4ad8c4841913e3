"""The quality-vs-latency report: one dict, written as report.json, report.md and a PNG plot.

Conventions of the report dict (what ``eval.distributed_eval`` fills in):

- every metric slot of a system is a dict with ``"status"``: ``"ok"`` (with its values),
  ``"unavailable"`` or ``"not applicable"`` (with a ``"reason"`` saying why and how to fix it);
- a metric computed with a network that is not its standard one (e.g. the tiny random networks
  of the tests) carries ``"network": "random-test"``; the Markdown table and the plot never show
  such numbers under the metric's name (they print "random-test network" instead), since a
  distance in a random feature space is not FVD, LPIPS or CLIP score;
- latencies are ``eval.latency.TimingSummary`` dicts (seconds).

The Pareto front (``pareto_front``) is computed on (median latency, quality): lower latency and
higher quality win; it is drawn on the plot and marked per system (``"pareto": true``).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from teacher.weight_files import write_bytes_atomic, write_text_atomic

REPORT_FORMAT = "wan-distill-eval/1"
RANDOM_TEST_NETWORK = "random-test"
JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "report.json", "report.md", "quality_vs_latency.png"

OK, UNAVAILABLE, NOT_APPLICABLE = "ok", "unavailable", "not applicable"


def available(**values) -> dict:
    """A computed metric slot."""
    return {"status": OK, **values}


def unavailable(reason: str) -> dict:
    """A metric that could not be computed here; ``reason`` says why and how to fix it."""
    if not reason or not reason.strip():
        raise ValueError("an unavailable metric needs a reason (what is missing, how to get it)")
    return {"status": UNAVAILABLE, "reason": reason.strip()}


def not_applicable(reason: str) -> dict:
    """A metric that has no meaning for this system (e.g. paired distances of the reference)."""
    return {"status": NOT_APPLICABLE, "reason": reason}


def is_ok(slot: dict | None) -> bool:
    return isinstance(slot, dict) and slot.get("status") == OK


def is_standard(slot: dict | None) -> bool:
    """Computed with the metric's real network (so its number may be shown under its name)."""
    return is_ok(slot) and slot.get("network") != RANDOM_TEST_NETWORK


# ---------------------------------------------------------------------------------------------
# Pareto front


def pareto_front(points: Sequence[tuple[float, float]], maximize_y: bool = True) -> list[int]:
    """Indices of the non-dominated points, sorted by x then by index.

    x is minimised (latency); y is maximised (or minimised with ``maximize_y=False``, e.g. FVD).
    Point j dominates point i when it is at least as good in both coordinates and strictly
    better in one; equal points do not dominate each other, so both stay on the front.

    Args:
        points: (x, y) pairs of finite floats.
    """
    values = []
    for i, point in enumerate(points):
        if len(point) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                      for v in point):
            raise ValueError(f"point {i} is {point!r}; need a pair of finite numbers")
        x, y = float(point[0]), float(point[1])
        values.append((x, y if maximize_y else -y))
    front = []
    for i, (xi, yi) in enumerate(values):
        dominated = any(xj <= xi and yj >= yi and (xj < xi or yj > yi)
                        for j, (xj, yj) in enumerate(values) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (values[i][0], i))


# ---------------------------------------------------------------------------------------------
# Quality axis and assembly


def quality_axis(systems: Sequence[dict]) -> dict | None:
    """Which quality the plot and the Pareto front use: the oracle's joint accuracy when any
    system has it, else a standard CLIP score, else a standard FVD (lower is better); None if
    no system has a usable quality number.

    Returns {"key", "label", "maximize", "values": {system name: value}}.
    """
    candidates = (
        ("oracle", "joint", "oracle joint accuracy", True, is_ok),
        ("clip_score", "mean", "CLIP score", True, is_standard),
        ("fvd", "value", "FVD", False, is_standard),
    )
    for key, field, label, maximize, usable in candidates:
        values = {s["name"]: float(s[key][field]) for s in systems
                  if usable(s.get(key)) and _finite(s[key].get(field))}
        if values:
            return {"key": key, "label": label, "maximize": maximize, "values": values}
    return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def mark_pareto(systems: list[dict]) -> dict | None:
    """Set ``system["pareto"]`` (True/False; None without latency or quality) and return the
    quality axis used (see ``quality_axis``)."""
    axis = quality_axis(systems)
    named = [s for s in systems if axis and s["name"] in axis["values"]
             and _finite((s.get("latency_s") or {}).get("median"))]
    front = set()
    if named:
        points = [(s["latency_s"]["median"], axis["values"][s["name"]]) for s in named]
        front = {named[i]["name"] for i in pareto_front(points, axis["maximize"])}
    for s in systems:
        s["pareto"] = (s["name"] in front) if s in named else None
    return axis


def build_report(*, world: str, systems: list[dict], settings: dict, machine: dict,
                 weights: dict, notes: Sequence[str] = (), skipped: Sequence[dict] = (),
                 reference: str | None = None, seconds: dict | None = None,
                 created: str | None = None, streams: dict | None = None) -> dict:
    """Assemble the report dict (see the module doc) and mark the Pareto front.

    Args:
        world: "shapes" or "prompts" (real models on a prompt file).
        systems: one dict per evaluated system (name, kind, steps, nfe, latency_s,
            time_to_first_frame_s, oracle, fvd, paired, clip_score, ...).
        settings, machine, weights: how the run was made (JSON-ready).
        notes: sentences for the reader (e.g. the student was not found and how to make it).
        skipped: systems not evaluated, each {"name", "reason"}.
        reference: the system paired distances are measured against.
        seconds: wall time per phase.
        streams: long streams of the student systems (``eval.run``'s streams phase), or None.
    """
    names = [s.get("name") for s in systems]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise ValueError(f"systems need distinct non-empty names, got {names}")
    systems = [dict(s) for s in systems]
    axis = mark_pareto(systems)
    return {
        "format": REPORT_FORMAT, "world": world, "created": created, "machine": machine,
        "weights": weights, "settings": settings, "reference": reference,
        "quality_axis": None if axis is None else {k: axis[k] for k in ("key", "label", "maximize")},
        "systems": systems, "skipped": [dict(s) for s in skipped], "notes": list(notes),
        "seconds": dict(seconds or {}), "streams": streams,
    }


# ---------------------------------------------------------------------------------------------
# Writing


def _json_ready(value):
    """Non-finite floats become the strings "inf", "-inf", "nan" (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def report_json(report: dict) -> str:
    return json.dumps(_json_ready(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _num(value, digits: int = 3) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    # Fixed decimals up to 1e5 (an FVD of 1019.3 stays 1019.3); scientific beyond, where the
    # decimals stop meaning anything.
    return f"{value:.4g}" if abs(value) >= 1e5 else f"{value:.{digits}f}"


def _timing_cell(t: dict | None) -> str:
    if not t:
        return "-"
    return f"{t['median']:.3f} [{t['q25']:.3f}, {t['q75']:.3f}] (n={t['n']})"


def _batched_cell(quality_pass: dict | None) -> str:
    """Milliseconds per video of the quality pass (throughput at its batch size): the median
    over its batches (with their count), or '-'."""
    by_batch = (quality_pass or {}).get("seconds_per_video_by_batch")
    if not by_batch or not by_batch.get("n"):
        return "-"
    return f"{by_batch['median'] * 1000:.1f} (n={by_batch['n']})"


def _slot_cell(slot: dict | None, render) -> str:
    if not slot:
        return "-"
    if slot["status"] == UNAVAILABLE:
        return "unavailable"
    if slot["status"] == NOT_APPLICABLE:
        return "-"
    if not is_standard(slot):
        return "random-test network"
    return render(slot)


def _oracle_cell(o: dict, field: str) -> str:
    return f"{o[field]:.3f}"


def _fvd_cell(f: dict) -> str:
    ci = (f" [{_num(f['ci_low'], 1)}, {_num(f['ci_high'], 1)}]"
          if f.get("ci_low") is not None else "")
    return f"{_num(f['value'], 1)}{ci} (N={f['n_fake']} vs {f['n_real']} real)"


def _mean_cell(m: dict, digits: int = 3) -> str:
    return f"{_num(m['mean'], digits)} ± {_num(m['std'], digits)} (n={m['n']})"


def _paired_cell(system: dict, field: str) -> str:
    paired = system.get("paired")
    if not paired or paired["status"] != OK:
        return _slot_cell(paired, lambda p: "")
    return _slot_cell(paired.get(field), _mean_cell)


def format_markdown(report: dict) -> str:
    """The human-readable report: context, one table row per system, the Pareto front, why any
    metric is unavailable, and the protocol."""
    m, st, w = report["machine"], report["settings"], report["weights"]
    axis = report.get("quality_axis")
    lines = [f"# Quality vs latency: {report['world']} evaluation", ""]
    lines.append(f"- Machine: {m.get('device_name', m.get('device'))}, {m.get('world_size', 1)} "
                 f"process(es), torch {m.get('torch')}, {m.get('cpu_threads')} CPU threads.")
    lines.append(f"- Prompts: N={st.get('num_prompts')} ({st.get('prompt_source')}); "
                 f"noise seeds {st.get('noise_seed')}..{st.get('noise_seed', 0) + st.get('num_prompts', 1) - 1}; "
                 f"batch {st.get('batch_size')} per process for the quality pass.")
    lines.append(f"- Weights: teacher `{w.get('teacher')}`; student `{w.get('student')}`"
                 + (f" ({w['label']})" if w.get("label") else "") + ".")
    if report.get("reference"):
        lines.append(f"- Paired distances: each system against `{report['reference']}` "
                     "(same prompt, same initial noise), per frame, averaged per video.")
    lines.append("")
    batch = next((s["quality_pass"]["batch_size"] for s in report["systems"]
                  if s.get("quality_pass")), None)
    batched = "Batched ms/video" + (f" (batch {batch})" if batch else "")
    header = ["System", "Steps", "NFE", "Latency s, median [IQR]", "First frame s", batched,
              "Oracle joint [95% CI]", "colour", "shape", "motion", "FVD [95% CI]", "PSNR dB",
              "SSIM", "LPIPS", "CLIP score"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for s in report["systems"]:
        oracle = s.get("oracle")
        star = " *" if s.get("pareto") else ""
        row = [f"{s['name']}{star}", str(s.get("steps", "-")), str(s.get("nfe", "-")),
               _timing_cell(s.get("latency_s")), _timing_cell(s.get("time_to_first_frame_s")),
               _batched_cell(s.get("quality_pass")), _slot_cell(oracle, _joint_cell)]
        row += [_slot_cell(oracle, lambda o, f=f: _oracle_cell(o, f))
                for f in ("colour", "shape", "motion")]
        row.append(_slot_cell(s.get("fvd"), _fvd_cell))
        row += [_paired_cell(s, f) for f in ("psnr_db", "ssim", "lpips")]
        row.append(_slot_cell(s.get("clip_score"), _mean_cell))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if axis:
        front = [s["name"] for s in report["systems"] if s.get("pareto")]
        lines.append(f"Pareto front (*) on latency vs {axis['label']}: {', '.join(front)}.")
    else:
        lines.append("No quality metric is available, so there is no Pareto front.")
    lines += _by_value_lines(report)
    lines += _versus_lines(report)
    lines += _stream_lines(report.get("streams"))
    reasons = _unavailable_reasons(report)
    if reasons or report.get("skipped") or report.get("notes"):
        lines += ["", "## Notes", ""]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    for skipped in report.get("skipped", []):
        lines.append(f"- {skipped['name']} not evaluated: {skipped['reason']}")
    for metric, reason in reasons:
        lines.append(f"- {metric}: unavailable: {reason}")
    lines += ["", "## Protocol", ""]
    lines += [f"- {p}" for p in report["settings"].get("protocol", [])]
    seconds = report.get("seconds") or {}
    if seconds:
        lines.append("- Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + ".")
    return "\n".join(lines) + "\n"


def _joint_cell(o: dict) -> str:
    interval = o.get("joint_ci95")
    within = f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
    return f"{o['joint']:.3f}{within} (N={o['n']})"


def _versus_lines(report: dict) -> list[str]:
    """A table of each student against each teacher system on the same prompts (exact McNemar);
    empty when no student has the comparison."""
    rows = [(s["name"], teacher, c) for s in report["systems"] if is_ok(s.get("oracle"))
            for teacher, c in (s["oracle"].get("versus") or {}).items()]
    if not rows:
        return []
    lines = ["", "## Student against teacher, prompt by prompt", "",
             "Same prompts, same noise seeds. Only the prompts where exactly one of the two is "
             "right tell them apart; the p-value (exact McNemar, two-sided) is the chance of a "
             "split at least this uneven between two equally good systems.", "",
             "| Student | Teacher | only the student right | only the teacher right | "
             "joint difference | p |", "|---|---|---|---|---|---|"]
    for student, teacher, c in rows:
        lines.append(f"| {student} | {teacher} | {c['only_a']} | {c['only_b']} | "
                     f"{c['difference']:+.3f} (N={c['n']}) | {c['p_value']:.3g} |")
    return lines


def _stream_lines(streams: dict | None) -> list[str]:
    """A table of each student system's long streams (first clip, second and last window, the
    first wall, the switch); empty when none were run."""
    if not streams or not streams.get("systems"):
        return []
    fps = streams["fps"]
    first = next(iter(streams["systems"].values()))["windows"]

    def span(window: dict) -> str:
        return f"{window['start'] / fps:.1f}-{window['end'] / fps:.1f} s"

    switch = streams.get("switch_frame")
    # The switch column: the chunk (4 frames) that ends 2 s after the switch.
    shown = max(0, round(2.0 * fps / 4) - 1)
    header = ["System", f"joint, first clip ({span(first[0])})",
              f"joint, {span(first[1])}", f"last window ({span(first[-1])}): colour / shape / "
              f"motion / joint", "moving in the last window", "came back from the first wall"]
    if switch is not None:
        header.append(f"new colour and shape {4 * shown / fps:g}-{4 * (shown + 1) / fps:g} s "
                      f"after the switch")
    lines = ["", "## Long streams", "",
             f"{streams['num_streams']} streams per student system of {streams['seconds']:g} s "
             f"({streams['num_frames']} frames) as `wan-distill stream` makes them, prompt i of "
             f"the evaluation's list from noise seed {streams['noise_seed']} + i"
             + (f", switching at frame {switch} to another colour, shape and motion"
                if switch is not None else "")
             + ". The oracle judges 2-s windows against the prompt in effect; after the first, "
               "motion along the caption's axis either way counts (the world reflects its "
               "objects at the walls). Every window is in report.json.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in streams["systems"].items():
        windows, walls, last = result["windows"], result["walls"], result["windows"][-1]
        cells = [name, f"{windows[0]['joint']:.1%}", f"{windows[1]['joint']:.1%}",
                 " / ".join(f"{last[k]:.1%}" for k in ("colour", "shape", "motion", "joint")),
                 f"{last['moving']:.1%}",
                 f"{walls['came_back']} of {walls['reached_wall']}"]
        if switch is not None:
            cells.append(f"{result['after_switch'][shown]['both']:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _by_value_lines(report: dict) -> list[str]:
    """A table of the oracle's accuracy per shape and motion value (and the weakest colour), with
    each system's most common confusions; empty when no system has the breakdown."""
    rows = [(s["name"], s["oracle"]) for s in report["systems"]
            if is_ok(s.get("oracle")) and "by_value" in s["oracle"]]
    if not rows:
        return []
    shapes = list(rows[0][1]["by_value"]["shape"])
    motions = list(rows[0][1]["by_value"]["motion"])
    header = ["System", *shapes, *motions, "weakest colour", "most common errors (asked -> seen)"]
    lines = ["", "## Oracle accuracy by factor value", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, oracle in rows:
        by_value = oracle["by_value"]
        colour, worst = min(by_value["colour"].items(), key=lambda kv: kv[1])
        errors = sorted(((count, f"{asked} -> {seen}") for table in oracle["confusion"].values()
                         for asked, row in table.items() for seen, count in row.items()
                         if seen != asked), reverse=True)[:3]
        cells = [f"{by_value['shape'].get(v, float('nan')):.0%}" for v in shapes]
        cells += [f"{by_value['motion'].get(v, float('nan')):.0%}" for v in motions]
        weakest = "all 100%" if worst == 1.0 else f"{colour} {worst:.0%}"
        lines.append("| " + " | ".join([name, *cells, weakest,
                                        ", ".join(f"{e} ({c})" for c, e in errors) or "-"]) + " |")
    return lines


def _unavailable_reasons(report: dict) -> list[tuple[str, str]]:
    """Distinct (metric, reason) pairs of unavailable slots, in table order."""
    seen: list[tuple[str, str]] = []
    for s in report["systems"]:
        slots = [(k, s.get(k)) for k in ("oracle", "fvd", "clip_score")]
        paired = s.get("paired") or {}
        slots += [(f"paired {k}", paired.get(k)) for k in ("psnr_db", "ssim", "lpips")]
        for name, slot in slots:
            if isinstance(slot, dict) and slot.get("status") == UNAVAILABLE:
                item = (name, slot["reason"])
                if item not in seen:
                    seen.append(item)
    return seen


def plot_png(report: dict) -> bytes:
    """The quality-vs-latency plot as PNG bytes: latency (log x) against the report's quality
    axis, systems labelled, the Pareto front drawn as a line. Random-test numbers never appear."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = Figure(figsize=(7.0, 4.8), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    axis = report.get("quality_axis")
    systems = [s for s in report["systems"] if _finite((s.get("latency_s") or {}).get("median"))]
    values = {}
    if axis:
        values = {s["name"]: float(s[axis["key"]][_axis_field(axis["key"])])
                  for s in systems if is_ok(s.get(axis["key"]))
                  and (axis["key"] == "oracle" or is_standard(s.get(axis["key"])))}
    colours = {"teacher": "tab:blue", "student": "tab:orange"}
    shown = []
    # Label offsets staggered in latency order, so neighbours on the plot get different heights.
    for k, s in enumerate(sorted(systems, key=lambda s: s["latency_s"]["median"])):
        y = values.get(s["name"], 0.0 if not axis else None)
        if y is None:
            continue
        x = s["latency_s"]["median"]
        shown.append(x)
        ax.scatter([x], [y], color=colours.get(s.get("kind"), "tab:gray"), zorder=3,
                   edgecolors="black" if s.get("pareto") else "none", s=50)
        # Staggered offsets keep the names of systems with equal numbers readable.
        ax.annotate(s["name"], (x, y), textcoords="offset points", xytext=(6, 4 + 10 * (k % 4)),
                    fontsize=8)
    for kind, colour in colours.items():
        ax.scatter([], [], color=colour, label=kind)
    front = sorted(((s["latency_s"]["median"], values[s["name"]]) for s in systems
                    if s.get("pareto") and s["name"] in values))
    if len(front) > 1:
        xs, ys = zip(*front)
        ax.plot(xs, ys, color="black", linewidth=1, linestyle="--", label="Pareto front",
                drawstyle="steps-post" if axis["maximize"] else "default", zorder=2)
    ax.legend(loc="best", fontsize=8)
    ax.set_xscale("log")
    if shown:
        # At least a factor 4 of range around the points, so a log axis has labelled ticks.
        low, high = min(shown), max(shown)
        pad = max(2.0, math.sqrt(4.0 * low / high))
        ax.set_xlim(low / pad, high * pad)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency per video, s (median, batch 1, log scale)")
    ax.set_ylabel(axis["label"] if axis else "no quality metric available")
    if axis and axis["key"] == "oracle":
        ax.set_ylim(-0.02, 1.02)
    if axis and not axis["maximize"]:
        ax.invert_yaxis()  # lower FVD is better: keep "better" upwards
    ax.set_title(f"{report['world']}: quality vs latency", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


_SHORT_LABELS = {"oracle": "joint", "clip_score": "CLIP", "fvd": "FVD"}


def _axis_field(key: str) -> str:
    return {"oracle": "joint", "clip_score": "mean", "fvd": "value"}[key]


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and quality_vs_latency.png into ``out_dir``, each file
    atomically (a crash never leaves a half-written file). Returns the three paths."""
    out = Path(out_dir)
    paths = {"json": out / JSON_NAME, "markdown": out / MARKDOWN_NAME, "plot": out / PLOT_NAME}
    write_text_atomic(report_json(report), paths["json"])
    write_text_atomic(format_markdown(report), paths["markdown"])
    write_bytes_atomic(plot_png(report), paths["plot"])
    return paths


def summary_line(report: dict, paths: dict[str, Path] | None = None) -> str:
    """One line for the console: scope, wall time, the Pareto front, anything missing."""
    n = report["settings"].get("num_prompts")
    systems = report["systems"]
    total = (report.get("seconds") or {}).get("total")
    parts = [f"eval ({report['world']}, N={n}, {len(systems)} systems"
             + (f", {total:.0f} s" if total is not None else "") + ")"]
    axis = report.get("quality_axis")
    front = [s for s in systems if s.get("pareto")]
    if axis and front:
        field = _axis_field(axis["key"])
        parts.append("Pareto front: " + ", ".join(
            f"{s['name']} ({_SHORT_LABELS[axis['key']]} {s[axis['key']][field]:.3f}, "
            f"{s['latency_s']['median']:.3f} s)" for s in front))
    if report.get("skipped"):
        parts.append("skipped: " + ", ".join(s["name"] for s in report["skipped"]))
    if paths:
        parts.append(f"report: {paths['markdown']}")
    return "; ".join(parts)
