"""The quality-vs-latency evaluation: Pareto front, timing helpers, systems, metric states, and a
small end-to-end run with a tiny random teacher and student.

Numbers from random networks are plumbing, not quality: the end-to-end test asserts structure
(every field, reasons for unavailable metrics, a decodable PNG) and that numbers computed with
the random-test FVD network never appear in the Markdown table under the name FVD.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest

from eval.compare import compare_reports
from eval.config import EvalConfig, LatencySettings, SystemSpec
from eval.distributed_eval import system_name
from eval.metric_states import (NOT_RECOVERED, MetricNetworks, OracleCounts, VideoFeatures,
                                add_oracle_comparisons)
from eval.oracle_stats import JOINT_BY_PROMPT
from eval import distributed_eval
from eval.latency import cpu_threads, rotation, side_by_side, summarize
from eval.oracle import accuracy, judge
from eval.report import (
    RANDOM_TEST_NETWORK,
    available,
    build_report,
    format_markdown,
    not_applicable,
    pareto_front,
    unavailable,
)
from eval.run import add_eval_arguments, check_config, evaluate_main, load_config, overrides_from_args
from eval.shapes_world import eval_prompts, parse_caption, render, sample_spec
from eval.systems import StudentSystem, TeacherSystem, seeded_noise
from student.checkpoint import save_student, student_from_expert_state_dict
from student.config import SHAPES_STUDENT, StudentConfig
from teacher.checkpoint import save_teacher
from teacher.pipeline import initial_noise
from student.tiny_decoder_checkpoint import save_tiny_decoder
from tests.tiny_teacher import TINY, tiny_decoder_for, tiny_models

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 9 frames: the I3D-protocol minimum, so the FVD plumbing runs on the tiny clips.
TINY_9 = replace(TINY, sampling=replace(TINY.sampling, frames=9))
SYSTEM_FIELDS = {"name", "kind", "steps", "nfe", "streaming", "latency_s",
                 "time_to_first_frame_s", "quality_pass", "oracle", "fvd", "paired",
                 "clip_score", "pareto"}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine spinning OpenMP
    # workers of several processes slow each other down by an order of magnitude.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tiny_student_config() -> StudentConfig:
    return StudentConfig(name="tiny", teacher="tiny", dit=TINY_9.dit, chunk_frames=1,
                         sink_chunks=1, window_chunks=2, steps=4, shift=3.0,
                         guidance_default=3.0, guidance_max=5.0)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("eval")
    models = tiny_models(TINY_9)
    save_teacher(root / "teacher", models)
    # The default systems include the student with the tiny decoder.
    save_tiny_decoder(root / "teacher" / "tiny_decoder", tiny_decoder_for(models.vae))
    config = _tiny_student_config()
    student = student_from_expert_state_dict(config, models.expert_low.state_dict(),
                                             trainable=False)
    with torch.no_grad():  # a non-zero guidance embedding, so guidance reaches the output
        for p in student.guidance_embedding.parameters():
            p.normal_(0.0, 0.1)
    save_student(root / "student", student, config)
    return {"root": root, "teacher": root / "teacher", "student": root / "student"}


class RandomFeatures(torch.nn.Module):
    """A random video embedding [B, 3, T, 224, 224] -> [B, 6] standing in for the I3D."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.proj = torch.nn.Linear(3 * 4 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.nn.functional.adaptive_avg_pool3d(x, (1, 4, 4)).flatten(1))


def _tiny_config(folders: dict, out: Path, **changes) -> EvalConfig:
    overrides = [f"teacher_dir={folders['teacher']}", f"student_dir={folders['student']}",
                 "num_prompts=4", "batch_size=4", "latency.warmup=0", "latency.repeats=2",
                 f"out={out}", "fvd.num_frames=9", "fvd.bootstrap=20", "trainer.accelerator=cpu",
                 "progress=false"]
    return replace(load_config(None, overrides), **changes)


# ---------------------------------------------------------------------------------------------
# Pareto front


def test_pareto_front_hand_made_points():
    # (latency, accuracy): index 2 is dominated by index 1 (slower and worse); 1 and 4 are equal
    # points, neither dominates the other; index 3 is fastest though worst.
    points = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (0.5, 0.2), (2.0, 0.7)]
    assert pareto_front(points) == [3, 0, 1, 4]
    # Same latency: the better one wins; same quality: the faster one wins.
    assert pareto_front([(1.0, 0.5), (1.0, 0.6)]) == [1]
    assert pareto_front([(1.0, 0.5), (2.0, 0.5)]) == [0]
    assert pareto_front([(4.0, 0.9)]) == [0]
    assert pareto_front([]) == []


