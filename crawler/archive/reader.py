"""Reading an archive back: the committed lines of every segment, plain or compressed.

What is committed is what the state says: each segment's lines that start before
its committed size. An active segment may hold more (a page written but never
committed, cut away by the next run); readers of the archive never see it.
This is the one place that reads segments back: `verify`, and any export or
repair, go through it. `committed_lines` hands out one line at a time, for
checking; `committed_blocks` hands out large blocks of whole committed lines,
for bulk readers (export, SQL) that split and parse them in bulk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from crawler import exactjson
from crawler.archive.compression import DECODE_ERRORS, decoded, open_segment
from crawler.archive.state import Kind, Publication, SegmentRow, State
from crawler.archive.store import open_object
from crawler.errors import StateError


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a segment, as stored."""

    segment: str  # the name the segment was written under, whatever its file is now
    number: int  # 1-based, within the segment
    offset: int  # where it starts in the segment's uncompressed bytes
    data: bytes  # with its newline (a torn last line has none)

    def committed_in(self, segment: SegmentRow) -> bool:
        """Whether the state's commit covers this line (it starts before the committed size)."""
        return self.offset < segment.size


def segment_lines(out_dir: Path, segment: SegmentRow, published: Publication | None = None) -> Iterator[Line]:
    """Every line of one segment's file, committed or not, in order: for checking it. A segment
    whose local file is gone is read from the object store when it is `published` there.

    A file that cannot be read to its end (a damaged compressed file) is a
    StateError naming it and the line where reading stopped.
    """
    path = out_dir / segment.file
    try:
        stream = open_segment(path)
    except FileNotFoundError:
        if not segment.closed and segment.size == 0:
            return  # named by the state, never written to: its file is made by the first append
        if published is None:
            raise StateError(f"{path}: missing, but the state holds {segment.items} lines in it") from None
        stream = open_published(published)
        path = Path(published.url)
    offset = number = 0
    with stream:
        try:
            for number, data in enumerate(stream, 1):
                yield Line(segment.name, number, offset, data)
                offset += len(data)
        except _READ_ERRORS as exc:
            raise StateError(f"{path}: cannot be read after line {number}: {_reason(exc)}") from None


_READ_ERRORS: tuple[type[Exception], ...] = (*DECODE_ERRORS, OSError)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def committed_lines(out_dir: Path, state: State) -> Iterator[Line]:
    """The committed lines of every segment in the state, segment by segment, in order."""
    for segment in state.segments():
        for line in segment_lines(out_dir, segment):
            if not line.committed_in(segment):
                break  # an uncommitted tail: never part of the archive
            yield line


def committed_blocks(
    out_dir: Path, state: State, segment: SegmentRow, start: int = 0, block: int = 32 << 20
) -> Iterator[bytes]:
    """The committed bytes of `segment` from `start` (a line boundary) up to its committed size,
    as blocks of about `block` bytes, each holding whole lines only (every one ends in a newline).

    `segment` is a snapshot: a harvest running meanwhile may append more (left out) or
    compress the segment (its plain file goes; the compressed one is read instead).
    """
    if segment.size <= start:
        return  # nothing committed past `start` (a segment named but never written has no file)
    stream = _open_committed(out_dir, state, segment)
    with stream:
        _skip(stream, start, segment)
        left, carry = segment.size - start, b""
        while left > 0:
            data = stream.read(min(block, left))
            if not data:
                raise StateError(f"{segment.file}: ends before the {segment.size} bytes the state committed")
            left -= len(data)
            data = carry + data
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                yield data[:cut]
    if carry:
        raise StateError(f"{segment.file}: the committed bytes end inside a line (at byte {segment.size})")


def open_published(published: Publication) -> BinaryIO:
    """A published segment's uncompressed bytes, read from the object store."""
    return decoded(open_object(published.url), published.file)


def _open_committed(out_dir: Path, state: State, segment: SegmentRow) -> BinaryIO:
    try:
        return open_segment(out_dir / segment.file)
    except FileNotFoundError:
        now = state.segment(segment.name)  # compressed meanwhile? Its bytes are the same
        if now.file != segment.file:
            return _open_committed(out_dir, state, now)
        published = state.publication(Kind.SEGMENT, segment.name)
        if published is not None:  # only in the object store (keep_local = false)
            return open_published(published)
        path = out_dir / segment.file
        raise StateError(f"{path}: missing, but the state holds {segment.items} lines in it") from None


def _skip(stream: BinaryIO, count: int, segment: SegmentRow) -> None:
    """Move `count` bytes into the uncompressed stream (compressed ones are read through)."""
    if count <= 0:
        return
    if segment.file == segment.name:
        stream.seek(count)
        return
    while count > 0:
        data = stream.read(min(count, 8 << 20))
        if not data:
            raise StateError(f"{segment.file}: ends before byte {count} of its committed lines")
        count -= len(data)


def committed_items(out_dir: Path, state: State) -> Iterator[dict[str, Any]]:
    """The committed images, parsed, in archive order."""
    for line in committed_lines(out_dir, state):
        yield parse(line)


def parse(line: Line) -> dict[str, Any]:
    """One line as the image it holds; a line that is not one is a broken archive."""
    try:
        item = loads(line.data)
    except ValueError:
        raise StateError(f"{line.segment}:{line.number}: not JSON") from None
    if not isinstance(item, dict):
        raise StateError(f"{line.segment}:{line.number}: not a JSON object")
    return item


def loads(data: bytes) -> Any:
    """The JSON value of one line, every number exact; ValueError when it holds none."""
    return exactjson.loads(data)
