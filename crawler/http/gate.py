"""The rate gate: one concurrency cap, one cooldown, one pacer, shared by every request.

    async with gate.turn() as turn:
        outcome = ...  # send one request, classify its answer
        turn.observe(outcome)

A turn takes a concurrency slot (a fixed number of them, or, with no
`concurrency` configured, about rate x p90 latency as observed: `InFlight`),
waits for the cooldown (a 429 or 503 seen by any request pauses all of them),
then for its place at the pacer, then checks the cooldown once more, so
nothing is sent before a `Retry-After` has passed. The outcome is observed
before the slot is given back, so no other request can be sent in between.

Two of the three mechanisms against overload live here (the third, a request's
own backoff, is the client's retry loop):

- the shared `Cooldown`: a rate-limited answer pauses every request for its
  `Retry-After` (seconds or HTTP-date, honoured exactly), or, without one, for a
  capped exponential delay that grows while rate limiting goes on (a 5xx that
  carries a `Retry-After` pauses everyone too, without counting as rate limited);
- `Aimd`, the effective request rate: repeated rate limiting halves it, a run of
  successes adds back a tenth of the configured rate, never above it.

A pause the server demands is said at WARNING when it begins ("the server asked
for a pause of 2 s (HTTP 503)"): once per pause, not once per worker whose answer
arrives while it is in force.

Waiting requests are served by priority (the context's `PRIORITY`, highest first,
then first come): a walk with most pages ahead sets it, so the run's longest walks
are never the ones left waiting and the run does not end on one slow serial tail.

Time comes from an injectable `Clock`; the pacer, being aiolimiter, reads the
event loop's clock, so tests that fake one fake both.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import heapq
import itertools
import logging
import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiolimiter import AsyncLimiter

from crawler.http.backoff import backoff_delay
from crawler.http.clock import Clock, MonotonicClock, seconds_text
from crawler.http.outcomes import Kind, Outcome

log = logging.getLogger("harvest")

# How urgent the requests of the current task are (higher first; equal: first come, first served).
PRIORITY: contextvars.ContextVar[float] = contextvars.ContextVar("request_priority", default=0.0)


class _Waiters:
    """Futures waiting for a turn, served highest `PRIORITY` first, then in arrival order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    def __bool__(self) -> bool:
        return bool(self._heap)

    def add(self) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (-PRIORITY.get(), next(self._arrivals), waiter))
        return waiter

    def remove(self, waiter: asyncio.Future[None]) -> None:
        self._heap = [entry for entry in self._heap if entry[2] is not waiter]
        heapq.heapify(self._heap)

    def wake_next(self) -> bool:
        """Hand the turn to the first waiter still waiting; False if there is none."""
        while self._heap:
            waiter = heapq.heappop(self._heap)[2]
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False


@dataclass(slots=True)
class Counters:
    """What the gate and the client did, for the run summary."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0  # answers classified RATE_LIMITED
    cooldown_seconds: float = 0.0  # time every worker was held back by the shared cooldown
    rate_decreases: int = 0  # AIMD halvings of the request rate
    rate_increases: int = 0  # AIMD additive steps back up
    effective_rps: float = 0.0  # the request rate in force now (at the end: when the run ended)
    lowest_rps: float = 0.0  # the lowest rate the run was paced at
    by_reason: dict[str, int] = field(default_factory=dict)  # failed attempts by Outcome.key


class Cooldown:
    """A pause shared by every request, in front of the pacer."""

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
    turn that came from a replaced limiter is taken again on the current one, so
    no request is sent at a stale rate. One dispatcher takes the turns and hands
    each to the most urgent waiter (`PRIORITY`).
    """

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self.limiter = AsyncLimiter(1, 1 / rate)
        self._waiters = _Waiters()
        self._dispatcher: asyncio.Task[None] | None = None

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        if value != self._rate:
            self._rate = value
            self.limiter = AsyncLimiter(1, 1 / value)

    async def acquire(self) -> None:
        waiter = self._waiters.add()
        loop = asyncio.get_running_loop()
        if self._dispatcher is None or self._dispatcher.done() or self._dispatcher.get_loop() is not loop:
            self._dispatcher = loop.create_task(self._dispatch())
        await waiter  # cancelled: the dispatcher skips it

    async def _dispatch(self) -> None:
        while self._waiters:
            await self._turn()
            self._waiters.wake_next()

    async def _turn(self) -> None:
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


class Slots:
    """A semaphore whose size may change at any time (the in-flight target).

    Waiters are served by `PRIORITY`, then first come, first served; a smaller limit takes effect as
    turns end (nothing in flight is interrupted), a larger one wakes waiters at once.
    """

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self.used = 0
        self.peak = 0  # most turns ever held at once
        self._waiters = _Waiters()

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        self._limit = max(1, value)
        self._wake()

    async def acquire(self) -> None:
        if self.used < self._limit and not self._waiters:
            self._take()
            return
        waiter = self._waiters.add()
        try:
            await waiter  # the slot is handed over with the result (see _wake)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then cancelled before it ran: give it back
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.used -= 1
        self._wake()

    def _take(self) -> None:
        self.used += 1
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self.used < self._limit and self._waiters.wake_next():
            self._take()


