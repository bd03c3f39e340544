"""The fake image CDN on aiohttp.web: CdnFiles served over HTTP, with Cloudflare's weather.

Its own app on its own port (another origin than the API, as image.civitai.com is to
civitai.com), started by serve() when ServerOptions.cdn is set. Content-Length always,
Range (206, 416) unless CdnOptions.ranges is off, the real format's Content-Type, 404/410
for gone media, seeded faults (CdnFaults) and scripted ones (CdnServer.faults.queue), an
optional throttle, and a record of every request with all its headers (CdnServer.log).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import struct
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from crawler.testing.fakeapi.cdnfiles import (
    CACHE_PREFIX,
    CDN_KINDS,
    CdnFaults,
    CdnFiles,
    CdnOptions,
    MediaFile,
)
from crawler.testing.fakeapi.cdnlog import CdnLog, CdnRecord, Transfers
from crawler.testing.fakeapi.dataset import Dataset, mix64
from crawler.testing.fakeapi.faults import CHALLENGE_PAGE, cf_error_page

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_CF = {"Server": "cloudflare", "CF-Cache-Status": "HIT"}
_STATUS_TEXT = {400: b"Bad Request", 404: b"Not Found", 410: b"Gone"}
_LAST_MODIFIED = "Mon, 22 Sep 2025 00:00:00 GMT"


class CdnInjector:
    """Decides, per request, whether and how to fail: scripted faults first (per uuid, then any),
    then a draw seeded by (path, how many times the path was asked): reproducible whatever the
    order concurrent requests arrive in."""

    def __init__(self, spec: CdnFaults | None = None) -> None:
        self.spec = spec or CdnFaults()
        self._salt = mix64(self.spec.seed ^ 0xFA17)
        self._asked: defaultdict[str, int] = defaultdict(int)
        self._script: deque[str] = deque()
        self._per_uuid: defaultdict[str, deque[str]] = defaultdict(deque)

    def queue(self, *kinds: str, uuid: str | None = None) -> None:
        """Fail the next requests (for uuid only, when given) with these kinds, in order."""
        for kind in kinds:
            if kind not in CDN_KINDS:
                raise ValueError(f"unknown CDN fault kind {kind!r}; known: {', '.join(CDN_KINDS)}")
        (self._per_uuid[uuid] if uuid else self._script).extend(kinds)

    def draw(self, path: str, uuid: str | None) -> str | None:
        if uuid and self._per_uuid.get(uuid):
            return self._per_uuid[uuid].popleft()
        if self._script:
            return self._script.popleft()
        attempt = self._asked[path]
        self._asked[path] += 1
        if not self.spec.rates:
            return None
        digest = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "big")
        r = mix64(digest ^ self._salt ^ attempt * 0x9E3779B97F4A7C15 & (1 << 64) - 1) / 2**64
        acc = 0.0
        for kind, rate in self.spec.rates:
            acc += rate
            if r < acc:
                return kind
        return None


@dataclass
class _Cdn:
    files: CdnFiles
    options: CdnOptions
    faults: CdnInjector
    log: CdnLog
    transfers: Transfers


_CDN = web.AppKey("fakecdn", _Cdn)


@dataclass
class _Tx:
    """One request's outcome, filled in as it goes and logged at the end."""

    status: int = 0
    sent: int = 0
    complete: bool = False


def _uuid_of(path: str) -> str | None:
    if path.startswith(CACHE_PREFIX):
        return path[len(CACHE_PREFIX) :].partition("/")[0] or None
    parts = path.lstrip("/").split("/")
    return parts[1] if len(parts) == 4 and parts[1] else None


async def _handle(request: web.Request) -> web.StreamResponse:
    cdn = request.app[_CDN]
    mono, tx = time.monotonic(), _Tx()
    uuid = _uuid_of(request.path)
    fault = cdn.faults.draw(request.path, uuid) if uuid else None
    try:
        return await _answer(cdn, request, tx, fault, uuid)
    finally:
        cdn.log.append(
            CdnRecord(
                mono,
                request.method,
                request.path_qs,
                tuple(request.headers.items()),
                tx.status,
                tx.sent,
                fault,
                uuid,
                tx.complete,
                time.monotonic(),
            )
        )


async def _answer(
    cdn: _Cdn, request: web.Request, tx: _Tx, fault: str | None, uuid: str | None
) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        return _small(tx, 405, b"Method Not Allowed")
    if fault == "reset":
        _reset(request)
        resp = _small(tx, 0, b"")  # never sent: the connection is gone
        tx.sent, tx.complete = 0, False
        return resp
    if fault == "slow":
        await asyncio.sleep(cdn.faults.spec.slow_seconds)
    elif fault is not None and fault != "cut":
        return _canned(tx, fault, cdn.faults.spec.retry_after)
    found = cdn.files.resolve(request.path)
    if isinstance(found, int):
        return _small(tx, found, _STATUS_TEXT[found])
    return await _serve(cdn, request, tx, found, cut=fault == "cut")


def _small(tx: _Tx, status: int, body: bytes, **headers: str) -> web.Response:
    tx.status, tx.sent, tx.complete = status, len(body), True
    return web.Response(status=status or 500, body=body, headers={**_CF, **headers})


