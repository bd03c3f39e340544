"""One shard's walk: follow cursors, check what comes back, hand pages on.

A walk ends only when `nextCursor` is absent or null, never on a short or empty
page; and an end is only the end when the walk did not reach the server's walk
cap. Three things make a walker go on where a naive one would stop:

- timeouts: the walk asks for smaller pages, then splits the shard into children
  that partition it exactly and walks those (slow is no reason to give up);
- the walk cap: a walk that stops `walk_cap` positions deep is split the same
  way, and a shard that cannot be split further is walked from both ends
  (newest first, oldest first) until the two walks meet; what lies between two
  capped ends is reported, never hidden (status `capped`);
- a cursor the server no longer continues: the walk starts again from the head,
  at most `CURSOR_RESTARTS` times a run, never stopping on known pages before it
  is past where it was.

Two guards stop a walk that would never end: a cursor it has followed before
("the cursor looped"), and `max_pages_without_new` pages in a row that bring no
image the walk has not seen (`stall.StallGuard`: fresh cursors, same images).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from crawler.archive.checkpoint import PageResult
from crawler.archive.state import Cursor
from crawler.civitai.endpoint import Page
from crawler.civitai.images import IMAGES
from crawler.crawl.api import CivitaiApi
from crawler.crawl.plan import PageSize, WalkPlan
from crawler.crawl.shards import Shard, check_items, describe, ends_of, halves, split, with_limit
from crawler.crawl.sizing import Pair, Sizes
from crawler.crawl.stall import StallGuard
from crawler.errors import CursorGoneError, CursorLoopError, SearchTimeoutError, ShardError
from crawler.http.gate import PRIORITY

log = logging.getLogger("harvest")

TIMEOUTS_PER_LIMIT = 2  # timed-out attempts at one page size before it is halved
CURSOR_RESTARTS = 3  # walks from the head after a dead cursor, per shard and run
DEEPEST_PAGES = 2  # pages whose ids mark where a capped walk stopped


@dataclass(frozen=True, slots=True)
class Fetched:
    shard: Shard
    cursor: Cursor | None
    page: Page
    depth: int  # positions deep into the query after this page
    capped: bool  # the page ends the walk at the server's cap, not at the query's end
    stop_when_known: bool  # an incremental walk: a page of known images only ends it
    other_end: str | None  # the shard walking the same query from the other end: stop on meeting it
    may_meet: bool  # the two ends' walks are near enough in time for a shared id to be their meeting
    # Set when the walker must learn how the commit went (known page, the ends met) before
    # it fetches on, so it never walks past a frontier.
    committed: asyncio.Future[PageResult] | None = None

    def levels(self) -> dict[int, int]:
        """Images on the page by browsing level (the SFW-host check reads these)."""
        counts = collections.Counter(i.get("browsingLevel") for i in self.page.items)
        return {int(k): n for k, n in counts.items() if isinstance(k, int) and not isinstance(k, bool)}


@dataclass(frozen=True, slots=True)
class Failed:
    shard: Shard
    error: str
    cause: ShardError | None = None  # with the answer that stopped it, when one did


@dataclass(frozen=True, slots=True)
class Split:
    shard: Shard
    children: list[Shard]
    ends: bool = False  # the children walk the shard from its two ends


@dataclass(frozen=True, slots=True)
class Ends:
    """`shard` reached the cap from one end; `other` now walks it from the other end."""

    shard: Shard
    other: Shard
    deepest: list[int]


@dataclass(slots=True)
class Crew:
    """The walks fetching now, against how many requests the run wants in flight."""

    active: int = 0

    def short(self, client: CivitaiApi) -> bool:
        return self.active < client.in_flight_target


@dataclass(frozen=True, slots=True)
class Walker:
    """What every walk of a run shares."""

    client: CivitaiApi
    queue: asyncio.Queue[Any]
    walk_cap: int
    max_pages_without_new: int
    crew: Crew = field(default_factory=Crew)
    sizes: Sizes = field(default_factory=Sizes)


@dataclass(slots=True)
class _Walk:
    """Where one walk is: its cursor, depth, the ids it saw deepest."""

    cursor: Cursor | None
    depth: int
    used: set[str] = field(default_factory=set)
    deepest: collections.deque[list[int]] = field(
        default_factory=lambda: collections.deque(maxlen=DEEPEST_PAGES)
    )
    capped: bool = False
    met: bool = False
    other_capped: bool = False  # this end's last page found the other end capped too
    other_end: str | None = None  # the shard walking this one's query from its other end
    pair: Pair | None = None  # sized as it goes, when both ends are walked from their heads
    halved: bool = False  # stopped: the shard is walked as halves instead


async def walk(shard: Shard, plan: WalkPlan, walker: Walker, *, both_ends: bool = False) -> None:
    """Walk `shard` as `plan` says (`both_ends`: with its other end from the start); failures
    go on the queue, never up."""
    walk_: _Walk | None = None
    try:
        async with asyncio.TaskGroup() as helpers:  # the other end, when one is started on the way
            try:
                walk_ = await _walk(shard, plan, walker, helpers, both_ends)
            except ShardError as exc:
                exc.shard = exc.shard or shard.key
                await walker.queue.put(Failed(shard, str(exc), exc))
    finally:
        walker.sizes.close(shard.key)
    if walk_ is not None and walk_.halved and walk_.pair is not None and walk_.pair.key == shard.key:
        await _walk_halves(shard, walk_.pair.other, walker)  # both ends have stopped


async def _walk(
    shard: Shard, plan: WalkPlan, walker: Walker, helpers: asyncio.TaskGroup, both_ends: bool
) -> _Walk:
    restarts = 0
    while True:
        walk_ = _Walk(plan.start, plan.depth, other_end=plan.other_end)
        walk_.pair = walker.sizes.pairs.get(shard.key) if plan.start is None else None
        walker.crew.active += 1
        try:
            if both_ends and walk_.other_end is None:
                await _start_other_end(shard, walker, walk_, helpers)
            await _follow(shard, plan, walker, walk_, helpers)
        except SearchTimeoutError:
            await _walk_children(shard, walker, "timing out")
            return walk_
        except CursorGoneError as gone:
            restarts += 1
            if restarts > CURSOR_RESTARTS:
                raise CursorGoneError(
                    f"{gone} (walked again from the head {CURSOR_RESTARTS} times)"
                ) from None
            log.warning("%s: %s; walking it again from the head", describe(shard), gone)
            # Known pages do not end the new walk before it is past where the old one was.
            plan = replace(
                plan,
                start=None,
                depth=0,
                known_from=max(walk_.depth, plan.known_from),
                other_end=walk_.other_end,
            )
            walker.sizes.close(shard.key)  # a walk from the head again: its first stretch is gone
            continue
        finally:
            walker.crew.active -= 1
        if walk_.capped and not walk_.met:
            await _beyond_the_cap(shard, replace(plan, other_end=walk_.other_end), walker, walk_)
        return walk_


async def _follow(
    shard: Shard, plan: WalkPlan, walker: Walker, walk_: _Walk, helpers: asyncio.TaskGroup
) -> None:
    """Follow the cursors to the end (or the cap, or the other end)."""
    size = PageSize(int(shard.value("limit") or 200))
    stall = StallGuard(walker.max_pages_without_new)
    while True:
        if walk_.pair is not None and walk_.pair.stops(shard.key):
            walk_.halved = walk_.pair.halve and not walk_.pair.met
            return  # else the state marks this end done when the other meets it
        walk_.used.add(repr(walk_.cursor))
        PRIORITY.set(_urgency(walk_))
        try:
            page = await walker.client.images(
                with_limit(shard.params, size.current), walk_.cursor, TIMEOUTS_PER_LIMIT
            )
        except SearchTimeoutError:
            if not size.shrink():
                raise
            log.warning("%s: timing out; asking for %d images a page", describe(shard), size.current)
            continue
        size.answered()
        check_items(shard, page)
        _check_loop(walk_, page)
        if page.next_cursor is not None:  # the last page ends the walk whatever it holds
            stall.page(page.ids)
        walk_.depth = _depth_after(walk_, size.current)
        walk_.deepest.append(page.ids)
        walk_.capped = page.next_cursor is None and walk_.depth >= walker.walk_cap
        if walk_.pair is not None:  # before the commit: it decides whether the ends met
            walker.sizes.page(walk_.pair, shard.key, page.items, walk_.depth)
        done = await _hand_on(shard, plan, walker, walk_, page)
        if walk_.pair is not None:
            walk_.pair.committed(shard.key)
        if done or page.next_cursor is None:
            return
        walk_.cursor = page.next_cursor
        if _wants_other_end(shard, plan, walker, walk_):
            await _start_other_end(shard, walker, walk_, helpers)
            if walk_.pair is not None:
                walker.sizes.page(walk_.pair, shard.key, page.items, walk_.depth)  # its first stretch
        _size(shard, walker, walk_)
        await _until_sized(shard, walker, walk_)


# -- more walkers --------------------------------------------------------------
# With fewer walks fetching than requests the run wants in flight, a walk that has a
# second page gets a second walker: the same query from its other end (`sort=Oldest`
# for a `Newest` walk, and back), until the two meet. The walk that started it sends
# its next request only once the other end's first page is committed: by then the two
# have met (a shard of two pages, walked in a plain walk's two requests), or less than
# a page lies between them (the other end stops, this one walks the rest), or the pair
# is sized and perhaps halved. So nothing is walked twice but, at most, the page where
# the two meet, and a small shard costs what one walk of it would. A shard that can be
# split and is capped from both ends is split then, its children walked from their heads.


def _wants_other_end(shard: Shard, plan: WalkPlan, walker: Walker, walk_: _Walk) -> bool:
    if walk_.other_end is not None or plan.stop_when_known or plan.known_from or plan.start is not None:
        return False  # already two-ended, or an incremental or resumed walk: it knows its frontier
    if not walker.crew.short(walker.client):
        return False
    return shard in ends_of(shard)  # its sort is one end's: the walk so far is that end's


async def _start_other_end(shard: Shard, walker: Walker, walk_: _Walk, helpers: asyncio.TaskGroup) -> None:
    other = next(e for e in ends_of(shard) if e != shard)
    if walk_.depth:
        why = "%s: %d images deep, walkers to spare: walking it from its other end too"
        log.info(why, describe(shard), walk_.depth)
    walk_.other_end = other.key
    await walker.queue.put(Ends(shard, other, [i for ids in walk_.deepest for i in ids]))
    walk_.pair = walker.sizes.open(shard.key, other.key, int(shard.value("limit") or 200), walker.walk_cap)
    helpers.create_task(walk(other, WalkPlan(None, False, other_end=shard.key), walker))


# -- halves --------------------------------------------------------------------
# Two ends walked from their heads say, after a page each, about how much lies
# between them (`sizing`); a shard with far more pages than its two walkers can
# take before the rest of the run is done is walked as halves instead, each from
# both ends. The pages walked so far are kept (their images are known, not
# written again); the halves walk them once more, a page or two per end.


def _urgency(walk_: _Walk) -> float:
    """Whose requests go first: a lone walker, or an end not sized yet (nothing says it is
    small), then the ends with most pages ahead of them. A lone walker has one request in
    flight at most, so going first never takes more than its share."""
    left = walk_.pair.pages_left() if walk_.pair is not None else None
    return math.inf if left is None else left / 2


def _may_meet(walk_: _Walk) -> bool:
    """Ends meet where their walks cross in time (an id both served is then the proof); a
    shared id while about a page or more lies between them is not a meeting."""
    left = walk_.pair.pages_left() if walk_.pair is not None else None
    return left is None or left < 1


def _size(shard: Shard, walker: Walker, walk_: _Walk) -> None:
    pair = walk_.pair
    if pair is None:
        return
    parts = len(halves(shard))
    if parts and walker.sizes.decide(pair, walker.client.in_flight_target, walker.crew.active, parts):
        left = pair.pages_left() or 0
        log.info("%s: about %.0f pages left, too many for two walkers", describe(shard), left)


async def _until_sized(shard: Shard, walker: Walker, walk_: _Walk) -> None:
    """The end that started its pair waits for the other end's first page to be committed before
    it walks on: if the shard is halved, each page walked now is walked again by a half; if the
    two met there, or are less than a page apart, a page asked for now is one walked already."""
    pair = walk_.pair
    if pair is None or pair.key != shard.key or pair.sized.is_set():
        return
    walker.crew.active -= 1
    try:
        await pair.sized.wait()
    finally:
        walker.crew.active += 1


async def _walk_halves(shard: Shard, other_end: str, walker: Walker) -> None:
    children = halves(shard)
    other = next(e for e in ends_of(shard) if e.key == other_end)
    parts = "2 halves" if len(children) == 2 else f"{len(children)} parts, one per type"
    log.info("%s: walking it as %s, each from both ends", describe(shard), parts)
    await walker.queue.put(Split(shard, children, ends=True))  # before any page of theirs
    await walker.queue.put(Split(other, []))  # the other end's walk is over: its halves walk it
    async with asyncio.TaskGroup() as group:
        for child in children:
            group.create_task(walk(child, WalkPlan(None, False), walker, both_ends=True))


def _check_loop(walk_: _Walk, page: Page) -> None:
    if page.next_cursor is not None and repr(page.next_cursor) in walk_.used:
        raise CursorLoopError(f"the cursor looped: {page.next_cursor!r} was already followed in this walk")


def _depth_after(walk_: _Walk, limit: int) -> int:
    """Positions walked after this page: the feed's cursors say where they point; for other
    cursors, count the positions asked for."""
    start = 0 if walk_.cursor is None else IMAGES.cursor_offset(walk_.cursor)
    return (walk_.depth if start is None else start) + limit


async def _hand_on(shard: Shard, plan: WalkPlan, walker: Walker, walk_: _Walk, page: Page) -> bool:
    """Queue the page for its commit; True when the commit ended the walk early."""
    stop = plan.stop_when_known and walk_.depth > plan.known_from
    wait = stop or walk_.other_end is not None
    committed: asyncio.Future[PageResult] | None = (
        asyncio.get_running_loop().create_future() if wait else None
    )
    await walker.queue.put(
        Fetched(
            shard,
            walk_.cursor,
            page,
            walk_.depth,
            walk_.capped,
            stop,
            walk_.other_end,
            _may_meet(walk_),
            committed,
        )
    )
    if committed is None:
        return False
    result = await committed
    walk_.met, walk_.other_capped = result.met, result.other_capped
    if result.met and walk_.pair is not None:
        walk_.pair.met = True  # the other end stops before its next request
    return result.done


async def _beyond_the_cap(shard: Shard, plan: WalkPlan, walker: Walker, walk_: _Walk) -> None:
    """A walk that stopped at the cap: split it, or walk it from its other end."""
    if plan.other_end is not None:
        await _both_ends_capped(shard, walker, walk_)
        return
    if split(shard):
        await _walk_children(shard, walker, f"capped {walk_.depth} images deep")
        return
    ends = ends_of(shard)
    if shard in ends:  # it is one end itself: walk the other one, until it meets this one
        other = next(e for e in ends if e != shard)
        log.warning("%s: capped %d images deep; walking it from the other end", describe(shard), walk_.depth)
        await walker.queue.put(Ends(shard, other, [i for ids in walk_.deepest for i in ids]))
        await walk(other, WalkPlan(None, False, other_end=shard.key), walker)
        return
    log.warning("%s: capped %d images deep; walking it from both ends", describe(shard), walk_.depth)
    await walker.queue.put(Split(shard, ends, ends=True))
    first, last = ends
    async with asyncio.TaskGroup() as group:
        group.create_task(walk(first, WalkPlan(None, False, other_end=last.key), walker))
        group.create_task(walk(last, WalkPlan(None, False, other_end=first.key), walker))


async def _both_ends_capped(shard: Shard, walker: Walker, walk_: _Walk) -> None:
    """One end of a two-ended walk reached the cap; once both have, the shard is split."""
    if not walk_.other_capped:
        log.info("%s: capped %d images deep; its other end walks on", describe(shard), walk_.depth)
    elif split(shard):
        await _walk_children(shard, walker, "capped from both ends")
    else:
        log.warning("%s: capped from both ends; the images between cannot be reached", describe(shard))


async def _walk_children(shard: Shard, walker: Walker, why: str) -> None:
    children = split(shard)
    if not children:
        raise SearchTimeoutError("requests keep timing out even at the smallest page size")
    log.warning("%s: %s; splitting it into %d shards", describe(shard), why, len(children))
    await walker.queue.put(Split(shard, children))  # recorded before any child page is committed
    await walk_all(children, [WalkPlan(None, False)] * len(children), walker)


async def walk_all(shards: Sequence[Shard], plans: Sequence[WalkPlan], walker: Walker) -> None:
    async with asyncio.TaskGroup() as group:
        for shard, plan in zip(shards, plans, strict=True):
            group.create_task(walk(shard, plan, walker))