class InFlight:
    """How many requests to keep in flight when the config does not say: about rate x p90 latency.

    Little's law: to send `rate` requests a second that each take `latency` seconds,
    rate x latency of them must be in flight. The p90 of the last `window` answers
    (not the median) leaves room for the slow tail; the result is bounded to
    `low`..`high`. Before `warmup` answers are seen, latency is guessed at `guess` s.
    """

    def __init__(
        self, *, low: int = 2, high: int = 64, window: int = 64, warmup: int = 8, guess: float = 1.0
    ) -> None:
        self.low, self.high, self.warmup, self.guess = low, high, warmup, guess
        self._latencies: collections.deque[float] = collections.deque(maxlen=window)

    def observe(self, seconds: float) -> None:
        self._latencies.append(max(0.0, seconds))

    @property
    def p90(self) -> float:
        if len(self._latencies) < self.warmup:
            return self.guess
        ordered = sorted(self._latencies)
        return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]

    def target(self, rate: float) -> int:
        return max(self.low, min(self.high, math.ceil(rate * self.p90)))


@dataclass(frozen=True, slots=True)
class Turn:
    """One request's right to be sent: taken by `RateGate.turn`, reported on by `observe`."""

    gate: RateGate
    sent_at: float  # clock time the request was let through

    def observe(self, outcome: Outcome) -> None:
        """Count the outcome and let it steer the cooldown and the rate (before the slot is freed)."""
        self.gate._observe(outcome, self.sent_at)


class RateGate:
    """Admission for every request to one rate-limited service: slots, cooldown, pace, AIMD."""

    def __init__(
        self,
        requests_per_second: float,
        concurrency: int | None,
        *,
        max_backoff: float,
        clock: Clock | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.clock: Clock = clock or MonotonicClock()
        self._max_backoff = max_backoff
        self._rng = rng
        # An explicit concurrency is a hard cap; None follows the rate and the latency observed.
        self._auto: InFlight | None = InFlight() if concurrency is None else None
        first = concurrency if concurrency is not None else InFlight().target(requests_per_second)
        self._slots = Slots(first)
        self._cooldown = Cooldown(self.clock)
        self._aimd = Aimd(requests_per_second)
        self._pacer = Pacer(requests_per_second)
        self.counters = Counters(effective_rps=requests_per_second, lowest_rps=requests_per_second)

    @property
    def effective_rps(self) -> float:
        """The request rate in force now (AIMD), at most the configured requests_per_second."""
        return self._aimd.rate

    @property
    def in_flight_target(self) -> int:
        """Requests let in flight at once now (the explicit concurrency, or the auto target)."""
        return self._slots.limit

    @property
    def in_flight(self) -> int:
        return self._slots.used

    @property
    def peak_in_flight(self) -> int:
        return self._slots.peak

    @property
    def cooldown_until(self) -> float:
        """Clock time before which no request is sent (-inf when there is no pause)."""
        return self._cooldown.until

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[Turn]:
        """Hold a slot from the moment sending is allowed until the outcome is observed."""
        await self._slots.acquire()
        try:
            await self._ready_to_send()
            self.counters.requests += 1
            yield Turn(self, self.clock.now())
        finally:
            self._slots.release()

    async def _ready_to_send(self) -> None:
        while True:
            await self._cooldown.wait()
            await self._pacer.acquire()
            if self._cooldown.is_open():  # a pause that began while we queued at the pacer
                return

    def _observe(self, outcome: Outcome, sent_at: float) -> None:
        if self._auto is not None:
            self._auto.observe(self.clock.now() - sent_at)
            self._slots.limit = self._auto.target(self._aimd.rate)
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
            if self._aimd.on_rate_limited(sent_at, self.clock.now()):
                self.counters.rate_decreases += 1
                self._set_rate()
                log.info(
                    "rate limited again (%s): pacing requests at %.3g/s", outcome.reason, self._aimd.rate
                )
            if pause is None:  # Cloudflare's bare 429: back off, longer while it goes on
                pause = backoff_delay(self._aimd.streak, self._max_backoff, self._rng)
        if pause is not None:
            begins = self._cooldown.is_open()
            self.counters.cooldown_seconds += self._cooldown.extend(pause)
            if begins and outcome.retry_after:  # said by the server (not our backoff), and not 0
                # Every worker stops: a person watching should know why, and for how long.
                log.warning(
                    "the server asked for a pause of %s s (HTTP %s)", seconds_text(pause), outcome.status
                )

    def _set_rate(self) -> None:
        self._pacer.rate = self._aimd.rate
        self.counters.effective_rps = self._aimd.rate
        self.counters.lowest_rps = min(self.counters.lowest_rps, self._aimd.rate)
