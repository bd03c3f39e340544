"""Civitai's two endpoints the crawl uses, over the generic `HttpClient`.

`images()` fetches one page of `/images`, `model_version_ids()` lists a model's
published versions. Each checks the shape of what comes back: a body that is not
the shape the API promises is refused (None), which the client retries like a 5xx.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from crawler.archive.state import Cursor
from crawler.config import ApiConfig
from crawler.http.client import HttpClient, HttpSettings
from crawler.http.gate import Counters, RateGate
from crawler.http.transport import AiohttpTransport, Params


@dataclass(frozen=True, slots=True)
class Page:
    """One page of `/images`: the items as served and the cursor to the next."""

    items: list[dict[str, Any]]
    next_cursor: Cursor | None


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

    async def images(self, params: Params, cursor: Cursor | None, timeouts: int | None = None) -> Page:
        """One page. With `timeouts`, that many timed-out attempts (the client's own timeout,
        or a gateway's 504/524) raise `SearchTimeoutError`, so the walker can ask for less."""
        query = list(params) + ([("cursor", str(cursor))] if cursor is not None else [])
        return await self.http.get_json("/images", query, _parse_page, timeouts=timeouts)

    async def model_version_ids(self, model_id: str) -> list[int]:
        return await self.http.get_json(f"/models/{model_id}", [], _parse_model)


def http_settings(api: ApiConfig) -> HttpSettings:
    """The `[api]` config table as the HTTP layer's settings."""
    return HttpSettings(
        base_url=api.base_url,
        timeout=api.timeout,
        max_retries=api.max_retries,
        max_backoff=api.max_backoff,
        requests_per_second=api.requests_per_second,
        concurrency=api.concurrency,
    )


def make_api(session: aiohttp.ClientSession, api: ApiConfig, api_key: str | None) -> CivitaiApi:
    """The API over `session`, with one rate gate for every request of the run."""
    settings = http_settings(api)
    gate = RateGate(settings.requests_per_second, settings.concurrency, max_backoff=settings.max_backoff)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return CivitaiApi(HttpClient(AiohttpTransport(session), gate, settings, headers))


def _parse_page(body: Any) -> Page | None:
    """A page, or None when the body is not the shape the API promises."""
    if not isinstance(body, dict):
        return None
    items, meta = body.get("items"), body.get("metadata", {})
    if not isinstance(items, list) or not isinstance(meta, dict):
        return None
    if not all(isinstance(i, dict) and _is_id(i.get("id")) for i in items):
        return None
    cursor = meta.get("nextCursor")
    if cursor is not None and (not isinstance(cursor, str | int) or isinstance(cursor, bool)):
        return None
    return Page(items, cursor)


def _parse_model(body: Any) -> list[int] | None:
    versions = body.get("modelVersions") if isinstance(body, dict) else None
    if not isinstance(versions, list):
        return None
    ids: list[Any] = [v.get("id") for v in versions if isinstance(v, dict)]
    return [i for i in ids if _is_id(i)]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
