"""`harvest repair`: rebuild the state from the segment files themselves.

For when the state and the files disagree (`agreement`): the state was lost or an
older copy put back, a segment was deleted or cut outside the harvest. The files
are the archive; the rebuilt state describes exactly them:

- every segment file is read through: its ids, its size and its line count are
  recorded. A compressed segment, and every segment but the last, is closed; the
  last plain one stays active unless it is full. Where a segment has both a plain
  and a compressed file (a compression a crash interrupted) the plain one is used;
- a torn last line of the last plain segment (no newline: a write cut short) is
  cut. A complete line is never removed;
- cursors cannot be recovered: the rebuilt state has no shards, so the next run
  walks every shard from its head, and the id index keeps each image once. The
  images of a segment that is gone are forgotten: the next run fetches them again;
- closed-segment steps are not recorded, so the next run repeats them (each is
  safe to repeat);
- the observation segments of `harvest refresh` (`refresh-NNNNNN.ndjson`) are read the
  same way and adopted as what they are: their sizes and lines, and the latest observation
  per id; the refresh pass a crash interrupted is closed (the next refresh opens a new one).
  The first sight of each id is not in the files: every id counts as due for a refresh.

Nothing changes unless every file reads whole: a damaged compressed file, a line
that is not an image with an integer id, or an id held twice stops the repair,
naming the file. The new state is built in a folder aside and renamed into place;
the old one is kept as `harvest.sqlite.bak-<timestamp>` (with its -wal and -shm).
A crash part way leaves either the old state, or none (the next run then refuses
and points here again), never a half-built one.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crawler.archive import agreement
from crawler.archive.checkpoint import ArchiveSpec, segment_full
from crawler.archive.fs import fsync_dir, open_nofollow, refuse_symlink
from crawler.archive.observations import RefreshLedger
from crawler.archive.reader import Line, loads, segment_lines
from crawler.archive.segments import IMAGES, OBSERVATIONS, SegmentKind
from crawler.archive.state import STATE_FILE, Kind, SegmentRow, State
from crawler.errors import HarvestError, StateError

WORK_DIR = ".harvest-repair"  # where the new state is built before it replaces the old
_STATE_FILES = ("", "-wal", "-shm", "-journal")  # a state is its file and SQLite's companions
_ID_RANGE = range(-(2**63), 2**63)  # what the id index (an SQLite INTEGER) holds


@dataclass(frozen=True, slots=True)
class Found:
    """One segment as its file holds it."""

    row: SegmentRow
    ids: list[int]
    torn: int  # bytes of a torn last line, cut by the repair (the last plain segment only)
    latest: dict[int, tuple[float, int, bool]] | None = None  # observations: id -> (at, pass, gone)


@dataclass(frozen=True, slots=True)
class Repair:
    """What `repair` found and did."""

    segments: tuple[SegmentRow, ...]
    images: int
    cut: tuple[str, int] | None  # the file whose torn last line was cut, and its bytes
    forgotten: tuple[str, ...]  # what the old state held that no file holds now, a line each
    ignored: tuple[str, ...]  # files left as they are (a compressed twin of a plain segment)
    old_images: int | None  # images the old state knew of; None when it could not be read
    backup: Path | None  # where the old state was kept


def repair(out_dir: Path, spec: ArchiveSpec) -> Repair:
    """Rebuild `out_dir`'s state from its segment files; see the module doc."""
    _refuse_published(out_dir)
    files = _segment_files(out_dir)
    found = [_read(out_dir, f, n == len(files) - 1, spec) for n, f in enumerate(files)]
    seen_files = _segment_files(out_dir, OBSERVATIONS)
    seen = [_read(out_dir, f, n == len(seen_files) - 1, spec, OBSERVATIONS) for n, f in enumerate(seen_files)]
    old = _old_state(out_dir)
    _build(out_dir, found, seen)
    backup = _set_aside(out_dir)
    _swap_in(out_dir)
    cut = _cut_torn(out_dir, found[-1]) if found and found[-1].torn else None
    if seen and seen[-1].torn:
        _cut_torn(out_dir, seen[-1])
    return Repair(
        segments=tuple(f.row for f in found),
        images=sum(f.row.items for f in found),
        cut=cut,
        forgotten=tuple(_forgotten(old[0], found)) if old else (),
        ignored=tuple(twin for f in files for twin in f.twins),
        old_images=old[1] if old else None,
        backup=backup,
    )


