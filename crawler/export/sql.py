"""`harvest sql`: an embedded DuckDB over one output dir, no server.

Tables and views, current as of the call:

- `images`: the export's columns (`schema.SCHEMA`), typed from the committed lines
  of every segment, plain or compressed (never an uncommitted tail). They are kept
  as Parquet in `OUTPUT_DIR/sql-cache/`, an export brought up to date before each
  query (only lines committed since the last call are typed), so DuckDB scans
  Parquet: fast, in parallel, and in bounded memory;
- `media`: downloaded media (id, path, size, sha256, content_type): no rows until
  media is downloaded;
- `shards` and `segments`: the state's shards (query, status, cursor, counts,
  error) and segments (file, committed bytes and lines, closed).

The cache is brought up to date only for a query that names `images`
(`names_images`); otherwise `images` is an empty table. A later `refresh` adds its
observations as one more table here, joined to `images` by `id` (latest
observation per id).
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import orjson
import pyarrow as pa

from crawler.archive.state import State
from crawler.export import typed
from crawler.export.export import export
from crawler.export.manifest import Manifest
from crawler.export.schema import MEDIA_SCHEMA, SCHEMA

TABLES = ("images", "media", "shards", "segments")
CACHE_DIR = "sql-cache"


def names_images(query: str) -> bool:
    """Whether `query` can refer to `images`: any table reference spells the name."""
    return re.search(r"\bimages\b", query, re.IGNORECASE) is not None


def session(out_dir: Path, state: State, images: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB holding `TABLES` for the archive in `out_dir` (`images` empty unless asked)."""
    files = _cache(out_dir, state) if images else []
    con = typed.connect()
    try:
        if files:
            listed = ", ".join(_literal(str(f)) for f in files)
            con.execute(f"CREATE VIEW images AS SELECT * FROM read_parquet([{listed}])")
        else:
            _create(con, "images", SCHEMA.empty_table())
        _create(con, "media", MEDIA_SCHEMA.empty_table())
        _create(con, "shards", _shards(state))
        _create(con, "segments", _segments(state))
    except BaseException:
        con.close()
        raise
    return con


def _cache(out_dir: Path, state: State) -> list[Path]:
    """The Parquet files of `images`, brought up to date (started over if they cannot be)."""
    folder = out_dir / CACHE_DIR
    export(out_dir, state, folder, "parquet", restart=True, wait=True)
    manifest = Manifest.load(folder)
    exported = manifest.formats.get("parquet") if manifest else None
    return [folder / f.name for f in exported.files] if exported else []


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
