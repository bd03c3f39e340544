"""Seeded fault injection and edge rate limiting for the fake Civitai API.

Every failure here is one the real API (or Cloudflare in front of it) has been
seen to produce; the harvester must treat each as a failed attempt, never data.
Draws come from one random.Random(seed), so a run is reproducible.
"""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import struct
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import orjson
from aiohttp import web

KINDS = (
    "503",
    "429",
    "429_retry_after",
    "challenge",
    "challenge_403",
    "502",
    "504",
    "524",
    "500",
    "reset",
    "truncated",
    "slow",
    "451",
)

# What a hostile or broken server does, beyond the weather above: never drawn by the
# chaos tests ("every kind" means KINDS), only asked for by name.
HOSTILE = (
    "echo_400",  # error bodies that echo the request's headers, the Authorization header included
    "echo_404",
    "echo_500",
    "gzip_bomb",  # a small gzip body that inflates to `bomb_mb` MiB
    "endless",  # a 200 JSON body that never ends (stops after `endless_mb` MiB or the client leaving)
    "json_as_html",  # the genuine page, labelled text/html
    "surrogate_400",  # an error message holding a lone surrogate escape and terminal escape sequences
    "surrogate_cursor",  # the genuine page with a nextCursor holding a lone surrogate
)

# Kinds the real server took up later (api-facts "What changed in 2025-2026"): asked for by name
# or rate, never part of "every kind" (KINDS), so the sweeps over KINDS are unchanged.
KINDS_2026 = (
    "503_overloaded",  # the search backend's 503: {"error": OVERLOADED} with Retry-After
)
OVERLOADED = "Image search is temporarily overloaded — please retry."

CHALLENGE_PAGE = (
    b'<!DOCTYPE html><html lang="en-US"><head><title>Just a moment...</title></head><body>'
    b"<noscript>Enable JavaScript and cookies to continue</noscript>"
    b"<script>window._cf_chl_opt={cvId:'3'};</script></body></html>"
)


def cf_error_page(code: int, title: str) -> bytes:
    return (
        f"<!DOCTYPE html><html><head><title>civitai.com | {code}: {title}</title></head>"
        f"<body><h1>Error {code}</h1><p>{title}</p><p>Cloudflare Ray ID: 8f1c2a3b4d5e6f70</p>"
        f"</body></html>"
    ).encode()


@dataclass(frozen=True)
class FaultSpec:
    """Rates per kind (summing to at most 1) plus how some kinds behave."""

    seed: int = 0
    rates: tuple[tuple[str, float], ...] = ()
    retry_after: int = 2  # seconds, for 503 and 429_retry_after
    retry_after_http_date: bool = False  # send Retry-After as an HTTP-date instead
    slow_seconds: float = 35.0  # longer than any sane client timeout
    bomb_mb: int = 256  # what the gzip bomb inflates to
    endless_mb: int = 4096  # where an endless body gives up, if the client never does

    def __post_init__(self) -> None:
        known = KINDS + HOSTILE + KINDS_2026
        unknown = [k for k, _ in self.rates if k not in known]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(known)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FaultSpec:
        """{"seed": 1, "rates": {"503": 0.05}, ...}; kinds may also sit at the top level."""
        rates = dict(d.get("rates", {}))
        rates.update({k: v for k, v in d.items() if k in KINDS + KINDS_2026})
        options = {
            k: d[k]
            for k in ("seed", "retry_after", "retry_after_http_date", "slow_seconds", "bomb_mb", "endless_mb")
            if k in d
        }
        return cls(rates=tuple((k, float(v)) for k, v in rates.items()), **options)

    @classmethod
    def only(cls, kind: str, rate: float = 1.0, **options: Any) -> FaultSpec:
        return cls(rates=((kind, rate),), **options)

    def rate(self, kind: str) -> float:
        return sum(r for k, r in self.rates if k == kind)

    @property
    def total_rate(self) -> float:
        return sum(r for _, r in self.rates)


