"""`GET /api/v1/images`, as the harvester knows it (see shared/reference/api-facts.md).

Everything endpoint-specific lives here: the parameters a [[queries]] table may
set and how each is spelled on the wire, the list keys, the refused `page` and
`cursor`, `limit=200` by default, the `modelId` expansion into one
`modelVersionId` shard per published version (the legacy modelId path loses a
row per page and times out), the exact partitions (browsingLevel bits, then
type), the `postId`/`username` guards against the global feed served in place of
a filter, and the frontier of each sort.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from crawler import checks
from crawler.civitai.endpoint import Check, Cursor, Endpoint, Expansion, Frontier, WireParams

SORTS: tuple[str, ...] = ("Most Reactions", "Most Comments", "Most Collected", "Newest", "Oldest", "Random")
PERIODS: tuple[str, ...] = ("Day", "Week", "Month", "Year", "AllTime")
TYPES: tuple[str, ...] = ("image", "video", "audio")
NSFW_LEVELS: tuple[str, ...] = ("None", "Soft", "Mature", "X")
LEVEL_BITS: tuple[int, ...] = (1, 2, 4, 8, 16)  # browsingLevel: PG, PG-13, R, X, XXX; one per image
MATURE_LEVELS = 4 | 8 | 16  # R, X, XXX: never served by the SFW host (civitai.com since 2026-04)
SFW_HOST_AFTER = 1000  # images of a mature query, none mature, before the SFW host is suspected
LIST_KEYS: frozenset[str] = frozenset({"postId", "modelVersionId", "userId", "modelId", "username"})
DEFAULT_LIMIT = 200  # the API's maximum: fewer requests for the same items
LOOKUP_MAX = 100  # ids= takes at most this many ids (more is a zod 400)
OBSERVED: tuple[str, ...] = ("nsfwLevel", "browsingLevel", "stats")  # what changes after first sight

log = logging.getLogger("harvest")


def _wire_id(value: Any) -> str:
    return str(checks.integer(value, 1))


def _wire_bool(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    raise checks.Invalid(f"expected true or false, {checks.got(value)}")


def _wire_nsfw(value: Any) -> str:
    if isinstance(value, bool):
        return _wire_bool(value)
    if isinstance(value, str):
        return checks.one_of(NSFW_LEVELS, value)
    raise checks.Invalid(f"expected true, false or one of {checks.quoted(NSFW_LEVELS)}, {checks.got(value)}")


def _wire_tags(value: Any) -> str:
    if isinstance(value, list) and value:
        return ",".join(checks.each(value, _wire_id))
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        if all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):
            return ",".join(dict.fromkeys(str(int(part)) for part in parts))
    if checks.is_int(value) and value > 0:
        return str(value)
    raise checks.Invalid(
        f"expected a tag id, a list of them or a comma-separated string of them, {checks.got(value)}"
    )


def _wire_base_models(value: Any) -> str:
    if isinstance(value, list) and value:
        return ",".join(checks.each(value, checks.text))
    if isinstance(value, str):
        return checks.text(value)
    raise checks.Invalid(f"expected a string or a non-empty list of strings, {checks.got(value)}")


_PARAMS: dict[str, Check] = {
    "limit": lambda value: str(checks.integer(value, 1, 200)),
    **dict.fromkeys(("postId", "modelId", "modelVersionId", "imageId", "userId"), _wire_id),
    "username": checks.text,
    "period": functools.partial(checks.one_of, PERIODS),
    "sort": functools.partial(checks.one_of, SORTS),
    "type": functools.partial(checks.one_of, TYPES),
    "nsfw": _wire_nsfw,
    "browsingLevel": lambda value: str(checks.integer(value, 1, 31)),
    "tags": _wire_tags,
    "baseModels": _wire_base_models,
    **dict.fromkeys(("withMeta", "withTags"), _wire_bool),
}
_WALKED = "the harvester walks cursors itself; remove it"


def _version_ids(body: Any) -> list[int] | None:
    """`GET /models/{id}`: the ids of its `modelVersions[]` (published, with a file), or None.

    An id given as an integer string ("11") is that integer; anything else is
    reported and skipped, never dropped silently.
    """
    versions = body.get("modelVersions") if isinstance(body, dict) else None
    if not isinstance(versions, list):
        return None
    ids: list[int] = []
    for version in versions:
        raw = version.get("id") if isinstance(version, dict) else version
        value = _as_id(raw) if isinstance(version, dict) else None
        if value is None:
            log.warning(
                "model %s lists a version whose id is not an integer (%.60r); skipped", body.get("id"), raw
            )
        else:
            ids.append(value)
    return ids


def _as_id(raw: Any) -> int | None:
    if checks.is_int(raw):
        return int(raw) if raw > 0 else None
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and int(raw) > 0:
        return int(raw)
    return None


def _partitions(params: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every image has exactly one browsing level and one type, so the bits of an explicit
    `browsingLevel`, and then the media types, partition any query."""
    levels = params.get("browsingLevel")
    if levels is None:
        return []  # the server picks the levels: no exact cover
    bits = [bit for bit in LEVEL_BITS if int(levels) & bit]
    if len(bits) > 1:
        return [("browsingLevel", str(bit)) for bit in bits]
    if "type" not in params:
        return [("type", kind) for kind in TYPES]
    return []


