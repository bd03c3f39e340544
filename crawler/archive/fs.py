"""Durable, symlink-proof file operations for the output dir.

A file's bytes surviving a power cut need an fsync of the file; its *name*
surviving needs an fsync of the directory holding it. Every new or renamed file
in the output dir goes through here so neither is forgotten.

A harvest often runs as root from cron, in a directory others may write to. A
symlink planted under a name the harvest creates or truncates (a segment, the
lock, the state, a temporary file) would make it overwrite the link's target,
so no such file is ever opened through a symlink: opens use O_NOFOLLOW, files
that must be new are created with O_EXCL, and files opened by a library (the
SQLite state) are checked first (`refuse_symlink`).
"""

from __future__ import annotations

import errno
import os
import resource
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from crawler.errors import OutputError

PART_SUFFIX = ".part"
_LOW_SPACE = 1 << 16  # bytes free below which a failed write is put down to a full disk


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a new or renamed file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def symlink_error(path: Path) -> OutputError:
    return OutputError(f"{path}: is a symlink; the harvest never writes through one (remove it)")


def refuse_symlink(path: Path) -> None:
    """Raise if `path` is a symlink (dangling or not): for files a library opens for us."""
    if path.is_symlink():
        raise symlink_error(path)


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """`os.open` that never follows a symlink at `path`: a planted one is an OutputError."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise symlink_error(path) from None
        raise


def create_new(path: Path) -> BinaryIO:
    """A fresh file at `path` for writing, never through a symlink.

    A regular file left there (by a run that died before renaming it) is ours and
    replaced; a symlink is refused, so its target is never touched.
    """
    refuse_symlink(path)
    path.unlink(missing_ok=True)
    try:
        fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:  # planted between the unlink and the create
        raise OutputError(f"{path}: appeared while the harvest was creating it; remove it") from None
    return os.fdopen(fd, "wb")


def write_atomic(dst: Path, fill: Callable[[BinaryIO], None]) -> Path:
    """Create `dst` whole or not at all: `fill` writes `dst.part`, which is fsynced and renamed.

    A crash or an error part way leaves at most a `.part` file, never a short
    `dst`; the next start removes it (`remove_partials`). The rename replaces a
    symlink at `dst` itself, never its target.
    """
    part = dst.with_name(dst.name + PART_SUFFIX)
    with create_new(part) as raw:
        fill(raw)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(part, dst)
    fsync_dir(dst.parent)
    return dst


def remove_partials(folder: Path, targets: Iterable[str]) -> None:
    """Delete the `.part` files an interrupted `write_atomic` of `targets` left in `folder`.

    Only those: other `.part` files in the folder are not the harvest's to delete.
    """
    for target in targets:
        part = folder / (target + PART_SUFFIX)
        if part.is_file() and not part.is_symlink():
            part.unlink()


def describe(exc: OSError) -> str:
    """An OS error as one line for the user; a full disk says what to do about it."""
    if exc.errno in (errno.ENOSPC, errno.EFBIG):
        return _full(exc.errno)
    return exc.strerror or str(exc)


def diagnose_write_failure(files: Iterable[Path]) -> str | None:
    """Why writing `files` may have failed, when a library does not say (SQLite's "disk I/O
    error" hides the errno): the disk holding them is full, or one of them has reached the
    process's file size limit (`ulimit -f`). None when neither shows."""
    files = list(files)
    for path in files[:1]:
        try:
            fs = os.statvfs(path.parent)
        except OSError:
            break
        if fs.f_bavail * fs.f_frsize < _LOW_SPACE:
            return _full(errno.ENOSPC)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and any(_size(p) + _LOW_SPACE > limit for p in files):
        return f"file too large: the process may write files of at most {limit} bytes, `ulimit -f` " + (
            "(what was committed is intact; rerun once the limit allows)"
        )
    return None


def _full(code: int) -> str:
    if code == errno.ENOSPC:
        return "no space left on device (what was committed is intact; rerun once space is free)"
    return "file too large (what was committed is intact; rerun once the file size limit allows)"


def _size(path: Path) -> int:
    try:
        st = path.lstat()
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0
