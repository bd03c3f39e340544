"""The harvest's durable state: one SQLite file per output dir.

It holds every shard's cursor, the output segments' committed sizes and the ids
already written, and changes them together in one transaction per page. That
transaction is the commit point of exactly-once: lines written to a segment
before it are cut away on the next start if it never happened.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar

import orjson

from crawler.archive import schema
from crawler.archive.fs import diagnose_write_failure, refuse_symlink
from crawler.errors import StateError

STATE_FILE = "harvest.sqlite"
_S = TypeVar("_S", bound="State")
Cursor = str | int


class ShardStatus:
    """A shard's place in the current pass."""

    PENDING = "pending"  # not fetched yet in this pass
    ACTIVE = "active"  # walked part way; `cursor` is the next page
    DONE = "done"  # walked to the end in this pass
    FAILED = "failed"  # stopped on an error; a rerun resumes from `cursor`
    SPLIT = "split"  # timed out or capped; walked as child shards that cover it exactly, for good
    CAPPED = "capped"  # walked to the server's walk cap, from both ends, and more exist between

    FINISHED = frozenset({DONE, CAPPED})  # nothing more to do in this pass


@dataclass(frozen=True, slots=True)
class ShardRow:
    """One shard as the state knows it."""

    key: str
    query: str
    pass_no: int
    status: str
    cursor: Cursor | None
    tail_cursor: Cursor | None
    items: int
    pages: int
    finished: int  # walks that reached the end, over all passes
    error: str | None
    depth: int = 0  # positions the current walk has gone into its query
    ends: bool = False  # walked from both ends (newest and oldest first) until they meet
    met: bool = False  # ... and they did: nothing between them is out of reach


@dataclass(frozen=True, slots=True)
class SegmentRow:
    """One output segment: how much of it is committed, and where it lives now."""

    name: str  # images-NNNNNN.ndjson: the name it was written under
    size: int  # committed bytes of the uncompressed lines
    items: int
    closed: bool  # no line is appended any more; may be compressed
    file: str  # the file on disk: `name`, or its compressed form once that is complete


@dataclass(frozen=True, slots=True)
class PageCommit:
    """Everything one page changes, applied in a single transaction."""

    shard_key: str
    segment: str
    segment_size: int
    new_ids: Sequence[int]
    next_cursor: Cursor | None
    page_cursor: Cursor | None
    depth: int = 0  # positions the walk has gone into its query after this page
    capped: bool = False  # with no next cursor: the walk stopped at the server's cap, not the end
    levels: Mapping[int, int] = field(default_factory=dict)  # images served on the page, by level
    walked_ids: Sequence[int] = ()  # every id on the page, for a shard walked from both ends
    met: str | None = None  # the other end's shard, when this page reached what it walked


class Kind:
    """What a published object is (the `published` table's `kind`)."""

    SEGMENT = "segment"  # `name`: the segment's name
    MEDIA = "media"  # `name`: the item's id


@dataclass(frozen=True, slots=True)
class Publication:
    """One object in the store, recorded once it was there and checked."""

    kind: str
    name: str
    file: str  # what was uploaded: the segment's file, or the media file's path in the media dir
    url: str  # s3://bucket/key
    size: int
    etag: str
    sha256: str
    local: bool = True  # the local copy is kept (false: deleted, or about to be)


# The files SQLite opens for a state: it follows symlinks, so each is checked first.
_SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def _connect(out_dir: Path, path: Path) -> sqlite3.Connection:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for suffix in _SQLITE_SUFFIXES:
            refuse_symlink(path.with_name(path.name + suffix))
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per page.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise StateError(f"{path}: cannot open harvest state: {exc}") from None
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL, not FULL: a commit survives the process at once and the disk at the
        # next checkpoint. FULL would sync the WAL on every page and halve the
        # throughput (make bench, scenario 1: 0.72x the baseline against 1.28x). The
        # price: after a power cut the segments may hold more than the one page past
        # the commit that a crash leaves, so the next run refuses (`agreement`) and
        # `harvest repair` rebuilds the state from the fsynced lines; nothing is lost.
        conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as exc:
        conn.close()
        raise StateError(f"{path}: cannot open harvest state: {exc}") from None
    return conn


