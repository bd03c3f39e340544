"""Civitai's two endpoints the crawl uses, over the generic `HttpClient`.

`images()` fetches one page of `/images`, `model_version_ids()` lists a model's
published versions; what each body means is `IMAGES`'s to say. A body that is not
the shape the API promises is refused, which the client retries like a 5xx.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp

from crawler import exactjson
from crawler.civitai.endpoint import Cursor, Page
from crawler.civitai.images import IMAGES, lookup_params
from crawler.config import ApiConfig
from crawler.errors import BadRequestError, CursorGoneError
from crawler.http.client import HttpClient, HttpSettings
from crawler.http.gate import Counters, InFlight, RateGate
from crawler.http.transport import AiohttpTransport, Params


class CivitaiApi:
    """The images API as the crawl sees it: pages of images and a model's versions."""

    def __init__(self, http: HttpClient) -> None:
        self.http = http

    @property
    def counters(self) -> Counters:
        return self.http.counters

    @property
    def effective_rps(self) -> float:
        """The request rate in force now (AIMD), at most the configured requests_per_second."""
        return self.http.gate.effective_rps

    @property
    def in_flight_target(self) -> int:
        """Requests the run wants in flight now (explicit concurrency, or rate x p90 latency)."""
        return self.http.gate.in_flight_target

    async def images(self, params: Params, cursor: Cursor | None, timeouts: int | None = None) -> Page:
        """One page. With `timeouts`, that many timed-out attempts (the client's own timeout,
        or a gateway's 504/524) raise `SearchTimeoutError`, so the walker can ask for less."""
        query = list(params) + ([("cursor", str(cursor))] if cursor is not None else [])
        try:
            return await self.http.get(IMAGES.path, query, IMAGES.parse_page, timeouts=timeouts)
        except BadRequestError as refused:
            if cursor is not None and IMAGES.cursor_gone(str(refused)):
                raise CursorGoneError(f"the server no longer continues the cursor: {refused}") from None
            raise

    async def lookup(self, ids: Sequence[int]) -> Page:
        """The current state of `ids` (at most LOOKUP_MAX): those still shown, in no useful order."""
        return await self.http.get(IMAGES.path, lookup_params(ids), IMAGES.parse_page)

    async def model_version_ids(self, model_id: str) -> list[int]:
        expansion = IMAGES.expansion
        assert expansion is not None
        return await self.http.get(
            expansion.path.format(model_id), [], lambda body: expansion.parse(exactjson.loads(body))
        )


def http_settings(api: ApiConfig) -> HttpSettings:
    """The `[api]` config table as the HTTP layer's settings."""
    return HttpSettings(
        base_url=api.base_url,
        timeout=api.timeout,
        max_retries=api.max_retries,
        max_backoff=api.max_backoff,
        requests_per_second=api.requests_per_second,
        concurrency=api.concurrency,
        max_page_mb=api.max_page_mb,
        max_wait=api.max_wait,
    )


def max_in_flight(api: ApiConfig) -> int:
    """The most requests the run may ever have in flight (connections, queue room)."""
    return api.concurrency if api.concurrency is not None else InFlight().high


def make_api(session: aiohttp.ClientSession, api: ApiConfig, api_key: str | None) -> CivitaiApi:
    """The API over `session`, with one rate gate for every request of the run."""
    settings = http_settings(api)
    gate = RateGate(settings.requests_per_second, settings.concurrency, max_backoff=settings.max_backoff)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return CivitaiApi(HttpClient(AiohttpTransport(session), gate, settings, headers))
