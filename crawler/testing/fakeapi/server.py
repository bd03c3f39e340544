"""The fake Civitai API on aiohttp.web: /api/v1/images and /api/v1/models/{id}.

It reproduces what the real server does, warts included (as described in
the project's api-facts reference): offset cursors over a search feed with rows filtered
after slicing, the legacy modelId path that loses a row per page and goes
silent on big models, the page cap answered as 429, zod-style 400s.

What changed in 2025-2026 is there too, each behind a ServerOptions switch that is off by
default: the walk cap, opaque feed: cursors that expire, the SFW-only host, the new
{"message": ...} error bodies, ids= lookups (always served: unknown parameters used to be
dropped, so nobody relied on ids= being ignored) and a latency model for benchmarks.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import ipaddress
import math
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web

from crawler.testing.fakeapi.cdn import CdnServer, serve_cdn
from crawler.testing.fakeapi.cdnfiles import CdnOptions
from crawler.testing.fakeapi.cursors import MISFIT, CursorRefused, FeedCursors, filters_hash
from crawler.testing.fakeapi.cursors import PREFIX as FEED_PREFIX
from crawler.testing.fakeapi.dataset import PERIODS, SORTS, TYPES, Dataset, ImageQuery
from crawler.testing.fakeapi.faults import FaultInjector, FaultSpec, RateLimit, TokenBucket

_HEADERS = {"Cache-Control": "public, s-maxage=300"}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_NSFW = {"None": 1, "Soft": 3, "Mature": 7, "X": 31}
_NSFW_TRUE = 4 | 8 | 16  # nsfw=true means R and up, without PG: a real trap
_PAGE_CAP = "You've requested too many pages, please use cursors instead"
_INT32_MAX = 2**31 - 1  # numeric cursors beyond this answer 400
_MAX_IDS = 100  # ids= takes at most this many
_SFW = 1 | 2  # what the SFW host serves: PG and PG-13
_SILENT: dict[str, Any] = {"items": [], "metadata": {}}  # the legacy path's 20 s timeout, as served


@dataclass(frozen=True)
class ServerOptions:
    """Server-level behaviour switches and test hooks."""

    null_end_cursor: bool = False  # end with "nextCursor": null (older responses) instead of {}
    default_levels: int = 1  # browsingLevel when neither it nor nsfw is sent: public (PG) only
    rate_limit: RateLimit | None = None
    cursor_loops: frozenset[tuple[str, str]] = frozenset()  # (param, value): 3rd page's cursor = 1st's
    fallback_usernames: frozenset[str] = frozenset()  # these username filters are ignored (global feed)
    fallback_post_ids: frozenset[int] = frozenset()  # these postId filters are ignored (global feed)
    body_cache: int = 256  # identical URLs (retries) reuse the body, like the edge cache
    slow_search: SlowSearch | None = None  # big feed queries outlast the client's timeout
    # (param, value, raw item bytes): served first on the first page of queries with that filter,
    # spliced in as bytes, as Node writes them (integers beyond 64 bits, lone surrogate escapes)
    raw_items: tuple[tuple[str, str, bytes], ...] = ()
    version_ids_as_strings: bool = False  # /models/{id} lists version ids as "11", not 11
    # (param, value): every page serves the first page's images again, with ever new cursors
    stale_pages: frozenset[tuple[str, str]] = frozenset()

    # ---- what changed in 2025-2026 (api-facts); every switch is off by default
    # The feed stops handing out nextCursor once a walk is this many positions deep: the page
    # with offset + limit >= walk_cap is served (cut at the cap), then the walk looks finished.
    # Positions from walk_cap on are never served, not even to a forged cursor. The real server
    # does it at about 50,000; a test uses e.g. 1_200. Feed path only (not modelId, not ids=).
    walk_cap: int | None = None
    # nextCursor on the feed path is an opaque "feed:<base64>" string (cursors.py) instead of
    # "<offset>|<ms>". It answers 400 {"message": "This cursor can no longer be continued; start
    # again without it"} once expired, and 400 {"message": "This cursor cannot be continued with
    # these filters"} when sent with other filters (or on the modelId path). Old "<offset>|<ms>"
    # cursors are still read, as during the rollout. A feed: cursor is read whatever this says.
    feed_cursors: bool = False
    # Seconds a feed: cursor lives; None: until FakeServer.cursors.expire_all(). Tests cross it
    # with FakeServer.cursors.advance(seconds), not by sleeping.
    cursor_ttl: float | None = None
    # The cursor epoch a server starts in: feed: cursors issued in an earlier epoch are expired,
    # so a test that restarts the server (or a subprocess fake) can kill the cursors a run stored.
    cursor_epoch: int = 0
    # The SFW host (civitai.com since 2026-04-16): /images answers only PG and PG-13 items
    # (browsingLevel & 3) whatever browsingLevel or nsfw ask, silently.
    sfw_only: bool = False
    # Non-zod 4xx bodies are {"message": "..."}: the missing model's 404, the page-cap 429, the
    # out-of-range cursor's 400. Off: the older {"error": "..."} (with "code" where it had one).
    new_error_bodies: bool = False
    # Seeded lognormal time taken before answering each /images and /models request (not the
    # edge's rate-limit or injected-fault answers); cancelled when the client goes away.
    latency: Latency | None = None
    # The image CDN on a second port (cdn.py): items' `url` point at it. None: no CDN, and items'
    # `url` are the https://image.civitai.com/... of before, byte for byte.
    cdn: CdnOptions | None = None

    def __post_init__(self) -> None:
        if self.walk_cap is not None and self.walk_cap < 1:
            raise ValueError("walk_cap must be at least 1 (or None: no cap)")
        if self.cursor_ttl is not None and self.cursor_ttl <= 0:
            raise ValueError("cursor_ttl must be positive (or None: no ttl)")


_Z95 = statistics.NormalDist().inv_cdf(0.95)


@dataclass(frozen=True)
class Latency:
    """Response time, lognormal: half the answers take less than `median` seconds, 95% less
    than `p95`. The server draws from random.Random(seed); p95 == median is a fixed delay."""

    median: float
    p95: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.median <= self.p95:
            raise ValueError("Latency needs 0 < median <= p95")

    @property
    def mu(self) -> float:
        return math.log(self.median)

    @property
    def sigma(self) -> float:
        return math.log(self.p95 / self.median) / _Z95

    def sample(self, rng: random.Random) -> float:
        """One delay in seconds, drawn from rng."""
        return rng.lognormvariate(self.mu, self.sigma)


@dataclass(frozen=True)
class SlowSearch:
    """The search backend's timeouts: a feed query selecting more than `rows_over` rows
    with a `limit` above `limit_over` answers only after `seconds` (Cloudflare gives up first)."""

    rows_over: int
    limit_over: int = 0
    seconds: float = 35.0


@dataclass(frozen=True)
class RequestRecord:
    mono: float  # time.monotonic() when the request arrived
    wall: float  # time.time() when the request arrived
    method: str
    path: str
    query: Mapping[str, str]
    status: int  # 0: the client went away before an answer
    fault: str | None  # injected fault kind, "rate_limit", or None
    has_auth: bool  # an Authorization header was sent
    answered: float = 0.0  # time.monotonic() when the answer was done (or the client went away)

    @property
    def faulted(self) -> bool:
        return self.fault is not None


class RequestLog:
    """Every request the server saw, in order of completion."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def append(self, record: RequestRecord) -> None:
        self.records.append(record)

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(list(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> RequestRecord:
        return self.records[i]

    def clear(self) -> None:
        self.records.clear()

    def for_path(self, prefix: str) -> list[RequestRecord]:
        return [r for r in self.records if r.path.startswith(prefix)]

    def max_in_flight(self) -> int:
        """The most requests the server was answering at once (from arrival to answer)."""
        events = sorted([(r.mono, 1) for r in self.records] + [(r.answered, -1) for r in self.records])
        most = now = 0
        for _, step in events:  # at a tie the answer (-1) comes first: back to back is not overlap
            now += step
            most = max(most, now)
        return most

    def max_in_window(self, seconds: float = 1.0) -> int:
        """The most requests that arrived within any window of `seconds`."""
        times = sorted(r.mono for r in self.records)
        return max((bisect.bisect_left(times, t + seconds) - i for i, t in enumerate(times)), default=0)


@dataclass
class _State:
    dataset: Dataset
    injector: FaultInjector
    options: ServerOptions
    api_key: str | None
    log: RequestLog = field(default_factory=RequestLog)
    bucket: TokenBucket | None = None
    # (dataset generation, cursors version, url) -> (cursor clock when rendered, body)
    bodies: dict[tuple[int, int, str], tuple[float, bytes]] = field(default_factory=dict)
    cursors: FeedCursors = field(default_factory=FeedCursors)
    latency_rng: random.Random = field(default_factory=random.Random)
    media_url: Callable[[str], str] | None = None  # an item's url -> the CDN's, when it runs


_STATE = web.AppKey("fakeapi_state", _State)


# ---------------------------------------------------------------- parameters


class _Params:
    """Parses query parameters the way the server's zod schema does, collecting issues."""

    def __init__(self, query: Mapping[str, str]) -> None:
        self._q = query
        self.issues: list[dict[str, Any]] = []

    def raw(self, name: str) -> str | None:
        value = self._q.get(name)
        return None if value is None or value == "" else value

    def _issue(self, name: str, message: str, **details: Any) -> None:
        self.issues.append({**details, "path": [name], "message": message})

    def integer(self, name: str, *, lo: int | None = None, hi: int | None = None) -> int | None:
        raw = self.raw(name)
        if raw is None:
            return None
        try:
            value = float(raw.strip())  # like JS Number(): "1e2" is fine
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            self._issue(
                name, "Expected number, received nan", code="invalid_type", expected="number", received="nan"
            )
            return None
        if not value.is_integer():
            self._issue(
                name,
                "Expected integer, received float",
                code="invalid_type",
                expected="integer",
                received="float",
            )
            return None
        n = int(value)
        if lo is not None and n < lo:
            self._issue(
                name,
                f"Number must be greater than or equal to {lo}",
                code="too_small",
                minimum=lo,
                type="number",
                inclusive=True,
                exact=False,
            )
        if hi is not None and n > hi:
            self._issue(
                name,
                f"Number must be less than or equal to {hi}",
                code="too_big",
                maximum=hi,
                type="number",
                inclusive=True,
                exact=False,
            )
        return n

    def enum(self, name: str, options: tuple[str, ...], default: str | None = None) -> str | None:
        raw = self.raw(name)
        if raw is None:
            return default
        if raw not in options:  # case-sensitive, as the server's enums are
            expected = " | ".join(f"'{o}'" for o in options)
            self.issues.append(
                {
                    "received": raw,
                    "code": "invalid_enum_value",
                    "options": list(options),
                    "path": [name],
                    "message": f"Invalid enum value. Expected {expected}, received '{raw}'",
                }
            )
            return default
        return raw

    def boolean(self, name: str) -> bool:
        raw = self.raw(name)
        if raw is None:
            return False
        if raw not in _BOOLS:
            self._issue(
                name,
                "Expected boolean, received string",
                code="invalid_type",
                expected="boolean",
                received="string",
            )
            return False
        return _BOOLS[raw]

    def nsfw(self) -> int | None:
        raw = self.raw("nsfw")
        if raw is None:
            return None
        if raw in _NSFW:
            return _NSFW[raw]
        if raw in _BOOLS:
            return _NSFW_TRUE if _BOOLS[raw] else 1
        self._issue("nsfw", "Invalid input", code="invalid_union")
        return None

    def int_list(self, name: str, *, max_items: int | None = None) -> frozenset[int]:
        raw = self.raw(name)
        parts = [p.strip() for p in raw.split(",")] if raw else []
        if not all(p.lstrip("-").isascii() and p.lstrip("-").isdigit() for p in parts):
            self._issue(
                name, "Expected number, received nan", code="invalid_type", expected="number", received="nan"
            )
            return frozenset()
        if max_items is not None and len(parts) > max_items:
            self._issue(
                name,
                f"Array must contain at most {max_items} element(s)",
                code="too_big",
                maximum=max_items,
                type="array",
                inclusive=True,
                exact=False,
            )
            return frozenset()
        return frozenset(int(p) for p in parts)

    def str_list(self, name: str) -> frozenset[str]:
        raw = self.raw(name)
        return frozenset(p.strip() for p in raw.split(",") if p.strip()) if raw else frozenset()

    def cursor(self) -> int | str | None:
        """Only the offset (or image id) before '|' is ever read back; a feed: cursor is
        returned whole, for the server to read (it knows the cursors it issued)."""
        raw = self.raw("cursor")
        if raw is None:
            return None
        if raw.startswith(FEED_PREFIX):
            return raw
        head = raw.split("|", 1)[0].strip()
        if not (head.isascii() and head.isdigit()):
            self._issue("cursor", "Invalid cursor", code="custom")
            return None
        return int(head)


@dataclass(frozen=True)
class _Paging:
    limit: int
    cursor: int | None  # the offset (feed) or image id (legacy) to continue from
    feed_cursor: str | None  # a feed: cursor as sent, until read into `cursor`
    page: int | None
    with_meta: bool
    with_tags: bool


def _parse_images(
    query: Mapping[str, str], options: ServerOptions
) -> tuple[ImageQuery, _Paging, list[dict[str, Any]]]:
    p = _Params(query)
    level = p.integer("browsingLevel", lo=0)
    nsfw = p.nsfw()
    username = p.raw("username")
    q = ImageQuery(
        post_id=p.integer("postId"),
        model_id=p.integer("modelId"),
        model_version_id=p.integer("modelVersionId"),
        image_id=p.integer("imageId"),
        username=username.lower() if username else None,
        user_id=p.integer("userId"),
        period=p.enum("period", PERIODS, "AllTime") or "AllTime",
        sort=p.enum("sort", SORTS, "Most Reactions") or "Most Reactions",
        levels=(level & 31)
        if level
        else nsfw
        if nsfw is not None
        else options.default_levels,  # browsingLevel wins
        tags=p.int_list("tags"),
        type=p.enum("type", TYPES),
        base_models=p.str_list("baseModels"),
        ids=p.int_list("ids", max_items=_MAX_IDS),
    )
    limit = p.integer("limit", lo=0, hi=200)
    cursor = p.cursor()
    paging = _Paging(
        limit=limit or 100,
        cursor=cursor if isinstance(cursor, int) else None,
        feed_cursor=cursor if isinstance(cursor, str) else None,
        page=p.integer("page", lo=1),  # JS: 0 is falsy -> 100
        with_meta=p.boolean("withMeta"),
        with_tags=p.boolean("withTags"),
    )
    return q, paging, p.issues


# ---------------------------------------------------------------- responses


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, content_type="application/json", headers=_HEADERS
    )


def _refusal(options: ServerOptions, status: int, message: str, code: str | None = None) -> web.Response:
    """A non-zod 4xx: {"message": ...} on today's server, {"error": ..., "code": ...} on the older."""
    if options.new_error_bodies:
        return _json({"message": message}, status)
    return _json({"error": message, **({"code": code} if code else {})}, status)


def _zod(issues: list[dict[str, Any]]) -> web.Response:
    return _json(
        {"error": {"name": "ZodError", "message": orjson.dumps(issues, option=orjson.OPT_INDENT_2).decode()}},
        400,
    )


def _next_page(request: web.Request, cursor: str | int) -> str:
    """The request URL with the cursor set: every parameter is copied, as the real server does."""
    return str(request.url.update_query(cursor=str(cursor)))


def _end(options: ServerOptions) -> dict[str, Any]:
    return {"nextCursor": None} if options.null_end_cursor else {}


def _feed_page(
    st: _State, request: web.Request, q: ImageQuery, paging: _Paging, filters: int
) -> dict[str, Any]:
    """Offset paging over the sorted selection; hidden rows drop out after slicing.

    `filters`: the hash of the filters as sent, which a feed: cursor is bound to.
    """
    ds, options = st.dataset, st.options
    rows = ds.select(q)
    offset = paging.cursor or 0
    stale = any(request.query.get(name) == value for name, value in options.stale_pages)
    start = 0 if stale else offset
    stop = start + paging.limit if options.walk_cap is None else min(start + paging.limit, options.walk_cap)
    chunk = rows[start:stop] if stop > start else rows[:0]
    items = [
        _item(st, i, with_meta=paging.with_meta, with_tags=paging.with_tags)
        for i in chunk
        if not ds.is_hidden(i)
    ]
    nxt: int | None = offset + paging.limit if offset + paging.limit < len(rows) or stale else None
    if _loops(options, request.query):
        nxt = paging.limit if offset >= 2 * paging.limit else offset + paging.limit
    if options.walk_cap is not None and offset + paging.limit >= options.walk_cap:
        nxt = None  # the walk looks finished, and is not
    if nxt is None:
        return {"items": items, "metadata": _end(options)}
    if options.feed_cursors:
        cursor = st.cursors.issue(nxt, filters)
    else:
        anchor = rows[min(nxt, len(rows)) - 1] if len(rows) else None
        cursor = f"{nxt}|{ds.created_ms(ds.cols.ids[anchor]) if anchor is not None else 0}"
    return {"items": items, "metadata": {"nextCursor": cursor, "nextPage": _next_page(request, cursor)}}


def _item(st: _State, i: int, **flags: bool) -> dict[str, Any]:
    """Row i as served: its url points at the CDN when one runs."""
    item = st.dataset.item(i, **flags)
    if st.media_url is not None:
        item["url"] = st.media_url(item["url"])
    return item


def _loops(options: ServerOptions, query: Mapping[str, str]) -> bool:
    return any(query.get(name) == value for name, value in options.cursor_loops)


def _ids_page(st: _State, q: ImageQuery, paging: _Paging) -> dict[str, Any]:
    """ids=: the current state of those images that are still shown, in `sort` order, one
    batch: at most `limit` of them and never a cursor (the legacy database path)."""
    ds = st.dataset
    rows = [i for i in ds.select(q) if not ds.is_hidden(i)][: paging.limit]
    items = [
        _item(st, i, with_meta=paging.with_meta, with_tags=paging.with_tags, nested_meta=True) for i in rows
    ]
    return {"items": items, "metadata": _end(st.options)}


def _legacy_page(st: _State, request: web.Request, q: ImageQuery, paging: _Paging) -> dict[str, Any]:
    """The SQL path for modelId alone: id cursors, one row lost per descending page, silent timeouts."""
    ds = st.dataset
    descending = q.sort != "Oldest"  # the SQL orders by id; sort only picks the direction here
    rows = ds.select(replace(q, sort="Newest" if descending else "Oldest"))
    if len(rows) > ds.spec.legacy_timeout_rows:
        return _SILENT
    ids = ds.cols.ids
    visible = [i for i in rows if not ds.is_hidden(i)]
    if paging.cursor is not None and descending:  # `id < cursor`: the row at the cursor is never served
        start = bisect.bisect_right(visible, -paging.cursor, key=lambda i: -ids[i])
    elif paging.cursor is not None:
        start = bisect.bisect_left(visible, paging.cursor, key=lambda i: ids[i])
    else:
        start = ((paging.page or 1) - 1) * paging.limit  # page works here, unlike on the feed
    chunk = visible[start : start + paging.limit + 1]
    items = [
        _item(st, i, with_meta=paging.with_meta, with_tags=paging.with_tags, nested_meta=True)
        for i in chunk[: paging.limit]
    ]
    if len(chunk) <= paging.limit:
        return {"items": items, "metadata": _end(st.options)}
    cursor = ids[chunk[paging.limit]]
    return {"items": items, "metadata": {"nextCursor": cursor, "nextPage": _next_page(request, cursor)}}


# ---------------------------------------------------------------- handlers


async def _images(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    options = st.options
    await _delay(st)
    key = (st.dataset.generation, st.cursors.version, str(request.url))
    cached = st.bodies.get(key)
    if cached is not None and _fresh(st, cached[0]):
        return web.Response(body=cached[1], content_type="application/json", headers=_HEADERS)
    q, paging, issues = _parse_images(request.query, options)
    if issues:
        return _zod(issues)
    if paging.cursor is not None and paging.cursor > _INT32_MAX:
        message = f"Cursor {paging.cursor} is out of range: it must fit a 32-bit integer"
        return _refusal(options, 400, message, "BAD_REQUEST")
    if paging.page is not None and paging.cursor is None and paging.feed_cursor is None:
        if paging.page * paging.limit > 1000:
            return _refusal(options, 429, _PAGE_CAP)  # not a rate limit: retrying never helps
    filters = filters_hash(q)  # the filters as sent, before the server narrows them
    q = _fallback(q, options)
    if options.sfw_only:
        q = replace(q, levels=q.levels & _SFW)
    legacy = q.model_id is not None and q.model_version_id is None and q.image_id is None
    if paging.feed_cursor is not None and not q.ids:  # ids= reads no cursor
        try:
            if legacy:
                raise CursorRefused(MISFIT)  # the legacy path issues no feed: cursors
            paging = replace(paging, cursor=st.cursors.read(paging.feed_cursor, filters))
        except CursorRefused as exc:
            return _json({"message": str(exc)}, 400)
        except ValueError:
            return _zod([{"code": "custom", "path": ["cursor"], "message": "Invalid cursor"}])
    slow = options.slow_search
    if q.ids:
        page = _ids_page(st, q, paging)
    elif legacy:
        page = _legacy_page(st, request, q, paging)
    else:
        if slow and paging.limit > slow.limit_over and len(st.dataset.select(q)) > slow.rows_over:
            await asyncio.sleep(slow.seconds)
        page = _feed_page(st, request, q, paging, filters)
    body = orjson.dumps(page)
    if paging.cursor is None:
        body = _splice(body, request.query, options.raw_items)
    if len(st.bodies) >= options.body_cache:
        del st.bodies[next(iter(st.bodies))]
    st.bodies[key] = (st.cursors.now(), body)
    return web.Response(body=body, content_type="application/json", headers=_HEADERS)


def _fresh(st: _State, rendered: float) -> bool:
    """A cached body is reused unless it may hand out a feed: cursor near the end of its life."""
    ttl = st.options.cursor_ttl
    return not (st.options.feed_cursors and ttl is not None and st.cursors.now() - rendered > ttl / 2)


async def _delay(st: _State) -> None:
    """The latency model; the sleep is cancelled with the handler when the client goes away."""
    if st.options.latency is not None:
        await asyncio.sleep(st.options.latency.sample(st.latency_rng))


def _splice(body: bytes, query: Mapping[str, str], raw_items: tuple[tuple[str, str, bytes], ...]) -> bytes:
    """Put raw items at the head of the page's `items` array, byte for byte."""
    extra = [raw for name, value, raw in raw_items if query.get(name) == value]
    if not extra:
        return body
    head = b'{"items":['
    assert body.startswith(head)
    rest = body[len(head) :]
    joined = b",".join(extra)
    return head + joined + (rest if rest.startswith(b"]") else b"," + rest)


def _fallback(q: ImageQuery, options: ServerOptions) -> ImageQuery:
    """The hook for filters the server cannot apply: it serves the global feed instead."""
    if q.username is not None and q.username in {u.lower() for u in options.fallback_usernames}:
        q = replace(q, username=None)
    if q.post_id is not None and q.post_id in options.fallback_post_ids:
        q = replace(q, post_id=None)
    return q


async def _model(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    await _delay(st)
    p = _Params({"id": request.match_info["id"]})
    model_id = p.integer("id")
    if p.issues or model_id is None:
        return _zod(p.issues)
    model = st.dataset.model(model_id)
    if model is None:
        return _refusal(st.options, 404, f"No model with id {model_id}")
    if st.options.version_ids_as_strings:
        versions = [{**v, "id": str(v["id"])} for v in model["modelVersions"]]
        model = {**model, "modelVersions": versions}
    return _json(model)


@web.middleware
async def _edge(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Rate limit, auth and fault injection in front of the handlers; logs every request."""
    st = request.app[_STATE]
    mono, wall = time.monotonic(), time.time()
    status = 0
    early, fault = _screen(st, request)  # decided first, so a cancelled slow fault is still logged
    try:
        if early is not None:
            resp: web.StreamResponse = early
        elif fault is not None:
            resp = await st.injector.respond(fault, request, lambda: handler(request))
        else:
            resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        st.log.append(
            RequestRecord(
                mono,
                wall,
                request.method,
                request.path,
                dict(request.query),
                status,
                fault,
                "Authorization" in request.headers,
                time.monotonic(),
            )
        )


def _screen(st: _State, request: web.Request) -> tuple[web.Response | None, str | None]:
    """An answer that preempts the handler (edge 429, 401), and the fault kind to inject, if any."""
    if st.bucket is not None and not st.bucket.take():
        return st.bucket.rejection(), "rate_limit"
    auth = request.headers.get("Authorization")
    if st.api_key is not None and auth is not None and auth != f"Bearer {st.api_key}":
        return _json({"error": "Unauthorized", "message": "Invalid API key"}, 401), None
    if request.path.startswith(("/api/v1/images", "/api/v1/models/")):
        return None, st.injector.draw()
    return None, None


def make_app(
    dataset: Dataset,
    faults: FaultSpec | FaultInjector | None = None,
    *,
    api_key: str | None = None,
    options: ServerOptions | None = None,
) -> web.Application:
    options = options or ServerOptions()
    injector = faults if isinstance(faults, FaultInjector) else FaultInjector(faults)
    state = _State(
        dataset,
        injector,
        options,
        api_key,
        bucket=TokenBucket(options.rate_limit) if options.rate_limit else None,
        cursors=FeedCursors(options.cursor_ttl, options.cursor_epoch),
        latency_rng=random.Random(options.latency.seed if options.latency else 0),
    )
    app = web.Application(middlewares=[_edge])
    app[_STATE] = state
    app.router.add_get("/api/v1/images", _images)
    app.router.add_get("/api/v1/models/{id}", _model)
    return app


def cursors_of(app: web.Application) -> FeedCursors:
    """The feed: cursor hooks of an app built by make_app (FakeServer.cursors for serve())."""
    return app[_STATE].cursors


@dataclass(frozen=True)
class FakeServer:
    base_url: str  # http://127.0.0.1:PORT/api/v1
    port: int
    dataset: Dataset
    log: RequestLog
    faults: FaultInjector  # queue() scripted faults at runtime
    app: web.Application
    # feed: cursors at runtime: expire_all() kills every cursor issued so far, advance(s) ages them
    cursors: FeedCursors
    cdn: CdnServer | None = None  # the image CDN, when ServerOptions.cdn is set

    @property
    def cdn_url(self) -> str:
        """http://127.0.0.1:PORT of the image CDN (no trailing slash)."""
        if self.cdn is None:
            raise RuntimeError("the fake API runs without a CDN: pass ServerOptions(cdn=CdnOptions())")
        return self.cdn.url


def _check_loopback(host: str) -> None:
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the fake API binds to loopback only, not {host}")


@asynccontextmanager
async def serve(
    dataset: Dataset,
    faults: FaultSpec | FaultInjector | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    options: ServerOptions | None = None,
) -> AsyncIterator[FakeServer]:
    """Run the fake API on host:port (0: any free port) for the duration of the block, and
    the image CDN on a port of its own when options.cdn is set."""
    _check_loopback(host)
    app = make_app(dataset, faults, api_key=api_key, options=options)
    state = app[_STATE]
    async with AsyncExitStack() as stack:
        cdn = None
        if state.options.cdn is not None:
            cdn = await stack.enter_async_context(serve_cdn(dataset, state.options.cdn, host=host))
            state.media_url = functools.partial(cdn.files.item_url, cdn.url)
        # handler_cancellation: a client that times out on a `slow` fault frees its handler
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        yield FakeServer(
            f"http://{url_host}:{bound}/api/v1",
            bound,
            dataset,
            state.log,
            state.injector,
            app,
            state.cursors,
            cdn,
        )
