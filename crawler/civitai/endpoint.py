"""What the harvester knows about one Civitai list endpoint, as one frozen value.

An `Endpoint` says which parameters a query may carry and how each is checked
and spelled on the wire, which may be lists (one shard per element), which are
refused and why, how a page's body is read, which parameter must be replaced by a
list of narrower ones before walking (`Expansion`), how a shard splits into
children that partition it exactly, which item fields must match the shard, and
where a walk over a given sort can start and stop again (`Frontier`).

It holds knowledge, not machinery: the network, the state and the walk are the
callers'. An expansion is given the function that lists values, so this package
never imports the HTTP client.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crawler import checks, exactjson
from crawler.errors import ForeignItemsError, OddItemError

Cursor = str | int  # the search feed's "<offset>|<ms>" (or "feed:..."), or the legacy path's image id
ParamValue = str | tuple[str, ...]  # a tuple only for a list key: one shard per element
WireParams = tuple[tuple[str, str], ...]
Check = Callable[[Any], str]  # a TOML value -> its wire spelling, or checks.Invalid
Lister = Callable[[str], Awaitable[Sequence[int]]]  # e.g. a model id -> its version ids


MAX_ID = 2**63 - 1  # ids are indexed as SQLite integers


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list endpoint: each item's value, its bytes as served, its id; the next cursor."""

    items: list[dict[str, Any]]  # read only: what is written is `lines`
    lines: list[bytes]  # each item's own bytes from the response, as one NDJSON line
    ids: list[int]
    next_cursor: Cursor | None


class Frontier(enum.Enum):
    """How far a shard walked to its end before must be walked again."""

    STOP_WHEN_KNOWN = "stop-when-known"  # newest first: new items come first; stop at a known page
    CONTINUE_FROM_TAIL = "continue-from-tail"  # oldest first: new items come after the last page
    WALK_ALL = "walk-all"  # no stable order: walk everything, dedupe drops what is known