def _canned(tx: _Tx, kind: str, retry_after: int) -> web.Response:
    if kind == "challenge":
        return _small(tx, 200, CHALLENGE_PAGE, **{"Content-Type": "text/html", "cf-mitigated": "challenge"})
    if kind == "429":
        return _small(tx, 429, b"error code: 1015", **{"Retry-After": str(retry_after)})
    code = int(kind)
    title = {500: "Internal server error", 502: "Bad gateway", 503: "Service unavailable"}
    page = cf_error_page(code, title.get(code, "Gateway time-out"))
    extra = {"Retry-After": str(retry_after)} if code == 503 else {}
    return _small(tx, code, page, **{"Content-Type": "text/html", **extra})


def _reset(request: web.Request) -> None:
    """A TCP RST before any byte of the answer."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:  # linger 0: close() sends RST, not FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _span(cdn: _Cdn, request: web.Request, file: MediaFile) -> tuple[int, int] | None:
    """The [start, stop) a Range asks for; None: the whole file; (-1, -1): unsatisfiable."""
    header = request.headers.get("Range")
    if not cdn.options.ranges or header is None:
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range != file.etag:
        return None  # the file changed since: the whole of it
    m = _RANGE.fullmatch(header.strip())
    if m is None or m.group(1) == m.group(2) == "":
        return None  # several ranges or a malformed one: ignored, as RFC 9110 allows
    first, last = m.group(1), m.group(2)
    if first == "":  # bytes=-N: the last N bytes
        return (max(file.size - int(last), 0), file.size) if int(last) > 0 else (-1, -1)
    start, stop = int(first), file.size if last == "" else min(int(last) + 1, file.size)
    if start >= file.size:
        return (-1, -1)
    return None if stop <= start else (start, stop)


async def _serve(
    cdn: _Cdn, request: web.Request, tx: _Tx, file: MediaFile, *, cut: bool
) -> web.StreamResponse:
    headers = {
        **_CF,
        "Content-Type": file.content_type,
        "ETag": file.etag,
        "Last-Modified": _LAST_MODIFIED,
        "Cache-Control": "public, max-age=31536000, immutable",
    }
    if cdn.options.ranges:
        headers["Accept-Ranges"] = "bytes"
    span = _span(cdn, request, file)
    if span == (-1, -1):
        return _small(tx, 416, b"", **{"Content-Range": f"bytes */{file.size}"})
    start, stop = span or (0, file.size)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{file.size}"
    resp = web.StreamResponse(status=206 if span else 200, headers=headers)
    resp.content_length = stop - start
    tx.status = resp.status
    await resp.prepare(request)
    if request.method == "HEAD":
        tx.complete = True
        await resp.write_eof()
        return resp
    end = start + (stop - start) // 2 if cut else stop
    await _body(cdn, resp, tx, file, start, end)
    if cut:  # Content-Length promised the whole; a FIN comes early
        if request.transport is not None:
            request.transport.close()
        return resp
    tx.complete = True
    await resp.write_eof()
    return resp


async def _body(cdn: _Cdn, resp: web.StreamResponse, tx: _Tx, file: MediaFile, start: int, stop: int) -> None:
    """Write bytes [start, stop), pausing at a hold and keeping to the throttle."""
    rate, transfers = cdn.options.throttle, cdn.transfers
    hold = transfers.hold_at(file.uuid)
    hold = hold if hold is not None and start < hold <= stop else None
    step = max(1024, int(rate / 10)) if rate else 1 << 16
    began = asyncio.get_running_loop().time()
    pos = start
    for piece in file.chunks(start, stop):
        for k in range(0, len(piece), step):
            part = piece[k : k + step]
            if hold is not None and pos + len(part) >= hold:
                head = part[: hold - pos]
                await _write(resp, tx, transfers, file.uuid, head)
                await transfers.pause(file.uuid)
                pos, part, hold = hold, part[len(head) :], None
            await _write(resp, tx, transfers, file.uuid, part)
            pos += len(part)
            if rate:
                await asyncio.sleep(max(0.0, began + tx.sent / rate - asyncio.get_running_loop().time()))


async def _write(
    resp: web.StreamResponse, tx: _Tx, transfers: Transfers, uuid: str, data: memoryview
) -> None:
    if data:
        await resp.write(data)
        tx.sent += len(data)
        transfers.add(uuid, len(data))


@dataclass(frozen=True)
class CdnServer:
    """A running fake CDN: where it is, what it holds, what it saw, and its live controls."""

    url: str  # http://127.0.0.1:PORT (no trailing slash)
    port: int
    files: CdnFiles  # expected bytes of any URL: files.file(url).sha256(), files.expected(url)
    log: CdnLog  # every request, all headers
    faults: CdnInjector  # queue("cut", uuid=...) scripted faults at runtime
    transfers: Transfers  # sent(uuid), wait_sent, hold/wait_paused/release
    app: web.Application


def make_cdn_app(dataset: Dataset, options: CdnOptions | None = None) -> web.Application:
    options = options or CdnOptions()
    app = web.Application()
    app[_CDN] = _Cdn(CdnFiles(dataset, options), options, CdnInjector(options.faults), CdnLog(), Transfers())
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app


@asynccontextmanager
async def serve_cdn(
    dataset: Dataset, options: CdnOptions | None = None, *, host: str = "127.0.0.1"
) -> AsyncIterator[CdnServer]:
    """Run the fake CDN on host:options.port for the duration of the block."""
    app = make_cdn_app(dataset, options)
    state = app[_CDN]
    state.transfers.bind(asyncio.get_running_loop())
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, state.options.port).start()
        port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        yield CdnServer(
            f"http://{url_host}:{port}", port, state.files, state.log, state.faults, state.transfers, app
        )
    finally:
        state.transfers.release_all()  # paused bodies would hold the shutdown up
        await runner.cleanup()
