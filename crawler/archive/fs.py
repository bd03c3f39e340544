"""Durable file operations for the output dir.

A file's bytes surviving a power cut need an fsync of the file; its *name*
surviving needs an fsync of the directory holding it. Every new or renamed file
in the output dir goes through here so neither is forgotten.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

PART_SUFFIX = ".part"


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a new or renamed file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(dst: Path, fill: Callable[[BinaryIO], None]) -> Path:
    """Create `dst` whole or not at all: `fill` writes `dst.part`, which is fsynced and renamed.

    A crash or an error part way leaves at most a `.part` file, never a short
    `dst`; `remove_partials` sweeps those on the next start.
    """
    part = dst.with_name(dst.name + PART_SUFFIX)
    with part.open("wb") as raw:
        fill(raw)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(part, dst)
    fsync_dir(dst.parent)
    return dst


def remove_partials(folder: Path) -> None:
    """Delete the `.part` files an interrupted `write_atomic` left in `folder`."""
    for part in folder.glob(f"*{PART_SUFFIX}"):
        part.unlink()


def describe(exc: OSError) -> str:
    """An OS error as one line for the user; a full disk says what to do about it."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device (what was committed is intact; rerun once space is free)"
    return exc.strerror or str(exc)
