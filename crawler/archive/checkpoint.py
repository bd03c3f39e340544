"""Where fetched pages land: dedupe by id, append new lines, commit the cursor.

Order matters for exactly-once: lines are appended and fsynced first, then one
state transaction records the ids, the segment's new length and the shard's
next cursor. A crash between the two leaves an uncommitted tail that the next
start cuts away, and the page is fetched again. Before cutting anything, the
start checks that the files and the state agree (`agreement`): a tail longer
than one page is committed work of a lost or newer state, and is refused.

A full segment is closed and a fresh one started; the closed one then goes
through the closed-segment steps (`steps.py`: compression first), each recorded,
so a restart completes whichever a crash interrupted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from crawler.archive import agreement
from crawler.archive.compression import SUFFIXES
from crawler.archive.fs import remove_partials
from crawler.archive.segments import MAX_APPEND_LINES, SegmentWriter
from crawler.archive.state import Cursor, Kind, PageCommit, ShardStatus, State
from crawler.archive.steps import Compress, DropLocal, Publish, SegmentStep, finish_closed
from crawler.archive.store import ObjectStore, StoreUrl


@dataclass(frozen=True, slots=True)
class ArchiveSpec:
    """Where the archive lives and when its segments close; built from the config by its user."""

    dir: Path
    segment_items: int = 100_000  # close a segment after this many images (0: no limit)
    segment_mb: float = 0.0  # ... or once it holds this many MiB (0: no limit)
    compress: str = "none"  # what closed segments become: "zstd", "gzip" or "none" (stay plain)
    publish: StoreUrl | None = None  # closed segments are uploaded here, after compression
    keep_local: bool = True  # false: a published segment's local file is deleted once recorded


class Lines(Protocol):
    """A page as the archive sees it: each item's id and its line (bytes ending in a newline)."""

    @property
    def ids(self) -> Sequence[int]: ...
    @property
    def lines(self) -> Sequence[bytes]: ...


@dataclass(frozen=True, slots=True)
class WalkNote:
    """What the walk knows about a page that the archive records with it."""

    stop_when_known: bool = False  # an incremental walk: a page of known ids only ends it
    depth: int = 0  # positions deep into the query after this page
    capped: bool = False  # without a next cursor: the walk stopped at the server's cap
    other_end: str | None = None  # walked from both ends: the shard walking from the other one
    levels: Mapping[int, int] = field(default_factory=dict)  # images on the page by browsing level
    # False when the two ends' walks are still far apart in time: ids the other end served
    # are then not a meeting (an image served at both ends, e.g. pinned, must not end them).
    may_meet: bool = True


@dataclass(frozen=True, slots=True)
class PageResult:
    """What committing one page changed."""

    new_items: int
    done: bool
    met: bool = False  # the page reached what the other end of the walk had walked
    other_capped: bool = False  # the page capped this end, and the other end was capped before


def segment_full(output: ArchiveSpec, items: int, size: int) -> bool:
    """Whether a segment holding `items` images in `size` bytes is due to be closed."""
    by_items = output.segment_items > 0 and items >= output.segment_items
    return by_items or (output.segment_mb > 0 and size >= output.segment_mb * 2**20)


def closed_segment_steps(output: ArchiveSpec) -> tuple[SegmentStep, ...]:
    """What is done to each closed segment, in order; a new step is appended here."""
    if output.publish is None:
        return (Compress(output.compress),)
    return (Compress(output.compress), Publish(ObjectStore(output.publish)), DropLocal(output.keep_local))


class Checkpointer:
    """Commits pages of any shard into one output dir. Call from one thread at a time."""

    def __init__(self, output: ArchiveSpec, state: State, steps: Sequence[SegmentStep] | None = None) -> None:
        self._state = state
        self._output = output
        self._steps = tuple(closed_segment_steps(output) if steps is None else steps)
        # Before anything is cut or removed.
        agreement.check(output.dir, state.segments(), published=state.publications(Kind.SEGMENT))
        self._writer = SegmentWriter(output.dir, state.segments(), state.register_segment)
        self._finish_closed_segments()

    def commit(
        self,
        shard_key: str,
        page_cursor: Cursor | None,
        page: Lines,
        next_cursor: Cursor | None,
        walk: WalkNote = WalkNote(),
    ) -> PageResult:
        if len(page.lines) > MAX_APPEND_LINES:  # the walker refuses such pages first
            raise ValueError(f"a page of {len(page.lines)} lines; the archive takes {MAX_APPEND_LINES}")
        fresh, fresh_ids = self._unseen(page)
        if walk.stop_when_known and page.ids and not fresh:
            next_cursor = None  # an incremental walk has reached what it already holds
        met = walk.other_end is not None and walk.may_meet and self._state.meets(walk.other_end, page.ids)
        if met:
            next_cursor = None  # the two ends of a walk met: everything between is covered
        capped = walk.capped and next_cursor is None and not met
        size = self._writer.append(b"".join(fresh), len(fresh)) if fresh else self._writer.size
        self._state.commit_page(
            PageCommit(
                shard_key=shard_key,
                segment=self._writer.name,
                segment_size=size,
                new_ids=fresh_ids,
                next_cursor=next_cursor,
                page_cursor=page_cursor,
                depth=walk.depth,
                capped=capped,
                levels=walk.levels,
                walked_ids=page.ids if walk.other_end is not None else (),
                met=walk.other_end if met else None,
            )
        )
        if self._segment_full():
            self._rotate()
        other_capped = capped and walk.other_end is not None and self._capped(walk.other_end)
        return PageResult(new_items=len(fresh), done=next_cursor is None, met=met, other_capped=other_capped)

    def _capped(self, key: str) -> bool:
        return self._state.shard(key).status == ShardStatus.CAPPED

    def _segment_full(self) -> bool:
        return segment_full(self._output, self._writer.items, self._writer.size)

    def _rotate(self) -> None:
        closing = self._writer.name
        self._state.close_segment(closing)
        self._writer.rotate()
        finish_closed([self._state.segment(closing)], self._output.dir, self._state, self._steps)

    def _finish_closed_segments(self) -> None:
        """Complete what a crash interrupted: partial files, closed segments' unrecorded steps."""
        closed = [s for s in self._state.segments() if s.closed]
        # Only the partial files of our own segments: a `.part` of anything else is not ours.
        remove_partials(self._output.dir, (s.name + suffix for s in closed for suffix in SUFFIXES.values()))
        finish_closed(closed, self._output.dir, self._state, self._steps)

    def _unseen(self, page: Lines) -> tuple[list[bytes], list[int]]:
        """The lines whose id is neither in the state nor earlier on this page, and their ids."""
        known = self._state.known_ids(page.ids)
        fresh, fresh_ids = [], []
        for line, item_id in zip(page.lines, page.ids, strict=True):
            if item_id not in known:
                known.add(item_id)
                fresh.append(line)
                fresh_ids.append(item_id)
        return fresh, fresh_ids

    def close(self) -> None:
        self._writer.close()
