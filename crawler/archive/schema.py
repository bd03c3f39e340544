"""The state's tables, versioned by SQLite's `PRAGMA user_version`, one migration per step.

`MIGRATIONS[n]` takes a state from version n to n + 1. `State.open` applies the
ones a file lacks, in order, each in its own transaction that also stamps the new
version, so a crash part way leaves the file at a whole version, never between two.
A migration only adds: it never drops or rewrites what an older step made.

Before versioning, states were left at user_version 0 with the meta key `schema`
set to "1". Step 1 is exactly how those tables were made ("IF NOT EXISTS"), so on
such a file it changes no table and only stamps version 1; on a new file it makes
them. Code from before versioning reads `meta.schema` and refuses anything but "1":
it stays "1" while later steps only add what that code can safely ignore.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]

LEGACY_SCHEMA = "1"  # meta `schema` of every state before user_version was used


def _v1_tables(conn: sqlite3.Connection) -> None:
    """Meta, shards, segments and seen ids: the state as first released."""
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute(
        """CREATE TABLE IF NOT EXISTS shards (
    key TEXT PRIMARY KEY,
    query TEXT NOT NULL,
    pass INTEGER NOT NULL,
    status TEXT NOT NULL,
    cursor TEXT,
    tail_cursor TEXT,
    items INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0,
    finished INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    updated REAL NOT NULL
)"""
    )
    conn.execute(
        """CREATE TABLE IF NOT EXISTS segments (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    items INTEGER NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0,
    file TEXT
)"""
    )
    conn.execute("CREATE TABLE IF NOT EXISTS seen (id INTEGER PRIMARY KEY) WITHOUT ROWID")
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (LEGACY_SCHEMA,))


def _v2_segment_steps(conn: sqlite3.Connection) -> None:
    """Which closed-segment steps (compress, ...) have completed, per segment.

    Starts empty: a compression done before this step is still told by
    `segments.file`, and the compress step records itself on the next start.
    """
    conn.execute(
        """CREATE TABLE segment_steps (
    segment TEXT NOT NULL,
    step TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (segment, step)
) WITHOUT ROWID"""
    )


def _v3_walks(conn: sqlite3.Connection) -> None:
    """What completeness needs: how deep each walk has gone (the server caps walks), whether a
    shard is walked from both ends and which ids each end has seen, the browsing levels served.

    New tables, not new columns: the first tables stay exactly as older code made them.
    """
    conn.execute(
        """CREATE TABLE walks (
    shard TEXT PRIMARY KEY,
    depth INTEGER NOT NULL DEFAULT 0,
    ends INTEGER NOT NULL DEFAULT 0,
    met INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID"""
    )
    conn.execute(
        "CREATE TABLE end_ids (shard TEXT NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (shard, id)) "
        "WITHOUT ROWID"
    )
    conn.execute(
        """CREATE TABLE shard_levels (
    shard TEXT NOT NULL,
    level INTEGER NOT NULL,
    served INTEGER NOT NULL,
    PRIMARY KEY (shard, level)
) WITHOUT ROWID"""
    )


def _v4_media(conn: sqlite3.Connection) -> None:
    """The media of every item: what was fetched (path, size, SHA-256, type), or why not.

    A row is made `fetching` before a download begins, so a crash between a file's
    rename and its record is found (and reconciled) by the next start.
    """
    conn.execute(
        """CREATE TABLE media (
    id INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    url TEXT NOT NULL,
    status TEXT NOT NULL,
    source TEXT,
    path TEXT,
    size INTEGER,
    sha256 TEXT,
    content_type TEXT,
    tries INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    updated REAL NOT NULL
)"""
    )
    conn.execute("CREATE INDEX media_status ON media (status)")


def _v5_refresh(conn: sqlite3.Connection) -> None:
    """What `harvest refresh` and the export need beyond ids: when each id was first seen and
    which shard's page wrote it; the observation segments (`refresh-NNNNNN.ndjson`) and their
    steps, kept apart from the item segments; the latest observation per id; the ids the open
    refresh pass has still to observe.

    New tables only, as in step 3: `seen` stays as the first step made it. An id seen before
    this step, or adopted by a repair, has no `first_seen` row (it counts as seen long ago).
    """
    conn.execute("CREATE TABLE first_seen (id INTEGER PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID")
    conn.execute(
        """CREATE TABLE runs (
    segment TEXT NOT NULL,
    first_line INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    shard TEXT NOT NULL,
    PRIMARY KEY (segment, first_line)
) WITHOUT ROWID"""
    )
    conn.execute(
        """CREATE TABLE refresh_segments (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    items INTEGER NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0,
    file TEXT
)"""
    )
    conn.execute(
        """CREATE TABLE refresh_steps (
    segment TEXT NOT NULL,
    step TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (segment, step)
) WITHOUT ROWID"""
    )
    conn.execute(
        """CREATE TABLE observed (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    pass INTEGER NOT NULL,
    gone INTEGER NOT NULL
) WITHOUT ROWID"""
    )
    conn.execute("CREATE TABLE refresh_todo (id INTEGER PRIMARY KEY) WITHOUT ROWID")


def _v6_published(conn: sqlite3.Connection) -> None:
    """What is in the object store (`[output] publish`): per closed segment or media file, the
    object's URL, size, ETag and SHA-256, and whether the local copy is still kept.

    A row is written only after the object is in the store and checked; `local` is set to 0
    before the local copy is deleted (keep_local = false), so a reader looks in the store
    whenever the local file is absent.
    """
    conn.execute(
        """CREATE TABLE published (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    file TEXT NOT NULL,
    url TEXT NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    local INTEGER NOT NULL DEFAULT 1,
    at REAL NOT NULL,
    PRIMARY KEY (kind, name)
) WITHOUT ROWID"""
    )


MIGRATIONS: tuple[Migration, ...] = (
    _v1_tables,
    _v2_segment_steps,
    _v3_walks,
    _v4_media,
    _v5_refresh,
    _v6_published,
)
LATEST = len(MIGRATIONS)  # the version this code reads and writes


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def legacy_schema(conn: sqlite3.Connection) -> str | None:
    """The meta `schema` value of a file from before versioning, if it has one."""
    has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
    if has_meta is None:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    return None if row is None else str(row[0])