def test_pareto_front_minimising_quality():
    # FVD-like: lower is better. (3, 7) is dominated by (2, 5).
    assert pareto_front([(1.0, 10.0), (2.0, 5.0), (3.0, 7.0)], maximize_y=False) == [0, 1]


@pytest.mark.parametrize("bad", [[(1.0, float("nan"))], [(float("inf"), 0.1)], [(1.0,)]])
def test_pareto_front_rejects_bad_points(bad):
    with pytest.raises(ValueError, match="finite"):
        pareto_front(bad)


def test_build_report_marks_the_front_and_skips_systems_without_numbers():
    def system(name, latency, joint):
        return {"name": name, "kind": "teacher",
                "latency_s": None if latency is None else summarize([latency]).to_dict(),
                "oracle": available(joint=joint, n=10) if joint is not None
                else unavailable("no oracle")}

    systems = [system("a", 1.0, 0.5), system("b", 2.0, 0.4), system("c", 0.5, 0.3),
               system("d", None, 0.9), system("e", 3.0, None)]
    report = build_report(world="shapes", systems=systems, settings={}, machine={}, weights={})
    pareto = {s["name"]: s["pareto"] for s in report["systems"]}
    assert pareto == {"a": True, "b": False, "c": True, "d": None, "e": None}
    assert report["quality_axis"]["key"] == "oracle"
    with pytest.raises(ValueError, match="distinct"):
        build_report(world="shapes", systems=[systems[0], systems[0]], settings={}, machine={},
                     weights={})


def test_unavailable_needs_a_reason():
    with pytest.raises(ValueError, match="reason"):
        unavailable("  ")


# ---------------------------------------------------------------------------------------------
# Timing helpers


def test_summarize_matches_numpy_quantiles():
    samples = [0.31, 0.12, 0.5, 0.2, 0.9, 0.25]
    s = summarize(samples)
    q25, q50, q75 = np.quantile(samples, [0.25, 0.5, 0.75])
    assert (s.n, s.min, s.max) == (6, 0.12, 0.9)
    assert s.median == pytest.approx(q50, abs=1e-15)
    assert (s.q25, s.q75) == pytest.approx((q25, q75), abs=1e-15)
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([0.1, -1.0])


def test_side_by_side_rotates_and_discards_warmup():
    calls = []

    def run(name):
        return lambda r: calls.append((name, r)) or (name, r)

    results = side_by_side({"a": run("a"), "b": run("b"), "c": run("c")}, warmup=1, repeats=2)
    assert [c[0] for c in calls] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert results == {"a": [("a", 1), ("a", 2)], "b": [("b", 1), ("b", 2)],
                       "c": [("c", 1), ("c", 2)]}
    assert rotation(["x", "y"], 3) == ["y", "x"]
    with pytest.raises(ValueError):
        side_by_side({"a": run("a")}, warmup=0, repeats=0)


# ---------------------------------------------------------------------------------------------
# Systems


def test_cpu_threads_sets_and_restores_the_setting():
    assert torch.get_num_threads() == 1
    with cpu_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1
    with pytest.raises(RuntimeError, match="boom"), cpu_threads(2):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 1  # restored when the block raises
    with cpu_threads(None):
        assert torch.get_num_threads() == 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"threads={bad!r} must be an integer >= 1"):
            with cpu_threads(bad):
                pass
    with pytest.raises(ValueError, match="latency.threads=0 must be >= 1"):
        check_config(replace(EvalConfig(), latency=LatencySettings(threads=0)))


def test_student_and_teacher_start_from_the_same_noise():
    shape, seeds = (16, 3, 4, 4), [5, 11]
    noise, generators = seeded_noise(shape, seeds)
    assert torch.equal(noise, initial_noise(shape, seeds))
    # The generators continue past the initial noise (re-noising draws are fresh numbers).
    again = torch.randn(shape, generator=generators[0])
    assert not torch.equal(again, noise[0])


