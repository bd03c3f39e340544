"""The HTTP client: GET JSON from a rate-limited service, retrying what is worth retrying.

Each attempt takes a turn at the shared `RateGate` (slots, cooldown, pacer,
AIMD), is sent through a `Transport`, classified in `outcomes`, and its body is
handed to the caller's `parse`; a body `parse` refuses (None) is as transient as
a 5xx. The outcome is observed by the gate before the turn ends.

Three mechanisms against overload, from fast to slow: this request's own
backoff (a transient failure is retried after a capped exponential delay that
jitter only ever lengthens), then the gate's shared cooldown and its AIMD rate.

Every retry, of any kind, spends the request's budget (`max_retries`); when it is
spent the caller gets `RetriesExhaustedError`. Time comes from the gate's
injectable `Clock`, so all of this is testable without sleeping.

A pause the server demands (`Retry-After`) longer than `max_wait` is not waited
for: the request fails at once (a `ShardError` saying when a rerun may go), and
nobody else is held back by it, so a server that asks for a day cannot stall
every worker in silence.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

from crawler import exactjson
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
from crawler.http.clock import Clock, seconds_text
from crawler.http.gate import Counters, RateGate
from crawler.http.outcomes import (
    TOO_LARGE,
    Kind,
    Outcome,
    classify,
    classify_exception,
    malformed,
    not_json,
    refuse_long_pause,
)
from crawler.http.servertext import ServerText
from crawler.http.transport import Params, Transport

log = logging.getLogger("harvest")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """How to talk to one service: where, how fast, how patiently."""

    base_url: str  # prefixed to every path, e.g. "https://example.com/api/v1"
    timeout: float  # seconds for one whole request
    max_retries: int  # retries of one request after its first attempt
    max_backoff: float  # seconds: cap of every exponential backoff
    requests_per_second: float  # one pace shared by every request (AIMD may lower it)
    concurrency: int | None  # requests in flight at most; None: about rate x p90 latency
    max_page_mb: float = 64.0  # MiB: a larger answer (decompressed) is a failed attempt, read no further
    max_wait: float = 900.0  # seconds: a longer pause demanded by the server stops the request's caller

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_page_mb * 2**20)


class HttpClient:
    """GETs of JSON with retries, pacing and classification; knows nothing of what it fetches."""

    def __init__(
        self,
        transport: Transport,
        gate: RateGate,
        settings: HttpSettings,
        headers: Mapping[str, str] | None = None,
        *,
        clock: Clock | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._transport = transport
        self._gate = gate
        self._settings = settings
        self._headers = dict(headers or {})
        # A 401/403 means "credentials rejected" only when some were sent.
        self._has_key = any(name.lower() == "authorization" for name in self._headers)
        # Whatever the server says is cleaned, and what we sent it (the key) redacted, as it comes in.
        self._text = ServerText.hiding(self._headers)
        self._clock = clock or gate.clock
        self._rng = rng
        self._host = host_of(settings.base_url)

    @property
    def gate(self) -> RateGate:
        return self._gate

    @property
    def counters(self) -> Counters:
        return self._gate.counters

    async def get(
        self, path: str, query: Params, parse: Callable[[bytes], T | None], *, timeouts: int | None = None
    ) -> T:
        """`parse(body)` of the first good answer to GET base_url+path?query.

        `parse` gets the body's bytes and returns what the caller wants from them,
        or None (or raises ValueError with a reason) when they are not what was due:
        a failed attempt, retried like a 5xx. The body is decided by what it holds,
        never by its content-type label.

        With `timeouts`, that many timed-out attempts (our own timeout, or a
        gateway's 504/524) raise `SearchTimeoutError`, so the caller can ask for less.
        """
        retry = Retry(self._gate, self._settings, self._host, clock=self._clock, rng=self._rng)
        outcome = await retry.run(path, lambda: self._attempt(path, query, parse), timeouts=timeouts)
        parsed: T = outcome.body
        return parsed

    async def _attempt(self, path: str, query: Params, parse: Callable[[bytes], Any]) -> Outcome:
        """One request; its outcome is observed (cooldown, rate) before the turn ends."""
        async with self._gate.turn() as turn:
            outcome = await self._send(path, query)
            if outcome.kind is Kind.OK:
                outcome = _parsed(outcome, parse, self._text)
            turn.observe(outcome)
            return outcome

    async def _send(self, path: str, query: Params) -> Outcome:
        url = self._settings.base_url + path
        try:
            resp = await self._transport.get(
                url, query, self._headers, self._settings.timeout, self._settings.max_body_bytes
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return classify_exception(exc, self._text)
        outcome = classify(resp.status, resp.headers, resp.body, has_key=self._has_key, text=self._text)
        return refuse_long_pause(outcome, self._settings.max_wait)


class Retry:
    """The retry loop of one request, over any way of making one attempt.

    An attempt is a coroutine that takes its turn at the gate and returns the
    `Outcome` it observed. `run` returns the first OK outcome; it raises for a fatal
    one, for too many timeouts (with `timeouts`) and when `max_retries` is spent.
    """

    def __init__(
        self,
        gate: RateGate,
        settings: HttpSettings,
        host: str,
        *,
        clock: Clock | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._gate, self._settings, self._host = gate, settings, host
        self._clock = clock or gate.clock
        self._rng = rng

    async def run(
        self, what: str, attempt: Callable[[], Awaitable[Outcome]], *, timeouts: int | None = None
    ) -> Outcome:
        """`what` names the request in messages (a path; never a URL's query)."""
        attempts = self._settings.max_retries + 1
        failures = 0  # transient failures of this request so far: its own backoff
        timed_out = 0
        outcome: Outcome | None = None
        for number in range(attempts):
            if number:
                self._gate.counters.retries += 1
            outcome = await attempt()
            if outcome.kind is Kind.OK:
                return outcome
            _raise_if_fatal(outcome, what)
            wait = 0.0  # RATE_LIMITED: the shared cooldown already holds everyone back
            if outcome.kind is Kind.RETRY:
                failures += 1
                timed_out += outcome.timed_out
                if timeouts is not None and timed_out >= timeouts:
                    raise SearchTimeoutError(
                        f"{what}: {timed_out} attempts timed out; last: {outcome.reason}", outcome=outcome
                    )
                wait = backoff_delay(failures, self._settings.max_backoff, self._rng)
            self._report(what, outcome, number, wait)
            if number + 1 < attempts and wait > 0:
                await self._clock.sleep(wait)
        assert outcome is not None
        raise RetriesExhaustedError(
            f"{what}: gave up after {attempts} attempts; last: {outcome.reason}", outcome=outcome
        )

    def _report(self, what: str, outcome: Outcome, attempt: int, wait: float) -> None:
        """Log a failed attempt: at WARNING when the host was not reached and a retry follows."""
        retries = self._settings.max_retries
        if outcome.unreachable and attempt < retries:
            # Not DEBUG: a run without a network would otherwise say nothing until its budgets run out.
            log.warning(
                "%s unreachable (%s): retry %d/%d in %s s",
                self._host,
                outcome.unreachable,
                attempt + 1,
                retries,
                seconds_text(wait),
            )
        elif outcome.tag == TOO_LARGE and attempt < retries:
            # Not DEBUG: the cure may be the user's (a larger max_page_mb), and memory was at stake.
            log.warning(
                "%s: %s: retry %d/%d in %s s", what, outcome.reason, attempt + 1, retries, seconds_text(wait)
            )
        else:
            log.debug("%s: %s (attempt %d of %d)", what, outcome.reason, attempt + 1, retries + 1)


def _parsed(outcome: Outcome, parse: Callable[[bytes], Any], text: ServerText = ServerText()) -> Outcome:
    """OK with what `parse` made of the body, or RETRY when it could not use it (its reason
    may quote the body: `text` cleans it)."""
    status = outcome.status or 200
    try:
        parsed = parse(outcome.body)
    except exactjson.NotJson:
        return not_json(status, outcome.body)
    except ValueError as exc:
        return malformed(status, str(exc), text)
    if parsed is None:
        return malformed(status, None)
    return Outcome(Kind.OK, "ok", body=parsed, status=outcome.status)


def _raise_if_fatal(outcome: Outcome, path: str) -> None:
    if outcome.kind is Kind.RUN_FATAL:
        raise RunFatalError(outcome.reason, outcome=outcome)
    if outcome.kind is Kind.SHARD_FATAL:
        raise _shard_error(outcome, path)


def _shard_error(outcome: Outcome, path: str) -> ApiError:
    if outcome.status == 400:
        return BadRequestError(f"{path}: {outcome.reason}", outcome=outcome)
    if outcome.status == 404:
        return NotFoundError(f"{path}: {outcome.reason}", outcome=outcome)
    return ShardError(f"{path}: {outcome.reason}", outcome=outcome)


def host_of(base_url: str) -> str:
    """`host:port` of the service, for messages (never the URL's user or password)."""
    parts = urlsplit(base_url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a port that is not a number: the request itself will say so
        port = None
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host
