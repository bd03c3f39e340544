"""The state's record of media: which item's file is on disk (and what it is), gone, or failed.

A second connection to the harvest's state, so the media stage can record files
while the harvest commits pages (SQLite serialises the two writers). Each change
is one transaction. Statuses:

- `fetching`: a download began and was not recorded since; the next start looks
  for a complete file (renamed, never recorded) before fetching again.
- `done`: the file is at `path`, `size` bytes, `sha256`; never fetched again.
- `gone`: the CDN said 404/410 for every URL tried; asked again only on request.
- `failed`: the attempts ran out (`error` says why); the next run tries again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import orjson

from crawler.archive.state import Kind, Publication, State

FETCHING, DONE, GONE, FAILED = "fetching", "done", "gone", "failed"
_SCAN_KEY = "media_scan"


@dataclass(frozen=True, slots=True)
class MediaRef:
    """What an item says of its media: enough to fetch it."""

    id: int
    url: str
    type: str  # "image", "video", "audio"


@dataclass(frozen=True, slots=True)
class MediaResult:
    """How one item's download ended, as a worker reports it (the Ray engine)."""

    id: int
    status: str  # DONE, GONE or FAILED
    path: str | None = None  # where the file is, relative to the media dir (or the store's prefix)
    size: int | None = None
    sha256: str | None = None
    content_type: str | None = None
    source: str | None = None  # the URL the bytes came from
    error: str | None = None  # why it is gone or failed
    url: str | None = None  # s3://bucket/key when the file went straight to the object store
    etag: str | None = None  # the store's ETag of it (with `url`)


@dataclass(frozen=True, slots=True)
class MediaCounts:
    done: int = 0
    gone: int = 0
    failed: int = 0
    fetching: int = 0
    bytes: int = 0  # of the files done


@dataclass(frozen=True, slots=True)
class MediaRow:
    id: int
    type: str
    status: str
    path: str | None
    size: int | None
    sha256: str | None
    content_type: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ScanPoint:
    """How far the committed lines have been looked at for media, for which item types."""

    types: tuple[str, ...]
    segment: str = ""  # the segment's name ("" before the first)
    offset: int = 0  # bytes into it: every item before has its row (or is not wanted)