def test_systems_are_batch_invariant_and_report_costs(tiny_folders):
    from student.checkpoint import load_student
    from teacher.checkpoint import load_teacher

    models = load_teacher(tiny_folders["teacher"])
    student, config = load_student(tiny_folders["student"])
    prompts, seeds = ["a red circle moving left", "一个蓝色的正方形向上移动"], [3, 8]
    teacher = TeacherSystem(models, steps=2, solver="euler")
    streaming = StudentSystem(student, config, models, steps=2)
    assert teacher.info()["nfe"] == 4 and streaming.info()["nfe"] == 2 * 3
    for system in (teacher, streaming):
        both = system.generate(prompts, seeds)
        alone = system.generate(prompts[1:], seeds[1:])
        assert both.videos.shape == (2, 9, 32, 32, 3) and both.videos.dtype == torch.uint8
        # The same prompt and seed give the same video at any batch size (up to one level of
        # rounding where batched and single GEMMs round differently).
        assert (both.videos[1].int() - alone.videos[0].int()).abs().max() <= 1
        assert 0 < both.first_frame_seconds <= both.seconds
    out = streaming.generate(prompts[:1], seeds[:1])
    assert out.forwards == {"denoise": 6, "kv_append": 2}
    tuned = StudentSystem(student, replace(config, sampling_grids=((1.0, 0.5),)), models, steps=2)
    assert tuned.info()["sigmas"] == [1.0, 0.5, 0.0]
    assert streaming.info()["sigmas"] == [1.0, 0.75, 0.0]  # no grid: shift 3 at 2 steps
    assert out.first_frame_seconds < out.seconds  # the first chunk is out before the rest
    with pytest.raises(ValueError, match="one seed per prompt"):
        teacher.generate(prompts, seeds[:1])


def test_student_system_decodes_in_slices_with_a_cache_each(tiny_folders, monkeypatch):
    """More prompts than DECODE_BATCH: every chunk is decoded in slices of at most DECODE_BATCH
    clips, each slice with its own streaming cache, and each clip comes out as it does alone."""
    from student.checkpoint import load_student
    from teacher.checkpoint import load_teacher
    from teacher.pipeline import DECODE_BATCH

    models = load_teacher(tiny_folders["teacher"])
    student, config = load_student(tiny_folders["student"])
    system = StudentSystem(student, config, models, steps=1)
    prompts = eval_prompts(DECODE_BATCH + 2, seed=5)
    seeds = list(range(len(prompts)))
    calls = []
    decode_chunk = models.vae.decode_chunk

    def spy(latents, cache, **kwargs):
        calls.append((latents.shape[0], id(cache)))
        return decode_chunk(latents, cache, **kwargs)

    monkeypatch.setattr(models.vae, "decode_chunk", spy)
    batched = system.generate(prompts, seeds)
    assert [n for n, _ in calls] == [DECODE_BATCH, 2] * system.num_chunks
    assert len({cache for _, cache in calls}) == 2  # one cache per slice, kept across chunks
    last = system.generate(prompts[-1:], seeds[-1:])
    assert batched.videos.shape == (len(prompts), *last.videos.shape[1:])
    assert (batched.videos[-1].int() - last.videos[0].int()).abs().max() <= 1


# ---------------------------------------------------------------------------------------------
# Metric states


def test_oracle_counts_equal_eval_oracle_accuracy():
    prompts = eval_prompts(6, seed=3)
    videos = [render(sample_spec(100 + i, parse_caption(p))) for i, p in enumerate(prompts)]
    videos[1] = videos[0]  # a wrong video for prompt 1
    videos[4] = np.zeros_like(videos[4])  # no object at all
    metric = OracleCounts()
    metric.update(torch.from_numpy(np.stack(videos[3:])), prompts[3:], [13, 14, 15])
    metric.update(torch.from_numpy(np.stack(videos[:3])), prompts[:3], [10, 11, 12])
    got, expected = metric.compute(), accuracy(videos, prompts)
    for key in ("n", "colour", "shape", "motion", "joint", "not_found", "no_motion", "correct"):
        assert got[key] == expected[key], key
    # Each prompt's joint verdict under its index (what pairs two systems), and the joint's
    # Wilson interval, from scipy.
    assert got[JOINT_BY_PROMPT] == {10 + i: judge(v).matches(parse_caption(p))["joint"]
                                    for i, (v, p) in enumerate(zip(videos, prompts))}
    wilson = binomtest(expected["correct"]["joint"], 6).proportion_ci(method="wilson")
    assert got["joint_ci95"] == pytest.approx([wilson.low, wilson.high], abs=1e-12)
    assert got["not_found"] == 1 and got["joint"] < 1.0
    by_lang = got["by_language"]
    assert by_lang["en"]["n"] + by_lang["zh"]["n"] == 6
    # The confusion tables against a tally of the oracle's verdicts, video by video.
    for factor in ("colour", "shape", "motion"):
        tally = {}
        for video, prompt in zip(videos, prompts):
            asked = getattr(parse_caption(prompt), factor)
            seen = getattr(judge(video), factor) or NOT_RECOVERED
            tally.setdefault(asked, {}).setdefault(seen, 0)
            tally[asked][seen] += 1
        assert got["confusion"][factor] == tally, factor
        assert got["by_value"][factor] == {asked: row.get(asked, 0) / sum(row.values())
                                           for asked, row in tally.items()}, factor
    assert got["confusion"]["shape"][parse_caption(prompts[4]).shape].get(NOT_RECOVERED, 0) >= 1


