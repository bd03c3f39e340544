"""Where a shard's walk starts, and whether it may stop early.

A resumed walk continues from its committed cursor. A shard that has been walked
to its end before is walked again only as far as it must be: a `Newest` walk
stops at the first page that holds only images the output already has, an
`Oldest` walk continues from the last page it saw. Other sorts have no stable
frontier, so they walk everything again and the id index drops what is known.
"""

from __future__ import annotations

from dataclasses import dataclass

from crawler.shards import Shard
from crawler.state import Cursor, ShardRow, ShardStatus


@dataclass(frozen=True, slots=True)
class WalkPlan:
    start: Cursor | None
    stop_when_known: bool  # end the walk on a page of known images only


def plan_walk(shard: Shard, row: ShardRow) -> WalkPlan:
    sort = shard.value("sort")
    seen_end = row.finished > 0
    newest = seen_end and sort == "Newest"
    if row.status in (ShardStatus.ACTIVE, ShardStatus.FAILED):
        return WalkPlan(row.cursor, newest)
    if seen_end and sort == "Oldest" and row.tail_cursor is not None:
        return WalkPlan(row.tail_cursor, False)
    return WalkPlan(None, newest)
