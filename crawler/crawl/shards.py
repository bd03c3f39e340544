"""Splitting queries into shards: the units that are walked and checkpointed.

A `modelId` query becomes one `modelVersionId` shard per published version
(the legacy modelId path loses rows and times out, see api-facts.md); a list
value becomes one shard per element. A shard's key is its query string without
`limit`, so it stays the same across runs and a changed `limit` keeps its cursor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

from crawler.civitai.images import TYPES
from crawler.config import Query
from crawler.errors import ForeignItemsError, ShardError

log = logging.getLogger("harvest")

WireParams = tuple[tuple[str, str], ...]

# Item fields that must equal the shard's value when the item carries them: the
# API has answered a filter it could not apply with the global feed.
_CHECKED_KEYS = ("postId", "username")


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


def _split_lists(query: Query) -> list[WireParams]:
    """One parameter set per element of the query's list-valued key."""
    fixed = [(k, v) for k, v in query.params if isinstance(v, str)]
    listed = [(k, v) for k, v in query.params if not isinstance(v, str)]
    if not listed:
        return [tuple(fixed)]
    key, values = listed[0]
    return [(*fixed, (key, value)) for value in values]


def _needs_versions(params: WireParams) -> str | None:
    names = {k for k, _ in params}
    if "modelId" in names and not names & {"modelVersionId", "imageId"}:
        return dict(params)["modelId"]
    return None


async def plan_shards(
    queries: Sequence[Query], lister: VersionLister
) -> tuple[list[Shard], list[PlanFailure]]:
    """Every shard of every query, deduplicated by key, in config order."""
    shards: dict[str, Shard] = {}
    failures: list[PlanFailure] = []
    for query in queries:
        for params in _split_lists(query):
            model_id = _needs_versions(params)
            if model_id is None:
                _add(shards, make_shard(query.name, params))
                continue
            try:
                versions = await lister.model_version_ids(model_id)
            except ShardError as exc:
                failures.append(PlanFailure(query.name, f"modelId={model_id}", str(exc)))
                continue
            if not versions:
                log.warning("%s: model %s lists no published versions", query.name, model_id)
            rest = [(k, v) for k, v in params if k != "modelId"]
            for version in versions:
                _add(shards, make_shard(query.name, [*rest, ("modelVersionId", str(version))]))
    return list(shards.values()), failures


def _add(shards: dict[str, Shard], shard: Shard) -> None:
    shards.setdefault(shard.key, shard)


def check_items(shard: Shard, items: Sequence[dict[str, Any]]) -> None:
    """Refuse a page holding images that do not match the shard's key."""
    for name in _CHECKED_KEYS:
        expected = shard.value(name)
        if expected is None:
            continue
        for item in items:
            got = item.get(name)
            if got is not None and str(got).casefold() != expected.casefold():
                raise ForeignItemsError(
                    f"{name}={expected}: the API served image {item.get('id')} with "
                    f"{name}={got!r}; refusing to write foreign images (filter not applied?)"
                )


def describe(shard: Shard) -> str:
    return f"{shard.query} [{shard.key}]"


def split(shard: Shard) -> list[Shard]:
    """Child shards that together select exactly what `shard` selects, or [] if none.

    Every image has exactly one browsing level and one type, so the bits of
    `browsingLevel`, and then the media types, partition any query.
    """
    levels = shard.value("browsingLevel")
    bits = [b for b in (1, 2, 4, 8, 16) if levels is not None and int(levels) & b]
    if len(bits) > 1:
        return [_child(shard, "browsingLevel", str(bit)) for bit in bits]
    if shard.value("type") is None and levels is not None:
        return [_child(shard, "type", kind) for kind in TYPES]
    return []  # without an explicit browsingLevel the server picks the levels: no exact cover


def _child(shard: Shard, name: str, value: str) -> Shard:
    params = [(k, v) for k, v in shard.params if k != name]
    return make_shard(shard.query, [*params, (name, value)])


def with_limit(params: WireParams, limit: int) -> WireParams:
    return tuple((k, str(limit) if k == "limit" else v) for k, v in params)
