"""`harvest sql`: an embedded DuckDB over one output dir, no server.

Tables, made afresh from the output dir on every call:

- `images`: the export's columns (`schema.SCHEMA`), typed from the committed lines
  of every segment, plain or compressed (never an uncommitted tail);
- `media`: downloaded media (id, path, size, sha256, content_type): no rows until
  media is downloaded;
- `shards` and `segments`: the state's shards (query, status, cursor, counts,
  error) and segments (file, committed bytes and lines, closed).

Filling `images` reads the whole archive (about as long as an export), so it is
filled only for a query that names it (`names_images`). A later `refresh` adds its
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
from crawler.export import lines, typed
from crawler.export.schema import MEDIA_SCHEMA, SCHEMA

TABLES = ("images", "media", "shards", "segments")


def names_images(query: str) -> bool:
    """Whether `query` can refer to `images`: any table reference spells the name."""
    return re.search(r"\bimages\b", query, re.IGNORECASE) is not None


def session(out_dir: Path, state: State, images: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB holding `TABLES` for the archive in `out_dir` (`images` if asked)."""
    con = typed.connect()
    try:
        # Without `images`, the table is there but empty: it keeps SHOW TABLES and DuckDB's
        # "did you mean" whole, and no query can read it without naming it.
        _create(con, "images", SCHEMA.empty_table())
        if images:
            for segment in state.segments():
                for block in lines.blocks(out_dir, state, segment, 0, 1):
                    _insert(con, "images", typed.rows(con, block))
        _create(con, "media", MEDIA_SCHEMA.empty_table())
        _create(con, "shards", _shards(state))
        _create(con, "segments", _segments(state))
    except BaseException:
        con.close()
        raise
    return con


def _create(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
    con.register("_source", table)
    try:
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM _source")
    finally:
        con.unregister("_source")


def _insert(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
    con.register("_source", table)
    try:
        con.execute(f"INSERT INTO {name} SELECT * FROM _source")
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
