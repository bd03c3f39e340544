"""`harvest media --engine ray` without a cluster: the CDN budget split between the workers."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from crawler.config import MIN_REQUESTS_PER_SECOND, MediaConfig
from crawler.crawl.media_ray import worker_share


@given(
    rate=st.floats(min_value=MIN_REQUESTS_PER_SECOND, max_value=10_000, allow_nan=False),
    concurrency=st.integers(min_value=1, max_value=256),
    workers=st.integers(min_value=1, max_value=1000),
)
def test_the_workers_shares_never_add_up_to_more_than_the_cdn_budget(
    rate: float, concurrency: int, workers: int
) -> None:
    media = MediaConfig(Path("media"), requests_per_second=rate, concurrency=concurrency)
    at_once, share = worker_share(media, workers)
    assert 1 <= at_once <= workers and share.concurrency >= 1  # every task can download
    assert at_once * share.concurrency <= concurrency
    assert Fraction(share.requests_per_second) * at_once <= Fraction(rate)  # exactly, not to a float
    assert share.requests_per_second > 0
    assert share.types == media.types and share.timeout == media.timeout  # the rest is as configured


def test_a_share_is_the_whole_budget_split_evenly() -> None:
    media = MediaConfig(Path("media"), requests_per_second=10.0, concurrency=8)
    assert worker_share(media, 2)[1].concurrency == 4
    assert worker_share(media, 3)[1].concurrency == 2  # 3 x 2 <= 8, where rounding up made 3 x 3
    at_once, share = worker_share(media, 16)  # more workers than downloads: one download each
    assert (at_once, share.concurrency, share.requests_per_second) == (8, 1, 10.0 / 8)