def _dump_cursor(cursor: Cursor | None) -> str | None:
    return None if cursor is None else orjson.dumps(cursor).decode()


def _load_cursor(text: str | None) -> Cursor | None:
    return None if text is None else orjson.loads(text)


class State:
    """The SQLite store of one output dir. Not thread-safe: one user at a time."""

    # The tables of the segments this object writes and their closed-segment steps: the item
    # segments here; `RefreshLedger` names the observation segments' own tables instead.
    _SEGMENTS = "segments"
    _STEPS = "segment_steps"

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, out_dir: Path, *, create: bool = True) -> Self:
        """Open (or create) the state of `out_dir`, migrated to the version this code reads.

        Use it as a context manager (`with State.open(dir) as state:`) or `close()` it.
        """
        path = out_dir / STATE_FILE
        if not create and not path.exists():
            raise StateError(f"{out_dir}: no harvest state here yet (run `harvest run` first)")
        state = cls(_connect(out_dir, path), path)
        try:
            state._migrate()
        except sqlite3.Error as exc:
            state.close()
            raise StateError(f"{path}: cannot open harvest state: {exc}") from None
        except BaseException:
            state.close()
            raise
        return state

    def sharing(self, cls: type[_S]) -> _S:
        """This state's connection seen through another of its ledgers (`RefreshLedger`, ...);
        closing either closes both."""
        return cls(self._conn, self.path)

    def runs(self, segment: str) -> list[tuple[int, int, str, str]]:
        """Which shard wrote which lines of `segment`: (first line, lines, shard, query), in line
        order. Lines written before state version 5, or adopted by a repair, have none."""
        rows = self._conn.execute(
            "SELECT first_line, lines, shard, COALESCE(shards.query, '') FROM runs "
            "LEFT JOIN shards ON shards.key = runs.shard WHERE segment=? ORDER BY first_line",
            (segment,),
        )
        return [(int(a), int(b), str(c), str(d)) for a, b, c, d in rows]

    def media_table(self) -> list[tuple[object, ...]]:
        """Every row of the media ledger: id, type, status, path, size, sha256, content_type, url, error."""
        query = "SELECT id, type, status, path, size, sha256, content_type, url, error FROM media ORDER BY id"
        return self._conn.execute(query).fetchall()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def _migrate(self) -> None:
        """Bring the file to `schema.LATEST`, one step per transaction; refuse a newer file."""
        found = schema.user_version(self._conn)
        if found > schema.LATEST:
            raise StateError(
                f"{self.path}: state version {found} is newer than this harvest reads "
                f"(version {schema.LATEST}); use the harvest that wrote it, or a newer one"
            )
        legacy = schema.legacy_schema(self._conn) if found == 0 else None
        if legacy not in (None, schema.LEGACY_SCHEMA):
            raise StateError(f"{self.path}: state schema {legacy}, this harvest reads {schema.LEGACY_SCHEMA}")
        for version in range(found, schema.LATEST):
            with self._transaction():
                if schema.user_version(self._conn) != version:
                    continue  # another process opening the same file took this step first
                schema.MIGRATIONS[version](self._conn)
                self._conn.execute(f"PRAGMA user_version = {version + 1}")

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- passes ---------------------------------------------------------------

    def begin_pass(self, shards: Iterable[tuple[str, str]]) -> int:
        """Register the run's shards and return the pass they belong to.

        A pass is one walk of every shard. While the last one is unfinished a
        run resumes it (done shards stay done); once it finished, the next run
        opens a new pass in which every shard walks again.
        """
        pass_no = int(self.get_meta("pass") or 0)
        with self._transaction():
            if self.get_meta("pass_open") != "1":
                pass_no += 1
                self.set_meta("pass", str(pass_no))
                self.set_meta("pass_open", "1")
            for key, query in shards:
                self._enrol(key, query, pass_no)
        return pass_no

    def enrol(self, shards: Iterable[tuple[str, str]], *, ends: bool = False) -> None:
        """Add shards found after the pass began (the children of a split, the ends of a walk)."""
        pass_no = int(self.get_meta("pass") or 0)
        with self._transaction():
            for key, query in shards:
                self._enrol(key, query, pass_no, ends=ends)

    def record_split(self, key: str, children: Iterable[tuple[str, str]], *, ends: bool = False) -> None:
        """Mark `key` split and enrol its children (walked from both ends, with `ends`), at once."""
        pass_no = int(self.get_meta("pass") or 0)
        with self._transaction():
            self._conn.execute(
                "UPDATE shards SET status=?, error=NULL, updated=? WHERE key=?",
                (ShardStatus.SPLIT, time.time(), key),
            )
            for child, query in children:
                self._enrol(child, query, pass_no, ends=ends)

    def record_ends(self, key: str, other: tuple[str, str], deepest: Sequence[int]) -> None:
        """`key`, a walk that reached the cap, is from now on one end of a two-ended walk; `other`
        walks from the other end until it meets the ids `key` saw deepest."""
        pass_no = int(self.get_meta("pass") or 0)
        with self._transaction():
            self._set_walk(key, ends=True)
            self._conn.executemany("INSERT OR IGNORE INTO end_ids VALUES (?, ?)", ((key, i) for i in deepest))
            self._enrol(*other, pass_no, ends=True)

    def meets(self, key: str, ids: Sequence[int]) -> bool:
        """Whether a page of `ids` meets the walk of `key` (its shard's other end): the ids that
        walk served are the page's last ones, none before them missing. Two ends that met walked
        the same stretch from opposite sides, so a page overlaps the other end only past some
        point of its own order; an id it shares before an id it does not is one served out of
        order (an image pinned on every page, say), never proof that nothing lies between."""
        served = self._served_by(key, ids)
        first = next((n for n, i in enumerate(ids) if i in served), None)
        return first is not None and all(i in served for i in ids[first:])

    def _served_by(self, key: str, ids: Sequence[int]) -> set[int]:
        """Those of `ids` that the walk of `key` has served (for shards walked from both ends)."""
        served: set[int] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id FROM end_ids WHERE shard=? AND id IN ({marks})"
            served.update(row[0] for row in self._conn.execute(query, (key, *chunk)))
        return served

    def _set_walk(self, key: str, *, depth: int | None = None, ends: bool | None = None) -> None:
        self._conn.execute(
            "INSERT INTO walks (shard, depth, ends) VALUES (?, COALESCE(?, 0), COALESCE(?, 0)) "
            "ON CONFLICT(shard) DO UPDATE SET depth=COALESCE(?, depth), ends=COALESCE(?, ends)",
            (key, depth, ends, depth, ends),
        )

    def _mark_met(self, key: str, other: str) -> None:
        """The two ends of a walk met: neither is capped, nothing lies out of reach between them,
        and the other end, if still walking, is done too (what lies past its cursor is walked)."""
        for each in (key, other):
            self._conn.execute("UPDATE walks SET met=1 WHERE shard=?", (each,))
            self._conn.execute(
                "UPDATE shards SET status=? WHERE key=? AND status=?",
                (ShardStatus.DONE, each, ShardStatus.CAPPED),
            )
        self._conn.execute(
            "UPDATE shards SET status=?, cursor=NULL, finished=finished+1 WHERE key=? AND status=?",
            (ShardStatus.DONE, other, ShardStatus.ACTIVE),
        )

    def finish_unwalked(self, key: str) -> str:
        """A shard with nothing to walk this pass keeps the outcome of its last walk; returns it."""
        met = self._conn.execute("SELECT met FROM walks WHERE shard=?", (key,)).fetchone()
        status = ShardStatus.DONE if met is not None and met[0] else ShardStatus.CAPPED
        self._conn.execute("UPDATE shards SET status=?, updated=? WHERE key=?", (status, time.time(), key))
        return status

    def levels(self, key: str) -> dict[int, int]:
        """Images served to `key`'s walks, by browsing level, over every pass."""
        rows = self._conn.execute("SELECT level, served FROM shard_levels WHERE shard=?", (key,))
        return {int(level): int(served) for level, served in rows}

    def _enrol(self, key: str, query: str, pass_no: int, *, ends: bool = False) -> None:
        row = self._conn.execute("SELECT pass FROM shards WHERE key=?", (key,)).fetchone()
        now = time.time()
        if row is None:
            self._conn.execute(
                "INSERT INTO shards (key, query, pass, status, updated) VALUES (?,?,?,?,?)",
                (key, query, pass_no, ShardStatus.PENDING, now),
            )
        elif row[0] != pass_no:
            # A new pass walks from the head again; the old tail is kept for
            # sorts that can continue from it.
            self._set_walk(key, depth=0)
            self._conn.execute(
                "UPDATE shards SET pass=?, cursor=NULL, error=NULL, updated=?, "
                "status=CASE status WHEN ? THEN status ELSE ? END WHERE key=?",
                (pass_no, now, ShardStatus.SPLIT, ShardStatus.PENDING, key),
            )
        if ends:
            self._set_walk(key, ends=True)

    def finish_pass_if_complete(self, keys: Iterable[str]) -> bool:
        """Close the pass when every one of `keys` is finished (done or capped); say whether it closed."""
        statuses = [self.shard(k).status for k in keys]
        complete = all(s in ShardStatus.FINISHED for s in statuses)
        if complete:
            self.set_meta("pass_open", "0")
        return complete

    # -- shards ---------------------------------------------------------------

    def knows(self, key: str) -> bool:
        return self._conn.execute(f"SELECT 1 FROM {_SHARDS} WHERE key=?", (key,)).fetchone() is not None

    def shard(self, key: str) -> ShardRow:
        row = self._conn.execute(
            f"SELECT {_SHARD_COLUMNS} FROM {_SHARDS} WHERE key=?",
            (key,),
        ).fetchone()
        if row is None:
            raise StateError(f"{self.path}: unknown shard {key}")
        return _shard_row(row)

    def shards(self) -> list[ShardRow]:
        rows = self._conn.execute(f"SELECT {_SHARD_COLUMNS} FROM {_SHARDS} ORDER BY query, key").fetchall()
        return [_shard_row(r) for r in rows]

    def mark_failed(self, key: str, error: str) -> None:
        self._conn.execute(
            "UPDATE shards SET status=?, error=?, updated=? WHERE key=?",
            (ShardStatus.FAILED, error, time.time(), key),
        )

    # -- pages ----------------------------------------------------------------

    def known_ids(self, ids: Sequence[int]) -> set[int]:
        """Which of `ids` were already written to this output dir."""
        found: set[int] = set()
        for start in range(0, len(ids), 500):  # stay under SQLite's variable limit
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(f"SELECT id FROM seen WHERE id IN ({marks})", chunk)
            found.update(r[0] for r in rows)
        return found

    def commit_page(self, page: PageCommit) -> None:
        """Record one page: its new ids, the segment's size, the shard's next cursor."""
        done = page.next_cursor is None
        status = ShardStatus.ACTIVE if not done else ShardStatus.CAPPED if page.capped else ShardStatus.DONE
        now = time.time()
        with self._transaction():
            self._conn.executemany("INSERT INTO seen (id) VALUES (?)", ((i,) for i in page.new_ids))
            self._conn.executemany("INSERT INTO first_seen VALUES (?, ?)", ((i, now) for i in page.new_ids))
            if page.new_ids:  # which shard wrote these lines (the export's `shard` and `query`)
                self._conn.execute(
                    "INSERT INTO runs VALUES "
                    "(?, 1 + COALESCE((SELECT items FROM segments WHERE name=?), 0), ?, ?)",
                    (page.segment, page.segment, len(page.new_ids), page.shard_key),
                )
            self._conn.executemany(
                "INSERT OR IGNORE INTO end_ids VALUES (?, ?)", ((page.shard_key, i) for i in page.walked_ids)
            )
            self._conn.executemany(
                "INSERT INTO shard_levels VALUES (?, ?, ?) "
                "ON CONFLICT(shard, level) DO UPDATE SET served=served+excluded.served",
                ((page.shard_key, level, n) for level, n in page.levels.items()),
            )
            self._conn.execute(
                "INSERT INTO segments (name, size, items) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET size=excluded.size, items=items+excluded.items",
                (page.segment, page.segment_size, len(page.new_ids)),
            )
            updated = self._conn.execute(
                "UPDATE shards SET status=?, cursor=?, tail_cursor=COALESCE(?, tail_cursor), "
                "items=items+?, pages=pages+1, finished=finished+?, error=NULL, updated=? WHERE key=?",
                (
                    status,
                    _dump_cursor(page.next_cursor),
                    _dump_cursor(page.page_cursor),
                    len(page.new_ids),
                    int(done),
                    now,
                    page.shard_key,
                ),
            )
            if updated.rowcount != 1:  # a cursor saved nowhere would be progress lost
                raise StateError(f"{self.path}: page committed for unknown shard {page.shard_key}")
            self._set_walk(page.shard_key, depth=page.depth)
            if page.met is not None:
                self._mark_met(page.shard_key, page.met)

    # -- segments -------------------------------------------------------------

    def segments(self) -> list[SegmentRow]:
        rows = self._conn.execute(f"SELECT {_SEGMENT_COLUMNS} FROM {self._SEGMENTS} ORDER BY name").fetchall()
        return [_segment_row(r) for r in rows]

    def segment(self, name: str) -> SegmentRow:
        query = f"SELECT {_SEGMENT_COLUMNS} FROM {self._SEGMENTS} WHERE name=?"
        row = self._conn.execute(query, (name,)).fetchone()
        if row is None:
            raise StateError(f"{self.path}: unknown segment {name}")
        return _segment_row(row)

    def register_segment(self, name: str) -> None:
        """Name a new, empty segment before its file is created: a segment file the state
        does not name is then never the harvest's own work in progress (`agreement`)."""
        with self._transaction():
            self._conn.execute(
                f"INSERT OR IGNORE INTO {self._SEGMENTS} (name, size, items) VALUES (?, 0, 0)", (name,)
            )

    def close_segment(self, name: str) -> None:
        with self._transaction():
            self._conn.execute(f"UPDATE {self._SEGMENTS} SET closed=1 WHERE name=?", (name,))

    def adopt_segment(self, segment: SegmentRow, ids: Iterable[int]) -> None:
        """Record a segment found on disk and the ids it holds (`harvest repair`), in one
        transaction. An id already recorded is a StateError: the archive holds it twice."""
        with self._transaction():
            self._conn.execute(
                f"INSERT INTO {self._SEGMENTS} (name, size, items, closed, file) VALUES (?, ?, ?, ?, ?)",
                (segment.name, segment.size, segment.items, int(segment.closed), segment.file),
            )
            self._conn.executemany("INSERT INTO seen (id) VALUES (?)", ((i,) for i in ids))

    def set_segment_file(self, name: str, file: str) -> None:
        with self._transaction():
            self._conn.execute(f"UPDATE {self._SEGMENTS} SET file=? WHERE name=?", (file, name))

    def done_steps(self, segment: str) -> frozenset[str]:
        """The closed-segment steps recorded as complete for `segment`."""
        rows = self._conn.execute(f"SELECT step FROM {self._STEPS} WHERE segment=?", (segment,))
        return frozenset(r[0] for r in rows)

    def record_step(self, segment: str, step: str) -> None:
        with self._transaction():
            self._conn.execute(
                f"INSERT OR IGNORE INTO {self._STEPS} VALUES (?, ?, ?)", (segment, step, time.time())
            )

    # -- the object store ----------------------------------------------------------

    def record_published(self, item: Publication) -> None:
        """Record an object that is in the store and checked (replacing an older record)."""
        with self._transaction():
            self._insert_published(item)

    def _insert_published(self, item: Publication) -> None:
        """`record_published`'s row, inside a transaction the caller holds."""
        self._conn.execute(
            "INSERT OR REPLACE INTO published VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                item.kind,
                item.name,
                item.file,
                item.url,
                item.size,
                item.etag,
                item.sha256,
                int(item.local),
                time.time(),
            ),
        )

    def publication(self, kind: str, name: str) -> Publication | None:
        row = self._conn.execute(
            f"SELECT {_PUBLISHED_COLUMNS} FROM published WHERE kind=? AND name=?", (kind, name)
        ).fetchone()
        return None if row is None else _publication(row)

    def publications(self, kind: str) -> dict[str, Publication]:
        """Every published object of `kind`, by name."""
        rows = self._conn.execute(f"SELECT {_PUBLISHED_COLUMNS} FROM published WHERE kind=?", (kind,))
        return {row[1]: _publication(row) for row in rows.fetchall()}

    def published_counts(self) -> dict[str, tuple[int, int, int]]:
        """By kind: (objects, bytes, objects whose local copy is gone)."""
        rows = self._conn.execute(
            "SELECT kind, count(*), coalesce(sum(size), 0), sum(local = 0) FROM published GROUP BY kind"
        ).fetchall()
        return {kind: (int(n), int(size), int(dropped or 0)) for kind, n, size, dropped in rows}

    def drop_local(self, kind: str, name: str) -> None:
        """The local copy of a published object is about to be deleted: readers use the store."""
        with self._transaction():
            self._conn.execute("UPDATE published SET local=0 WHERE kind=? AND name=?", (kind, name))

    def seen_count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM seen").fetchone()[0])

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn, self.path)


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any error, errors made one line."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self._rollback()
            if isinstance(exc, sqlite3.Error):
                raise StateError(f"{self._path}: {self._explain(exc)}") from None
            return
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._rollback()
            raise StateError(f"{self._path}: commit failed: {self._explain(err)}") from None

    def _explain(self, err: sqlite3.Error) -> str:
        """SQLite's message, or what lies behind it when it hides a full disk or a file
        size limit (EFBIG is a "disk I/O error" to SQLite)."""
        code = getattr(err, "sqlite_errorcode", 0) & 0xFF
        if code not in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
            return str(err)
        files = [self._path.with_name(self._path.name + s) for s in _SQLITE_SUFFIXES]
        return diagnose_write_failure(files) or str(err)

    def _rollback(self) -> None:
        # On some errors (a full disk, I/O) SQLite has already rolled back by itself;
        # a ROLLBACK then fails and would hide the error that matters.
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


