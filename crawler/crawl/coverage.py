"""How the walked shards cover the configured queries, and what they leave uncovered.

A planned shard is walked as itself, or, once split (it timed out, reached the
walk cap or was too big for its walkers), as its children; a shard that cannot be
split and reached the cap is walked from its two ends, each end a shard of its
own. `leaves_of` finds the shards to walk; `capped_lines` and `sfw_warnings` say,
after a run, what could not be reached and what looks like the SFW-only host.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from crawler.archive.state import ShardRow, ShardStatus, State
from crawler.civitai.images import MATURE_LEVELS, SFW_HOST_AFTER
from crawler.crawl.shards import Shard, describe, ends_of, halves, split

MATURE_HOST = "https://civitai.red/api/v1"


def other_end(shard: Shard, row: ShardRow) -> str | None:
    """The key of the shard that walks `shard`'s query from its other end, if it has one."""
    if not row.ends:
        return None
    return next((e.key for e in ends_of(shard) if e.key != shard.key), None)


def leaves_of(shards: Sequence[Shard], state: State) -> Iterator[Shard]:
    """The shards to walk: split ones as their children, two-ended ones with their other end."""
    return _leaves(shards, state, set())


def _leaves(shards: Sequence[Shard], state: State, seen: set[str]) -> Iterator[Shard]:
    for shard in shards:
        if shard.key in seen:
            continue
        seen.add(shard.key)
        row = state.shard(shard.key)
        if row.status == ShardStatus.SPLIT:
            children = _children(shard, state)
            ends = not children
            children = children or ends_of(shard)
            state.enrol(((c.key, c.query) for c in children), ends=ends)
            yield from _leaves(children, state, seen)
            continue
        yield shard
        if row.ends:
            others = [e for e in ends_of(shard) if e.key != shard.key]
            state.enrol(((e.key, e.query) for e in others), ends=True)
            yield from _leaves(others, state, seen)  # an end capped after its other end is split


def _children(shard: Shard, state: State) -> list[Shard]:
    """What a split shard was split into: its halves (for more walkers) if the state knows the
    second of them (no partition for the cap makes that one), else its partition."""
    two = halves(shard)
    return two if two and state.knows(two[1].key) else split(shard)


def capped_lines(state: State, shards: Sequence[Shard]) -> list[str]:
    """One line per shard whose walks stopped at the cap with images out of reach."""
    lines = []
    for shard in shards:
        row = state.shard(shard.key)
        if row.status == ShardStatus.CAPPED and not _split_at_other_end(shard, row, state):
            lines.append(
                f"{describe(shard)}: capped: holds {row.items} images; more exist that no walk reaches "
                "(the server stops every walk at walk_cap positions, from either end)"
            )
    return lines


def _split_at_other_end(shard: Shard, row: ShardRow, state: State) -> bool:
    """A capped end whose other end, capped too, was split: its children reach the rest."""
    other = other_end(shard, row)
    return other is not None and state.shard(other).status == ShardStatus.SPLIT


def sfw_warnings(state: State, shards: Sequence[Shard]) -> list[str]:
    """A query that asked for mature levels and, over many images, got none: the SFW host.

    Counted over all of a query's shards: once split by level, its mature shards
    alone would see nothing at all on that host."""
    mature = {s.query for s in shards if int(s.value("browsingLevel") or 0) & MATURE_LEVELS}
    by_query: dict[str, dict[int, int]] = {query: {} for query in mature}
    for shard in shards:
        if shard.query in by_query:
            counts = by_query[shard.query]
            for level, served in state.levels(shard.key).items():
                counts[level] = counts.get(level, 0) + served
    return [
        f"{query}: asked for R/X/XXX (browsingLevel) but {sum(counts.values())} images were all PG/PG-13: "
        f"the host is probably SFW-only; mature content is served by {MATURE_HOST} with an API key"
        for query, counts in by_query.items()
        if sum(counts.values()) >= SFW_HOST_AFTER and not any(level & MATURE_LEVELS for level in counts)
    ]
