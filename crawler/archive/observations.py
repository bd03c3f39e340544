"""What `harvest refresh` writes: observations of known images, in segments of their own.

An observation says what the API answered for one id at one time: its stats and
levels as served, or that it was absent (`gone`: hidden or deleted, which the API
does not tell apart). Observations are appended to `refresh-NNNNNN.ndjson` beside the
item segments, with the same machinery (`SegmentWriter`, fsync before commit, the
closed-segment steps, `agreement`), but their own rows in the state
(`refresh_segments`, `refresh_steps`): readers of the items never see them, and the
first-seen item lines are never touched.

Exactly once per refresh pass: a pass begins by listing the ids it will observe
(`refresh_todo`, in one transaction). Each batch of observations is appended and
fsynced, then one transaction removes its ids from that list, records the segment's
new length and the latest observation per id (`observed`). A kill between the two
leaves an uncommitted tail that the next start cuts, and those ids are asked again.
The transaction that empties the list closes the pass.
"""

from __future__ import annotations

import datetime as dt
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from crawler.archive import agreement
from crawler.archive.checkpoint import ArchiveSpec, closed_segment_steps, segment_full
from crawler.archive.compression import SUFFIXES
from crawler.archive.fs import remove_partials
from crawler.archive.segments import MAX_APPEND_LINES, OBSERVATIONS, SegmentWriter
from crawler.archive.state import Kind, SegmentRow, State
from crawler.archive.steps import finish_closed
from crawler.errors import StateError

_PASS, _OPEN = "refresh_pass", "refresh_open"


@dataclass(frozen=True, slots=True)
class Observation:
    """One id as the API answered it: `fields` are each observed field's JSON bytes as served
    (`null` for a field an answer lacked); `gone` when the id was not in the answer."""

    id: int
    gone: bool
    fields: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class RefreshPass:
    """The refresh pass in the state: its number, whether it is open, the ids it has left."""

    number: int
    open: bool
    todo: int
    resumed: bool = False  # this start continues a pass an earlier one began