_PUBLISHED_COLUMNS = "kind, name, file, url, size, etag, sha256, local"


def _publication(row: tuple[str, str, str, str, int, str, str, int]) -> Publication:
    kind, name, file, url, size, etag, sha256, local = row
    return Publication(kind, name, file, url, int(size), etag, sha256, bool(local))


_SEGMENT_COLUMNS = "name, size, items, closed, COALESCE(file, name)"


def _segment_row(row: tuple[str, int, int, int, str]) -> SegmentRow:
    name, size, items, closed, file = row
    return SegmentRow(name, size, items, bool(closed), file)


_SHARDS = "shards LEFT JOIN walks ON walks.shard = shards.key"
_SHARD_COLUMNS = (
    "key, query, pass, status, cursor, tail_cursor, items, pages, finished, error, "
    "COALESCE(depth, 0), COALESCE(ends, 0), COALESCE(met, 0)"
)


def _shard_row(row: tuple[object, ...]) -> ShardRow:
    key, query, pass_no, status, cursor, tail, items, pages, finished, error, depth, ends, met = row
    return ShardRow(
        key=str(key),
        query=str(query),
        pass_no=int(pass_no),  # type: ignore[call-overload]
        status=str(status),
        cursor=_load_cursor(cursor),  # type: ignore[arg-type]
        tail_cursor=_load_cursor(tail),  # type: ignore[arg-type]
        items=int(items),  # type: ignore[call-overload]
        pages=int(pages),  # type: ignore[call-overload]
        finished=int(finished),  # type: ignore[call-overload]
        error=None if error is None else str(error),
        depth=int(depth),  # type: ignore[call-overload]
        ends=bool(ends),
        met=bool(met),
    )