def test_oracle_counts_reject_a_batch_with_a_foreign_caption_and_count_none_of_it():
    metric = OracleCounts()
    videos = torch.zeros(2, 17, 64, 64, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="hexagon"):
        metric.update(videos, ["a red circle moving left", "a purple hexagon moving sideways"])
    assert metric.counts.sum() == 0 and metric.confusion_shape.sum() == 0


def test_each_student_is_compared_with_each_teacher_on_their_shared_prompts():
    def slot():
        return available(n=4, joint=0.5, colour=1.0, shape=0.5, motion=0.75)

    results = [{"name": "teacher-unipc", "kind": "teacher", "oracle": slot()},
               {"name": "teacher-euler-4", "kind": "teacher", "oracle": slot()},
               {"name": "student-4step", "kind": "student", "oracle": slot()},
               {"name": "student-2step", "kind": "student", "oracle": not_applicable("test")}]
    verdicts = {"teacher-unipc": {0: True, 1: True, 2: False, 3: False},
                "teacher-euler-4": {0: True, 1: True, 2: True, 3: True, 4: False},
                "student-4step": {0: True, 1: False, 2: True, 3: True, 4: True},
                "student-2step": {0: False}}
    add_oracle_comparisons(results, verdicts)
    versus = results[2]["oracle"]["versus"]
    assert list(versus) == ["teacher-unipc", "teacher-euler-4"]
    # Against the UniPC teacher only prompts 0-3 are shared: the student alone gets 2 and 3,
    # the teacher alone gets 1.
    assert {k: versus["teacher-unipc"][k] for k in ("n", "only_a", "only_b")} == {
        "n": 4, "only_a": 2, "only_b": 1}
    assert versus["teacher-unipc"]["difference"] == pytest.approx(0.25)
    assert {k: versus["teacher-euler-4"][k] for k in ("n", "only_a", "only_b")} == {
        "n": 5, "only_a": 1, "only_b": 1}
    assert versus["teacher-euler-4"]["p_value"] == 1.0
    assert "versus" not in results[0]["oracle"] and "versus" not in results[1]["oracle"]
    assert "versus" not in results[3]["oracle"]  # no oracle slot to extend

    report = build_report(world="shapes", systems=results, settings={}, machine={}, weights={})
    markdown = format_markdown(report)
    assert "## Student against teacher, prompt by prompt" in markdown
    assert "| student-4step | teacher-unipc | 2 | 1 | +0.250 (N=4) | 1 |" in markdown