def observed_at(at: float) -> str:
    """An observation time as the lines spell it: ISO 8601 in UTC, milliseconds, `Z`."""
    moment = dt.datetime.fromtimestamp(at, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def observation_line(observation: Observation, pass_no: int, at: str) -> bytes:
    """One NDJSON line: id, observed_at, pass, gone, then the observed fields as served."""
    head = b'{"id":%d,"observed_at":"%s","pass":%d,"gone":%s' % (
        observation.id,
        at.encode(),
        pass_no,
        b"true" if observation.gone else b"false",
    )
    body = b"".join(b',"%s":%s' % (name.encode(), raw) for name, raw in observation.fields)
    return head + body + b"}\n"


class RefreshLedger(State):
    """The state's refresh tables: the observation segments, the open pass, the latest observations.

    A connection of its own to the output dir's state, like `MediaLedger`.
    """

    _SEGMENTS = "refresh_segments"
    _STEPS = "refresh_steps"

    def refresh_pass(self) -> RefreshPass:
        todo = int(self._conn.execute("SELECT count(*) FROM refresh_todo").fetchone()[0])
        return RefreshPass(int(self.get_meta(_PASS) or 0), self.get_meta(_OPEN) == "1", todo)

    def begin_refresh(self, cutoff: float | None) -> RefreshPass:
        """Resume the open pass, or open the next one over every known id (with `cutoff`: only ids
        whose latest observation, or first sight when never observed, is older than it)."""
        current = self.refresh_pass()
        if current.open:
            return RefreshPass(current.number, True, current.todo, resumed=True)
        with self._transaction():
            if cutoff is None:
                self._conn.execute("INSERT INTO refresh_todo SELECT id FROM seen")
            else:
                self._conn.execute(
                    "INSERT INTO refresh_todo SELECT seen.id FROM seen "
                    "LEFT JOIN observed ON observed.id = seen.id "
                    "LEFT JOIN first_seen ON first_seen.id = seen.id "
                    "WHERE COALESCE(observed.at, first_seen.at, 0) < ?",
                    (cutoff,),
                )
            todo = int(self._conn.execute("SELECT count(*) FROM refresh_todo").fetchone()[0])
            if not todo:  # nothing is due: no pass is opened, none is counted
                return RefreshPass(current.number, False, 0)
            self.set_meta(_PASS, str(current.number + 1))
            self.set_meta(_OPEN, "1")
        return RefreshPass(current.number + 1, True, todo)

    def todo(self) -> array[int]:
        """The ids the open pass has still to observe, in id order."""
        return array("q", (r[0] for r in self._conn.execute("SELECT id FROM refresh_todo ORDER BY id")))

    def commit_observations(
        self, segment: str, size: int, pass_no: int, at: float, observations: Sequence[Observation]
    ) -> bool:
        """Record one appended batch; returns whether it was the pass's last (the pass is closed)."""
        with self._transaction():
            done = self._conn.executemany(
                "DELETE FROM refresh_todo WHERE id=?", ((o.id,) for o in observations)
            ).rowcount
            if done != len(observations):  # an observation outside the pass would be one too many
                raise StateError(f"{self.path}: observations of ids the refresh pass does not hold")
            self._conn.executemany(
                "INSERT INTO observed VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "at=excluded.at, pass=excluded.pass, gone=excluded.gone",
                ((o.id, at, pass_no, int(o.gone)) for o in observations),
            )
            self._conn.execute(
                "INSERT INTO refresh_segments (name, size, items) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET size=excluded.size, items=items+excluded.items",
                (segment, size, len(observations)),
            )
            last = self._conn.execute("SELECT 1 FROM refresh_todo LIMIT 1").fetchone() is None
            if last:
                self.set_meta(_OPEN, "0")
        return last

    def adopt_segment(self, segment: SegmentRow, ids: Iterable[int]) -> None:
        """Record an observation segment found on disk (`harvest repair`); `ids` are not image ids
        to index (an id is observed once per pass), so they are not recorded here."""
        with self._transaction():
            self._conn.execute(
                "INSERT INTO refresh_segments (name, size, items, closed, file) VALUES (?, ?, ?, ?, ?)",
                (segment.name, segment.size, segment.items, int(segment.closed), segment.file),
            )

    def adopt_observed(self, latest: Iterable[tuple[int, float, int, bool]], last_pass: int) -> None:
        """The latest observation per id, read back from the segments (`harvest repair`)."""
        with self._transaction():
            self._conn.executemany(
                "INSERT INTO observed VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "at=excluded.at, pass=excluded.pass, gone=excluded.gone WHERE excluded.at >= at",
                ((i, at, p, int(gone)) for i, at, p, gone in latest),
            )
            self.set_meta(_PASS, str(last_pass))
            self.set_meta(_OPEN, "0")

    def observed_count(self) -> tuple[int, int]:
        """Ids observed at least once, and how many of them were gone when last observed."""
        row = self._conn.execute("SELECT count(*), COALESCE(sum(gone), 0) FROM observed").fetchone()
        return int(row[0]), int(row[1])


class ObservationLog:
    """Appends the batches of a refresh pass to the observation segments and commits them."""

    def __init__(self, output: ArchiveSpec, ledger: RefreshLedger) -> None:
        self._output, self._ledger = output, ledger
        self._steps = closed_segment_steps(output)
        published = ledger.publications(Kind.SEGMENT)  # a dropped local copy is in the store
        agreement.check(output.dir, ledger.segments(), OBSERVATIONS, published)  # before anything is cut
        self._writer = SegmentWriter(output.dir, ledger.segments(), ledger.register_segment, OBSERVATIONS)
        closed = [s for s in ledger.segments() if s.closed]
        remove_partials(output.dir, (s.name + suffix for s in closed for suffix in SUFFIXES.values()))
        finish_closed(closed, output.dir, ledger, self._steps)

    def commit(self, pass_no: int, observations: Sequence[Observation], at: float | None = None) -> bool:
        """Append and commit one batch (at most MAX_APPEND_LINES); whether it closed the pass."""
        if len(observations) > MAX_APPEND_LINES:
            raise ValueError(f"{len(observations)} observations in one batch; at most {MAX_APPEND_LINES}")
        at = time.time() if at is None else at
        stamp = observed_at(at)
        data = b"".join(observation_line(o, pass_no, stamp) for o in observations)
        size = self._writer.append(data, len(observations)) if observations else self._writer.size
        last = self._ledger.commit_observations(self._writer.name, size, pass_no, at, observations)
        if segment_full(self._output, self._writer.items, self._writer.size):
            closing = self._writer.name
            self._ledger.close_segment(closing)
            self._writer.rotate()
            finish_closed([self._ledger.segment(closing)], self._output.dir, self._ledger, self._steps)
        return last

    def close(self) -> None:
        self._writer.close()
