"""The no-progress guard (issue 9, item 18): pages that bring no image new to the walk are counted,
and the walk stops at `limit` of them in a row; memory is a window of recent ids, never the walk."""

from __future__ import annotations

import pytest

from crawler.crawl.stall import WINDOW, StallGuard
from crawler.errors import NoProgressError, ShardError


def test_the_same_page_again_and_again_stops_at_the_limit() -> None:
    guard = StallGuard(limit=3)
    guard.page([1, 2, 3])
    guard.page([3, 2, 1])
    guard.page([1])
    with pytest.raises(
        NoProgressError, match="the walk makes no progress: 3 pages in a row brought no new image"
    ):
        guard.page([2, 3])
    assert issubclass(NoProgressError, ShardError)  # the shard stops, the others go on


def test_one_new_image_resets_the_count() -> None:
    guard = StallGuard(limit=2)
    for page in ([1, 2], [1, 2], [1, 2, 3], [3], [4], []):
        guard.page(page)
    with pytest.raises(NoProgressError):
        guard.page([1])  # remembered: the window holds far more than four ids


def test_empty_pages_count_as_no_progress() -> None:
    guard = StallGuard(limit=2)
    guard.page([])
    with pytest.raises(NoProgressError):
        guard.page([])


def test_a_long_walk_of_new_images_never_stops_and_memory_stays_in_the_window() -> None:
    guard = StallGuard(limit=1)
    for start in range(0, 1_000_000, 200):
        guard.page(range(start, start + 200))
    assert guard.streak == 0 and len(guard._seen) <= WINDOW and guard._held == len(guard._seen)


def test_forgotten_images_count_as_new_so_the_window_never_stops_a_walk_wrongly() -> None:
    guard = StallGuard(limit=1, window=4)
    guard.page([1, 2])
    guard.page([3, 4])
    guard.page([5, 6])  # [1, 2] is forgotten
    guard.page([1, 2])  # so this is progress, not a stop
    with pytest.raises(NoProgressError):
        guard.page([5, 6])


def test_a_cycle_shorter_than_the_window_is_caught() -> None:
    guard = StallGuard(limit=5)
    cycle = [list(range(n, n + 200)) for n in range(0, 1000, 200)]  # five pages, 1,000 ids
    for page in cycle:
        guard.page(page)
    with pytest.raises(NoProgressError):
        for page in cycle:
            guard.page(page)
