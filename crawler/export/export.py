"""`harvest export`: the archive's committed images as typed Parquet (or gzipped JSON lines).

An export dir holds numbered files and `manifest.json`. A second export reads
only each segment's committed bytes past what the manifest says is exported and
writes them as new files; `full` writes everything again as new files, and the
old ones are removed once the new manifest is in place. Only committed lines are
read (never an uncommitted tail), so a harvest may run meanwhile: what it commits
later goes to the next export.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import duckdb

from crawler.archive.state import SegmentRow, State
from crawler.errors import ConfigError, LockedError, OutputError, StateError
from crawler.export import lines, typed
from crawler.export.files import Files, JsonLinesFiles, ParquetFiles, Written, file_number, strays
from crawler.export.manifest import Exported, Manifest, Mark
from crawler.export.options import DEFAULT_FILE_MB
from crawler.export.schema import SCHEMA_VERSION

log = logging.getLogger("harvest")
T = TypeVar("T")

LOCK_FILE = ".export.lock"


@dataclass(frozen=True, slots=True)
class Result:
    """What one export did."""

    folder: Path
    format: str
    full: bool
    files: tuple[Written, ...]  # written by this export
    source_bytes: int  # bytes of the NDJSON lines they hold
    total_rows: int  # rows in the whole export now
    seconds: float

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


class StaleExport(ConfigError):
    """The export dir cannot be continued: another archive's, another schema's, or the archive
    was rebuilt since. `--full` starts it over."""


def export(
    out_dir: Path,
    state: State,
    folder: Path,
    fmt: str = "parquet",
    *,
    full: bool = False,
    restart: bool = False,
    wait: bool = False,
    file_mb: float = DEFAULT_FILE_MB,
    clock: Callable[[], float] = time.monotonic,
) -> Result:
    """Export what is new in `out_dir`'s archive (everything with `full`) into `folder`.

    `restart`: an export dir that cannot be continued is started over (as with `full`)
    instead of refused. `wait`: wait for another export into `folder` instead of refusing.
    """
    started = clock()
    with _Lock(folder, wait):
        try:
            result = _export(out_dir, state, folder, fmt, full, file_mb)
        except StaleExport as exc:
            if not restart or full:
                raise
            log.info("export: %s; starting it over", exc)
            result = _export(out_dir, state, folder, fmt, True, file_mb)
    return replace(result, seconds=clock() - started)


def _export(out_dir: Path, state: State, folder: Path, fmt: str, full: bool, file_mb: float) -> Result:
    manifest = _manifest(folder, out_dir, fmt, full)
    previous = manifest.formats.get(fmt, Exported(SCHEMA_VERSION))
    done = Exported(SCHEMA_VERSION) if full else previous
    parts = list(_new_parts(state.segments(), done.segments))  # refuses before anything is written
    suffix = _suffix(fmt)
    _sweep(folder, suffix, {f.name for f in previous.files})
    if not parts and not full and fmt in manifest.formats:
        return Result(folder, fmt, full, (), 0, previous.rows, 0.0)  # nothing new: nothing changes
    con = typed.connect()
    numbers = [file_number(f.name, suffix) or 0 for f in previous.files]
    sink = _files(fmt, folder, max(numbers, default=0) + 1, int(file_mb * 2**20), con)
    try:
        marks = _write(out_dir, state, parts, done.segments, sink, con)
        written = sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        con.close()
    now = Exported(SCHEMA_VERSION, [*done.files, *written], marks, _utc_now())
    manifest.formats[fmt] = now
    manifest.save(folder)
    if full:
        _remove(folder, previous.files)
    source_bytes = sum(segment.size - mark.bytes for segment, mark in parts)
    return Result(folder, fmt, full, tuple(written), source_bytes, now.rows, 0.0)


def _write(
    out_dir: Path,
    state: State,
    parts: list[tuple[SegmentRow, Mark]],
    marks: dict[str, Mark],
    sink: Files,
    con: duckdb.DuckDBPyConnection,
) -> dict[str, Mark]:
    """The committed lines of each segment past its mark into `sink`; the new marks.

    Three stages overlap: a thread reads and splits the next block, DuckDB types this
    one (on every core), a thread writes the one before; each stage releases the GIL
    for its heavy part (decompressing, splitting, the query, Parquet encoding or gzip).
    """

    def blocks() -> Iterator[lines.Block]:
        for segment, mark in parts:
            yield from lines.blocks(out_dir, state, segment, mark.bytes, mark.lines + 1)

    counts: Counter[str] = Counter()
    with ThreadPoolExecutor(1, "export-read") as reader, ThreadPoolExecutor(1, "export-write") as writer:
        pending: Future[None] | None = None
        for block in _ahead(blocks(), reader):
            batch = sink.prepare(typed.rows(con, block))
            if pending is not None:
                pending.result()  # in order, and its error surfaces here
            pending = writer.submit(sink.write, batch)
            counts[block.segment] += len(block)
        if pending is not None:
            pending.result()
    marks = dict(marks)
    for segment, mark in parts:
        log.debug("export: %s: lines %d-%d", segment.name, mark.lines + 1, mark.lines + counts[segment.name])
        marks[segment.name] = Mark(segment.size, mark.lines + counts[segment.name])
    return marks


def _ahead(items: Iterator[T], pool: ThreadPoolExecutor) -> Iterator[T]:
    """`items`, each one made in `pool` while the caller works on the one before."""
    end = object()
    future = pool.submit(next, items, end)
    while (item := future.result()) is not end:
        future = pool.submit(next, items, end)
        yield item  # type: ignore[misc]


def _new_parts(segments: list[SegmentRow], marks: dict[str, Mark]) -> Iterator[tuple[SegmentRow, Mark]]:
    for segment in segments:
        mark = marks.get(segment.name, Mark(0, 0))
        if segment.size < mark.bytes:
            raise StaleExport(
                f"{segment.name}: the archive commits {segment.size} bytes of it, the export holds "
                f"{mark.bytes}: the archive was rebuilt since; export again with --full"
            )
        if segment.size > mark.bytes:
            yield segment, mark


def _manifest(folder: Path, out_dir: Path, fmt: str, full: bool) -> Manifest:
    source = str(out_dir.resolve())
    try:
        manifest = Manifest.load(folder)
    except StateError:
        if not full:
            raise
        manifest = None  # replaced whole: its files are swept as strays
    if manifest is None:
        return Manifest(source)
    if manifest.source != source:
        if not full:
            raise StaleExport(
                f"{folder}: holds an export of {manifest.source}, not of {source}; "
                "choose another --to, or replace it with --full"
            )
        return Manifest(source, {})
    previous = manifest.formats.get(fmt)
    if previous is not None and previous.schema_version != SCHEMA_VERSION and not full:
        raise StaleExport(
            f"{folder}: its {fmt} files have schema version {previous.schema_version}, this harvest "
            f"writes version {SCHEMA_VERSION}; export again with --full"
        )
    return manifest


def _files(fmt: str, folder: Path, first: int, max_bytes: int, con: duckdb.DuckDBPyConnection) -> Files:
    if fmt == "parquet":
        return ParquetFiles(folder, first, max_bytes)
    return JsonLinesFiles(folder, first, max_bytes, con)


def _suffix(fmt: str) -> str:
    return {"parquet": ParquetFiles.suffix, "jsonl.gz": JsonLinesFiles.suffix}[fmt]


def _sweep(folder: Path, suffix: str, listed: set[str]) -> None:
    """Remove what an interrupted export left: files the manifest does not list."""
    for path in strays(folder, suffix, listed):
        log.info("export: removing %s (left by an interrupted export)", path.name)
        path.unlink(missing_ok=True)


def _remove(folder: Path, files: list[Written]) -> None:
    for f in files:
        (folder / f.name).unlink(missing_ok=True)


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class _Lock:
    """One export per export dir at a time (an flock: a killed export never leaves it held)."""

    def __init__(self, folder: Path, wait: bool) -> None:
        self._folder, self._wait = folder, wait
        self._fd = -1

    def __enter__(self) -> None:
        try:
            self._folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{self._folder}: cannot export here: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if self._wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self._fd)
            raise LockedError(f"{self._folder}: another export is writing to this dir") from None

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)
