"""Pairing two evaluation reports prompt by prompt (eval.compare, `wan-distill compare`)."""

from __future__ import annotations

import json

import pytest

from distill.cli import main
from eval.compare import compare_reports, read_report
from eval.oracle_stats import JOINT_BY_PROMPT, parse_verdict_string, verdict_string


def _report(systems: dict[str, str], **settings) -> dict:
    base = {"num_prompts": 10, "prompt_source": "shapes", "prompt_seed": 0, "noise_seed": 0}
    return {"world": "shapes", "settings": {**base, **settings},
            "systems": [{"name": name, "oracle": {"status": "ok", JOINT_BY_PROMPT: text}}
                        for name, text in systems.items()]}


def test_verdict_string_round_trip_and_errors():
    verdicts = {0: True, 1: False, 3: True}
    assert verdict_string(verdicts, 5) == "10-1-"
    assert parse_verdict_string("10-1-") == verdicts
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        verdict_string({3: True}, 3)
    with pytest.raises(ValueError, match="only 0, 1 and -"):
        parse_verdict_string("10x")


def test_every_system_of_one_report_against_every_system_of_the_other():
    a = _report({"student-4step": "1111111111"})
    b = _report({"teacher-euler-4": "0000000011", "student-4step": "1111111-10"})
    rows = {(r["a"], r["b"]): r for r in compare_reports(a, b)}
    assert set(rows) == {("student-4step", "teacher-euler-4"), ("student-4step", "student-4step")}
    versus_teacher = rows["student-4step", "teacher-euler-4"]
    # 8 prompts only A gets right, none only B: a fair coin gives 8 heads in 8 with
    # probability 1/256, both tails together 2/256.
    assert (versus_teacher["n"], versus_teacher["only_a"], versus_teacher["only_b"]) == (10, 8, 0)
    assert versus_teacher["p_value"] == pytest.approx(2 / 256)
    assert versus_teacher["difference"] == pytest.approx(0.8)
    # The prompt B did not judge (index 7) is left out of the pairing.
    versus_self = rows["student-4step", "student-4step"]
    assert (versus_self["n"], versus_self["only_a"], versus_self["only_b"]) == (9, 1, 0)


def test_reports_of_other_prompts_or_without_verdicts_are_refused():
    a = _report({"s": "1" * 10})
    with pytest.raises(ValueError, match="prompt_seed 0 vs 2"):
        compare_reports(a, _report({"s": "1" * 10}, prompt_seed=2))
    with pytest.raises(ValueError, match="noise_seed 0 vs 5"):
        compare_reports(a, _report({"s": "1" * 10}, noise_seed=5))
    old = _report({"s": "1" * 10})
    del old["systems"][0]["oracle"][JOINT_BY_PROMPT]
    with pytest.raises(ValueError, match="report B holds no per-prompt oracle verdicts"):
        compare_reports(a, old)
    with pytest.raises(ValueError, match="only shapes-world reports"):
        compare_reports(a, {**a, "world": "prompts"})
    nameless = _report({"s": "1" * 10})
    del nameless["systems"][0]["name"]
    with pytest.raises(ValueError, match="report B: system 0 has verdicts but no name"):
        compare_reports(a, nameless)


def test_compare_command(tmp_path, capsys):
    for name, text in (("old", "1111111100"), ("new", "1111111111")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(_report({"student-4step": text})))
    assert read_report(tmp_path / "old")["settings"]["num_prompts"] == 10
    assert main(["compare", str(tmp_path / "old"), str(tmp_path / "new" / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "| student-4step | student-4step | 10 | 0 | 2 | -20.0 pts | 0.5 |" in out
    assert main(["compare", str(tmp_path / "old"), str(tmp_path / "missing")]) == 2
    assert "missing is not a report" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["compare", str(tmp_path / "old"), str(tmp_path / "broken.json")]) == 2
    assert "broken.json is not valid JSON" in capsys.readouterr().err
