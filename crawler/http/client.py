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

import asyncio
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import backoff
from aiolimiter import AsyncLimiter

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
from crawler.http.outcomes import Kind, Outcome, classify, classify_exception

log = logging.getLogger("harvest")

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
    rate_limited: int = 0  # answers classified RATE_LIMITED
    cooldown_seconds: float = 0.0  # time every worker was held back by the shared cooldown
    rate_decreases: int = 0  # AIMD halvings of the request rate
    rate_increases: int = 0  # AIMD additive steps back up
    effective_rps: float = 0.0  # the request rate in force now (at the end: when the run ended)
    lowest_rps: float = 0.0  # the lowest rate the run was paced at
    by_reason: dict[str, int] = field(default_factory=dict)  # failed attempts by Outcome.key


# ---------------------------------------------------------------- time


class Clock(Protocol):
    """Where the client gets its time; tests substitute a fake one."""

    def now(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """time.monotonic(), the clock asyncio's loop and the fake API's request log use."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Cooldown:
    """A pause shared by every worker, in front of the pacer."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.until = -math.inf

    def extend(self, seconds: float) -> float:
        """Pause everyone for at least `seconds` from now; returns how much the pause grew."""
        now = self._clock.now()
        before = max(self.until, now)
        self.until = max(self.until, now + seconds)
        return max(0.0, self.until - before)

    def is_open(self) -> bool:
        return self._clock.now() >= self.until

    async def wait(self) -> None:
        # Loop: the pause can grow while we sleep, and a timer may fire a hair early.
        while (delay := self.until - self._clock.now()) > 0:
            await self._clock.sleep(delay)


class Pacer:
    """Even pacing by aiolimiter, at a rate that AIMD may change at any time.

    `AsyncLimiter(1, 1/rate)` spaces request starts evenly with no initial burst.
    aiolimiter cannot change a limiter's rate, so a new rate gets a new limiter; a
    waiter whose turn came from a replaced limiter queues again on the current
    one, so no request is sent at a stale rate.
    """

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self.limiter = AsyncLimiter(1, 1 / rate)

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        if value != self._rate:
            self._rate = value
            self.limiter = AsyncLimiter(1, 1 / value)

    async def acquire(self) -> None:
        while True:
            limiter = self.limiter
            await limiter.acquire()
            if limiter is self.limiter:
                return


class Aimd:
    """The effective request rate: additive increase, multiplicative decrease.

    A rate-limit *event* is a rate-limited answer to a request sent after the
    previous event was seen; answers to requests already in flight then belong to
    the same event (one congestion signal, one reaction). The first event of a
    streak only pauses (the cooldown); each further event before `recover_after`
    successes in a row multiplies the rate by `decrease`, down to `floor`
    (1/20 of the configured rate, at least 0.1/s, never above it). Every
    `recover_after` successes in a row end the streak and add `step` (a tenth of
    the configured rate), up to the configured rate.
    """

    def __init__(
        self,
        ceiling: float,
        *,
        decrease: float = 0.5,
        recover_after: int = 20,
        step: float | None = None,
        floor: float | None = None,
    ) -> None:
        self.ceiling = ceiling
        self.rate = ceiling
        self.floor = floor if floor is not None else min(ceiling, max(0.1, ceiling / 20))
        self.step = step if step is not None else ceiling / 10
        self.decrease = decrease
        self.recover_after = recover_after
        self.streak = 0  # rate-limit events since the last calm run of successes
        self.successes = 0  # successes in a row since the last event or step
        self._last_event = -math.inf

    def on_rate_limited(self, sent_at: float, now: float) -> bool:
        """Count one rate-limited answer; True when it lowered the rate."""
        if sent_at < self._last_event:
            return False  # in flight when the last event was seen: the same event
        self._last_event = now
        self.streak += 1
        self.successes = 0
        if self.streak < 2:
            return False
        lowered = max(self.floor, self.rate * self.decrease)
        changed = lowered < self.rate
        self.rate = lowered
        return changed

    def on_success(self) -> bool:
        """Count one success; True when it raised the rate."""
        self.successes += 1
        if self.successes < self.recover_after:
            return False
        self.successes = 0
        self.streak = 0
        if self.rate >= self.ceiling:
            return False
        self.rate = min(self.ceiling, self.rate + self.step)
        return True


def backoff_delay(failures: int, cap: float, rng: Callable[[], float] = random.random) -> float:
    """The wait after the `failures`-th failure in a row (1, 2, ...): 1 s, 2 s, 4 s ... up to `cap`.

    The nominal delays are `backoff.expo`'s. Jitter stretches one by up to half,
    never shortens it (backoff's default full jitter would retry early), and the
    result never exceeds `cap`.
    """
    delays = backoff.expo(factor=1, max_value=cap)
    next(delays)  # backoff's generators yield once before their first value
    nominal = next(itertools.islice(delays, max(1, failures) - 1, None))
    return min(cap, nominal * (1 + rng() / 2))


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
        self._session = session
        self._api = api
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clock = clock or MonotonicClock()
        self._rng = rng
        self._slots = asyncio.Semaphore(api.concurrency)
        self._cooldown = Cooldown(self._clock)
        self._aimd = Aimd(api.requests_per_second)
        self._pacer = Pacer(api.requests_per_second)
        self.counters = Counters(effective_rps=api.requests_per_second, lowest_rps=api.requests_per_second)

    @property
    def effective_rps(self) -> float:
        """The request rate in force now (AIMD), at most the configured requests_per_second."""
        return self._aimd.rate

    @property
    def cooldown_until(self) -> float:
        """Clock time before which no request is sent (-inf when there is no pause)."""
        return self._cooldown.until

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
        async with self._slots:
            await self._ready_to_send()
            sent_at = self._clock.now()
            self.counters.requests += 1
            outcome = await self._send(path, query)
            if outcome.kind is Kind.OK:
                parsed = parse(outcome.body)
                if parsed is None:
                    outcome = Outcome(
                        Kind.RETRY, "malformed JSON response", status=outcome.status, tag="malformed"
                    )
                else:
                    outcome = Outcome(Kind.OK, "ok", body=parsed, status=outcome.status)
            self._observe(outcome, sent_at)
            return outcome

    async def _send(self, path: str, query: Params) -> Outcome:
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
            await self._pacer.acquire()
            if self._cooldown.is_open():
                return

    def _observe(self, outcome: Outcome, sent_at: float) -> None:
        """Count the outcome and let it steer the cooldown and the rate."""
        if outcome.kind is Kind.OK:
            if self._aimd.on_success():
                self.counters.rate_increases += 1
                self._set_rate()
            return
        key = outcome.key
        self.counters.by_reason[key] = self.counters.by_reason.get(key, 0) + 1
        pause = outcome.retry_after
        if outcome.kind is Kind.RATE_LIMITED:
            self.counters.rate_limited += 1
            if self._aimd.on_rate_limited(sent_at, self._clock.now()):
                self.counters.rate_decreases += 1
                self._set_rate()
                log.info(
                    "rate limited again (%s): pacing requests at %.3g/s", outcome.reason, self._aimd.rate
                )
            if pause is None:  # Cloudflare's bare 429: back off, longer while it goes on
                pause = backoff_delay(self._aimd.streak, self._api.max_backoff, self._rng)
        if pause is not None:
            self.counters.cooldown_seconds += self._cooldown.extend(pause)

    def _set_rate(self) -> None:
        self._pacer.rate = self._aimd.rate
        self.counters.effective_rps = self._aimd.rate
        self.counters.lowest_rps = min(self.counters.lowest_rps, self._aimd.rate)


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