def _halving(params: Mapping[str, str]) -> list[tuple[str, str]]:
    """The lowest browsing level against the others: PG holds about half of most models' images,
    so the two halves are near even. A single level is split by type instead, as `_partitions`
    splits it (the parameter takes one value, so three parts, not two: most images are `image`,
    the other two are small and walked quickly); with the type fixed too, there is nothing left."""
    levels = params.get("browsingLevel")
    bits = [bit for bit in LEVEL_BITS if levels is not None and int(levels) & bit]
    if len(bits) < 2:
        return _partitions(params)  # by type, or nothing (no explicit level, or the type fixed)
    return [("browsingLevel", str(bits[0])), ("browsingLevel", str(sum(bits[1:])))]


def _cursor_offset(cursor: Cursor) -> int | None:
    """The search feed's `"<offset>|<ms>"` says how deep it points; bare ids and `feed:` do not."""
    if isinstance(cursor, str):
        head, bar, _ = cursor.partition("|")
        if bar and head.isascii() and head.isdigit():
            return int(head)
    return None


def _cursor_gone(message: str) -> bool:
    """`This cursor can no longer be continued`, `... cannot be continued with these filters`,
    a numeric cursor beyond 32 bits: all mean walk again from the head, not a bad config."""
    return "cursor" in message.casefold()


def lookup_params(ids: Sequence[int]) -> WireParams:
    """The current state of up to LOOKUP_MAX images: `ids=` with a `limit` that holds them all
    (the server's default is smaller) and every browsing level (an id filtered out by the levels
    asked would look gone). The answer is a subset: hidden or deleted ids are absent; it is in
    the default sort's order, never the request's, and carries no cursor (the legacy path)."""
    if not 0 < len(ids) <= LOOKUP_MAX:
        raise ValueError(f"{len(ids)} ids in one lookup; 1 to {LOOKUP_MAX}")
    return (("ids", ",".join(str(i) for i in ids)), ("limit", str(LOOKUP_MAX)), ("browsingLevel", "31"))


IMAGES = Endpoint(
    path="/images",
    params=MappingProxyType(_PARAMS),
    list_keys=LIST_KEYS,
    refused=MappingProxyType({"page": _WALKED, "cursor": _WALKED}),
    defaults=(("limit", str(DEFAULT_LIMIT)),),
    id_key="id",
    expansion=Expansion(
        key="modelId",
        into="modelVersionId",
        unless=frozenset({"modelVersionId", "imageId"}),
        path="/models/{}",
        parse=_version_ids,
        nothing="model {} lists no published versions",
    ),
    partitions=_partitions,
    halving=_halving,
    time_key="createdAt",
    guards=("postId", "username"),
    sort_key="sort",
    frontiers=MappingProxyType({"Newest": Frontier.STOP_WHEN_KNOWN, "Oldest": Frontier.CONTINUE_FROM_TAIL}),
    end_sorts=("Newest", "Oldest"),
    cursor_offset=_cursor_offset,
    cursor_gone=_cursor_gone,
)
