"""The API client: one limiter, one concurrency cap, one shared cooldown.

Every request waits for the cooldown (a 429 or 503 seen by any worker pauses all
of them), then for the rate limiter, then checks the cooldown once more so that
nothing is sent before a `Retry-After` has passed. Outcomes are classified in
`outcomes`; this module only acts on them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import backoff
from aiolimiter import AsyncLimiter

from crawler.config import ApiConfig
from crawler.errors import (
    ApiError,
    BadRequestError,
    NotFoundError,
    RetriesExhaustedError,
    RunFatalError,
    ShardError,
)
from crawler.outcomes import Kind, Outcome, classify, classify_exception
from crawler.state import Cursor

Params = Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of `/images`: the items as served and the cursor to the next."""

    items: list[dict[str, Any]]
    next_cursor: Cursor | None


@dataclass(slots=True)
class Counters:
    """What the client did, for the run summary."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    cooldown_seconds: float = 0.0
    by_reason: dict[str, int] = field(default_factory=dict)


class Cooldown:
    """A pause shared by every worker, in front of the rate limiter."""

    def __init__(self) -> None:
        self._until = 0.0

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def extend(self, seconds: float) -> None:
        self._until = max(self._until, self._now() + seconds)

    def is_open(self) -> bool:
        return self._now() >= self._until

    async def wait(self) -> None:
        while (delay := self._until - self._now()) > 0:
            await asyncio.sleep(delay)


class ApiClient:
    """GETs against the images API with retries, pacing and classification."""

    def __init__(self, session: aiohttp.ClientSession, api: ApiConfig, api_key: str | None) -> None:
        self._session = session
        self._api = api
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # max_rate=1 paces requests evenly instead of allowing an initial burst.
        self._limiter = AsyncLimiter(1, 1 / api.requests_per_second)
        self._slots = asyncio.Semaphore(api.concurrency)
        self._cooldown = Cooldown()
        self.counters = Counters()

    async def images(self, params: Params, cursor: Cursor | None) -> Page:
        query = list(params) + ([("cursor", str(cursor))] if cursor is not None else [])
        body = await self._get("/images", query, parse=_parse_page)
        return body  # type: ignore[no-any-return]

    async def model_version_ids(self, model_id: str) -> list[int]:
        body = await self._get(f"/models/{model_id}", [], parse=_parse_model)
        return body  # type: ignore[no-any-return]

    async def _get(self, path: str, query: Params, parse: Any) -> Any:
        attempts = self._api.max_retries + 1
        delays = _delays(self._api.max_backoff)
        for attempt in range(attempts):
            if attempt:
                self.counters.retries += 1
            outcome = await self._attempt(path, query)
            if outcome.kind is Kind.OK:
                parsed = parse(outcome.body)
                if parsed is not None:
                    return parsed
                outcome = Outcome(Kind.RETRY, "malformed JSON response")
            self._count(outcome)
            wait = self._pause_for(outcome, next(delays), path)
            if attempt + 1 < attempts:
                await asyncio.sleep(wait)
        raise RetriesExhaustedError(f"{path}: gave up after {attempts} attempts; last: {outcome.reason}")

    def _pause_for(self, outcome: Outcome, delay: float, path: str) -> float:
        """How long this worker waits before retrying; raises when it must not."""
        if outcome.kind is Kind.RUN_FATAL:
            raise RunFatalError(outcome.reason)
        if outcome.kind is Kind.SHARD_FATAL:
            raise _shard_error(outcome, path)
        if outcome.kind is Kind.RATE_LIMITED:
            # Every worker waits: the cooldown sits in front of the limiter.
            wait = outcome.retry_after if outcome.retry_after is not None else delay
            self.counters.rate_limited += 1
            self.counters.cooldown_seconds += wait
            self._cooldown.extend(wait)
            return 0.0
        return delay

    async def _attempt(self, path: str, query: Params) -> Outcome:
        async with self._slots:
            await self._ready_to_send()
            self.counters.requests += 1
            try:
                async with self._session.get(
                    self._api.base_url + path,
                    params=query,
                    headers=self._headers,
                    timeout=aiohttp.ClientTimeout(total=self._api.timeout),
                ) as resp:
                    raw = await resp.read()
                    return classify(resp.status, resp.headers, raw, has_key=bool(self._headers))
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return classify_exception(exc)

    async def _ready_to_send(self) -> None:
        while True:
            await self._cooldown.wait()
            await self._limiter.acquire()
            if self._cooldown.is_open():
                return

    def _count(self, outcome: Outcome) -> None:
        key = outcome.reason if outcome.status is None else str(outcome.status)
        self.counters.by_reason[key] = self.counters.by_reason.get(key, 0) + 1


def _delays(cap: float) -> Iterator[float]:
    """Capped exponential delays (1 s, 2 s, 4 s … cap), each stretched by up to 50%.

    The jitter only ever lengthens a delay: full jitter would retry early.
    """
    expo = backoff.expo(factor=1, max_value=cap)
    next(expo)  # backoff's generators yield once before their first value
    for base in expo:
        yield min(cap, base) * (1 + random.random() / 2)


def _shard_error(outcome: Outcome, path: str) -> ApiError:
    if outcome.status == 400:
        return BadRequestError(f"{path}: {outcome.reason}")
    if outcome.status == 404:
        return NotFoundError(f"{path}: {outcome.reason}")
    return ShardError(f"{path}: {outcome.reason}")


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
