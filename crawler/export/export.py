"""`harvest export`: the archive's committed images as typed Parquet (or gzipped JSON lines).

An export dir holds numbered files and `manifest.json`. A second export reads
only each segment's committed bytes past what the manifest says is exported and
writes them as new files; `full` writes everything again as new files, and the
old ones are removed once the new manifest is in place. Only committed lines are
read (never an uncommitted tail), so a harvest may run meanwhile: what it commits
later goes to the next export.

The observations of `harvest refresh` are exported beside the images in the same way
(their own files under `observations/`, their own marks over the refresh segments),
and `latest/latest.parquet` (or `.jsonl.gz`), the latest observation per id, is made again
from the last one and the new observations whenever there are new ones.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import duckdb
import pyarrow as pa
import pyarrow.json as pj

from crawler.archive.fs import PART_SUFFIX
from crawler.archive.observations import RefreshLedger
from crawler.archive.state import SegmentRow, State
from crawler.errors import ConfigError, LockedError, OutputError, StateError
from crawler.export import lines, typed
from crawler.export.files import PREFIX, Files, JsonLinesFiles, ParquetFiles, Written, file_number, strays
from crawler.export.manifest import Exported, Manifest, Mark
from crawler.export.options import DEFAULT_FILE_MB
from crawler.export.schema import MEDIA_SCHEMA, OBSERVATION_SCHEMA, RUNS_SCHEMA, SCHEMA, SCHEMA_VERSION

log = logging.getLogger("harvest")
T = TypeVar("T")

LOCK_FILE = ".export.lock"
OBSERVATIONS_DIR = "observations"  # every observation of `harvest refresh`: observations-NNNNNN.*
LATEST_DIR = "latest"  # the latest observation per id: one file per format, replaced by each export


def latest_names(suffix: str) -> tuple[str, str]:
    """The latest file's two names, used in turn, so the new file never overwrites the one the
    manifest lists: `latest.parquet` and `latest-next.parquet` (or `.jsonl.gz`)."""
    return f"latest{suffix}", f"latest-next{suffix}"


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
    observations: int = 0  # observation rows (harvest refresh) written by this export

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


@dataclass(frozen=True, slots=True)
class _Family:
    """One kind of exported rows: the images, or the observations of `harvest refresh`."""

    prefix: str  # of its file names
    sub: str  # its folder inside the export dir ("": the export dir itself)
    schema: pa.Schema


_IMAGES = _Family(PREFIX, "", SCHEMA)
_OBSERVED = _Family("observations-", OBSERVATIONS_DIR, OBSERVATION_SCHEMA)
_LATEST = _Family("latest", LATEST_DIR, OBSERVATION_SCHEMA)  # one file, named by `latest_names`


@dataclass(slots=True)
class _Plan:
    """What one family's export will do: its previous files, the marks kept, the parts to read."""

    family: _Family
    source: State
    previous: Exported
    done: Exported
    parts: list[tuple[SegmentRow, Mark]]

    @property
    def folder_names(self) -> set[str]:
        return {f.name for f in self.previous.files}


def _plan(family: _Family, source: State, exported: Exported | None, full: bool) -> _Plan:
    previous = exported or Exported(SCHEMA_VERSION)
    done = Exported(SCHEMA_VERSION) if full else previous
    parts = list(_new_parts(source.segments(), done.segments))  # refuses before anything is written
    return _Plan(family, source, previous, done, parts)


