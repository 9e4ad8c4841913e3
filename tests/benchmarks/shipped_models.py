"""What the shapes-world benchmarks share: the flags that point at the shipped student and
teacher, and loading them with a clear error when the student has not been made yet."""

from __future__ import annotations

import argparse
from pathlib import Path

from student.checkpoint import load_student
from student.paths import default_student_dir, embedded_teacher_dir
from teacher.checkpoint import load_teacher


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--student (default: where `wan-distill distill` exports it) and --teacher-dir."""
    parser.add_argument("--student", default=str(default_student_dir("shapes")))
    parser.add_argument("--teacher-dir", default=str(embedded_teacher_dir()))


def load_shipped(args: argparse.Namespace, *, experts: bool = False):
    """(teacher parts, the student in eval mode, its StudentConfig) named by ``args``; the
    teacher's experts only when ``experts``."""
    if not Path(args.student).is_dir():
        raise SystemExit(f"student folder {args.student} does not exist; run `wan-distill "
                         f"distill` first or pass --student DIR")
    parts = load_teacher(args.teacher_dir, experts=experts)
    student, config = load_student(args.student)
    return parts, student.eval(), config
