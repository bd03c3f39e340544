"""The size of a two-ended walk from its two ends' first pages, and the decision to halve it."""

from __future__ import annotations

import datetime
from typing import Any

from crawler.crawl.sizing import MIN_PAGES, Sizes

T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


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
