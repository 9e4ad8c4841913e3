"""`wan-distill stream`: a timed stream with a prompt switch written to a playable MP4."""

import json

import pytest
import torch

from distill.cli import main
from student.causal_dit import CausalWanModel
from student.checkpoint import save_student
from student.config import StudentConfig
from student.live import parse_switch
from teacher.video_io import read_video
from tests.tiny_teacher import TINY, tiny_decoder_for, tiny_models, write_official


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    teacher = write_official(root / "teacher", tiny_models())
    config = StudentConfig(name="tiny", teacher="tiny", dit=TINY.dit, chunk_frames=1, sink_chunks=1,
                           window_chunks=2, steps=2, shift=3.0, guidance_default=3.0, guidance_max=5.0)
    torch.manual_seed(0)
    student = CausalWanModel.from_config(config).eval()
    return save_student(root / "student", student, config), teacher


def test_stream_writes_while_generating_and_switches(folders, tmp_path, capsys):
    student, teacher = folders
    out = tmp_path / "live.mp4"
    assert main(["stream", "--student", str(student), "--teacher-dir", str(teacher), "--prompt",
                 "a red circle moving left", "--switch", "1:a blue square moving up",
                 "--seconds", "2", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    frames, fps = read_video(out)
    # 8 fps for 2 s: chunks of 1 latent frame give 1 frame, then 4 each: 1+4*4 = 17 >= 16.
    assert frames.shape == (17, 32, 32, 3) and fps == 8
    timeline = json.loads(out.with_suffix(".json").read_text())["prompts"]
    assert [p["prompt"] for p in timeline] == ["a red circle moving left", "a blue square moving up"]
    assert timeline[1]["frame"] == 9  # the first chunk boundary at or after 1 s (frame 8)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {out}: 17 frames") and "1 prompt switch(es)" in line
    assert line.endswith("decoded by the VAE")  # this teacher folder has no tiny decoder


def test_stream_errors_name_the_fix(folders, tmp_path):
    student, teacher = folders
    with pytest.raises(SystemExit, match="run `wan-distill distill`"):
        main(["stream", "--student", str(tmp_path / "none"), "--teacher-dir", str(teacher),
              "--prompt", "x"])
    with pytest.raises(SystemExit, match="not SECONDS:PROMPT"):
        main(["stream", "--student", str(student), "--prompt", "x", "--switch", "soon"])
    with pytest.raises(ValueError, match="not SECONDS:PROMPT"):
        parse_switch("2:")
    assert parse_switch("2.5: a cat ") == (2.5, "a cat")


def test_stream_refuses_late_switches_and_bad_out_before_loading(folders, tmp_path,
                                                                  monkeypatch, capsys):
    import student.live as live

    student, teacher = folders
    base = ["stream", "--student", str(student), "--teacher-dir", str(teacher), "--prompt",
            "a red circle moving left", "--seconds", "2", "--device", "cpu", "--quiet"]

    def forbidden(*a, **k):
        raise AssertionError("the student was loaded before the flags were checked")

    with monkeypatch.context() as patch:
        patch.setattr(live, "load_engine_factory", forbidden)
        with pytest.raises(SystemExit, match=r"--switch at 2 s comes after the stream's end"):
            main(base + ["--switch", "2:a blue square moving up"])
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        with pytest.raises(SystemExit, match=f"--out {blocker}/live.mp4: {blocker} is a file"):
            main(base + ["--out", str(blocker / "live.mp4")])
    # 1.9 s is frame 15.2, inside the last chunk (frames 13-16): said, not silently dropped.
    assert main(base + ["--switch", "1.9:a blue square moving up"]) == 0
    out = capsys.readouterr().out
    assert "0 prompt switch(es)" in out
    assert "note: the switch at 1.9 s to 'a blue square moving up' fell inside the last chunk" in out


def test_stream_takes_one_guidance_value(folders, tmp_path, capsys):
    """`stream --guidance G` reaches the engine (it once crashed in main's check for `generate`'s
    list-valued --guidance); a scale outside the student's trained range is refused by name."""
    student, teacher = folders
    base = ["stream", "--student", str(student), "--teacher-dir", str(teacher), "--prompt",
            "a red circle moving left", "--seconds", "0.5", "--device", "cpu", "--quiet"]
    assert main(base + ["--guidance", "2.5"]) == 0
    assert "frames" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--guidance: guidance 7.0 .*\[1, 5\]"):
        main(base + ["--guidance", "7"])


def test_serve_limits_guidance_to_the_students_trained_range(folders, monkeypatch):
    """`serve` hands the server the student's range, so the web page's out-of-range scale is a
    refused field and not an engine error that would end the stream."""
    import student.server.app as app

    student, teacher = folders
    seen = {}
    monkeypatch.setattr(app, "serve_main", lambda factory, **kw: seen.update(kw, factory=factory))
    assert main(["serve", "--student", str(student), "--teacher-dir", str(teacher),
                 "--device", "cpu", "--port", "0"]) == 0
    limits = seen["limits"]
    assert (limits.min_guidance, limits.max_guidance) == (1.0, 5.0)
    assert callable(seen["factory"])


def test_engines_keep_the_cached_kv_on_a_switch_unless_asked_to_recache(folders, monkeypatch):
    import student.server.app as app

    student, teacher = folders
    seen = {}
    monkeypatch.setattr(app, "serve_main", lambda factory, **kw: seen.update(factory=factory))
    base = ["serve", "--student", str(student), "--teacher-dir", str(teacher), "--device", "cpu",
            "--port", "0"]
    assert main(base) == 0
    assert seen["factory"]().recache is False
    assert main([*base, "--recache"]) == 0
    assert seen["factory"]().recache is True


def test_stream_with_the_tiny_decoder(folders, tmp_path, capsys):
    """`stream --decoder tiny` reads <teacher-dir>/tiny_decoder and names the command that makes
    it when it is missing; a folder trained for this VAE streams the same number of frames."""
    from student.tiny_decoder_checkpoint import save_tiny_decoder
    from teacher.checkpoint import load_teacher

    student, teacher = folders
    base = ["stream", "--student", str(student), "--teacher-dir", str(teacher), "--prompt",
            "a red circle moving left", "--seconds", "2", "--device", "cpu", "--quiet"]
    with pytest.raises(SystemExit, match="wan-distill train-decoder"):
        main([*base, "--decoder", "tiny"])
    vae = load_teacher(teacher, experts=False).vae
    folder = save_tiny_decoder(tmp_path / "tiny", tiny_decoder_for(vae))
    out = tmp_path / "tiny.mp4"
    assert main([*base, "--decoder", str(folder), "--out", str(out)]) == 0
    frames, _ = read_video(out)
    assert frames.shape == (17, 32, 32, 3)
    # A decoder of another VAE is refused by name.
    other = save_tiny_decoder(tmp_path / "other", tiny_decoder_for(tiny_models(seed=9).vae))
    with pytest.raises(SystemExit, match="retrain it with `wan-distill train-decoder`"):
        main([*base, "--decoder", str(other)])


def test_stream_decoder_auto_takes_the_teachers_tiny_decoder_when_it_fits(folders, tmp_path,
                                                                          capsys):
    """The default decoder: the tiny one in <teacher-dir>/tiny_decoder when it was trained for
    that teacher's VAE, else the VAE (a stale one is passed over, not an error)."""
    import shutil

    from student.tiny_decoder_checkpoint import save_tiny_decoder
    from teacher.checkpoint import load_teacher

    student, teacher = folders
    own = tmp_path / "teacher"
    shutil.copytree(teacher, own)
    base = ["stream", "--student", str(student), "--teacher-dir", str(own), "--prompt",
            "a red circle moving left", "--seconds", "1", "--device", "cpu", "--quiet"]

    def decoded_by() -> str:
        assert main(base) == 0
        return capsys.readouterr().out.strip().splitlines()[-1].rsplit("decoded by ", 1)[1]

    save_tiny_decoder(own / "tiny_decoder", tiny_decoder_for(tiny_models(seed=9).vae))
    assert decoded_by() == "the VAE"  # trained for another VAE
    save_tiny_decoder(own / "tiny_decoder", tiny_decoder_for(load_teacher(own, experts=False).vae))
    assert decoded_by() == "the tiny decoder"
    assert main([*base, "--decoder", "vae"]) == 0
    assert capsys.readouterr().out.strip().endswith("decoded by the VAE")
    with pytest.raises(SystemExit, match="'tinyy' is not auto, vae, tiny or an existing"):
        main([*base, "--decoder", "tinyy"])



def test_serve_checks_its_record_dir_before_loading(folders, tmp_path, monkeypatch):
    import student.live as live

    student, teacher = folders
    monkeypatch.setattr(live, "load_engine_factory", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the student was loaded before --record-dir was checked")))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=f"--record-dir {blocker}/rec: {blocker} is a file"):
        main(["serve", "--student", str(student), "--teacher-dir", str(teacher),
              "--record-dir", str(blocker / "rec"), "--port", "0"])


def test_serve_names_a_port_it_cannot_use(folders):
    import socket

    student, teacher = folders
    base = ["serve", "--student", str(student), "--teacher-dir", str(teacher), "--device", "cpu"]
    with pytest.raises(SystemExit, match="--port 70000 must be in 0-65535"):
        main(base + ["--port", "70000"])
    with pytest.raises(SystemExit, match="--max-sessions 0 must be >= 1"):
        main(base + ["--max-sessions", "0"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}: the port is in "
                                             f"use by another program; pass another --port"):
            main(base + ["--port", str(port)])
