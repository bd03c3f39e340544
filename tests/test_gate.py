"""The rate gate on virtual time: pacing, slots, the shared cooldown and AIMD, proved exactly.

Every test runs on an event loop whose clock jumps instead of sleeping
(`run_virtual`), so aiolimiter's waits and the gate's cooldown are measured
in virtual seconds and the whole file takes milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import math

import pytest

from crawler.http.gate import InFlight, RateGate, Slots
from crawler.http.outcomes import Kind, Outcome
from crawler.testing.fakehttp import VirtualClock, run_virtual

OK = Outcome(Kind.OK, "ok", status=200)
BARE_429 = Outcome(Kind.RATE_LIMITED, "HTTP 429 too many requests, no Retry-After", status=429)


def limited(seconds: float, status: int = 429) -> Outcome:
    reason = f"HTTP {status}, Retry-After {seconds:g} s"
    return Outcome(Kind.RATE_LIMITED, reason, retry_after=seconds, status=status)


def gate_on(
    clock: VirtualClock, rate: float = 100.0, concurrency: int | None = 4, max_backoff: float = 30.0
) -> RateGate:
    """A gate on `clock` whose jitter is always 0, so every pause is its nominal value."""
    return RateGate(rate, concurrency, max_backoff=max_backoff, clock=clock, rng=lambda: 0.0)


async def send(gate: RateGate, outcome: Outcome = OK, hold: float = 0.0) -> float:
    """One request through the gate: its send time; `hold` seconds in flight before its outcome."""
    async with gate.turn() as turn:
        if hold:
            await asyncio.sleep(hold)
        turn.observe(outcome)
        return turn.sent_at


def gaps(times: list[float]) -> list[float]:
    ordered = sorted(times)
    return [b - a for a, b in zip(ordered, ordered[1:], strict=False)]


# ---------------------------------------------------------------- pacing and slots


@pytest.mark.parametrize("rate", [4.0, 50.0, 0.5])
def test_turns_are_spaced_evenly_at_the_rate_with_no_burst(rate: float) -> None:
    clock = VirtualClock()
    gate = gate_on(clock, rate=rate, concurrency=8)

    async def main() -> list[float]:
        return list(await asyncio.gather(*(send(gate) for _ in range(6))))

    sent = run_virtual(clock, main)
    assert min(sent) == pytest.approx(100.0)  # the first goes at once
    assert gaps(sent) == pytest.approx([1 / rate] * 5)
    assert gate.counters.requests == 6 and gate.effective_rps == rate


def test_slots_cap_the_requests_in_flight() -> None:
    clock = VirtualClock()
    gate = gate_on(clock, rate=1000.0, concurrency=2)
    in_flight, peak = 0, 0

    async def one() -> None:
        nonlocal in_flight, peak
        async with gate.turn() as turn:
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(1.0)
            in_flight -= 1
            turn.observe(OK)

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(6)))

    run_virtual(clock, main)
    assert peak == 2
    assert clock.t == pytest.approx(103.0, abs=0.01)  # three rounds of two


# ---------------------------------------------------------------- the shared cooldown


@pytest.mark.parametrize(("status", "counted"), [(429, 1), (503, 1)])
def test_retry_after_pauses_every_later_turn_then_pacing_resumes(status: int, counted: int) -> None:
    clock = VirtualClock()
    gate = gate_on(clock, rate=10.0, concurrency=4)

    async def main() -> tuple[float, list[float]]:
        first = await send(gate, limited(5.0, status))
        rest = await asyncio.gather(*(send(gate) for _ in range(3)))
        return first, list(rest)

    first, rest = run_virtual(clock, main)
    assert gate.cooldown_until == pytest.approx(first + 5.0)
    assert all(t >= first + 5.0 for t in rest)
    assert gaps(rest) == pytest.approx([0.1, 0.1])  # and paced again after it
    counters = gate.counters
    assert counters.rate_limited == counted and counters.cooldown_seconds == pytest.approx(5.0)
    assert counters.by_reason == {str(status): 1}


def test_a_pause_that_begins_while_a_turn_queues_at_the_pacer_holds_it_back() -> None:
    clock = VirtualClock()
    gate = gate_on(clock, rate=1.0, concurrency=2)

    async def main() -> list[float]:
        # The first is let through at once and answers 0.5 s later with Retry-After 3;
        # the second queued at the pacer (due at +1 s) must wait for the pause instead.
        return list(await asyncio.gather(send(gate, limited(3.0), hold=0.5), send(gate)))

    first, second = run_virtual(clock, main)
    assert second >= first + 0.5 + 3.0


def test_a_5xx_with_retry_after_pauses_everyone_without_counting_as_rate_limited() -> None:
    clock = VirtualClock()
    gate = gate_on(clock)
    bad_gateway = Outcome(Kind.RETRY, "HTTP 502: bad gateway", retry_after=2.0, status=502)

    async def main() -> list[float]:
        return [await send(gate, bad_gateway), await send(gate)]

    first, second = run_virtual(clock, main)
    assert second >= first + 2.0
    assert gate.counters.rate_limited == 0 and gate.counters.by_reason == {"502": 1}
    assert gate.effective_rps == 100.0


def test_a_demanded_pause_is_said_once_when_it_begins_not_per_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = VirtualClock()
    gate = gate_on(clock, concurrency=4)

    async def main() -> None:
        # Four answers of one overload arrive together: one pause, one line.
        await asyncio.gather(*(send(gate, limited(2.0, 503), hold=0.5) for _ in range(4)))
        await send(gate, limited(3.0))  # after it: a new pause, a new line
        await send(gate, BARE_429)  # our own backoff: the server asked for nothing

    with caplog.at_level(logging.WARNING, logger="harvest"):
        run_virtual(clock, main)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "the server asked for a pause of 2 s (HTTP 503)"),
        ("WARNING", "the server asked for a pause of 3 s (HTTP 429)"),
    ]


def test_a_bare_429_pauses_by_a_backoff_that_grows_while_it_goes_on() -> None:
    clock = VirtualClock()
    gate = gate_on(clock, rate=100.0, concurrency=1, max_backoff=30.0)

    async def main() -> list[float]:
        return [await send(gate, BARE_429), await send(gate, BARE_429), await send(gate)]

    first, second, third = run_virtual(clock, main)
    assert second - first == pytest.approx(1.0)  # backoff_delay(1): 1 s
    assert third - second == pytest.approx(2.0)  # the streak goes on: 2 s
    assert gate.counters.cooldown_seconds == pytest.approx(3.0)


def test_a_bare_429_pause_is_capped_by_max_backoff() -> None:
    clock = VirtualClock()
    gate = gate_on(clock, max_backoff=0.25)

    async def main() -> list[float]:
        return [await send(gate, BARE_429), await send(gate)]

    first, second = run_virtual(clock, main)
    assert second - first == pytest.approx(0.25)


# ---------------------------------------------------------------- AIMD through the gate


def test_repeated_rate_limiting_halves_the_pace_and_successes_restore_it() -> None:
    clock = VirtualClock()
    gate = gate_on(clock, rate=8.0, concurrency=1)

    async def main() -> tuple[list[float], list[float]]:
        await send(gate, limited(1.0))
        await send(gate, limited(1.0))  # a second event: 8/s -> 4/s
        halved = [await send(gate) for _ in range(3)]
        for _ in range(17):  # 20 successes in a row: one step of 0.8/s back up
            await send(gate)
        restored = [await send(gate) for _ in range(3)]
        return halved, restored

    halved, restored = run_virtual(clock, main)
    assert gaps(halved) == pytest.approx([0.25, 0.25])
    assert gaps(restored) == pytest.approx([1 / 4.8, 1 / 4.8])
    counters = gate.counters
    assert (counters.rate_decreases, counters.rate_increases) == (1, 1)
    assert counters.lowest_rps == 4.0 and counters.effective_rps == gate.effective_rps == pytest.approx(4.8)


def test_answers_to_requests_in_flight_are_one_rate_limit_event() -> None:
    clock = VirtualClock()
    gate = gate_on(clock, rate=100.0, concurrency=3)

    async def main() -> None:
        # All three are sent before the first 429 comes back: one congestion signal.
        await asyncio.gather(*(send(gate, BARE_429, hold=0.5) for _ in range(3)))

    run_virtual(clock, main)
    assert gate.counters.rate_limited == 3 and gate.counters.rate_decreases == 0
    assert gate.effective_rps == 100.0


def test_no_pause_means_cooldown_until_is_minus_infinity() -> None:
    clock = VirtualClock()
    gate = gate_on(clock)
    run_virtual(clock, lambda: send(gate))
    assert math.isinf(gate.cooldown_until) and gate.cooldown_until < 0
    assert gate.counters.by_reason == {} and gate.counters.requests == 1


def test_a_cancelled_turn_gives_its_slot_back() -> None:
    clock = VirtualClock()
    gate = gate_on(clock, concurrency=1)

    async def main() -> float:
        stuck = asyncio.create_task(send(gate, hold=1000.0))
        await asyncio.sleep(1.0)
        stuck.cancel()
        return await send(gate)

    assert run_virtual(clock, main) == pytest.approx(101.0)


# ---------------------------------------------------------------- the in-flight target (auto)


def test_in_flight_target_is_rate_times_p90_latency_bounded() -> None:
    auto = InFlight(low=2, high=64, warmup=4, guess=1.0)
    assert auto.target(10.0) == 10  # before enough answers: latency guessed at 1 s
    for seconds in [0.2] * 9 + [2.0]:  # p90 of these ten: 2.0 s
        auto.observe(seconds)
    assert auto.target(10.0) == 20
    assert auto.target(0.1) == 2  # never fewer than `low`
    assert auto.target(1000.0) == 64  # never more than `high`


def test_slots_grow_and_shrink_without_interrupting_turns() -> None:
    async def main() -> list[int]:
        slots = Slots(1)
        await slots.acquire()
        waiting = [asyncio.ensure_future(slots.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        seen = [sum(w.done() for w in waiting)]
        slots.limit = 3  # two more at once
        await asyncio.sleep(0)
        seen.append(sum(w.done() for w in waiting))
        slots.limit = 1  # nobody in flight is interrupted; the last waits for all to end
        slots.release()
        slots.release()
        await asyncio.sleep(0)
        seen.append(sum(w.done() for w in waiting))
        slots.release()
        await asyncio.sleep(0)
        seen += [sum(w.done() for w in waiting), slots.used, slots.peak]
        return seen

    assert asyncio.run(main()) == [0, 2, 2, 3, 1, 3]


def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    async def main() -> int:
        slots = Slots(1)
        await slots.acquire()
        waiter = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # handed to the waiter ...
        waiter.cancel()  # ... which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return slots.used

    assert asyncio.run(main()) == 0


def test_auto_concurrency_follows_the_latency_observed() -> None:
    clock = VirtualClock()
    gate = gate_on(clock, rate=10.0, concurrency=None)
    assert gate.in_flight_target == 10  # 10/s x the 1 s guess

    async def main() -> None:
        await asyncio.gather(*(send(gate, hold=3.0) for _ in range(40)))

    run_virtual(clock, main)
    assert gate.in_flight_target in (30, 31)  # 10/s x 3 s observed (as the clock rounds)
    assert gate.peak_in_flight > 10  # the slots grew as the answers came in