def test_markdown_lists_accuracy_by_factor_value_and_the_common_errors():
    by_value = {"colour": {"red": 1.0, "blue": 0.5}, "shape": {"circle": 1.0, "square": 0.0},
                "motion": {"left": 0.75, "up": 1.0}}
    confusion = {"colour": {"red": {"red": 2}, "blue": {"blue": 1, "cyan": 1}},
                 "shape": {"circle": {"circle": 2}, "square": {"circle": 2}},
                 "motion": {"left": {"left": 3, "none": 1}, "up": {"up": 1}}}
    oracle = available(n=4, joint=0.25, colour=0.75, shape=0.5, motion=0.75, correct={},
                       not_found=0, no_motion=1, by_value=by_value, confusion=confusion)
    perfect = available(n=1, joint=1.0, colour=1.0, shape=1.0, motion=1.0, correct={},
                        not_found=0, no_motion=0,
                        by_value={"colour": {"red": 1.0}, "shape": {"circle": 1.0, "square": 1.0},
                                  "motion": {"left": 1.0, "up": 1.0}},
                        confusion={"colour": {"red": {"red": 1}}})
    report = build_report(world="shapes", systems=[{"name": "sys-a", "oracle": oracle},
                                                   {"name": "sys-p", "oracle": perfect}],
                          settings={}, machine={}, weights={})
    table = format_markdown(report).split("## Oracle accuracy by factor value")[1]
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| sys")}
    assert rows["sys-a"] == ("| sys-a | 100% | 0% | 75% | 100% | blue 50% | "
                             "square -> circle (2), left -> none (1), blue -> cyan (1) |")
    assert rows["sys-p"] == "| sys-p | 100% | 100% | 100% | 100% | all 100% | - |"
    without = build_report(world="shapes", systems=[{"name": "sys-b", "oracle": unavailable("x")}],
                           settings={}, machine={}, weights={})
    assert "by factor value" not in format_markdown(without)


def test_video_features_gather_in_order():
    metric = VideoFeatures()
    a, b = torch.randn(3, 5), torch.randn(2, 5)
    metric.update(a)
    metric.update(b)
    assert torch.equal(metric.compute(), torch.cat([a, b]))
    with pytest.raises(ValueError, match="D=4"):
        metric.update(torch.randn(1, 4))


# ---------------------------------------------------------------------------------------------
# Configuration and CLI


def test_shapes_yaml_is_the_default_and_a14b_yaml_is_valid():
    assert load_config(REPO / "configs" / "eval" / "shapes.yaml") == EvalConfig()
    a14b = load_config(REPO / "configs" / "eval" / "a14b.yaml")
    check_config(a14b)
    assert a14b.world == "prompts" and a14b.trainer.devices == 8
    with pytest.raises(ValueError, match="no_such_key"):
        load_config(None, ["no_such_key=1"])
    with pytest.raises(ValueError, match="world"):
        check_config(replace(EvalConfig(), world="mars"))


def test_guidance_sweep_yaml_names_each_student_and_teachers_refuse_guidance():
    sweep = load_config(REPO / "configs" / "eval" / "shapes-guidance.yaml")
    check_config(sweep)
    assert [s.guidance for s in sweep.systems][:5] == [1.0, 1.5, 2.0, 2.5, 3.0]
    # Every scale must be one the shapes student accepts (its engine rejects the others).
    assert all(1.0 <= s.guidance <= SHAPES_STUDENT.guidance_max for s in sweep.systems)
    names = [system_name(s, None, None) for s in sweep.systems]
    assert names[:3] == ["student-4step-g1", "student-4step-g1p5", "student-4step-g2"]
    assert len(set(names)) == len(names)
    assert system_name(SystemSpec("student", steps=2), None, None) == "student-2step"
    with pytest.raises(ValueError, match="guidance=2.0 is a student setting"):
        check_config(replace(EvalConfig(), systems=[SystemSpec("teacher", guidance=2.0)]))


def test_cli_flags_become_config_overrides():
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--num-prompts", "7", "--no-fvd", "--device", "cuda",
                              "--set", "fvd.bootstrap=3", "--out", "somewhere"])
    config = load_config(None, overrides_from_args(args))
    assert config.num_prompts == 7 and config.out == "somewhere"
    assert config.fvd.enabled is False and config.fvd.bootstrap == 3
    assert config.trainer.accelerator == "gpu"
    assert overrides_from_args(parser.parse_args([])) == []


# ---------------------------------------------------------------------------------------------
# End to end