def _export(out_dir: Path, state: State, folder: Path, fmt: str, full: bool, file_mb: float) -> Result:
    manifest = _manifest(folder, out_dir, fmt, full)
    images = _plan(_IMAGES, state, manifest.formats.get(fmt), full)
    observed = _plan(_OBSERVED, state.sharing(RefreshLedger), manifest.observations.get(fmt), full)
    suffix = _suffix(fmt)
    for plan in (images, observed):
        _sweep(folder / plan.family.sub, suffix, plan.folder_names, plan.family.prefix)
    _sweep_latest(folder, set(manifest.latest.values()))
    # An export dir from before latest files were written in every format gets one now.
    latest_due = fmt not in manifest.latest and bool(observed.done.files)
    if not images.parts and not observed.parts and not full and fmt in manifest.formats and not latest_due:
        return Result(folder, fmt, full, (), 0, images.previous.rows, 0.0)  # nothing new: nothing changes
    media = media_table(state) if images.parts else None
    con = typed.connect(media)
    try:
        with_media = media is not None and len(media) > 0
        written = _write_family(out_dir, images, folder, fmt, file_mb, con, with_media)
        seen = _write_family(out_dir, observed, folder, fmt, file_mb, con)
        previous_latest = manifest.latest.get(fmt)
        latest = _latest(folder, fmt, observed, seen, previous_latest, con)
    finally:
        con.close()
    manifest.formats[fmt] = written
    manifest.observations[fmt] = seen
    if latest is not None:
        manifest.latest[fmt] = latest
    manifest.save(folder)
    if latest is not None and previous_latest is not None and previous_latest.name != latest.name:
        (folder / LATEST_DIR / previous_latest.name).unlink(missing_ok=True)  # replaced
    if full:
        _remove(folder, images.previous.files)
        _remove(folder / OBSERVATIONS_DIR, observed.previous.files)
    new_files = tuple(written.files[len(images.done.files) :])  # `done` keeps the files not replaced
    source_bytes = sum(segment.size - mark.bytes for segment, mark in images.parts)
    observations = sum(f.rows for f in seen.files[len(observed.done.files) :])
    return Result(folder, fmt, full, new_files, source_bytes, written.rows, 0.0, observations)


def _write_family(
    out_dir: Path,
    plan: _Plan,
    folder: Path,
    fmt: str,
    file_mb: float,
    con: duckdb.DuckDBPyConnection,
    media: bool = False,
) -> Exported:
    """The family's files after this export: those kept, and those written from its new parts."""
    if not plan.parts:
        return plan.done
    suffix = _suffix(fmt)
    numbers = [file_number(f.name, suffix, plan.family.prefix) or 0 for f in plan.previous.files]
    target = folder / plan.family.sub
    sink = _files(fmt, target, max(numbers, default=0) + 1, int(file_mb * 2**20), con, plan.family)
    try:
        marks = _write(out_dir, plan.source, plan.parts, plan.done.segments, sink, con, plan.family, media)
        written = sink.close()
    except BaseException:
        sink.abort()
        raise
    return Exported(SCHEMA_VERSION, [*plan.done.files, *written], marks, _utc_now())


def media_table(state: State) -> pa.Table:
    """The media ledger as rows of MEDIA_SCHEMA: what the rows' media_* come from."""
    return _table(state.media_table(), MEDIA_SCHEMA)


def _runs(state: State, segment: str) -> pa.Table:
    return _table(state.runs(segment), RUNS_SCHEMA)


