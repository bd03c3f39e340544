"""How much is left of each two-ended walk, and whether one is too big for its two walkers.

The API says nothing of a query's size, but its items say when they were made. Two
walks of one query from its two ends (newest first, oldest first) have, after one
page each, walked a stretch of time at each end: the images per second there,
times the time still between the two walks, is about how many images are left.

A run whose budget needs W requests in flight, with R pages left in all, keeps
every walker busy to the end only if no walker has much more than R / W pages
ahead of it; a walk with far more would be the run's serial tail. Such a shard is
walked as halves instead (each from both ends: four walkers; a half may be halved
again; a single browsing level is split by type instead, into three parts), as
early as its size is known; small shards never are, and the halvings of a run
together cost at most a few percent of its requests (each walks again the few pages
its shard's two ends walked before it was sized).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from crawler.civitai.images import IMAGES

SLACK = 1.3  # pages a walker may have ahead beyond the run's average before its shard is halved
MIN_PAGES = 8  # pages per walker below which a shard is never halved
# Requests a halving into two adds: the pages its two ends walked before it was sized (a page each:
# the starting end waits for the other's first), which the halves walk again, and a meeting.
HALVING_COST = 3
PART_COST = 2  # each part beyond two (a split by type): its two ends' first pages, however small it is
OVERHEAD = 0.04  # of the run's pages, at most, spent on halvings
CLOSE_PAGES = 1.0  # less than this between the ends: one end walks the rest alone
DECIDE_WITHIN = 4  # pages of a pair: later, halving it costs too much walked again


@dataclass(slots=True)
class _EndWalked:
    """The stretch of time one end has walked: from its first item to its latest."""

    start: float | None = None
    reached: float | None = None
    items: int = 0

    def page(self, items: Sequence[dict[str, Any]]) -> None:
        times = [t for t in (IMAGES.item_time(i) for i in items) if t is not None]
        if not times:
            return
        if self.start is None:
            self.start = times[0]
        self.reached = times[-1]
        self.items += len(times)

    @property
    def span(self) -> float:
        return abs(self.reached - self.start) if self.start is not None and self.reached is not None else 0.0


@dataclass(slots=True)
class Pair:
    """A query walked from both ends in this run, from their heads."""

    key: str  # the shard that started the other end's walk (it walks the halves, if any)
    other: str  # the other end's shard
    limit: int  # images a page
    walk_cap: int  # positions the server lets one walk go
    ends: dict[str, _EndWalked] = field(default_factory=dict)
    pages: int = 0  # walked by both ends
    depth: int = 0  # positions deep the starting end's walk is
    decided: bool = False
    halve: bool = False  # both walks stop; the shard is walked as halves
    met: bool = False  # one end met the other: both walks are over
    # The other end's first page is committed (the pair sized, and a meeting known), or a walk ended.
    sized: asyncio.Event = field(default_factory=asyncio.Event)

    def page(self, end: str, items: Sequence[dict[str, Any]], depth: int) -> None:
        self.ends.setdefault(end, _EndWalked()).page(items)
        self.pages += 1
        if end == self.key:
            self.depth = depth

    def committed(self, end: str) -> None:
        """A page of `end` is committed: after the other end's first, the starting end walks on."""
        if end == self.other:
            self.sized.set()

    def stops(self, end: str) -> bool:
        """Whether the walk of `end` stops before its next request: the pair is halved, or has
        met, or is so near to meeting that one more page of the starting end will (its request,
        in flight at the meeting, would be spent on what is walked already); never where the
        starting end could reach the walk cap first (the rest would be left to no walk)."""
        if self.halve or self.met:
            return True
        left = self.pages_left()
        if end != self.other or left is None or left >= CLOSE_PAGES:
            return False
        return self.depth + (CLOSE_PAGES + 1) * self.limit < self.walk_cap

    def pages_left(self) -> float | None:
        """Pages between the two ends' walks, estimated; None until both ends have walked a stretch."""
        if len(self.ends) < 2:
            return None
        first, second = self.ends.values()
        walked = first.span + second.span
        if first.start is None or second.start is None or walked <= 0:
            return None
        gap = abs(first.start - second.start) - walked
        return max(0.0, gap) * (first.items + second.items) / walked / self.limit


@dataclass(slots=True)
class Sizes:
    """Every live two-ended walk of the run, for the decision to halve one."""

    pairs: dict[str, Pair] = field(default_factory=dict)  # by each end's shard key
    walked: int = 0  # pages the pairs have walked, live or not
    spent: int = 0  # requests the halvings so far are reckoned to add

    def open(self, key: str, other: str, limit: int, walk_cap: int) -> Pair:
        self.pairs[key] = self.pairs[other] = pair = Pair(key, other, limit, walk_cap)
        return pair

    def page(self, pair: Pair, end: str, items: Sequence[dict[str, Any]], depth: int) -> None:
        pair.page(end, items, depth)
        self.walked += 1

    def close(self, key: str) -> None:
        """The walk of `key` is over: its pair will not be sized by it; a pair it started is
        no longer live."""
        pair = self.pairs.get(key)
        if pair is not None:
            pair.sized.set()
        if pair is not None and pair.key == key:
            self.pairs.pop(pair.key, None)
            self.pairs.pop(pair.other, None)

    def live(self) -> list[Pair]:
        return list({id(p): p for p in self.pairs.values()}.values())

    def decide(self, pair: Pair, in_flight: int, walkers: int, parts: int = 2) -> bool:
        """Once `pair`'s size is known: whether to halve it (into `parts`). `walkers`: the walks
        fetching now; those not sized yet are counted at the sized ones' average. Asked again at
        each page, as more pairs are sized, for the first `DECIDE_WITHIN` pages of the pair; yes
        only once."""
        own = pair.pages_left()
        if pair.decided or own is None:
            return False
        pair.decided = pair.pages >= DECIDE_WITHIN
        live = self.live()
        if all(q is not pair for q in live):  # its walk began again from the head: no longer listed
            live.append(pair)
        known = [p for p in (q.pages_left() for q in live) if p is not None]
        per_walker = own / 2
        average = sum(known) / (2 * len(known))
        left = sum(known) + max(0, walkers - 2 * len(known)) * average
        cost = self.spent + HALVING_COST + PART_COST * max(0, parts - 2)
        affordable = cost <= OVERHEAD * (left + self.walked)
        pair.halve = affordable and per_walker >= MIN_PAGES and per_walker > SLACK * left / max(1, in_flight)
        if pair.halve:
            self.spent = cost
        pair.decided |= pair.halve
        return pair.halve
