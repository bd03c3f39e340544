"""Do the segment files hold what the state says, and nothing a lost state forgot?

A run cuts whatever lies past the committed length of the active segment, taking
it for the uncommitted tail of an interrupted run. That is only safe when it is
one: if the state was lost (deleted, and a fresh one made) or is an older copy,
the "tail" is committed work and cutting it destroys it. So before anything is
cut or removed, `check` holds the files to what the writer guarantees:

1. A segment file is created only after the state names the segment
   (`SegmentWriter` registers it in a transaction of its own first), and a
   compressed file only for a segment the state has closed. So a segment file
   holding data under a name the state does not know was written under another
   state: this one is lost or older.
2. Lines are appended a page at a time, at most MAX_APPEND_LINES (200) of them,
   and each append is committed before the next one starts; a commit outlives the
   process that made it (SQLite's WAL, `synchronous=NORMAL`). So past the commit point
   lies at most one page: at most 200 lines, the last one possibly torn. More means
   commits are missing: the state is older, or a power cut took back the last
   commits (NORMAL syncs the WAL at checkpoints only); either way `harvest repair`
   rebuilds the state from the lines, which were fsynced, and nothing is lost.
3. The state only ever commits whole lines: the committed length ends a line.
4. A closed segment never changes: its file exists and, when plain, holds exactly
   the committed bytes. An active segment's file holds at least them. A closed
   segment that is published (`[output] publish`) may have no local file: it is read
   from the object store (`keep_local = false` deletes the local copy once recorded).

Any breach names the file and what disagrees, and nothing is touched;
`harvest repair` rebuilds the state from the files.

What no check can tell apart: a state older than the files by one page at most
looks exactly like a crash between an append and its commit. Cutting that page
is then what crash recovery does, and it is safe for the same reason: the
state's cursors are from before that page, so the next walk fetches it again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

from crawler.archive.compression import SUFFIXES
from crawler.archive.fs import open_nofollow, symlink_error
from crawler.archive.segments import IMAGES, MAX_APPEND_LINES, SegmentKind
from crawler.archive.state import SegmentRow
from crawler.errors import DisagreementError

_CHUNK = 1 << 20


def check(
    out_dir: Path, segments: Sequence[SegmentRow], kind: SegmentKind = IMAGES, published: Collection[str] = ()
) -> None:
    """Raise DisagreementError, naming the file, unless the files agree with `segments`
    (the state's) up to one uncommitted page; OutputError for a symlinked segment file.

    Only the files of `kind` are looked at: the item segments and the observation
    segments of `harvest refresh` are checked apart, each against its own rows.
    `published`: the names of segments in the object store (their local file may be gone)."""
    found = disagreements(out_dir, segments, kind, published)
    if found:
        more = f" (and {len(found) - 1} more: `harvest verify` lists them)" if len(found) > 1 else ""
        raise DisagreementError(found[0] + more)


def disagreements(
    out_dir: Path, segments: Sequence[SegmentRow], kind: SegmentKind = IMAGES, published: Collection[str] = ()
) -> list[str]:
    """Every way the files disagree with `segments`, one line each, naming the file."""
    entries = segment_entries(out_dir, kind)
    found = list(_unknown(out_dir, entries, segments, kind))
    for segment in segments:
        if segment.file not in entries and segment.closed and segment.name in published:
            continue  # only in the object store: `verify` checks it there
        found += _missing(out_dir, segment, entries, published) or _sizes(
            out_dir, segment, entries.get(segment.file)
        )
    return found


def missing(out_dir: Path, segments: Sequence[SegmentRow], published: Collection[str] = ()) -> list[str]:
    """The segments whose file is gone (and that are not in the object store), one line each."""
    entries = segment_entries(out_dir)
    return [line for segment in segments for line in _missing(out_dir, segment, entries, published)]


def segment_entries(out_dir: Path, kind: SegmentKind = IMAGES) -> dict[str, os.stat_result]:
    """The segment files of `kind` in `out_dir` (plain or compressed), by name, as they are (lstat).

    A symlink among them is refused: the harvest neither writes nor reads through one.
    """
    try:
        scan = list(os.scandir(out_dir))
    except FileNotFoundError:
        return {}
    pattern = kind.pattern
    entries = {e.name: e.stat(follow_symlinks=False) for e in scan if pattern.fullmatch(e.name)}
    for name, st in entries.items():
        if stat.S_ISLNK(st.st_mode):
            raise symlink_error(out_dir / name)
    return entries


def _unknown(
    out_dir: Path, entries: Mapping[str, os.stat_result], segments: Sequence[SegmentRow], kind: SegmentKind
) -> Iterator[str]:
    """Segment files with data that the state does not name (invariant 1)."""
    known = {s.file for s in segments} | {s.name for s in segments}
    known |= {s.name + suffix for s in segments if s.closed for suffix in SUFFIXES.values()}
    for name, st in sorted(entries.items()):
        if name not in known and st.st_size > 0:
            yield (
                f"{out_dir / name}: {st.st_size} bytes of {kind.what} the state does not know of "
                "(the state was lost, or is older than the files)"
            )


def _missing(
    out_dir: Path, segment: SegmentRow, entries: Mapping[str, os.stat_result], published: Collection[str]
) -> list[str]:
    if segment.file in entries or (not segment.closed and segment.size == 0):
        return []  # a segment named but not written to yet has no file (invariant 1)
    if segment.closed and segment.name in published:
        return []  # in the object store (invariant 4)
    return [
        f"{out_dir / segment.file}: missing, but the state holds {segment.items} images in it "
        "(repair forgets them, so that the next run fetches them again)"
    ]


def _sizes(out_dir: Path, segment: SegmentRow, st: os.stat_result | None) -> list[str]:
    """Invariants 2 to 4 for one segment whose file exists."""
    path = out_dir / segment.file
    on_disk = 0 if st is None else st.st_size
    if segment.closed:
        if segment.file == segment.name and on_disk != segment.size:
            return [f"{path}: {on_disk} bytes, but the state closed it at {segment.size}"]
        return []
    if on_disk < segment.size:
        return [
            f"{path}: holds {on_disk} bytes but the state committed {segment.size}: "
            "the file was truncated or replaced outside the harvest"
        ]
    if segment.size and _byte_at(path, segment.size - 1) != b"\n":
        return [f"{path}: the state's commit point (byte {segment.size}) is not the end of a line"]
    if on_disk > segment.size and _lines_from(path, segment.size) > MAX_APPEND_LINES:
        return [
            f"{path}: more than {MAX_APPEND_LINES} lines past the state's commit point "
            f"(byte {segment.size}), more than the one page an interrupted run leaves: "
            "the state is older than the file, or was lost"
        ]
    return []


def _byte_at(path: Path, offset: int) -> bytes:
    fd = open_nofollow(path, os.O_RDONLY)
    try:
        return os.pread(fd, 1, offset)
    finally:
        os.close(fd)


def _lines_from(path: Path, offset: int) -> int:
    """How many lines (a torn last one included) start at or after `offset`, counted up
    to MAX_APPEND_LINES + 1: past that the answer is the same."""
    fd = open_nofollow(path, os.O_RDONLY)
    lines, last = 0, b"\n"
    try:
        while lines <= MAX_APPEND_LINES and (chunk := os.pread(fd, _CHUNK, offset)):
            lines += chunk.count(b"\n")
            offset += len(chunk)
            last = chunk[-1:]
    finally:
        os.close(fd)
    return lines + (last != b"\n")
