"""Downloads of large files, streamed to a sink, under a `RateGate` of their own.

The same retry loop as every other request (`client.Retry`), the same outcome
table for what is not a body (429/503 with Retry-After pause every download,
5xx and timeouts back off), but a body is never held in memory: it goes chunk by
chunk to the caller's `Sink` (a `.part` file). A sink that already holds the
first bytes from an earlier attempt is continued with `Range`; a server that
ignores it answers 200 and the sink starts over. A body shorter than its
`Content-Length` (aiohttp raises), a `Content-Range` that does not start where
asked, or a body the sink refuses (an HTML page where a picture was due) is a
failed attempt.

No header of the API's is ever sent here: the API key belongs to the API host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from crawler.http.client import HttpSettings, Retry, host_of
from crawler.http.gate import Counters, RateGate
from crawler.http.outcomes import Kind, Outcome, classify, classify_exception, refuse_long_pause
from crawler.http.servertext import ServerText

_ERROR_BODY = 1 << 16  # bytes of a non-2xx answer read for its message
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED = re.compile(r"bytes \*/(\d+)")


class Sink(Protocol):
    """Where one file's body goes, kept across attempts."""

    def held(self) -> int:
        """Bytes already held from an earlier attempt (0: none): the request asks for the rest."""
        ...

    def begin(self, start: int) -> None:
        """The body from byte `start` follows: 0 drops what is held, `held()` continues it."""
        ...

    def write(self, chunk: bytes) -> None: ...

    def refuse(self, content_type: str) -> str | None:
        """After the last byte: why the file is not what was due (None: it is)."""
        ...


@dataclass(frozen=True, slots=True)
class Got:
    """A whole body, in the sink."""

    status: int
    size: int  # bytes of the whole file, earlier attempts' included
    resumed_at: int  # where this attempt's bytes began (0: the whole file came now)


class Downloader:
    """GETs of whole files with retries, pacing and a shared cooldown; knows nothing of media."""

    def __init__(self, session: aiohttp.ClientSession, gate: RateGate, settings: HttpSettings) -> None:
        self._session = session
        self._gate = gate
        self._settings = settings
        self._text = ServerText()
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.timeout, sock_read=settings.timeout
        )

    @property
    def counters(self) -> Counters:
        return self._gate.counters

    async def fetch(self, url: str, sink: Sink) -> Got:
        """The whole body of `url` in `sink`; the client's errors (NotFoundError for a 404,
        ShardError for other refusals, RetriesExhaustedError) when it cannot be had."""
        retry = Retry(self._gate, self._settings, host_of(url))
        outcome = await retry.run(_shown(url), lambda: self._attempt(url, sink))
        got: Got = outcome.body
        return got

    async def _attempt(self, url: str, sink: Sink) -> Outcome:
        async with self._gate.turn() as turn:
            outcome = await self._send(url, sink)
            turn.observe(outcome)
            return outcome

    async def _send(self, url: str, sink: Sink) -> Outcome:
        held = sink.held()
        # identity: byte offsets (Range, Content-Length) then count the file's own bytes
        headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={held}-"} if held else {})
        try:
            async with self._session.get(url, headers=headers, timeout=self._timeout) as resp:
                if resp.status == 416 and held:
                    return self._whole_already(resp, held, sink)
                if resp.status not in (200, 206):
                    return await self._refused(resp)
                return await self._receive(resp, held, sink)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            return classify_exception(exc, self._text)

    def _whole_already(self, resp: aiohttp.ClientResponse, held: int, sink: Sink) -> Outcome:
        """A 416 to `bytes=<held>-`: the sink may hold the whole file already (a run stopped
        after its last byte, before the file was finished): `bytes */<held>` says so."""
        match = _UNSATISFIED.fullmatch(resp.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != held:
            sink.begin(0)  # what is held is no beginning of this file: the next attempt starts over
            return _failed(416, f"nothing to continue from byte {held}", "bad-range")
        sink.begin(held)
        why = sink.refuse(resp.headers.get("Content-Type", ""))
        if why is not None:
            return _failed(416, why, "not-media")
        return Outcome(Kind.OK, "ok", body=Got(206, held, held), status=416)

    async def _refused(self, resp: aiohttp.ClientResponse) -> Outcome:
        body = await resp.content.read(_ERROR_BODY)
        outcome = classify(resp.status, resp.headers, body, has_key=False, text=self._text)
        return refuse_long_pause(outcome, self._settings.max_wait)

    async def _receive(self, resp: aiohttp.ClientResponse, held: int, sink: Sink) -> Outcome:
        start = _start_of(resp) if resp.status == 206 else 0
        if start not in (0, held):
            return _failed(resp.status, f"the server sent bytes from {start}, not {held}", "bad-range")
        sink.begin(start)
        size = start
        async for chunk in resp.content.iter_any():  # as it comes: a kill loses little
            sink.write(chunk)
            size += len(chunk)
        whole = _whole_size(resp, start)
        if whole is not None and size != whole:
            return _failed(resp.status, f"the body ended at byte {size} of {whole}", "short-body")
        why = sink.refuse(resp.headers.get("Content-Type", ""))
        if why is not None:
            return _failed(resp.status, why, "not-media")
        return Outcome(Kind.OK, "ok", body=Got(resp.status, size, start), status=resp.status)


def _start_of(resp: aiohttp.ClientResponse) -> int:
    match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else -1


def _whole_size(resp: aiohttp.ClientResponse, start: int) -> int | None:
    """The file's size as the answer announces it (Content-Length, plus where a 206 starts)."""
    length = resp.headers.get("Content-Length", "")
    if not length.isdigit() or resp.headers.get("Content-Encoding", "identity") != "identity":
        return None  # an encoded body's length is not the file's (aiohttp checks the wire's)
    return start + int(length)


def _failed(status: int, why: str, tag: str) -> Outcome:
    return Outcome(Kind.RETRY, f"HTTP {status}: {why}", status=status, tag=tag)


def _shown(url: str) -> str:
    """A URL for messages: host and path, never a query (where a token could hide)."""
    parts = urlsplit(url)
    return f"{parts.netloc.rpartition('@')[2]}{parts.path}"
