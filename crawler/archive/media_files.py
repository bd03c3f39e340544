"""Media files on disk: where each one goes, and how it gets there whole or not at all.

`<media dir>/<millions>/<thousands>/<id>.<ext>`: the id's own digits, so a
folder holds at most 1,000 files (and 1,000 folders), and a person finds a file
by its id. A download grows `<id>.part` chunk by chunk, hashing as it goes; it is
fsynced and renamed to its final name (the extension of what the bytes are) only
when whole. A crash leaves at most a `.part`, which the next attempt continues
(HTTP Range) or starts over. Nothing is ever opened through a symlink.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from crawler.archive.fs import PART_SUFFIX, describe, fsync_dir, open_nofollow, refuse_symlink
from crawler.archive.sniff import HEAD_BYTES
from crawler.errors import OutputError

_CHUNK = 1 << 20


def folder_of(image_id: int) -> str:
    """`123/456` for id 123456789: the folder its file lives in, relative to the media dir."""
    return f"{image_id // 1_000_000:03d}/{image_id // 1000 % 1000:03d}"


def relpath(image_id: int, ext: str) -> str:
    return f"{folder_of(image_id)}/{image_id}.{ext}"


def finished_files(root: Path, image_id: int) -> list[Path]:
    """Complete files of `image_id` (any extension): a rename that was never recorded."""
    folder = root / folder_of(image_id)
    try:
        names = [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    stem = f"{image_id}."
    return [folder / n for n in names if n.startswith(stem) and not n.endswith(PART_SUFFIX)]


@dataclass(frozen=True, slots=True)
class Stored:
    """A complete media file, as the state records it."""

    path: str  # relative to the media dir
    size: int
    sha256: str


def hash_file(path: Path) -> Stored:
    """Size and SHA-256 of a file as it is on disk now; OSError when it cannot be read."""
    digest = hashlib.sha256()
    size = 0
    fd = open_nofollow(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return Stored(str(path), size, digest.hexdigest())


class PartFile:
    """One download in progress: `<id>.part`, kept between attempts (and runs) for Range.

    Disk errors are `OutputError`s naming the file: never mistaken for a network failure.
    """

    def __init__(self, root: Path, image_id: int) -> None:
        self.root = root
        self.image_id = image_id
        self.path = root / folder_of(image_id) / f"{image_id}{PART_SUFFIX}"
        self._fd: int | None = None
        self._digest = hashlib.sha256()
        self._head = b""
        self.size = 0

    def held(self) -> int:
        """Bytes an earlier attempt left: the next request asks for the rest."""
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return 0
        return st.st_size if self.path.is_file() and not self.path.is_symlink() else 0

    def begin(self, start: int) -> None:
        """The body from byte `start` follows: 0 starts over, `held()` continues."""
        self.close()
        self._digest, self._head, self.size = hashlib.sha256(), b"", 0
        with self._guard():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            refuse_symlink(self.path)
            flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if start else os.O_TRUNC)
            self._fd = open_nofollow(self.path, flags)
            if start:
                self._rehash(start)

    def _rehash(self, start: int) -> None:
        fd = open_nofollow(self.path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as stream:
            while self.size < start and (chunk := stream.read(min(_CHUNK, start - self.size))):
                self._took(chunk)
        if self.size != start:
            raise OutputError(f"{self.path}: shrank while it was being continued")

    def _took(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        self.size += len(chunk)

    def write(self, chunk: bytes) -> None:
        assert self._fd is not None, "begin() first"
        with self._guard():
            view = memoryview(chunk)
            while view:
                view = view[os.write(self._fd, view) :]
        self._took(chunk)

    @property
    def head(self) -> bytes:
        """The file's first bytes (for telling its format)."""
        return self._head

    def finish(self, ext: str) -> Stored:
        """fsync, rename to `<id>.<ext>`, fsync the folder: the file is complete on disk."""
        assert self._fd is not None, "begin() first"
        target = self.root / relpath(self.image_id, ext)
        with self._guard():
            os.fsync(self._fd)
            self.close()
            refuse_symlink(target)
            os.replace(self.path, target)
            fsync_dir(target.parent)
        return Stored(relpath(self.image_id, ext), self.size, self._digest.hexdigest())

    def close(self) -> None:
        """Stop writing; what was written stays for the next attempt."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """An OSError of the file's own I/O becomes an OutputError naming it and the cause."""
        try:
            yield
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write media: {describe(exc)}") from None
