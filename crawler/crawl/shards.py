"""Splitting queries into shards: the units that are walked and checkpointed.

A list value becomes one shard per element, and a `modelId` query one
`modelVersionId` shard per published version (the images endpoint's expansion,
see `crawler.civitai.images`). A shard's key is its query string without
`limit`, so it stays the same across runs and a changed `limit` keeps its cursor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode

from crawler.archive.segments import MAX_APPEND_LINES
from crawler.civitai.endpoint import Page, WireParams
from crawler.civitai.images import IMAGES
from crawler.config import Query
from crawler.errors import ShardError

log = logging.getLogger("harvest")


@dataclass(frozen=True, slots=True)
class Shard:
    """One walk: fixed parameters, its own cursor."""

    key: str
    query: str
    params: WireParams

    def value(self, name: str) -> str | None:
        return next((v for k, v in self.params if k == name), None)


@dataclass(frozen=True, slots=True)
class PlanFailure:
    """A query part that could not be split (e.g. a model that does not exist)."""

    query: str
    what: str
    error: str


class VersionLister(Protocol):
    async def model_version_ids(self, model_id: str) -> list[int]: ...


def make_shard(query: str, params: Iterable[tuple[str, str]]) -> Shard:
    ordered = tuple(sorted(params))
    key = urlencode([(k, v) for k, v in ordered if k != "limit"])
    return Shard(key=key, query=query, params=ordered)


async def plan_shards(
    queries: Sequence[Query], lister: VersionLister
) -> tuple[list[Shard], list[PlanFailure]]:
    """Every shard of every query, deduplicated by key, in config order."""
    shards: dict[str, Shard] = {}
    failures: list[PlanFailure] = []
    expansion = IMAGES.expansion
    for query in queries:
        for params in IMAGES.each_listed(query.params):
            if expansion is None or (value := expansion.source(params)) is None:
                _add(shards, make_shard(query.name, params))
                continue
            try:
                expanded = await expansion.expand(params, lister.model_version_ids)
            except ShardError as exc:
                failures.append(PlanFailure(query.name, f"{expansion.key}={value}", str(exc)))
                continue
            if not expanded:
                log.warning("%s: %s", query.name, expansion.nothing.format(value))
            for each in expanded:
                _add(shards, make_shard(query.name, each))
    return list(shards.values()), failures


def _add(shards: dict[str, Shard], shard: Shard) -> None:
    shards.setdefault(shard.key, shard)


def check_items(shard: Shard, page: Page) -> None:
    """Refuse a page holding odd ids or images that do not match the shard's key, or more
    images than the API ever serves on one page (the archive's bound on one append)."""
    if len(page.lines) > MAX_APPEND_LINES:
        raise ShardError(f"the API served {len(page.lines)} images on one page; at most {MAX_APPEND_LINES}")
    IMAGES.check_items(shard.params, page)


def describe(shard: Shard) -> str:
    return f"{shard.query} [{shard.key}]"


def split(shard: Shard) -> list[Shard]:
    """Child shards that together select exactly what `shard` selects, or [] if none."""
    return [make_shard(shard.query, params) for params in IMAGES.split(shard.params)]


def ends_of(shard: Shard) -> list[Shard]:
    """`shard` walked newest first and oldest first."""
    return [make_shard(shard.query, params) for params in IMAGES.from_ends(shard.params)]


def halves(shard: Shard) -> list[Shard]:
    """Child shards that together select exactly what `shard` selects, for more walkers: two by
    browsing level, or, for a single level, one per type; [] if none."""
    return [make_shard(shard.query, params) for params in IMAGES.halve(shard.params)]


def with_limit(params: WireParams, limit: int) -> WireParams:
    return tuple((k, str(limit) if k == "limit" else v) for k, v in params)
