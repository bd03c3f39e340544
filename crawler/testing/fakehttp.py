"""Fakes for the HTTP layer: a scripted `Transport` and virtual time, for tests that never sleep.

    clock = VirtualClock()
    transport = ScriptedTransport(reply(503, retry_after="2"), reply(200, {"ok": True}))
    result = run_virtual(clock, lambda: client_over(transport, clock).get(...))

`run_virtual` runs a coroutine on an event loop whose time is `clock`: whenever
every task waits, time jumps to the next timer instead of sleeping. aiolimiter
reads the loop's time and `RateGate` reads `clock`, so pacing, cooldowns and
backoff are all proved to the microsecond, in milliseconds of real time.
"""

from __future__ import annotations

import asyncio
import selectors
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from crawler.http.transport import BodyTooLarge, Params, Response

T = TypeVar("T")


class VirtualClock:
    """A `Clock` whose time passes only when the virtual loop has nothing to do."""

    def __init__(self, start: float = 100.0) -> None:
        self.t = start
        self.slept: list[float] = []  # every Clock.sleep, in order (not the pacer's waits)

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(seconds)  # the loop jumps the clock to the timer


# Each turn of the loop takes this long, as on a real machine. Without it a timer
# that a rounding error puts a hair before "now" (aiolimiter computes its wake-ups
# in floats) would be rescheduled at the same instant for ever.
TICK = 1e-9


class _JumpingSelector(selectors.DefaultSelector):
    """Never blocks: where the loop would wait for `timeout`, the clock jumps by it."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready:
            self._clock.t += TICK
        elif timeout is None:  # no timer and no I/O: nothing could ever wake the loop
            raise RuntimeError("virtual time: every task waits and nothing is scheduled (deadlock)")
        else:
            self._clock.t += max(timeout, TICK)
        return ready


class _VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(_JumpingSelector(clock))
        self._virtual_clock = clock

    def time(self) -> float:
        return self._virtual_clock.t


def run_virtual(clock: VirtualClock, main: Callable[[], Awaitable[T]]) -> T:
    """Run `main()` to completion on a fresh event loop whose time is `clock`."""

    async def wrapper() -> T:
        return await main()

    with asyncio.Runner(loop_factory=lambda: _VirtualLoop(clock)) as runner:
        return runner.run(wrapper())


@dataclass(frozen=True, slots=True)
class Sent:
    """One request as the transport received it."""

    url: str
    params: tuple[tuple[str, str], ...]
    headers: Mapping[str, str]
    timeout: float
    at: float  # the event loop's time (the virtual clock under `run_virtual`)
    max_bytes: int | None = None  # the body cap the client asked for


Step = Response | BaseException


class ScriptedTransport:
    """A `Transport` that answers from a script, in order, and records every request.

    A step is a `Response` to return or an exception to raise (as a real
    transport does when no answer came). `latency` seconds pass before each step.
    A `Response` whose body is larger than the request's `max_bytes` raises
    `BodyTooLarge`, as the real transport does once it has read that much.
    """

    def __init__(self, *script: Step, latency: float = 0.0) -> None:
        self._script: deque[Step] = deque(script)
        self.latency = latency
        self.sent: list[Sent] = []
        self.in_flight = 0
        self.peak_in_flight = 0

    async def get(
        self,
        url: str,
        params: Params,
        headers: Mapping[str, str],
        timeout: float,
        max_bytes: int | None = None,
    ) -> Response:
        loop = asyncio.get_running_loop()
        self.sent.append(Sent(url, tuple(params), dict(headers), timeout, loop.time(), max_bytes))
        if not self._script:
            raise AssertionError(f"the script ran out at request {len(self.sent)}: {url}")
        step = self._script.popleft()
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        if isinstance(step, BaseException):
            raise step
        if max_bytes is not None and len(step.body) > max_bytes:
            raise BodyTooLarge(step.status, max_bytes)
        return step


def reply(
    status: int,
    body: Any = None,
    *,
    retry_after: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A response whose `body` is sent as JSON (bytes as they are; None: an empty body)."""
    all_headers = dict(headers or {})
    if not isinstance(body, bytes):
        all_headers.setdefault("Content-Type", "application/json")
        body = b"" if body is None else orjson.dumps(body)
    if retry_after is not None:
        all_headers["Retry-After"] = retry_after
    return Response(status, all_headers, body)
