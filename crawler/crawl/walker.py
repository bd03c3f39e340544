"""One shard's walk: follow cursors, check what comes back, hand pages on.

A walk ends only when `nextCursor` is absent or null, never on a short or empty
page. When a shard's requests keep timing out, the walk first asks for smaller
pages, then splits the shard into children that partition it exactly and walks
those instead: slow is not a reason to give up on a shard.

Two guards stop a walk that would never end: a cursor it has followed before
("the cursor looped"), and `max_pages_without_new` pages in a row that bring no
image the walk has not seen (`stall.StallGuard`: fresh cursors, same images).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from crawler.archive.checkpoint import PageResult
from crawler.archive.state import Cursor
from crawler.civitai.endpoint import Page
from crawler.crawl.api import CivitaiApi
from crawler.crawl.plan import PageSize, WalkPlan
from crawler.crawl.shards import Shard, check_items, describe, split, with_limit
from crawler.crawl.stall import StallGuard
from crawler.errors import CursorLoopError, SearchTimeoutError, ShardError

log = logging.getLogger("harvest")

TIMEOUTS_PER_LIMIT = 2  # timed-out attempts at one page size before it is halved


@dataclass(frozen=True, slots=True)
class Fetched:
    shard: Shard
    cursor: Cursor | None
    page: Page
    # Set for incremental walks: the walker waits for the commit to learn
    # whether the page was all known, so it never fetches past the frontier.
    committed: asyncio.Future[PageResult] | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    shard: Shard
    error: str


@dataclass(frozen=True, slots=True)
class Split:
    shard: Shard
    children: list[Shard]


async def walk(
    shard: Shard, plan: WalkPlan, client: CivitaiApi, queue: asyncio.Queue[Any], max_pages_without_new: int
) -> None:
    """Walk `shard` from `plan.start`; failures go on the queue, never up."""
    try:
        if not await _follow(shard, plan, client, queue, StallGuard(max_pages_without_new)):
            await _walk_children(shard, client, queue, max_pages_without_new)
    except ShardError as exc:
        await queue.put(Failed(shard, str(exc)))


async def _follow(
    shard: Shard, plan: WalkPlan, client: CivitaiApi, queue: asyncio.Queue[Any], stall: StallGuard
) -> bool:
    """Follow the cursors to the end: True, or False when the shard must be split."""
    cursor = plan.start
    used: set[str] = set()
    size = PageSize(int(shard.value("limit") or 200))
    while True:
        used.add(repr(cursor))
        try:
            page = await client.images(with_limit(shard.params, size.current), cursor, TIMEOUTS_PER_LIMIT)
        except SearchTimeoutError:
            if not size.shrink():
                return False
            log.warning("%s: timing out; asking for %d images a page", describe(shard), size.current)
            continue
        size.answered()
        check_items(shard, page)
        if page.next_cursor is not None and repr(page.next_cursor) in used:
            raise CursorLoopError(
                f"the cursor looped: {page.next_cursor!r} was already followed in this walk"
            )
        if page.next_cursor is not None:  # the last page ends the walk whatever it holds
            stall.page(page.ids)
        committed = asyncio.get_running_loop().create_future() if plan.stop_when_known else None
        await queue.put(Fetched(shard, cursor, page, committed))
        if page.next_cursor is None or (committed is not None and (await committed).done):
            return True
        cursor = page.next_cursor


async def _walk_children(
    shard: Shard, client: CivitaiApi, queue: asyncio.Queue[Any], max_pages_without_new: int
) -> None:
    children = split(shard)
    if not children:
        raise SearchTimeoutError("requests keep timing out even at the smallest page size")
    log.warning("%s: timing out; splitting it into %d shards", describe(shard), len(children))
    await queue.put(Split(shard, children))  # recorded before any child page is committed
    async with asyncio.TaskGroup() as group:
        for child in children:
            group.create_task(walk(child, WalkPlan(None, False), client, queue, max_pages_without_new))
