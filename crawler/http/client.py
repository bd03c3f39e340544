"""The API client: one cooldown, one pacer (aiolimiter), one concurrency cap, shared by every worker.

A request takes a concurrency slot, waits for the cooldown (a 429 or 503 seen by
any worker pauses all of them), then for its turn at the pacer, then checks the
cooldown once more, so nothing is sent before a `Retry-After` has passed. The
answer is classified in `outcomes` and acted on before the slot is given back,
so no other worker can send in between.

Three mechanisms, from fast to slow:

- the per-request backoff: a transient failure (5xx, timeout, HTML page) is
  retried after a capped exponential delay that jitter only ever lengthens;
- the shared `Cooldown`: a rate-limited answer pauses every worker for its
  `Retry-After` (seconds or HTTP-date, honoured exactly), or, without one, for a
  capped exponential delay that grows while rate limiting goes on (a 5xx that
  carries a `Retry-After` pauses everyone too, without counting as rate limited);
- `Aimd`, the effective request rate: repeated rate limiting halves it, a run of
  successes adds back a tenth of the configured rate, never above it.

Every retry, of any kind, spends the request's budget (`max_retries`); when it is
spent the shard stops with `RetriesExhaustedError` and its checkpoint intact.
Time comes from an injectable `Clock`, so all of this is testable without sleeping.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from crawler.archive.state import Cursor
from crawler.config import ApiConfig
from crawler.errors import (
    ApiError,
    BadRequestError,
    NotFoundError,
    RetriesExhaustedError,
    RunFatalError,
    SearchTimeoutError,
    ShardError,
)
from crawler.http.backoff import backoff_delay
from crawler.http.clock import Clock
from crawler.http.gate import RateGate
from crawler.http.outcomes import Kind, Outcome, classify, classify_exception
from crawler.http.transport import AiohttpTransport, Params, Transport

log = logging.getLogger("harvest")


@dataclass(frozen=True, slots=True)
class Page:
    """One page of `/images`: the items as served and the cursor to the next."""

    items: list[dict[str, Any]]
    next_cursor: Cursor | None


# ---------------------------------------------------------------- the client


class ApiClient:
    """GETs against the images API with retries, pacing and classification."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api: ApiConfig,
        api_key: str | None,
        *,
        clock: Clock | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._transport: Transport = AiohttpTransport(session)
        self._api = api
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._gate = RateGate(
            api.requests_per_second, api.concurrency, max_backoff=api.max_backoff, clock=clock, rng=rng
        )
        self._clock = self._gate.clock
        self._rng = rng
        self.counters = self._gate.counters

    @property
    def effective_rps(self) -> float:
        """The request rate in force now (AIMD), at most the configured requests_per_second."""
        return self._gate.effective_rps

    @property
    def cooldown_until(self) -> float:
        """Clock time before which no request is sent (-inf when there is no pause)."""
        return self._gate.cooldown_until

    async def images(self, params: Params, cursor: Cursor | None, timeouts: int | None = None) -> Page:
        """One page. With `timeouts`, that many timed-out attempts (the client's own timeout,
        or a gateway's 504/524) raise `SearchTimeoutError`, so the walker can ask for less."""
        query = list(params) + ([("cursor", str(cursor))] if cursor is not None else [])
        page: Page = await self._get("/images", query, parse=_parse_page, timeouts=timeouts)
        return page

    async def model_version_ids(self, model_id: str) -> list[int]:
        ids: list[int] = await self._get(f"/models/{model_id}", [], parse=_parse_model)
        return ids

    async def _get(
        self, path: str, query: Params, parse: Callable[[Any], Any], timeouts: int | None = None
    ) -> Any:
        attempts = self._api.max_retries + 1
        failures = 0  # transient failures of this request so far: its own backoff
        timed_out = 0
        outcome: Outcome | None = None
        for attempt in range(attempts):
            if attempt:
                self.counters.retries += 1
            outcome = await self._attempt(path, query, parse)
            if outcome.kind is Kind.OK:
                return outcome.body
            if outcome.kind is Kind.RUN_FATAL:
                raise RunFatalError(outcome.reason)
            if outcome.kind is Kind.SHARD_FATAL:
                raise _shard_error(outcome, path)
            wait = 0.0  # RATE_LIMITED: the shared cooldown already holds everyone back
            if outcome.kind is Kind.RETRY:
                failures += 1
                timed_out += outcome.timed_out
                if timeouts is not None and timed_out >= timeouts:
                    raise SearchTimeoutError(
                        f"{path}: {timed_out} attempts timed out; last: {outcome.reason}"
                    )
                wait = backoff_delay(failures, self._api.max_backoff, self._rng)
            log.debug("%s: %s (attempt %d of %d)", path, outcome.reason, attempt + 1, attempts)
            if attempt + 1 < attempts and wait > 0:
                await self._clock.sleep(wait)
        assert outcome is not None
        raise RetriesExhaustedError(f"{path}: gave up after {attempts} attempts; last: {outcome.reason}")

    async def _attempt(self, path: str, query: Params, parse: Callable[[Any], Any]) -> Outcome:
        """One request; its outcome is acted on (cooldown, rate) before the slot is released."""
        async with self._gate.turn() as turn:
            outcome = await self._send(path, query)
            if outcome.kind is Kind.OK:
                parsed = parse(outcome.body)
                if parsed is None:
                    outcome = Outcome(
                        Kind.RETRY, "malformed JSON response", status=outcome.status, tag="malformed"
                    )
                else:
                    outcome = Outcome(Kind.OK, "ok", body=parsed, status=outcome.status)
            turn.observe(outcome)
            return outcome

    async def _send(self, path: str, query: Params) -> Outcome:
        try:
            url = self._api.base_url + path
            resp = await self._transport.get(url, query, self._headers, self._api.timeout)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return classify_exception(exc)
        return classify(resp.status, resp.headers, resp.body, has_key=bool(self._headers))


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