class MediaLedger(State):
    """The media table of an output dir's state (and the scan point)."""

    def statuses(self, ids: Sequence[int]) -> dict[int, str]:
        found: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(f"SELECT id, status FROM media WHERE id IN ({marks})", chunk)
            found.update(rows.fetchall())
        return found

    def begin(self, ref: MediaRef) -> None:
        """A download of `ref` starts (again): made `fetching`, its tries counted."""
        with self._transaction():
            self._conn.execute(
                "INSERT INTO media (id, type, url, status, tries, updated) VALUES (?, ?, ?, ?, 1, ?) "
                "ON CONFLICT (id) DO UPDATE SET status=excluded.status, type=excluded.type, "
                "url=excluded.url, tries=tries + 1, error=NULL, updated=excluded.updated",
                (ref.id, ref.type, ref.url, FETCHING, time.time()),
            )

    def begin_many(self, refs: Sequence[MediaRef]) -> None:
        """`begin` for a whole task's items, in one transaction."""
        now = time.time()
        with self._transaction():
            self._conn.executemany(
                "INSERT INTO media (id, type, url, status, tries, updated) VALUES (?, ?, ?, ?, 1, ?) "
                "ON CONFLICT (id) DO UPDATE SET status=excluded.status, type=excluded.type, "
                "url=excluded.url, tries=tries + 1, error=NULL, updated=excluded.updated",
                [(ref.id, ref.type, ref.url, FETCHING, now) for ref in refs],
            )

    def record(self, results: Sequence[MediaResult]) -> list[MediaResult]:
        """Record how items ended, in one transaction; a result for an item already `done` is
        ignored (a retried task reports again what a first attempt recorded). A file that went
        straight to the object store (`url`) is recorded published in the same transaction,
        with no local copy. Returns the results that changed a row: each item is counted
        once, however often it is reported."""
        now = time.time()
        recorded: list[MediaResult] = []
        with self._transaction():
            for r in results:
                cursor = self._conn.execute(
                    "UPDATE media SET status=?, path=?, size=?, sha256=?, content_type=?, "
                    "source=coalesce(?, source), error=?, updated=? WHERE id=? AND status != ?",
                    (r.status, r.path, r.size, r.sha256, r.content_type, r.source, r.error, now, r.id, DONE),
                )
                if not cursor.rowcount:
                    continue
                recorded.append(r)
                if r.status == DONE and r.url is not None:
                    self._insert_published(
                        Publication(
                            Kind.MEDIA,
                            str(r.id),
                            r.path or "",
                            r.url,
                            r.size or 0,
                            r.etag or "",
                            r.sha256 or "",
                            local=False,
                        )
                    )
        return recorded

    def source(self, image_id: int) -> str | None:
        """The URL the download in progress is fetched from (what a `.part` holds bytes of)."""
        row = self._conn.execute("SELECT source FROM media WHERE id=?", (image_id,)).fetchone()
        return None if row is None else row[0]

    def trying(self, image_id: int, url: str) -> None:
        with self._transaction():
            self._conn.execute("UPDATE media SET source=? WHERE id=?", (url, image_id))

    def done(self, image_id: int, path: str, size: int, sha256: str, content_type: str) -> None:
        with self._transaction():
            self._conn.execute(
                "UPDATE media SET status=?, path=?, size=?, sha256=?, content_type=?, error=NULL, "
                "updated=? WHERE id=?",
                (DONE, path, size, sha256, content_type, time.time(), image_id),
            )

    def ended(self, image_id: int, status: str, error: str) -> None:
        """`gone` or `failed`, with why."""
        with self._transaction():
            self._conn.execute(
                "UPDATE media SET status=?, error=?, updated=? WHERE id=?",
                (status, error, time.time(), image_id),
            )

    def refs(self, statuses: Iterable[str], types: Iterable[str]) -> list[MediaRef]:
        """The items whose media is in one of `statuses`, of the `types` wanted, by id."""
        st, ty = tuple(statuses), tuple(types)
        rows = self._conn.execute(
            f"SELECT id, url, type FROM media WHERE status IN ({','.join('?' * len(st))}) "
            f"AND type IN ({','.join('?' * len(ty))}) ORDER BY id",
            (*st, *ty),
        )
        return [MediaRef(i, url, kind) for i, url, kind in rows.fetchall()]

    def counts(self) -> MediaCounts:
        rows = self._conn.execute(
            "SELECT status, count(*), coalesce(sum(size), 0) FROM media GROUP BY status"
        ).fetchall()
        by = {status: (n, size) for status, n, size in rows}
        return MediaCounts(
            done=by.get(DONE, (0, 0))[0],
            gone=by.get(GONE, (0, 0))[0],
            failed=by.get(FAILED, (0, 0))[0],
            fetching=by.get(FETCHING, (0, 0))[0],
            bytes=by.get(DONE, (0, 0))[1],
        )

    def rows(self, status: str | None = None) -> Iterator[MediaRow]:
        """Every media row (of one status), by id, read in batches."""
        last = -(2**63)
        where = "AND status=?" if status else ""
        while True:
            batch = self._conn.execute(
                "SELECT id, type, status, path, size, sha256, content_type, error FROM media "
                f"WHERE id > ? {where} ORDER BY id LIMIT 1000",
                (last, status) if status else (last,),
            ).fetchall()
            if not batch:
                return
            yield from (MediaRow(*row) for row in batch)
            last = batch[-1][0]

    def scan_point(self, types: Sequence[str]) -> ScanPoint:
        """Where the scan stopped for these types; from the start when the types changed."""
        wanted = tuple(sorted(types))
        raw = self.get_meta(_SCAN_KEY)
        if raw is None:
            return ScanPoint(wanted)
        stored = orjson.loads(raw)
        if tuple(stored.get("types", ())) != wanted:
            return ScanPoint(wanted)  # other types: items passed over before may be wanted now
        return ScanPoint(wanted, stored["segment"], int(stored["offset"]))

    def set_scan_point(self, point: ScanPoint) -> None:
        data = {"types": list(point.types), "segment": point.segment, "offset": point.offset}
        with self._transaction():
            self.set_meta(_SCAN_KEY, orjson.dumps(data).decode())