class FaultInjector:
    """Decides, per request, whether and how to fail; scripted faults go first."""

    def __init__(self, spec: FaultSpec | None = None) -> None:
        self.spec = spec or FaultSpec()
        self._rng = random.Random(self.spec.seed)
        self._script: deque[str] = deque()

    def queue(self, *kinds: str) -> None:
        """Fail the next requests with these kinds, in order, before any random draw."""
        for kind in kinds:
            if kind not in KINDS + HOSTILE + KINDS_2026:
                raise ValueError(f"unknown fault kind {kind!r}")
        self._script.extend(kinds)

    def draw(self) -> str | None:
        if self._script:
            return self._script.popleft()
        if not self.spec.rates:
            return None
        r, acc = self._rng.random(), 0.0
        for kind, rate in self.spec.rates:
            acc += rate
            if r < acc:
                return kind
        return None

    def retry_after(self) -> str:
        if self.spec.retry_after_http_date:
            return formatdate(time.time() + self.spec.retry_after, usegmt=True)
        return str(self.spec.retry_after)

    async def respond(
        self, kind: str, request: web.Request, real: Callable[[], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The response for kind; `real` produces the genuine answer the fault spoils or delays."""
        if kind == "slow":
            await asyncio.sleep(self.spec.slow_seconds)
            return await real()
        if kind in ("reset", "truncated"):
            return await _cut_short(request, await real(), reset=kind == "reset")
        if kind in HOSTILE:
            return await _hostile(kind, self.spec, request, real)
        return self._canned(kind)

    def _canned(self, kind: str) -> web.Response:
        json_type = "application/json"
        if kind == "503_overloaded":
            return _overloaded(self.retry_after())
        if kind == "503":
            return web.Response(
                status=503,
                body=b'{"error":"Service Unavailable"}',
                content_type=json_type,
                headers={"Retry-After": self.retry_after()},
            )
        if kind == "429_retry_after":
            return web.Response(
                status=429,
                body=b'{"error":"Too Many Requests"}',
                content_type=json_type,
                headers={"Retry-After": self.retry_after()},
            )
        if kind == "429":  # Cloudflare's edge: plain text, no Retry-After
            return web.Response(status=429, text="error code: 1015")
        if kind in ("challenge", "challenge_403"):
            return web.Response(
                status=200 if kind == "challenge" else 403,
                body=CHALLENGE_PAGE,
                content_type="text/html",
                headers={"cf-mitigated": "challenge"},
            )
        if kind in ("502", "504", "524"):
            title = {"502": "Bad gateway", "504": "Gateway time-out", "524": "A timeout occurred"}[kind]
            return web.Response(
                status=int(kind), body=cf_error_page(int(kind), title), content_type="text/html"
            )
        if kind == "500":
            return web.Response(
                status=500,
                content_type=json_type,
                body=b'{"error":"An unexpected error occurred","code":"INTERNAL_SERVER_ERROR"}',
            )
        return web.Response(
            status=451, content_type=json_type, body=b'{"error":"Unavailable For Legal Reasons"}'
        )


def _overloaded(retry_after: str) -> web.Response:
    return web.Response(
        status=503,
        body=orjson.dumps({"error": OVERLOADED}),
        content_type="application/json",
        headers={"Retry-After": retry_after},
    )


async def _cut_short(request: web.Request, resp: web.StreamResponse, *, reset: bool) -> web.StreamResponse:
    """Send the headers and part of the body, then drop the connection.

    reset: chunked body then a TCP RST (connection reset by peer);
    otherwise Content-Length promises the whole body and a FIN comes early.
    """
    body = resp.body if isinstance(resp, web.Response) and isinstance(resp.body, bytes) else b"{}"
    out = web.StreamResponse(status=resp.status, headers={"Content-Type": resp.content_type})
    if reset:
        out.enable_chunked_encoding()
    else:
        out.content_length = len(body)
    await out.prepare(request)
    await out.write(body[: max(len(body) // 2, 1)])
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if reset and sock is not None:  # linger 0: close() sends RST, not FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if reset:
            transport.abort()
        else:
            transport.close()
    return out


@dataclass(frozen=True)
class RateLimit:
    """Edge rate limit: above `rate` requests/s (burst `burst`) answer 429 bare or 503 Retry-After."""

    rate: float
    burst: int = 1
    # "429": no Retry-After (Cloudflare); "503": Retry-After: retry_after; "503_overloaded": the
    # same with today's body, {"error": "Image search is temporarily overloaded — please retry."}
    mode: str = "429"
    retry_after: int = 2

    def __post_init__(self) -> None:
        if self.mode not in ("429", "503", "503_overloaded"):
            raise ValueError("RateLimit.mode is '429', '503' or '503_overloaded'")


class TokenBucket:
    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._tokens = float(limit.burst)
        self._at = time.monotonic()

    def take(self) -> bool:
        """True when a request may pass now."""
        now = time.monotonic()
        self._tokens = min(self.limit.burst, self._tokens + (now - self._at) * self.limit.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def rejection(self) -> web.Response:
        if self.limit.mode == "503_overloaded":
            return _overloaded(str(self.limit.retry_after))
        if self.limit.mode == "503":
            return web.Response(
                status=503,
                body=b'{"error":"Service Unavailable"}',
                content_type="application/json",
                headers={"Retry-After": str(self.limit.retry_after)},
            )
        return web.Response(status=429, text="error code: 1015")


# ---------------------------------------------------------------- a hostile server


async def _hostile(
    kind: str, spec: FaultSpec, request: web.Request, real: Callable[[], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if kind.startswith("echo_"):
        echoed = {"message": f"cannot serve {request.url} with headers {dict(request.headers)}"}
        return web.json_response(echoed, status=int(kind.removeprefix("echo_")))
    if kind == "surrogate_400":
        body = b'{"message":"cursor \\ud83d broken \\u001b[31mRED\\u001b[0m \\u0007bell"}'
        return web.Response(status=400, body=body, content_type="application/json")
    if kind == "gzip_bomb":
        return web.Response(
            body=_bomb(spec.bomb_mb), content_type="application/json", headers={"Content-Encoding": "gzip"}
        )
    if kind == "endless":
        return await _endless(request, spec.endless_mb)
    genuine = await real()
    body = genuine.body if isinstance(genuine, web.Response) and isinstance(genuine.body, bytes) else b"{}"
    if kind == "json_as_html":
        return web.Response(status=genuine.status, body=body, content_type="text/html")
    page = orjson.loads(body)
    page.setdefault("metadata", {})["nextCursor"] = "@lone@"
    raw = orjson.dumps(page).replace(b'"@lone@"', b'"\\ud83d"')  # what Node sends for a cut emoji
    return web.Response(status=genuine.status, body=raw, content_type="application/json")


@functools.lru_cache(maxsize=4)
def _bomb(mebibytes: int) -> bytes:
    """`mebibytes` MiB of spaces, gzipped: about a thousandth of that on the wire."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip container
    block = b" " * (1 << 20)
    parts = [packer.compress(block) for _ in range(mebibytes)]
    return b"".join(parts) + packer.flush()


async def _endless(request: web.Request, limit_mb: int) -> web.StreamResponse:
    out = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    out.enable_chunked_encoding()
    await out.prepare(request)
    await out.write(b'{"items":[')
    chunk = b'{"id":1,"url":"x"},' * 3000
    for _ in range(limit_mb * (1 << 20) // len(chunk)):
        await out.write(chunk)  # raises once the client has gone
    return out
