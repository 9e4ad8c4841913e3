"""Checking where a command will write before it does the work.

A command writes its result last: ``generate`` after sampling (minutes for the A14B), ``eval``
after every system, ``distill`` and ``train-teacher`` after their stages. A location that cannot
be written would otherwise fail there, with a traceback, after the work. These checks run first
and name the flag, the path and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path


class OutputLocationError(ValueError):
    """An output file or folder cannot be written where it was asked for."""


def check_output_folder(folder: str | os.PathLike, flag: str, *,
                        asked: str | os.PathLike | None = None) -> Path:
    """Check, creating nothing, that ``folder`` exists as a writable folder or can be created.

    ``flag`` names the setting it came from (e.g. ``--out``) and ``asked`` the path given there
    (default: ``folder``), both for the error message. Returns the folder as a Path. Raises
    OutputLocationError when a path on the way is a file or the nearest existing folder is not
    writable.
    """
    folder = Path(folder).expanduser()
    where = f"{flag} {asked if asked is not None else folder}"
    nearest = next(p for p in (folder, *folder.parents) if p.exists())
    if not nearest.is_dir():
        raise OutputLocationError(
            f"{where}: {nearest} is a file, not a folder; pass a path under a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise OutputLocationError(f"{where}: the folder {nearest} is not writable; pass a path in "
                                  f"a writable folder")
    return folder


def prepare_output_folder(folder: str | os.PathLike, flag: str, *,
                          asked: str | os.PathLike | None = None) -> Path:
    """``check_output_folder``, then create the folder (and its parents) if needed."""
    folder = check_output_folder(folder, flag, asked=asked)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        where = f"{flag} {asked if asked is not None else folder}"
        raise OutputLocationError(
            f"{where}: cannot create the folder {folder} ({err.strerror}); pass a path in a "
            f"writable folder") from None
    return folder


def prepare_output_file(path: str | os.PathLike, flag: str, example: str = "video.mp4") -> Path:
    """Check that the file ``path`` can be written: not a folder, its folder created and
    writable (``prepare_output_folder``). ``example`` is the file name the fix suggests."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputLocationError(
            f"{flag} {path} is a folder; pass a file path such as {path / example}")
    prepare_output_folder(path.parent, flag, asked=path)
    return path
