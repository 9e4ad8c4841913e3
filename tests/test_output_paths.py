"""Output locations are checked before the work: a file where a folder must go, a folder where a
file must go, or an unwritable folder fails at once, naming the flag, the path and the fix, in
every command that writes its result last."""

from __future__ import annotations

import os

import pytest

from teacher.output_paths import (
    OutputLocationError,
    check_output_folder,
    prepare_output_file,
    prepare_output_folder,
)


@pytest.fixture()
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("a file, not a folder")
    return path


def test_prepare_creates_the_folders_and_check_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_output_folder(target, "--out") == target
    assert not (tmp_path / "a").exists()
    assert prepare_output_folder(target, "--out") == target
    assert target.is_dir()
    assert prepare_output_file(tmp_path / "c" / "clip.mp4", "--out") == tmp_path / "c" / "clip.mp4"
    assert (tmp_path / "c").is_dir() and not (tmp_path / "c" / "clip.mp4").exists()


def test_a_file_on_the_way_is_named(a_file):
    for check in (check_output_folder, prepare_output_folder):
        with pytest.raises(OutputLocationError,
                           match=f"--record-dir {a_file}/rec: {a_file} is a file, not a folder"):
            check(a_file / "rec", "--record-dir")
    with pytest.raises(OutputLocationError, match=f"--out {a_file}/x.mp4: {a_file} is a file"):
        prepare_output_file(a_file / "x.mp4", "--out")
    assert a_file.read_text() == "a file, not a folder"


def test_a_folder_given_for_a_file_suggests_a_file_name(tmp_path):
    with pytest.raises(OutputLocationError,
                       match=f"--out {tmp_path} is a folder; pass a file path such as "
                             f"{tmp_path}/video.mp4"):
        prepare_output_file(tmp_path, "--out")


def test_an_unwritable_folder_is_refused(tmp_path, monkeypatch):
    # The tests may run as root, for whom every folder is writable: fake the permission check.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path)
                        else real_access(p, mode))
    with pytest.raises(OutputLocationError, match=f"the folder {tmp_path} is not writable"):
        check_output_folder(tmp_path / "new", "output_dir")
    assert not (tmp_path / "new").exists()


def test_eval_checks_its_report_folder_before_loading_anything(a_file, monkeypatch):
    import eval.run

    def forbidden(*args, **kwargs):
        raise AssertionError("the teacher was loaded before --out was checked")

    monkeypatch.setattr(eval.run, "load_teacher", forbidden)
    with pytest.raises(SystemExit, match=f"--out {a_file}/report: {a_file} is a file"):
        eval.run.main(["--out", str(a_file / "report"), "--no-fvd", "--num-prompts", "2"])


def test_distill_checks_its_folders_before_any_stage(a_file, tmp_path, monkeypatch):
    import distill.run

    def forbidden(*args, **kwargs):
        raise AssertionError("a stage ran before the output folders were checked")

    monkeypatch.setattr(distill.run, "_build_data", forbidden)
    with pytest.raises(SystemExit, match=f"output_dir {a_file}/student: {a_file} is a file"):
        distill.run.main([f"--output_dir={a_file / 'student'}", f"--run_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit, match=f"run_dir {a_file}/run: {a_file} is a file"):
        distill.run.main([f"--run_dir={a_file / 'run'}", f"--output_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_train_teacher_and_decoder_check_their_out_before_training(a_file, tmp_path):
    from distill.teacher_training.run import main as train_teacher_main
    from distill.tiny_decoder import main as train_decoder_main

    with pytest.raises(SystemExit, match=f"--out {a_file}/teacher: {a_file} is a file"):
        train_teacher_main(["--out", str(a_file / "teacher"), "--work-dir", str(tmp_path / "w")])
    with pytest.raises(SystemExit, match=f"--out {a_file}/tiny: {a_file} is a file"):
        train_decoder_main(["--out", str(a_file / "tiny"), "--work-dir", str(tmp_path / "w2")])
    assert not (tmp_path / "w2").exists()
