"""Append-only NDJSON segments whose committed length lives in the state.

Lines are appended and fsynced *before* the state commit that covers them, so the
state never points past data on disk; on open, anything past the committed
length (a torn line, a page whose commit never happened) is cut away.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from crawler.archive.fs import describe, fsync_dir, open_nofollow
from crawler.archive.state import SegmentRow
from crawler.errors import OutputError, StateError

SEGMENT_SUFFIX = ".ndjson"


def segment_name(number: int) -> str:
    return f"images-{number:06d}{SEGMENT_SUFFIX}"


class SegmentWriter:
    """Appends lines to the active segment of one output dir."""

    def __init__(self, out_dir: Path, committed: Sequence[SegmentRow]) -> None:
        self._dir = out_dir
        last = committed[-1] if committed else None
        if last is not None and not last.closed:
            self.name, self.size, self.items = last.name, last.size, last.items
        else:
            self.name, self.size, self.items = segment_name(len(committed) + 1), 0, 0
        self._fd = self._open_at_commit()

    def rotate(self) -> None:
        """Start the next segment; the current one is complete."""
        os.close(self._fd)
        number = int(self.name.removeprefix("images-").removesuffix(SEGMENT_SUFFIX))
        self.name, self.size, self.items = segment_name(number + 1), 0, 0
        self._fd = self._open_at_commit()

    def _open_at_commit(self) -> int:
        path = self._dir / self.name
        try:
            fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT)
            on_disk = os.fstat(fd).st_size
        except OSError as exc:
            raise OutputError(f"{path}: cannot open for writing: {exc.strerror}") from None
        if on_disk < self.size:
            os.close(fd)
            raise StateError(
                f"{path}: holds {on_disk} bytes but the state committed {self.size}: "
                "the file was truncated or replaced outside the harvest"
            )
        if on_disk > self.size:
            os.ftruncate(fd, self.size)  # an uncommitted tail from an interrupted run
        if self.size == 0:
            try:
                fsync_dir(self._dir)  # the new file's name must outlive a power cut, like its lines
            except OSError as exc:
                os.close(fd)
                raise OutputError(f"{self._dir}: cannot sync the output dir: {exc.strerror}") from None
        os.lseek(fd, self.size, os.SEEK_SET)
        return fd

    @property
    def path(self) -> Path:
        return self._dir / self.name

    def append(self, data: bytes, lines: int) -> int:
        """Write and fsync `data`, holding `lines` lines; return the segment's new size."""
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as exc:
            self._rewind()
            raise OutputError(f"{self.path}: write failed: {describe(exc)}") from None
        self.size += len(data)
        self.items += lines
        return self.size

    def _rewind(self) -> None:
        """Drop a partial write so later appends never follow garbage."""
        try:
            os.ftruncate(self._fd, self.size)
            os.lseek(self._fd, self.size, os.SEEK_SET)
        except OSError:
            pass  # the next start cuts the tail anyway

    def close(self) -> None:
        os.close(self._fd)
