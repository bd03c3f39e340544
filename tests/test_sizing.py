"""The size of a two-ended walk from its two ends' first pages, the decision to halve it, and
whose requests go first."""

from __future__ import annotations

import asyncio
import datetime
import math
from typing import Any

from crawler.crawl.sizing import MIN_PAGES, Sizes
from crawler.crawl.walker import _urgency, _Walk
from crawler.http.gate import PRIORITY, RateGate
from crawler.http.outcomes import Kind, Outcome
from crawler.testing.fakehttp import VirtualClock, run_virtual

T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
OK = Outcome(Kind.OK, "ok", status=200)


def items(first: int, count: int, step: int) -> list[dict[str, Any]]:
    """`count` images made one second apart, from second `first` (step -1: newest first)."""
    return [
        {"id": i, "createdAt": (T0 + datetime.timedelta(seconds=first + k * step)).isoformat()}
        for k, i in enumerate(range(count))
    ]


def sized(sizes: Sizes, key: str, images: int, limit: int = 100) -> None:
    pair = sizes.open(key, key + "-old", limit, walk_cap=50_000)
    sizes.page(pair, key, items(images - 1, limit, -1), limit)  # newest first: the top `limit`
    sizes.page(pair, key + "-old", items(0, limit, 1), limit)  # oldest first: the bottom `limit`


def test_pages_left_is_the_time_between_the_ends_at_their_density() -> None:
    sizes = Sizes()
    sized(sizes, "a", 10_000)
    left = sizes.pairs["a"].pages_left()
    assert left is not None and abs(left - 98) <= 1.5  # 10,000 images, 200 walked, 100 a page
    crossed = Sizes()
    sized(crossed, "b", 150)  # the two first pages overlap: nothing lies between
    assert crossed.pairs["b"].pages_left() == 0


def test_only_a_shard_far_bigger_than_the_rest_is_halved_and_small_ones_never() -> None:
    sizes = Sizes()
    for key, images in (("big", 20_000), ("s1", 1_000), ("s2", 1_000), ("s3", 1_000)):
        sized(sizes, key, images)
    small = sizes.pairs["s1"]
    assert small.pages_left() is not None and small.pages_left() / 2 < MIN_PAGES  # type: ignore[operator]
    assert not sizes.decide(small, in_flight=64, walkers=8)
    assert sizes.decide(sizes.pairs["big"], in_flight=8, walkers=8)
    assert not sizes.decide(sizes.pairs["big"], in_flight=8, walkers=8)  # yes only once


def test_a_pair_no_longer_listed_is_still_decided_on_its_own() -> None:
    sizes = Sizes()
    sized(sizes, "a", 20_000)
    pair = sizes.pairs["a"]
    sizes.close("a")  # its starting end walked again from the head
    assert not sizes.pairs and pair.sized.is_set()
    assert sizes.decide(pair, in_flight=8, walkers=2)


def test_the_other_end_stops_a_page_from_meeting_unless_the_cap_is_as_near() -> None:
    far, near = Sizes(), Sizes()
    for sizes, cap in ((far, 50_000), (near, 250)):
        pair = sizes.open("a", "a-old", 100, walk_cap=cap)
        sizes.page(pair, "a", items(249, 100, -1), 100)
        sizes.page(pair, "a-old", items(0, 100, 1), 100)  # about half a page between them
    assert far.pairs["a"].stops("a-old") and not far.pairs["a"].stops("a")
    assert not near.pairs["a"].stops("a-old")  # the starting end is capped before it meets


# -- longest work first ----------------------------------------------------------


def urgent_first(urgencies: list[float]) -> list[int]:
    """The order in which requests of these urgencies, queued in this order behind one held slot,
    are let through the gate (on virtual time)."""
    clock = VirtualClock()
    gate = RateGate(100.0, 1, max_backoff=1.0, clock=clock, rng=lambda: 0.0)
    served: list[int] = []

    async def request(n: int, urgency: float) -> None:
        PRIORITY.set(urgency)  # as a walk sets it before each request
        async with gate.turn() as turn:
            served.append(n)
            turn.observe(OK)

    async def main() -> None:
        async with gate.turn() as holder:  # every request below queues behind this one
            tasks = [asyncio.ensure_future(request(n, u)) for n, u in enumerate(urgencies)]
            await asyncio.sleep(0)
            holder.observe(OK)
        await asyncio.gather(*tasks)

    run_virtual(clock, main)
    return served


def test_a_lone_walker_or_an_unsized_end_goes_before_ends_with_few_pages_left() -> None:
    sizes = Sizes()
    sized(sizes, "big", 10_000)  # about 98 pages between its ends
    sized(sizes, "small", 450)  # about 2.5 pages
    unsized = sizes.open("new", "new-old", 100, walk_cap=50_000)  # its other end has not answered
    walks = {
        "few left": _Walk(None, 0, pair=sizes.pairs["small"]),
        "many left": _Walk(None, 0, pair=sizes.pairs["big"]),
        "unsized end": _Walk(None, 0, pair=unsized),
        "lone walker": _Walk(None, 0),
    }
    urgency = {name: _urgency(walk) for name, walk in walks.items()}
    assert urgency["lone walker"] == urgency["unsized end"] == math.inf
    assert urgency["many left"] > urgency["few left"] > 0
    names = list(walks)  # queued in this order: the least urgent first
    order = [names[n] for n in urgent_first([urgency[name] for name in names])]
    assert order == ["unsized end", "lone walker", "many left", "few left"]
