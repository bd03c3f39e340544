"""The network, behind one seam: a `Transport` sends one GET and returns the whole answer.

The client's retry, cooldown and pacing logic sees only `Response`s and the
exceptions below, so tests drive it with a scripted transport instead of a
socket. A transport does not judge answers (every status comes back as a
`Response`); it fails only when no complete answer arrived, by raising
`aiohttp.ClientError`, `TimeoutError` or `OSError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp

Params = Sequence[tuple[str, str]]  # a query string, in order, keys may repeat


@dataclass(frozen=True, slots=True)
class Response:
    """One complete HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    """Sends one GET; raises aiohttp.ClientError, TimeoutError or OSError when no answer came."""

    async def get(self, url: str, params: Params, headers: Mapping[str, str], timeout: float) -> Response: ...


class AiohttpTransport:
    """A `Transport` over an `aiohttp.ClientSession` the caller opens and closes."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def get(self, url: str, params: Params, headers: Mapping[str, str], timeout: float) -> Response:
        """`timeout` bounds the whole request, the body included."""
        async with self._session.get(
            url, params=params, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            return Response(resp.status, resp.headers, await resp.read())
