"""The fake Civitai API on aiohttp.web: /api/v1/images and /api/v1/models/{id}.

It reproduces what the real server does, warts included (as described in
the project's api-facts reference): offset cursors over a search feed with rows filtered
after slicing, the legacy modelId path that loses a row per page and goes
silent on big models, the page cap answered as 429, zod-style 400s.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web

from crawler.testing.fakeapi.dataset import PERIODS, SORTS, TYPES, Dataset, ImageQuery
from crawler.testing.fakeapi.faults import FaultInjector, FaultSpec, RateLimit, TokenBucket

_HEADERS = {"Cache-Control": "public, s-maxage=300"}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_NSFW = {"None": 1, "Soft": 3, "Mature": 7, "X": 31}
_NSFW_TRUE = 4 | 8 | 16  # nsfw=true means R and up, without PG: a real trap
_PAGE_CAP = {"error": "You've requested too many pages, please use cursors instead"}
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
    bodies: dict[tuple[int, str], bytes] = field(default_factory=dict)


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

    def int_list(self, name: str) -> frozenset[int]:
        raw = self.raw(name)
        parts = [p.strip() for p in raw.split(",")] if raw else []
        if not all(p.lstrip("-").isdigit() for p in parts):
            self._issue(
                name, "Expected number, received nan", code="invalid_type", expected="number", received="nan"
            )
            return frozenset()
        return frozenset(int(p) for p in parts)

    def str_list(self, name: str) -> frozenset[str]:
        raw = self.raw(name)
        return frozenset(p.strip() for p in raw.split(",") if p.strip()) if raw else frozenset()

    def cursor(self) -> int | None:
        """Only the offset (or image id) before '|' is ever read back."""
        raw = self.raw("cursor")
        if raw is None:
            return None
        head = raw.split("|", 1)[0].strip()
        if not head.isdigit():
            self._issue("cursor", "Invalid cursor", code="custom")
            return None
        return int(head)


@dataclass(frozen=True)
class _Paging:
    limit: int
    cursor: int | None
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
    )
    limit = p.integer("limit", lo=0, hi=200)
    paging = _Paging(
        limit=limit or 100,
        cursor=p.cursor(),
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


def _feed_page(st: _State, request: web.Request, q: ImageQuery, paging: _Paging) -> dict[str, Any]:
    """Offset paging over the sorted selection; hidden rows drop out after slicing."""
    ds = st.dataset
    rows = ds.select(q)
    offset = paging.cursor or 0
    stale = any(request.query.get(name) == value for name, value in st.options.stale_pages)
    chunk = rows[0 if stale else offset : (0 if stale else offset) + paging.limit]
    items = [
        ds.item(i, with_meta=paging.with_meta, with_tags=paging.with_tags)
        for i in chunk
        if not ds.is_hidden(i)
    ]
    nxt: int | None = offset + paging.limit if offset + paging.limit < len(rows) or stale else None
    if _loops(st.options, request.query):
        nxt = paging.limit if offset >= 2 * paging.limit else offset + paging.limit
    if nxt is None:
        return {"items": items, "metadata": _end(st.options)}
    anchor = rows[min(nxt, len(rows)) - 1] if len(rows) else None
    cursor = f"{nxt}|{ds.created_ms(ds.cols.ids[anchor]) if anchor is not None else 0}"
    return {"items": items, "metadata": {"nextCursor": cursor, "nextPage": _next_page(request, cursor)}}


def _loops(options: ServerOptions, query: Mapping[str, str]) -> bool:
    return any(query.get(name) == value for name, value in options.cursor_loops)


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
        ds.item(i, with_meta=paging.with_meta, with_tags=paging.with_tags, nested_meta=True)
        for i in chunk[: paging.limit]
    ]
    if len(chunk) <= paging.limit:
        return {"items": items, "metadata": _end(st.options)}
    cursor = ids[chunk[paging.limit]]
    return {"items": items, "metadata": {"nextCursor": cursor, "nextPage": _next_page(request, cursor)}}


# ---------------------------------------------------------------- handlers


async def _images(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    key = (st.dataset.generation, str(request.url))
    cached = st.bodies.get(key)
    if cached is not None:
        return web.Response(body=cached, content_type="application/json", headers=_HEADERS)
    q, paging, issues = _parse_images(request.query, st.options)
    if issues:
        return _zod(issues)
    if paging.page is not None and paging.cursor is None and paging.page * paging.limit > 1000:
        return _json(_PAGE_CAP, 429)  # not a rate limit: retrying never helps
    q = _fallback(q, st.options)
    legacy = q.model_id is not None and q.model_version_id is None and q.image_id is None
    slow = st.options.slow_search
    if slow and not legacy and paging.limit > slow.limit_over and len(st.dataset.select(q)) > slow.rows_over:
        await asyncio.sleep(slow.seconds)
    body = orjson.dumps((_legacy_page if legacy else _feed_page)(st, request, q, paging))
    if paging.cursor is None:
        body = _splice(body, request.query, st.options.raw_items)
    if len(st.bodies) >= st.options.body_cache:
        del st.bodies[next(iter(st.bodies))]
    st.bodies[key] = body
    return web.Response(body=body, content_type="application/json", headers=_HEADERS)


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
    p = _Params({"id": request.match_info["id"]})
    model_id = p.integer("id")
    if p.issues or model_id is None:
        return _zod(p.issues)
    model = st.dataset.model(model_id)
    if model is None:
        return _json({"error": f"No model with id {model_id}"}, 404)
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
    )
    app = web.Application(middlewares=[_edge])
    app[_STATE] = state
    app.router.add_get("/api/v1/images", _images)
    app.router.add_get("/api/v1/models/{id}", _model)
    return app


@dataclass(frozen=True)
class FakeServer:
    base_url: str  # http://127.0.0.1:PORT/api/v1
    port: int
    dataset: Dataset
    log: RequestLog
    faults: FaultInjector  # queue() scripted faults at runtime
    app: web.Application


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
    """Run the fake API on host:port (0: any free port) for the duration of the block."""
    _check_loopback(host)
    app = make_app(dataset, faults, api_key=api_key, options=options)
    # handler_cancellation: a client that times out on a `slow` fault frees its handler
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        yield FakeServer(
            f"http://{url_host}:{bound}/api/v1", bound, dataset, app[_STATE].log, app[_STATE].injector, app
        )
    finally:
        await runner.cleanup()