@dataclass(frozen=True, slots=True)
class Expansion:
    """A parameter walked badly by the API, replaced by one shard per value of a narrower one.

    `key` is expanded unless the query already names one of `unless`; the values
    come from `path` (formatted with the key's value), whose body `parse` reads
    into ids, or None when the body is not the shape promised.
    """

    key: str
    into: str
    unless: frozenset[str]
    path: str
    parse: Callable[[Any], list[int] | None]
    nothing: str  # logged when the listing is empty; formatted with the key's value

    def source(self, params: Iterable[tuple[str, str]]) -> str | None:
        """The value of `key` when these parameters must be expanded, else None."""
        values = dict(params)
        if self.key in values and not values.keys() & self.unless:
            return values[self.key]
        return None

    async def expand(self, params: WireParams, lister: Lister) -> list[WireParams]:
        """`params` itself, or one parameter set per value `lister` gives (maybe none).

        Whatever `lister` raises (a missing model, say) goes up unchanged.
        """
        value = self.source(params)
        if value is None:
            return [params]
        rest = tuple((k, v) for k, v in params if k != self.key)
        return [(*rest, (self.into, str(each))) for each in await lister(value)]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One list endpoint of the API, as the harvester needs to know it."""

    path: str
    params: Mapping[str, Check]  # every parameter a query may set, and its check
    list_keys: frozenset[str]  # parameters that may be lists (at most one per query)
    refused: Mapping[str, str]  # parameters a query must not set, and why
    defaults: WireParams  # sent unless the query says otherwise
    id_key: str  # the item field that identifies an item
    expansion: Expansion | None
    partitions: Callable[[Mapping[str, str]], list[tuple[str, str]]]  # see `split`
    halving: Callable[[Mapping[str, str]], list[tuple[str, str]]]  # see `halve`
    time_key: str  # the item field holding when it was made (ISO 8601), for size estimates
    guards: tuple[str, ...]  # item fields that must equal the shard's parameter of that name
    sort_key: str
    frontiers: Mapping[str, Frontier]  # by sort; any other sort walks everything
    end_sorts: tuple[str, str]  # the sorts that walk a query from its two ends (newest, oldest first)
    cursor_offset: Callable[[Cursor], int | None]  # how deep a cursor points, when it tells
    cursor_gone: Callable[[str], bool]  # a 400's message says the cursor cannot be continued

    # -- queries -----------------------------------------------------------------

    def check_params(self, table: Mapping[str, Any]) -> tuple[tuple[str, ParamValue], ...]:
        """A query's parameters, checked and wire-ready, defaults added, sorted by key.

        Raises `checks.Invalid` naming the culprit (`.limit`, `.postId[2]`).
        """
        for key in table:
            if key in self.refused:
                raise checks.Invalid(self.refused[key], f".{key}")
            if key not in self.params:
                raise checks.Invalid(
                    f"unknown key {checks.show(key)}{checks.suggest(key, sorted(self.params))}"
                )
        params: dict[str, ParamValue] = dict(self.defaults)
        list_key: str | None = None
        for key, value in table.items():
            with checks.at(f".{key}"):
                params[key] = self._check(key, value)
            if isinstance(params[key], tuple):
                if list_key is not None:
                    raise checks.Invalid(
                        f'"{list_key}" and "{key}" are both lists; only one key per query may be a list'
                    )
                list_key = key
        return tuple(sorted(params.items()))

    def _check(self, key: str, value: Any) -> ParamValue:
        if key in self.list_keys and isinstance(value, list):
            if not value:
                raise checks.Invalid(f"expected a non-empty list, {checks.got(value)}")
            return checks.each(value, self.params[key])
        return self.params[key](value)

    def each_listed(self, params: Iterable[tuple[str, ParamValue]]) -> list[WireParams]:
        """One parameter set per element of the list-valued parameter (itself if there is none)."""
        fixed = tuple((k, v) for k, v in params if isinstance(v, str))
        listed = [(k, v) for k, v in params if not isinstance(v, str)]
        if not listed:
            return [fixed]
        key, values = listed[0]
        return [(*fixed, (key, value)) for value in values]

    # -- pages -------------------------------------------------------------------

    def parse_page(self, body: bytes) -> Page | None:
        """A page, or None when the body is not the shape the API promises.

        Raises `exactjson.NotJson` (a ValueError) when the body is not JSON at all.
        Items are never re-serialised: `lines` are their bytes as served.
        """
        envelope = exactjson.split_object(body, "items")
        meta = envelope.fields.get("metadata", {})
        if envelope.elements is None or not isinstance(meta, dict):
            return None
        items = [e.value for e in envelope.elements]
        if not all(isinstance(i, dict) and checks.is_int(i.get(self.id_key)) for i in items):
            return None
        cursor = meta.get("nextCursor")
        if cursor is not None and (isinstance(cursor, bool) or not isinstance(cursor, str | int)):
            return None
        if isinstance(cursor, str) and not _sendable(cursor):
            raise ValueError(f"a nextCursor that cannot be sent back: {cursor!r:.80}")
        lines = [e.line for e in envelope.elements]
        return Page(items, lines, [i[self.id_key] for i in items], cursor)

    def check_items(self, params: Iterable[tuple[str, str]], page: Page) -> None:
        """Refuse a page holding an item the archive cannot index, or items that do not match the
        shard's guarded parameters (the API has answered a filter it could not apply with the
        global feed). Either stops this shard only."""
        odd = next((i for i in page.ids if not 0 < i <= MAX_ID), None)
        if odd is not None:
            raise OddItemError(f"the API served an image id out of range ({odd}); refusing the page")
        items = page.items
        values = dict(params)
        for name in self.guards:
            expected = values.get(name)
            if expected is None:
                continue
            for item in items:
                got = item.get(name)
                if got is not None and str(got).casefold() != expected.casefold():
                    raise ForeignItemsError(
                        f"{name}={expected}: the API served image {item.get(self.id_key)} with "
                        f"{name}={got!r}; refusing to write foreign images (filter not applied?)"
                    )

    # -- walks -------------------------------------------------------------------

    def split(self, params: Iterable[tuple[str, str]]) -> list[WireParams]:
        """Parameter sets that together select exactly what `params` selects, or [] if none.

        Each child differs from `params` in one parameter, set (or replaced) by `partitions`.
        """
        return _each_set(tuple(params), self.partitions)

    def halve(self, params: Iterable[tuple[str, str]]) -> list[WireParams]:
        """Like `split`, but into as few parts as `halving` says (for more walkers, not for the cap),
        or []."""
        return _each_set(tuple(params), self.halving)

    def item_time(self, item: Mapping[str, Any]) -> float | None:
        """When the item was made, in seconds since the epoch; None when it does not say."""
        raw = item.get(self.time_key)
        if not isinstance(raw, str):
            return None
        try:
            return datetime.datetime.fromisoformat(raw).timestamp()
        except ValueError:
            return None

    def from_ends(self, params: Iterable[tuple[str, str]]) -> list[WireParams]:
        """The same query walked from each of its two ends (newest first, oldest first)."""
        params = tuple(params)
        rest = tuple((k, v) for k, v in params if k != self.sort_key)
        return [(*rest, (self.sort_key, sort)) for sort in self.end_sorts]

    def frontier(self, params: Iterable[tuple[str, str]]) -> Frontier:
        """Where a walk of these parameters, once walked to its end, resumes and stops."""
        sort = dict(params).get(self.sort_key)
        return self.frontiers.get(sort, Frontier.WALK_ALL) if sort is not None else Frontier.WALK_ALL


def _each_set(
    params: WireParams, partition: Callable[[Mapping[str, str]], list[tuple[str, str]]]
) -> list[WireParams]:
    """`params` once per (name, value) of `partition`, with that parameter set or replaced."""
    return [
        (*((k, v) for k, v in params if k != name), (name, value)) for name, value in partition(dict(params))
    ]


def _sendable(cursor: str) -> bool:
    """Text we can put back into a URL: no lone surrogates."""
    try:
        cursor.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