@dataclass(frozen=True, slots=True)
class _Files:
    """A segment's files: the one read, and any other form of it (left as it is)."""

    read: str
    twins: tuple[str, ...]


_PREFERENCE = ("", ".zst", ".gz")  # plain first: it is whole whenever it is there


def _segment_files(out_dir: Path, kind: SegmentKind = IMAGES) -> list[_Files]:
    """Each segment's files, in segment order."""
    by_number: dict[int, list[str]] = {}
    for name in agreement.segment_entries(out_dir, kind):  # a symlink among them is refused
        by_number.setdefault(kind.number(name), []).append(name)
    files = []
    for number in sorted(by_number):
        ranked = sorted(by_number[number], key=lambda n: _PREFERENCE.index(_suffix(n, kind)))
        files.append(_Files(ranked[0], tuple(ranked[1:])))
    return files


def _suffix(name: str, kind: SegmentKind) -> str:
    match = kind.pattern.fullmatch(name)
    return (match.group(2) if match else None) or ""


def _read(out_dir: Path, files: _Files, last: bool, spec: ArchiveSpec, kind: SegmentKind = IMAGES) -> Found:
    """One segment file read through: its ids, size and lines; StateError naming it if damaged."""
    file = files.read
    name = kind.name(kind.number(file))
    plain = file == name
    ids: list[int] = []
    latest: dict[int, tuple[float, int, bool]] | None = {} if kind is OBSERVATIONS else None
    size = torn = 0
    line_count = 0
    for line in segment_lines(out_dir, SegmentRow(name, 0, 0, True, file)):
        if not line.data.endswith(b"\n"):  # only ever the last line
            if not (last and plain):
                raise StateError(f"{out_dir / file}:{line.number}: torn line (no newline)")
            torn = len(line.data)
            break
        if latest is None:
            ids.append(_image_id(out_dir / file, line))
        else:
            _observation(out_dir / file, line, latest)
        size += len(line.data)
        line_count += 1
    twice = _first_twice(ids)
    if twice is not None:
        raise StateError(f"{out_dir / file}: holds id {twice} twice")
    lines = len(ids) if latest is None else line_count
    # Closed unless it is the last, plain, not full, and was never compressed.
    closed = not plain or bool(files.twins) or not last or segment_full(spec, lines, size)
    return Found(SegmentRow(name, size, lines, closed, file), ids, torn, latest)


def _image_id(path: Path, line: Line) -> int:
    try:
        item = loads(line.data)
    except ValueError:
        raise StateError(f"{path}:{line.number}: not JSON") from None
    image_id = item.get("id") if isinstance(item, dict) else None
    if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id not in _ID_RANGE:
        raise StateError(f"{path}:{line.number}: no integer id the archive can hold")
    return image_id


def _observation(path: Path, line: Line, latest: dict[int, tuple[float, int, bool]]) -> None:
    """One observation line into `latest` (id -> when, pass, gone), the latest kept."""
    image_id = _image_id(path, line)
    item = loads(line.data)
    try:
        at = dt.datetime.fromisoformat(str(item["observed_at"])).timestamp()
        pass_no, gone = int(item["pass"]), bool(item["gone"])
    except (KeyError, TypeError, ValueError):
        raise StateError(f"{path}:{line.number}: not an observation (id, observed_at, pass, gone)") from None
    if image_id not in latest or latest[image_id][:2] <= (at, pass_no):
        latest[image_id] = (at, pass_no, gone)


def _first_twice(ids: Sequence[int]) -> int | None:
    seen: set[int] = set()
    for image_id in ids:
        if image_id in seen:
            return image_id
        seen.add(image_id)
    return None