def test_tiny_end_to_end_report(tiny_folders, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    nets = MetricNetworks(fvd_model=RandomFeatures(), fvd_network=RANDOM_TEST_NETWORK,
                          lpips_reason="LPIPS trunk not installed (test)",
                          clip_reason="no CLIP folder (test)")
    # The timing runs at latency.threads (2 here; this process runs at 1), the rest does not.
    threads_while_timing = []

    def timed(*args, **kwargs):
        threads_while_timing.append(torch.get_num_threads())
        return side_by_side(*args, **kwargs)

    monkeypatch.setattr(distributed_eval, "side_by_side", timed)
    config = _tiny_config(tiny_folders, out)
    config = replace(config, latency=replace(config.latency, threads=2))
    report = evaluate_main(config, networks=nets)
    assert threads_while_timing == [2] and torch.get_num_threads() == 1
    stdout = capsys.readouterr().out
    assert "eval (shapes, N=4, 8 systems" in stdout and str(out / "report.md") in stdout

    on_disk = json.loads((out / "report.json").read_text(encoding="utf-8"))
    names = [s["name"] for s in on_disk["systems"]]
    assert names == ["teacher-unipc-3", "teacher-unipc-4", "teacher-euler-4", "teacher-euler-8",
                     "student-1step", "student-2step", "student-4step", "student-4step-tiny"]
    assert on_disk["reference"] == "teacher-unipc-3" and on_disk["skipped"] == []
    for s in on_disk["systems"]:
        assert SYSTEM_FIELDS <= set(s), s["name"]
        assert s["latency_s"]["n"] == 2 and s["latency_s"]["median"] > 0
        assert s["oracle"]["status"] == "ok" and s["oracle"]["n"] == 4
        assert set(s["oracle"]["by_language"]) == {"en", "zh"}
        # Kept so that another run's report pairs with this one (eval.compare).
        verdicts = s["oracle"][JOINT_BY_PROMPT]
        assert len(verdicts) == 4 and set(verdicts) <= {"0", "1"}
        assert verdicts.count("1") == s["oracle"]["correct"]["joint"]
        low, high = s["oracle"]["joint_ci95"]
        assert 0 <= low <= s["oracle"]["joint"] <= high <= 1
        if s["kind"] == "student":
            versus = s["oracle"]["versus"]
            assert list(versus) == ["teacher-unipc-3", "teacher-unipc-4", "teacher-euler-4",
                                    "teacher-euler-8"]
            assert all(c["n"] == 4 and c["only_a"] + c["only_b"] <= 4 for c in versus.values())
        else:
            assert "versus" not in s["oracle"]
        assert s["fvd"]["status"] == "ok" and s["fvd"]["network"] == RANDOM_TEST_NETWORK
        assert s["fvd"]["n_fake"] == 4 and s["fvd"]["n_real"] == 4
        assert s["clip_score"] == {"status": "unavailable", "reason": "no CLIP folder (test)"}
        paired = s["paired"]
        if s["name"] == "teacher-unipc-3":
            assert paired["status"] == "not applicable" and paired["reason"]
        else:
            assert paired["status"] == "ok" and paired["psnr_db"]["n"] == 4
            assert paired["lpips"]["status"] == "unavailable" and paired["lpips"]["reason"]
    students = [s for s in on_disk["systems"] if s["kind"] == "student"]
    # Pairing the written report with itself gives the in-run comparisons back.
    rows = {(r["a"], r["b"]): r for r in compare_reports(on_disk, on_disk)}
    for s in students:
        for teacher, c in s["oracle"]["versus"].items():
            assert {k: rows[s["name"], teacher][k] for k in c} == c
    assert all(s["streaming"] for s in students)
    assert all(s["time_to_first_frame_s"]["median"] < s["latency_s"]["median"] for s in students)
    assert sum(bool(s["pareto"]) for s in on_disk["systems"]) >= 1
    assert report["systems"][0]["nfe"] == on_disk["systems"][0]["nfe"]

    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert markdown.count("random-test network") == 8  # the FVD cells
    # The random-feature distance is never printed as FVD: its column names the network instead,
    # and the value appears nowhere (4 decimals: the table prints at most 3, so a latency such
    # as 1.010 cannot be mistaken for it).
    lines = markdown.splitlines()
    top = lines.index(next(line for line in lines if line.startswith("| System | Steps")))
    table = [line.split(" | ") for line in lines[top:top + 10]]  # header, rule, 8 systems
    fvd_column = table[0].index("FVD [95% CI]")
    assert [row[fvd_column] for row in table[2:]] == ["random-test network"] * 8
    # Throughput: each system's generation seconds of the quality pass over its 4 videos, one
    # batch of 4 here, so the median over batches is that batch's seconds per video.
    batched_column = table[0].index("Batched ms/video (batch 4)")
    for s, row in zip(on_disk["systems"], table[2:]):
        qp = s["quality_pass"]
        assert qp["videos"] == 4 and qp["batch_size"] == 4 and qp["seconds_per_video"] > 0
        assert qp["seconds_per_video_by_batch"]["n"] == 1
        assert qp["seconds_per_video_by_batch"]["median"] == pytest.approx(qp["seconds_per_video"])
        assert row[batched_column] == f"{qp['seconds_per_video'] * 1000:.1f} (n=1)"
    for s in on_disk["systems"]:
        assert f"{s['fvd']['value']:.4f}" not in markdown.split("## Protocol")[0]
    assert "unavailable: no CLIP folder (test)" in markdown
    assert markdown.count("| student-4step | teacher-") == 4
    assert "on a CPU at 2 torch thread(s)" in markdown

    png = (out / "quality_vs_latency.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE
    with Image.open(out / "quality_vs_latency.png") as image:
        image.load()
        assert image.size[0] > 300 and image.size[1] > 200


def test_missing_student_still_evaluates_the_teacher(tiny_folders, tmp_path, capsys):
    out = tmp_path / "report"
    config = _tiny_config(tiny_folders, out, student_dir=str(tmp_path / "no-student"),
                          num_prompts=2)
    nets = MetricNetworks(fvd_reason="I3D weights not found (test)",
                          lpips_reason="no trunk (test)", clip_reason="no CLIP (test)")
    report = evaluate_main(config, networks=nets)
    stdout = capsys.readouterr().out
    assert "student not found" in stdout and "wan-distill distill" in stdout
    assert [s["kind"] for s in report["systems"]] == ["teacher"] * 4
    assert [s["name"] for s in report["skipped"]] == ["student-1step", "student-2step",
                                                      "student-4step", "student-4step-tiny"]
    assert all("wan-distill distill" in s["reason"] for s in report["skipped"])
    assert any("wan-distill distill" in note for note in report["notes"])
    for s in report["systems"]:
        assert s["fvd"] == {"status": "unavailable", "reason": "I3D weights not found (test)"}
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "student-1step not evaluated" in markdown
    assert "fvd: unavailable: I3D weights not found (test)" in markdown
    # The protocol says FVD was not computed and why, instead of describing its procedure.
    assert "- FVD: not computed: I3D weights not found (test)." in markdown
    assert "TF1 bilinear resize" not in markdown


def test_numbers_keep_their_decimals_below_1e5():
    from eval.report import _num

    assert _num(1019.34, 1) == "1019.3"   # an FVD above 1000 (printed "1e+03" before)
    assert _num(0.98912) == "0.989"
    assert _num(123456.0, 1) == "1.235e+05"
    assert _num(float("inf")) == "inf"


def test_tiny_decoder_systems_run_beside_the_vae_ones_and_are_skipped_without_it(
        tiny_folders, tmp_path, capsys):
    """decoder: tiny decodes with <teacher_dir>/tiny_decoder; without one (or with one of
    another VAE) those systems are skipped with the command that makes it, the rest still run."""
    import shutil

    from teacher.checkpoint import load_teacher

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_folders["teacher"], teacher)
    shutil.rmtree(teacher / "tiny_decoder")
    specs = [SystemSpec("teacher", steps=2, solver="euler"), SystemSpec("student", steps=2),
             SystemSpec("student", steps=2, decoder="tiny")]
    nets = MetricNetworks(fvd_reason="off (test)", lpips_reason="off (test)",
                          clip_reason="off (test)")
    folders = {"teacher": teacher, "student": tiny_folders["student"]}
    config = _tiny_config(folders, tmp_path / "without", systems=specs, num_prompts=2)
    report = evaluate_main(config, networks=nets)
    assert [s["name"] for s in report["systems"]] == ["teacher-euler-2", "student-2step"]
    assert [s["name"] for s in report["skipped"]] == ["student-2step-tiny"]
    assert "wan-distill train-decoder" in report["skipped"][0]["reason"]
    assert "wan-distill train-decoder" in capsys.readouterr().out

    vae = load_teacher(teacher, experts=False).vae
    save_tiny_decoder(teacher / "tiny_decoder", tiny_decoder_for(tiny_models(seed=9).vae))
    report = evaluate_main(replace(config, out=str(tmp_path / "other")), networks=nets)
    assert "retrain it" in report["skipped"][0]["reason"]

    save_tiny_decoder(teacher / "tiny_decoder", tiny_decoder_for(vae))
    report = evaluate_main(replace(config, out=str(tmp_path / "with")), networks=nets)
    systems = {s["name"]: s for s in report["systems"]}
    assert list(systems) == ["teacher-euler-2", "student-2step", "student-2step-tiny"]
    assert report["skipped"] == []
    assert systems["student-2step-tiny"]["decoder"] == "tiny"
    assert systems["student-2step"]["decoder"] == "vae"
    assert systems["student-2step-tiny"]["oracle"]["n"] == 2
    with pytest.raises(ValueError, match="decoder='taehv'"):
        check_config(replace(EvalConfig(), systems=[SystemSpec("student", decoder="taehv")]))
    assert system_name(SystemSpec("teacher", decoder="tiny"), load_teacher(teacher, experts=False),
                       None) == "teacher-unipc-3-tiny"


def test_long_streams_are_judged_as_the_stream_command_makes_them(tiny_folders, tmp_path):
    """``streams.num_streams`` streams every student system as `wan-distill stream` does (its
    engine factory, steps, guidance, decoder, seed i for prompt i): the report's window rates and
    walls are those of the same streams judged directly."""
    from eval.long_streams import stream_frames, switched_prompt, wall_counts
    from eval.stream_quality import judge_stream, wall_contact, window_rates
    from student.live import load_engine_factory

    specs = [SystemSpec("teacher", steps=2, solver="euler"), SystemSpec("student", steps=2),
             SystemSpec("student", steps=1, decoder="tiny", guidance=2.0)]
    nets = MetricNetworks(fvd_reason="off (test)", lpips_reason="off (test)",
                          clip_reason="off (test)")
    config = _tiny_config(tiny_folders, tmp_path / "report", systems=specs, num_prompts=2)
    streams = replace(config.streams, num_streams=2, seconds=6.0, switch_frame=17)
    report = evaluate_main(replace(config, streams=streams), networks=nets)
    found = report["streams"]
    assert {k: found[k] for k in ("num_streams", "num_frames", "fps", "switch_frame")} == {
        "num_streams": 2, "num_frames": 49, "fps": 8, "switch_frame": 17}
    assert list(found["systems"]) == ["student-2step", "student-1step-g2-tiny"]

    prompts = eval_prompts(2, seed=0)
    for name, steps, decoder, guidance in (("student-2step", 2, "vae", None),
                                           ("student-1step-g2-tiny", 1, "tiny", 2.0)):
        engine = load_engine_factory(tiny_folders["student"], tiny_folders["teacher"],
                                     steps=steps, decoder=decoder)()
        verdicts, backs = [], []
        for i, prompt in enumerate(prompts):
            new = switched_prompt(prompt)
            frames = stream_frames(engine, prompt, i, 49, (17, lambda e, new=new: e.set_prompt(new)),
                                   guidance)
            verdicts.append(judge_stream(frames, [(0, prompt), (17, new)]))
            backs.append(wall_contact(frames, parse_caption(prompt).motion))
        result = found["systems"][name]
        assert result["windows"] == window_rates(verdicts)
        assert [(w["start"], w["end"]) for w in result["windows"]] == [(0, 17), (17, 33), (33, 49)]
        assert result["walls"] == wall_counts(backs)
        assert len(result["after_switch"]) == 8
    markdown = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Long streams" in markdown and "switching at frame 17" in markdown
    section = markdown.split("## Long streams")[1].split("\n## ")[0]
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| student")]
    assert rows == ["| student-2step", "| student-1step-g2-tiny"]


@pytest.mark.parametrize("streams,message", [
    ({"num_streams": -1}, "streams.num_streams=-1 must be >= 0"),
    ({"num_streams": 2, "seconds": 2.0}, "hold only the first clip; stream at least 33 frames"),
    ({"num_streams": 2, "switch_frame": 30}, "switch frame 30 must be a window start"),
    ({"num_streams": 2, "seconds": 6.0, "switch_frame": 33}, "with 32 frames after it"),
])
def test_stream_settings_are_checked_before_loading(streams, message):
    config = replace(EvalConfig(), streams=replace(EvalConfig().streams, **streams))
    with pytest.raises(ValueError, match=message):
        check_config(config)
    with pytest.raises(ValueError, match="shapes oracle"):
        check_config(replace(EvalConfig(), world="prompts", prompts_file="p.txt",
                             streams=replace(EvalConfig().streams, num_streams=2)))
