"""The network, behind one seam: a `Transport` sends one GET and returns the whole answer.

The client's retry, cooldown and pacing logic sees only `Response`s and the
exceptions below, so tests drive it with a scripted transport instead of a
socket. A transport does not judge answers (every status comes back as a
`Response`); it fails only when no complete answer arrived, by raising
`aiohttp.ClientError`, `TimeoutError` or `OSError`.

A body is read in chunks and never beyond `max_bytes` (counted after
decompression: a small gzip body can inflate a thousandfold), so a hostile or
broken server cannot make the harvester hold more than that for one answer: a
larger one is `BodyTooLarge`, and the rest of it is never read.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp

Params = Sequence[tuple[str, str]]  # a query string, in order, keys may repeat


class BodyTooLarge(aiohttp.ClientPayloadError):
    """The body outgrew the cap; the connection is dropped with the rest unread."""

    def __init__(self, status: int, limit: int) -> None:
        super().__init__(f"HTTP {status}: the body is larger than {limit} bytes")
        self.status = status
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Response:
    """One complete HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    """Sends one GET; raises aiohttp.ClientError, TimeoutError or OSError when no answer came,
    `BodyTooLarge` (a ClientError) when the body would be more than `max_bytes` (None: no cap)."""

    async def get(
        self,
        url: str,
        params: Params,
        headers: Mapping[str, str],
        timeout: float,
        max_bytes: int | None = None,
    ) -> Response: ...


class AiohttpTransport:
    """A `Transport` over an `aiohttp.ClientSession` the caller opens and closes."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def get(
        self,
        url: str,
        params: Params,
        headers: Mapping[str, str],
        timeout: float,
        max_bytes: int | None = None,
    ) -> Response:
        """`timeout` bounds the whole request, the body included; aiohttp decompresses as it
        reads, in bounded steps, so the cap counts the bytes the body inflates to."""
        async with self._session.get(
            url, params=params, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            try:
                body = await read_capped(resp.content.iter_any(), max_bytes, resp.status)
            except BodyTooLarge:
                resp.close()  # not released to the pool: the rest of the body is never read
                raise
            return Response(resp.status, resp.headers, body)


async def read_capped(chunks: AsyncIterable[bytes], max_bytes: int | None, status: int) -> bytes:
    """The whole body; `BodyTooLarge` as soon as more than `max_bytes` of it have come."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise BodyTooLarge(status, max_bytes)
        parts.append(chunk)
    return b"".join(parts)
