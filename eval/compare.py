"""Pair the oracle verdicts of two evaluation reports prompt by prompt.

``wan-distill eval`` compares each student with each teacher system of the same run. Two runs,
say the student of last week and today's, are only comparable prompt by prompt when they
rendered the same prompts from the same noise seeds: then the exact McNemar test
(``eval.oracle_stats.paired_comparison``) says whether the gap between two accuracies is more
than noise. Each system's ``oracle.joint_by_prompt`` (one character per prompt) carries the
verdicts.

    wan-distill compare old/report.json new/report.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from eval.oracle_stats import JOINT_BY_PROMPT, pair_verdicts, parse_verdict_string

# The settings that make prompt i and its noise the same in two reports.
SAME_PROMPTS = ("num_prompts", "prompt_source", "prompt_seed", "noise_seed")


def read_report(path: str | os.PathLike) -> dict:
    """A report.json, given as the file or the folder that holds it."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a report; pass a `wan-distill eval` report.json "
                                f"or its --out folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); pass the report.json that "
                         f"`wan-distill eval` wrote") from None


def _verdicts(report: dict, label: str) -> dict[str, dict[int, bool]]:
    found = {}
    for index, system in enumerate(report.get("systems", [])):
        text = (system.get("oracle") or {}).get(JOINT_BY_PROMPT)
        if isinstance(text, str):
            if not isinstance(system.get("name"), str):
                raise ValueError(f"report {label}: system {index} has verdicts but no name; pass "
                                 f"the report.json that `wan-distill eval` wrote, unedited")
            found[system["name"]] = parse_verdict_string(text)
    if not found:
        raise ValueError(f"report {label} holds no per-prompt oracle verdicts (a shapes-world "
                         f"report written before they were kept, or a real-prompt one); "
                         f"evaluate again with `wan-distill eval`")
    return found


def compare_reports(a: dict, b: dict, labels: tuple[str, str] = ("A", "B")) -> list[dict]:
    """Every system of ``a`` against every system of ``b``, on the prompts both judged.

    Returns rows {"a", "b", "n", "only_a", "only_b", "difference", "p_value"} (``a`` and ``b``
    are system names). Raises ValueError when the reports did not render the same prompts.
    """
    if a.get("world") != "shapes" or b.get("world") != "shapes":
        raise ValueError(f"only shapes-world reports carry oracle verdicts; got worlds "
                         f"{a.get('world')!r} and {b.get('world')!r}")
    settings_a, settings_b = a.get("settings", {}), b.get("settings", {})
    differ = {key: (settings_a.get(key), settings_b.get(key)) for key in SAME_PROMPTS
              if settings_a.get(key) != settings_b.get(key)}
    if differ:
        detail = ", ".join(f"{k} {va!r} vs {vb!r}" for k, (va, vb) in differ.items())
        raise ValueError(f"reports {labels[0]} and {labels[1]} rendered different prompts or "
                         f"noise ({detail}); evaluate both with the same num_prompts, "
                         f"prompt_seed and noise_seed")
    verdicts_a, verdicts_b = _verdicts(a, labels[0]), _verdicts(b, labels[1])
    pairs = [(name_a, name_b, pair_verdicts(va, vb))
             for name_a, va in verdicts_a.items() for name_b, vb in verdicts_b.items()]
    return [{"a": a_name, "b": b_name, **c} for a_name, b_name, c in pairs if c is not None]


def format_rows(rows: list[dict], labels: tuple[str, str]) -> str:
    """A markdown table of ``compare_reports`` rows."""
    lines = [f"| {labels[0]} | {labels[1]} | N | only {labels[0]} right | only {labels[1]} right "
             f"| difference | exact McNemar p |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['a']} | {r['b']} | {r['n']} | {r['only_a']} | {r['only_b']} | "
              f"{100 * r['difference']:+.1f} pts | {r['p_value']:.3g} |" for r in rows]
    return "\n".join(lines)