def _refuse_published(out_dir: Path) -> None:
    """Repair reads local files only: a state whose segments live only in the object store
    (`keep_local = false`) would lose them, and the next run would publish their images again."""
    if not (out_dir / STATE_FILE).exists():
        return
    try:
        with State.open(out_dir, create=False) as old:
            remote = [p.file for p in old.publications(Kind.SEGMENT).values() if not p.local]
    except HarvestError:
        return
    if remote:
        raise StateError(
            f"{out_dir}: {len(remote)} segment(s) ({remote[0]}, ...) live only in the object store; "
            "repair reads local files only: download them into the output dir first"
        )


def _old_state(out_dir: Path) -> tuple[list[SegmentRow], int] | None:
    """What the state being replaced held, for the report; None if there is none, or it is unreadable."""
    if not (out_dir / STATE_FILE).exists():
        return None
    try:
        with State.open(out_dir, create=False) as old:
            return old.segments(), old.seen_count()
    except HarvestError:
        return None


def _forgotten(old: Sequence[SegmentRow], found: Sequence[Found]) -> list[str]:
    held = {f.row.name: f.row.items for f in found}
    lines = []
    for segment in old:
        now = held.get(segment.name, 0)
        if now < segment.items:
            where = "its file is gone" if segment.name not in held else f"its file holds {now}"
            lines.append(
                f"{segment.file}: the old state held {segment.items} images, {where}: "
                f"{segment.items - now} forgotten (the next run fetches them again)"
            )
    return lines


def _build(out_dir: Path, found: Sequence[Found], seen: Sequence[Found] = ()) -> None:
    """The new state, in WORK_DIR; a StateError (nothing changed) if an id is held twice."""
    work = out_dir / WORK_DIR
    refuse_symlink(work)
    shutil.rmtree(work, ignore_errors=True)  # what an interrupted repair left
    try:
        with State.open(work) as new:
            for segment in found:
                twice = new.known_ids(segment.ids)
                if twice:
                    raise StateError(
                        f"{out_dir / segment.row.file}: id {min(twice)} is also in an earlier segment"
                    )
                new.adopt_segment(segment.row, segment.ids)
            _adopt_observations(new.sharing(RefreshLedger), seen)
        if (work / (STATE_FILE + "-wal")).exists():  # closing folds the log into the file
            raise StateError(f"{work}: the new state was not closed cleanly; nothing was changed")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _adopt_observations(ledger: RefreshLedger, seen: Sequence[Found]) -> None:
    latest: dict[int, tuple[float, int, bool]] = {}
    for segment in seen:
        ledger.adopt_segment(segment.row, ())
        for image_id, value in (segment.latest or {}).items():
            if image_id not in latest or latest[image_id][:2] <= value[:2]:
                latest[image_id] = value
    if seen:
        last_pass = max((p for _, p, _ in latest.values()), default=0)
        ledger.adopt_observed(((i, at, p, g) for i, (at, p, g) in latest.items()), last_pass)


def _set_aside(out_dir: Path) -> Path | None:
    """Keep the old state (and SQLite's companion files) under a name of its own."""
    present = [s for s in _STATE_FILES if os.path.lexists(out_dir / (STATE_FILE + s))]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    backup, n = out_dir / f"{STATE_FILE}.bak-{stamp}", 1
    while any(os.path.lexists(f"{backup}{s}") for s in _STATE_FILES):
        n += 1
        backup = out_dir / f"{STATE_FILE}.bak-{stamp}-{n}"
    for suffix in present:  # renamed as a set: SQLite finds a file's log by its name
        os.replace(out_dir / (STATE_FILE + suffix), f"{backup}{suffix}")
    fsync_dir(out_dir)
    return backup


def _swap_in(out_dir: Path) -> None:
    work = out_dir / WORK_DIR
    os.replace(work / STATE_FILE, out_dir / STATE_FILE)
    fsync_dir(out_dir)
    shutil.rmtree(work)


def _cut_torn(out_dir: Path, last: Found) -> tuple[str, int]:
    """Cut the torn last line: after the new state, so a crash first leaves it to the next run."""
    fd = open_nofollow(out_dir / last.row.file, os.O_WRONLY)
    try:
        os.ftruncate(fd, last.row.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return last.row.file, last.torn