def _table(rows: Sequence[Sequence[object]], schema: pa.Schema) -> pa.Table:
    columns = [[row[i] for row in rows] for i in range(len(schema))]
    return pa.table([pa.array(c, f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)


def _latest(
    folder: Path,
    fmt: str,
    plan: _Plan,
    exported: Exported,
    previous: Written | None,
    con: duckdb.DuckDBPyConnection,
) -> Written | None:
    """`latest/latest.parquet` (or `.jsonl.gz`): the latest observation per id, from the last one
    and what is new (everything, when the observations were exported again whole, or when there is
    no latest file yet)."""
    if not plan.parts and (previous is not None or not plan.done.files):
        return None
    kept = {f.name for f in plan.done.files}
    sources = [folder / OBSERVATIONS_DIR / f.name for f in exported.files if f.name not in kept]
    if plan.done.files and previous is not None:
        sources.append(folder / LATEST_DIR / previous.name)
    elif plan.done.files:
        sources += [folder / OBSERVATIONS_DIR / name for name in sorted(kept)]
    table = _latest_of(con, fmt, sources).cast(OBSERVATION_SCHEMA)
    first, other = latest_names(_suffix(fmt))
    name = first if previous is None or previous.name != first else other
    return _files(fmt, folder / LATEST_DIR, 0, 0, con, _LATEST).write_whole(name, table)


_LATEST_OF = (
    "SELECT * FROM {} "
    "QUALIFY row_number() OVER (PARTITION BY id ORDER BY pass DESC, observed_at DESC) = 1 ORDER BY id"
)


def _latest_of(con: duckdb.DuckDBPyConnection, fmt: str, sources: list[Path]) -> pa.Table:
    """The latest row per id of the observation files `sources` (of format `fmt`)."""
    if fmt == "parquet":
        listed = ", ".join("'" + str(p).replace("'", "''") + "'" for p in sources)
        return con.sql(_LATEST_OF.format(f"read_parquet([{listed}])")).to_arrow_table()
    con.register("_observed", pa.concat_tables([_json_lines(p) for p in sources]))
    try:
        return con.sql(_LATEST_OF.format("_observed")).to_arrow_table()
    finally:
        con.unregister("_observed")


def _write(
    out_dir: Path,
    state: State,
    parts: list[tuple[SegmentRow, Mark]],
    marks: dict[str, Mark],
    sink: Files,
    con: duckdb.DuckDBPyConnection,
    family: _Family = _IMAGES,
    media: bool = False,
) -> dict[str, Mark]:
    """The committed lines of each segment past its mark into `sink`; the new marks.

    Three stages overlap: a thread reads and splits the next block, DuckDB types this
    one (on every core), a thread writes the one before; each stage releases the GIL
    for its heavy part (decompressing, splitting, the query, Parquet encoding or gzip).
    """

    def blocks() -> Iterator[lines.Block]:
        for segment, mark in parts:
            yield from lines.blocks(out_dir, state, segment, mark.bytes, mark.lines + 1)

    runs: dict[str, pa.Table] = {}

    def typed_rows(block: lines.Block) -> pa.Table:
        if family is _OBSERVED:
            return typed.observation_rows(con, block)
        if block.segment not in runs:
            runs.clear()
            runs[block.segment] = _runs(state, block.segment)
        return typed.rows(con, block, runs[block.segment], media)

    counts: Counter[str] = Counter()
    with ThreadPoolExecutor(1, "export-read") as reader, ThreadPoolExecutor(1, "export-write") as writer:
        pending: Future[None] | None = None
        for block in _ahead(blocks(), reader):
            batch = sink.prepare(typed_rows(block))
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


def _files(
    fmt: str, folder: Path, first: int, max_bytes: int, con: duckdb.DuckDBPyConnection, family: _Family
) -> Files:
    if fmt == "parquet":
        return ParquetFiles(folder, first, max_bytes, family.schema, family.prefix)
    return JsonLinesFiles(folder, first, max_bytes, con, family.schema, family.prefix)


def _suffix(fmt: str) -> str:
    return {"parquet": ParquetFiles.suffix, "jsonl.gz": JsonLinesFiles.suffix}[fmt]


def _json_lines(path: Path) -> pa.Table:
    """One of our own gzipped JSON lines files of observations, read back typed: their schema is
    fixed, so pyarrow's reader (which fails a block on one mistyped value) is the right tool here."""
    options = pj.ParseOptions(explicit_schema=OBSERVATION_SCHEMA, unexpected_field_behavior="error")
    try:
        return pj.read_json(pa.input_stream(str(path), compression="gzip"), parse_options=options)
    except (OSError, pa.ArrowInvalid) as exc:
        raise StateError(f"{path}: cannot read it back ({exc}); export again with --full") from None


def _sweep(folder: Path, suffix: str, listed: set[str], prefix: str = PREFIX) -> None:
    """Remove what an interrupted export left: files the manifest does not list."""
    for path in strays(folder, suffix, listed, prefix):
        log.info("export: removing %s (left by an interrupted export)", path.name)
        path.unlink(missing_ok=True)


def _sweep_latest(folder: Path, listed: set[Written]) -> None:
    """The latest files the manifest does not list (the one it replaced, or a `.part`)."""
    keep = {f.name for f in listed}
    target = folder / LATEST_DIR
    for name in (*latest_names(ParquetFiles.suffix), *latest_names(JsonLinesFiles.suffix)):
        for path in (target / name, target / (name + PART_SUFFIX)):
            if path.name not in keep and path.exists():
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
