"""Where a shard's walk starts, whether it may stop early, and how big its pages are.

A resumed walk continues from its committed cursor. A shard that has been walked
to its end before is walked again only as far as its sort's frontier (the images
endpoint's, `crawler.civitai.images`) requires: a `Newest` walk stops at the
first page that holds only images the output already has, an `Oldest` walk
continues from the last page it saw. Other sorts have no stable frontier, so
they walk everything again and the id index drops what is known.
"""

from __future__ import annotations

from dataclasses import dataclass

from crawler.archive.state import Cursor, ShardRow, ShardStatus
from crawler.civitai.endpoint import Frontier
from crawler.civitai.images import IMAGES
from crawler.crawl.shards import Shard


@dataclass(frozen=True, slots=True)
class WalkPlan:
    start: Cursor | None
    stop_when_known: bool  # end the walk on a page of known images only
    depth: int = 0  # positions deep `start` points
    known_from: int = 0  # ... but not before the walk is this deep (a restart after a dead cursor)
    other_end: str | None = None  # walked from both ends: the shard walking from the other one
    skip: bool = False  # nothing to walk: the oldest end of a two-ended walk, done before


def plan_walk(shard: Shard, row: ShardRow, other_end: str | None = None) -> WalkPlan:
    frontier = IMAGES.frontier(shard.params)
    seen_end = row.finished > 0
    stop = seen_end and frontier is Frontier.STOP_WHEN_KNOWN
    if row.status in (ShardStatus.ACTIVE, ShardStatus.FAILED):
        return WalkPlan(row.cursor, stop, row.depth, other_end=other_end)
    if other_end is not None and seen_end and frontier is Frontier.CONTINUE_FROM_TAIL:
        # New images arrive at the newest end, which its own walk takes; this end stays put.
        return WalkPlan(None, False, other_end=other_end, skip=True)
    if seen_end and frontier is Frontier.CONTINUE_FROM_TAIL and row.tail_cursor is not None:
        return WalkPlan(row.tail_cursor, False, other_end=other_end)
    return WalkPlan(None, stop, other_end=other_end)


# -- page size -----------------------------------------------------------------
# Page size of a walk whose requests time out: halve it, then grow it back.
#
# A smaller `limit` asks the search backend for less work per request; offset and
# id cursors do not depend on it, so it can change in the middle of a walk.

SMALLEST = 25  # below this a timing-out shard is split instead
GROW_AFTER = 5  # pages answered in time at a reduced limit before doubling it


@dataclass(slots=True)
class PageSize:
    configured: int
    current: int = 0
    in_time: int = 0

    def __post_init__(self) -> None:
        self.current = self.configured

    def shrink(self) -> bool:
        """Halve the limit; False when it is as small as it goes."""
        if self.current <= SMALLEST:
            return False
        self.current = max(SMALLEST, self.current // 2)
        self.in_time = 0
        return True

    def answered(self) -> None:
        if self.current >= self.configured:
            return
        self.in_time += 1
        if self.in_time >= GROW_AFTER:
            self.current = min(self.configured, self.current * 2)
            self.in_time = 0
