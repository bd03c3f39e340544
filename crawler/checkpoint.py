"""Where fetched pages land: dedupe by id, append new lines, commit the cursor.

Order matters for exactly-once: lines are appended and fsynced first, then one
state transaction records the ids, the segment's new length and the shard's
next cursor. A crash between the two leaves an uncommitted tail that the next
start cuts away, and the page is fetched again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crawler.state import Cursor, PageCommit, State
from crawler.writer import SegmentWriter, dump_item


@dataclass(frozen=True, slots=True)
class PageResult:
    """What committing one page changed."""

    new_items: int
    done: bool


class Checkpointer:
    """Commits pages of any shard into one output dir. Call from one thread at a time."""

    def __init__(self, out_dir: Path, state: State) -> None:
        self._state = state
        self._writer = SegmentWriter(out_dir, state.segments())

    def commit(
        self,
        shard_key: str,
        page_cursor: Cursor | None,
        items: list[dict[str, Any]],
        next_cursor: Cursor | None,
        stop_when_known: bool = False,
    ) -> PageResult:
        fresh = self._unseen(items)
        if stop_when_known and items and not fresh:
            next_cursor = None  # an incremental walk has reached what it already holds
        size = self._writer.append([dump_item(i) for i in fresh]) if fresh else self._writer.size
        self._state.commit_page(
            PageCommit(
                shard_key=shard_key,
                segment=self._writer.name,
                segment_size=size,
                new_ids=[i["id"] for i in fresh],
                next_cursor=next_cursor,
                page_cursor=page_cursor,
            )
        )
        return PageResult(new_items=len(fresh), done=next_cursor is None)

    def _unseen(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Items whose id is neither in the state nor earlier on this page."""
        known = self._state.known_ids([i["id"] for i in items])
        fresh = []
        for item in items:
            if item["id"] not in known:
                known.add(item["id"])
                fresh.append(item)
        return fresh

    def close(self) -> None:
        self._writer.close()
