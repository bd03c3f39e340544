"""`harvest sql`: an embedded DuckDB over one output dir, no server.

Tables and views, current as of the call:

- `images`: the export's columns (`schema.SCHEMA`), typed from the committed lines
  of every segment, plain or compressed (never an uncommitted tail). They are kept
  as Parquet in `OUTPUT_DIR/sql-cache/`, an export brought up to date before each
  query (only lines committed since the last call are typed), so DuckDB scans
  Parquet: fast, in parallel, and in bounded memory;
- `media`: the media ledger (id, type, status, path, size, sha256, content_type, url,
  error): no rows until media is fetched; `images` takes its media_* from it, as it is now;
- `observations`: every observation of `harvest refresh`; `latest`: the latest one per id,
  which `images` joins (observed_at, gone, latest_stats, latest_nsfwLevel, latest_browsingLevel);
- `shards` and `segments`: the state's shards (query, status, cursor, counts,
  error) and segments (file, committed bytes and lines, closed).

The cache is brought up to date only for a query that names `images`, `observations`
or `latest` (`names_cached`); otherwise they are empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import orjson
import pyarrow as pa

from crawler.archive.state import State
from crawler.export import typed
from crawler.export.export import LATEST_DIR, OBSERVATIONS_DIR, export, media_table
from crawler.export.manifest import Manifest
from crawler.export.schema import OBSERVATION_SCHEMA, SCHEMA

TABLES = ("images", "media", "observations", "latest", "shards", "segments")
CACHE_DIR = "sql-cache"
_CACHED = re.compile(r"\b(images|observations|latest)\b", re.IGNORECASE)
# What `images` adds to the export's columns: the latest observation of the id (harvest refresh).
LATEST_COLUMNS = ("observed_at", "gone", "latest_stats", "latest_nsfwLevel", "latest_browsingLevel")


def names_images(query: str) -> bool:
    """Whether `query` can refer to `images`: any table reference spells the name."""
    return re.search(r"\bimages\b", query, re.IGNORECASE) is not None


def names_cached(query: str) -> bool:
    """Whether `query` can refer to a table kept in the cache (images, observations, latest)."""
    return _CACHED.search(query) is not None


def session(out_dir: Path, state: State, images: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB holding `TABLES` for the archive in `out_dir` (the cached ones empty
    unless asked)."""
    cache = _cache(out_dir, state) if images else _Cache([], [], None)
    con = typed.connect()
    try:
        _source(con, "_images", cache.images, SCHEMA)
        _source(con, "observations", cache.observations, OBSERVATION_SCHEMA)
        _source(con, "latest", [cache.latest] if cache.latest else [], OBSERVATION_SCHEMA)
        _create(con, "media", media_table(state))
        con.execute(_IMAGES_VIEW)
        _create(con, "shards", _shards(state))
        _create(con, "segments", _segments(state))
    except BaseException:
        con.close()
        raise
    return con


# The export's columns, media_* as the media ledger says now (not as when the line was cached),
# then the latest observation of the id.
_MEDIA = ("path", "size", "sha256", "content_type", "status")
_IMAGES_VIEW = (
    "CREATE VIEW images AS SELECT i.* EXCLUDE ({}), {}, l.observed_at AS observed_at, l.gone AS gone, "
    "l.stats AS latest_stats, l.nsfwLevel AS latest_nsfwLevel, l.browsingLevel AS latest_browsingLevel "
    "FROM _images i LEFT JOIN media m ON m.id = i.id LEFT JOIN latest l ON l.id = i.id"
).format(", ".join(f"media_{c}" for c in _MEDIA), ", ".join(f"m.{c} AS media_{c}" for c in _MEDIA))


@dataclass(frozen=True, slots=True)
class _Cache:
    images: list[Path]
    observations: list[Path]
    latest: Path | None


def _cache(out_dir: Path, state: State) -> _Cache:
    """The Parquet files of the cached tables, brought up to date (started over if they cannot be)."""
    folder = out_dir / CACHE_DIR
    export(out_dir, state, folder, "parquet", restart=True, wait=True)
    manifest = Manifest.load(folder)
    if manifest is None:
        return _Cache([], [], None)
    images = manifest.formats.get("parquet")
    seen = manifest.observations.get("parquet")
    latest = manifest.latest.get("parquet")
    return _Cache(
        [folder / f.name for f in images.files] if images else [],
        [folder / OBSERVATIONS_DIR / f.name for f in seen.files] if seen else [],
        folder / LATEST_DIR / latest.name if latest else None,
    )


def _source(con: duckdb.DuckDBPyConnection, name: str, files: list[Path], schema: pa.Schema) -> None:
    """A view over Parquet files, or an empty table of their schema when there are none."""
    if files:
        listed = ", ".join(_literal(str(f)) for f in files)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{listed}])")
    else:
        _create(con, name, schema.empty_table())


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _create(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
    con.register("_source", table)
    try:
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM _source")
    finally:
        con.unregister("_source")


def _cursor(value: object) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _shards(state: State) -> pa.Table:
    rows = state.shards()
    return pa.table(
        {
            "key": pa.array([s.key for s in rows], pa.string()),
            "query": pa.array([s.query for s in rows], pa.string()),
            "pass": pa.array([s.pass_no for s in rows], pa.int64()),
            "status": pa.array([s.status for s in rows], pa.string()),
            "cursor": pa.array([_cursor(s.cursor) for s in rows], pa.string()),
            "tail_cursor": pa.array([_cursor(s.tail_cursor) for s in rows], pa.string()),
            "items": pa.array([s.items for s in rows], pa.int64()),
            "pages": pa.array([s.pages for s in rows], pa.int64()),
            "finished": pa.array([s.finished for s in rows], pa.int64()),
            "error": pa.array([s.error for s in rows], pa.string()),
        }
    )


def _segments(state: State) -> pa.Table:
    rows = state.segments()
    return pa.table(
        {
            "name": pa.array([s.name for s in rows], pa.string()),
            "file": pa.array([s.file for s in rows], pa.string()),
            "bytes": pa.array([s.size for s in rows], pa.int64()),
            "items": pa.array([s.items for s in rows], pa.int64()),
            "closed": pa.array([s.closed for s in rows], pa.bool_()),
        }
    )
