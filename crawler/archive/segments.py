"""Append-only NDJSON segments whose committed length lives in the state.

Lines are appended and fsynced *before* the state commit that covers them, so the
state never points past data on disk; on open, anything past the committed
length (a torn line, a page whose commit never happened) is cut away, once
`agreement.check` has made sure that is all it is.

A new segment's file is created only when its first lines are appended, and only
after the state has named the segment (`register`): a segment file the state does
not name is never the harvest's own work in progress.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from crawler.archive.fs import describe, fsync_dir, open_nofollow
from crawler.archive.state import SegmentRow
from crawler.errors import DisagreementError, OutputError

SEGMENT_SUFFIX = ".ndjson"
# Any segment file, plain or compressed, spelled exactly as `segment_name` spells its number.

# The most lines one append may hold: a page, and the API serves at most 200 items
# a page (its largest `limit`). The walker refuses larger pages; `append` too. With
# one append between commits this bounds what may lie past the commit point.
MAX_APPEND_LINES = 200




@dataclass(frozen=True, slots=True)
class SegmentKind:
    """One family of segments in an output dir: the items (`images-`), or the observations of
    `harvest refresh` (`refresh-`). Each family has its own numbers, its own rows in the state
    and its own checks: a reader of one never sees the files of the other."""

    prefix: str  # "images-"
    what: str  # what a line holds, for messages: "images"

    @property
    def pattern(self) -> re.Pattern[str]:
        """Any file of this family, plain or compressed, spelled exactly as `name` spells it."""
        return re.compile(re.escape(self.prefix) + r"(\d{6}|[1-9]\d{6,})\.ndjson(\.zst|\.gz)?")

    def name(self, number: int) -> str:
        return f"{self.prefix}{number:06d}{SEGMENT_SUFFIX}"

    def number(self, name: str) -> int:
        return int(name.removeprefix(self.prefix).split(".", 1)[0])


IMAGES = SegmentKind("images-", "images")
OBSERVATIONS = SegmentKind("refresh-", "observations")
SEGMENT_FILE = IMAGES.pattern  # the item segments' files; `refresh-` files never match it


def segment_name(number: int) -> str:
    return IMAGES.name(number)


def segment_number(name: str) -> int:
    return IMAGES.number(name)


class SegmentWriter:
    """Appends lines to the active segment of one output dir."""

    def __init__(
        self,
        out_dir: Path,
        committed: Sequence[SegmentRow],
        register: Callable[[str], None],
        kind: SegmentKind = IMAGES,
    ) -> None:
        self._dir = out_dir
        self._register = register
        self._kind = kind
        self._fd: int | None = None
        last = committed[-1] if committed else None
        if last is not None and not last.closed:
            self.name, self.size, self.items = last.name, last.size, last.items
            self._fd = self._open_at_commit()
        else:
            self._next(kind.number(last.name) + 1 if last else 1)

    def rotate(self) -> None:
        """Start the next segment; the current one is complete."""
        self._close_fd()
        self._next(self._kind.number(self.name) + 1)

    def _next(self, number: int) -> None:
        """Make segment `number` the one appended to; its file is made by the first append."""
        self.name, self.size, self.items = self._kind.name(number), 0, 0

    def _open_at_commit(self) -> int:
        path = self.path
        try:
            fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT)
            on_disk = os.fstat(fd).st_size
        except OSError as exc:
            raise OutputError(f"{path}: cannot open for writing: {exc.strerror}") from None
        if on_disk < self.size:
            os.close(fd)
            raise DisagreementError(
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
        if lines > MAX_APPEND_LINES:
            raise ValueError(f"{lines} lines in one append; at most {MAX_APPEND_LINES}")
        if self._fd is None:
            self._register(self.name)
            self._fd = self._open_at_commit()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as exc:
            self._rewind(self._fd)
            raise OutputError(f"{self.path}: write failed: {describe(exc)}") from None
        self.size += len(data)
        self.items += lines
        return self.size

    def _rewind(self, fd: int) -> None:
        """Drop a partial write so later appends never follow garbage."""
        try:
            os.ftruncate(fd, self.size)
            os.lseek(fd, self.size, os.SEEK_SET)
        except OSError:
            pass  # the next start cuts the tail anyway

    def close(self) -> None:
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
