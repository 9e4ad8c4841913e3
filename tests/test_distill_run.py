"""The distillation job (``distill.run``): recipes, the whole job on a tiny teacher, resumption."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from distill.config import DistillConfig
from student.paths import default_student_dir, wan_distill_home
from distill.run import DEFAULT_RECIPE, distill_main, load_config, resolve_student
from student.checkpoint import load_student
from student.config import STUDENT_PRESETS, StudentConfig
from student.moe import MoEStudent
from teacher.config import SHAPES
from tests.tiny_teacher import TINY, tiny_models, write_official

REPO = Path(__file__).resolve().parent.parent


def test_shapes_recipe_is_the_default_config():
    # `wan-distill distill` without arguments must run the shapes recipe even where the
    # configs folder is not installed: the YAML and the dataclass defaults must agree.
    assert DEFAULT_RECIPE == REPO / "configs" / "distill" / "shapes.yaml"
    assert load_config() == DistillConfig()


@pytest.mark.parametrize("name", ["a14b-to-causal-1.3b", "a14b-to-causal-14b"])
def test_gpu_recipes_parse(name):
    cfg = load_config(REPO / "configs" / "distill" / f"{name}.yaml",
                      ["data.source.folder=/videos", "--teacher_dir=/teacher"])
    assert cfg.trainer.strategy == "model_parallel" and cfg.parallel.compute_dtype == "bf16"
    assert cfg.parallel.activation_checkpointing and cfg.data.source.folder == "/videos"
    assert cfg.trainer.devices * cfg.trainer.num_nodes == cfg.trainer.data_parallel_size


def test_overrides_in_every_spelling():
    # key=value, --key=value and --key value (the value as its own argument) all set the key.
    cfg = load_config(None, ["stage_a.max_steps=7", "--stage_b.max_steps=9", "--seed", "3",
                             "--stage_b.optim.lr", "3e-4"])
    assert (cfg.stage_a.max_steps, cfg.stage_b.max_steps, cfg.seed) == (7, 9, 3)
    assert cfg.stage_b.optim.lr == 3e-4


def test_recipe_errors():
    with pytest.raises(SystemExit):  # jsonargparse names the unknown key and exits
        load_config(None, ["stage_b.max_stepz=3"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config("/nonexistent.yaml")
    with pytest.raises(ValueError, match="data.source.folder"):
        load_config(REPO / "configs" / "distill" / "a14b-to-causal-1.3b.yaml")
    with pytest.raises(ValueError, match="ode_init.num_trajectories=8 must be >= ode_init.batch_size=16"):
        load_config(None, ["ode_init.num_trajectories=8"])
    with pytest.raises(ValueError, match=r"ode_init.max_steps_low=0 must be >= 1"):
        load_config(None, ["ode_init.max_steps_low=0"])
    with pytest.raises(ValueError, match=r"stage_b.networks=\['mid'\] must name 'high' and/or 'low'"):
        load_config(None, ["stage_b.networks=[mid]"])
    # A misspelt expert fails while the recipe is read, before any data or training.
    with pytest.raises(ValueError, match=r"init_expert='hgh' must be one of \['high', 'low'\]"):
        resolve_student(load_config(None, ["init_expert=hgh"]), SHAPES)
    # Above the shapes student's default scale 1.5: it would run untrained when none is given.
    with pytest.raises(ValueError, match=r"stage_b.guidance_min=2.0 must lie in \[1, the "
                                         r"student's guidance_default=1.5\]"):
        resolve_student(load_config(None, ["stage_b.guidance_min=2.0"]), SHAPES)


def test_stage_b_guidance_min_is_the_exported_students_range():
    # The student carries its trained range to generate, stream, serve and eval.
    assert resolve_student(load_config(None, []), SHAPES).guidance_range == (1.0, 3.0)
    raised = resolve_student(load_config(None, ["stage_b.guidance_min=1.25"]), SHAPES)
    assert raised.guidance_range == (1.25, 3.0)


def test_default_paths_follow_wan_distill_home(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_DISTILL_HOME", str(tmp_path))
    assert wan_distill_home() == tmp_path
    assert default_student_dir() == tmp_path / "students" / "shapes"
    monkeypatch.delenv("WAN_DISTILL_HOME")
    assert default_student_dir("causal-1.3b") == Path.home() / ".cache" / "wan-distill" / \
        "students" / "causal-1.3b"
    with pytest.raises(ValueError):
        default_student_dir("../x")


def _tiny_job(tmp_path, monkeypatch):
    tiny = StudentConfig(name="tiny", teacher="tiny", dit=TINY.dit, chunk_frames=1,
                         sink_chunks=1, window_chunks=1, shift=3.0, guidance_default=3.0,
                         guidance_max=5.0)
    monkeypatch.setitem(STUDENT_PRESETS, "tiny", tiny)
    monkeypatch.setenv("WAN_DISTILL_HOME", str(tmp_path / "home"))
    teacher = write_official(tmp_path / "teacher", tiny_models(seed=2))
    overrides = [f"teacher_dir={teacher}", "student=tiny", "data.source.num_clips=4",
                 "data.source.num_frames=5", "data.encode_batch_size=4", "stage_a.max_steps=2",
                 "stage_a.batch_size=2", "stage_b.max_steps=2", "stage_b.batch_size=2",
                 "stage_b.num_intervals=6", "ode_init.max_steps=2", "ode_init.max_steps_low=1",
                 "ode_init.batch_size=2",
                 "ode_init.num_trajectories=3", "ode_init.generate_batch_size=2",
                 "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=1"]
    return tiny, overrides


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def test_whole_job_on_a_tiny_teacher_then_resume(tmp_path, monkeypatch, capsys):
    tiny, overrides = _tiny_job(tmp_path, monkeypatch)
    summary = distill_main(None, overrides)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("distilled in ") and str(summary.student_dir) in line
    # Two networks (the default): ODE steps 2 (high) + 1 (low); stage B trains the high one.
    assert "stage A 2 steps" in line and "ODE init 3 steps" in line and "stage B 2 steps" in line
    assert "reused" not in line
    assert summary.student_dir == tmp_path / "home" / "students" / "tiny"
    model, config = load_student(summary.student_dir)
    assert isinstance(model, MoEStudent)
    assert config == replace(tiny, boundary=TINY.sampling.boundary)
    export = json.loads((summary.student_dir / "wan_distill_export.json").read_text())
    assert export["main"] == "ema" and export["stage_b_networks"] == ["high"]
    # On top: the high network's stage-B EMA and the low network's ODE-initialised weights.
    run = tmp_path / "home" / "runs" / "tiny"
    ode = {name: run / "ode_init" / name / "student" for name in ("high", "low")}
    _assert_same_weights(load_student(run / "stage_b" / "high" / "export")[0], model.high)
    _assert_same_weights(load_student(ode["low"])[0], model.low)
    assert not (run / "stage_b" / "low").exists()

    # Same settings again, but for a new sampling grid (inference only): the cache, the causal
    # teacher and stage B's last checkpoint are reused (no new training step), and the export
    # is the same weights with the new grid.
    stamp = (summary.causal_teacher_dir / "wan_distill_causal_teacher.json").stat().st_mtime_ns
    monkeypatch.setitem(STUDENT_PRESETS, "tiny", replace(tiny, sampling_grids=((1.0, 0.5),)))
    again = distill_main(None, overrides)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "data reused, stage A 2 steps reused, ODE init 3 steps reused" in line, line
    assert (again.causal_teacher_dir / "wan_distill_causal_teacher.json").stat().st_mtime_ns == stamp
    model_again, config_again = load_student(again.student_dir)
    _assert_same_weights(model, model_again)
    assert config_again.sampling_grids == ((1.0, 0.5),)

    # Changed stage-B settings, both networks trained: stage A and the ODE initialisation are
    # kept, stage B starts over from the ODE-initialised networks (lr 0: the online networks are
    # still those, whose guidance embeddings have left zero).
    ode_stamps = {n: (p / "wan_distill_student.json").stat().st_mtime_ns for n, p in ode.items()}
    third = distill_main(None, overrides + ["stage_b.optim.lr=0.0", "stage_b.networks=[high,low]"],
                         verbose=False)
    assert third.steps["stage_b"] == 4
    assert (third.causal_teacher_dir / "wan_distill_causal_teacher.json").stat().st_mtime_ns == stamp
    model3, _ = load_student(third.student_dir / "student")
    for name, path in ode.items():
        assert (path / "wan_distill_student.json").stat().st_mtime_ns == ode_stamps[name]
        start, _ = load_student(path)
        _assert_same_weights(start, getattr(model3, name))
        assert start.guidance_embedding[-1].weight.abs().sum() > 0

    # Without the ODE initialisation each network starts from its own adapted expert, and stage
    # B must then train both.
    with pytest.raises(ValueError, match=r"stage_b.networks=\['high'\]: set it to \[high, low\]"):
        distill_main(None, overrides + ["ode_init.max_steps=0"], verbose=False)
    fourth = distill_main(None, overrides + ["stage_b.optim.lr=0.0", "ode_init.max_steps=0",
                                             "stage_b.networks=[high,low]"], verbose=False)
    assert "ode_init" not in fourth.steps
    model4, _ = load_student(fourth.student_dir / "student")
    for name in ("high", "low"):
        expert, _ = load_student(fourth.causal_teacher_dir / f"{name}_noise_model")
        for k, v in expert.state_dict().items():
            assert torch.equal(getattr(model4, name).state_dict()[k], v)


def test_one_network_job_starts_from_init_expert(tmp_path, monkeypatch):
    tiny, overrides = _tiny_job(tmp_path, monkeypatch)
    summary = distill_main(None, overrides + ["split_experts=false", "stage_b.optim.lr=0.0",
                                              "ode_init.max_steps=0"], verbose=False)
    assert summary.steps["stage_b"] == 2
    model, config = load_student(summary.student_dir / "student")
    assert config == tiny and not isinstance(model, MoEStudent)
    high, _ = load_student(summary.causal_teacher_dir / "high_noise_model")
    for k, v in high.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
