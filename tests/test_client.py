"""The client (issue #3): one classification of every outcome, Retry-After in both forms,
capped backoff that never retries early, AIMD pacing; then `CivitaiApi` against the real
fake API over HTTP (no mocks)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
import pytest
from aiolimiter import AsyncLimiter
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_dataset
from crawler import exactjson
from crawler.config import ApiConfig
from crawler.crawl.api import CivitaiApi, make_api
from crawler.errors import (
    BadRequestError,
    HarvestError,
    NotFoundError,
    RetriesExhaustedError,
    RunFatalError,
    SearchTimeoutError,
    ShardError,
)
from crawler.http.backoff import backoff_delay
from crawler.http.client import HttpClient, HttpSettings, _parsed
from crawler.http.gate import Aimd, Cooldown, Pacer, RateGate
from crawler.http.outcomes import (
    MAX_RETRY_AFTER,
    Kind,
    Outcome,
    classify,
    classify_exception,
    parse_retry_after,
    refuse_long_pause,
)
from crawler.http.transport import Response
from crawler.testing.fakeapi import Dataset, FakeServer, FaultInjector, FaultSpec, serve
from crawler.testing.fakehttp import ScriptedTransport, VirtualClock, reply, run_virtual

JSON = {"Content-Type": "application/json"}
HTML = {"Content-Type": "text/html; charset=utf-8"}
TEXT = {"Content-Type": "text/plain"}
CHALLENGE = b"<!DOCTYPE html><html><head><title>Just a moment...</title></head></html>"
ZOD = orjson.dumps(
    {
        "error": {
            "name": "ZodError",
            "message": orjson.dumps(
                [
                    {
                        "code": "too_big",
                        "path": ["limit"],
                        "message": "Number must be less than or equal to 200",
                    }
                ]
            ).decode(),
        }
    }
)

# ---------------------------------------------------------------- classification

# (status, headers, body, has_key) -> (kind, retry_after, words the reason must hold)
CASES: dict[str, tuple[int, dict[str, str], bytes, bool, Kind, float | None, str]] = {
    "200 JSON": (200, JSON, b'{"items": [], "metadata": {}}', False, Kind.OK, None, "ok"),
    "200 JSON, no content-type": (200, {}, b'{"items": []}', False, Kind.OK, None, "ok"),
    "200 HTML challenge": (200, HTML, CHALLENGE, False, Kind.RETRY, None, "HTML page"),
    "200 says JSON, is HTML": (200, JSON, CHALLENGE, True, Kind.RETRY, None, "HTML page"),
    "200 cut short": (200, JSON, b'{"items": [{"id": 1', False, Kind.RETRY, None, "non-JSON"),
    "200 empty": (200, JSON, b"", False, Kind.RETRY, None, "empty body"),
    "429 page cap": (
        429,
        JSON,
        b'{"error":"You\'ve requested too many pages, please use cursors instead"}',
        False,
        Kind.SHARD_FATAL,
        None,
        "page cap",
    ),
    "429 Cloudflare, no Retry-After": (429, TEXT, b"error code: 1015", False, Kind.RATE_LIMITED, None, "429"),
    "429 with Retry-After": (
        429,
        {**JSON, "Retry-After": "3"},
        b'{"error":"Too Many Requests"}',
        False,
        Kind.RATE_LIMITED,
        3.0,
        "Retry-After 3",
    ),
    "503 with Retry-After": (
        503,
        {**JSON, "retry-after": "2"},
        b'{"error":"Service Unavailable"}',
        False,
        Kind.RATE_LIMITED,
        2.0,
        "503",
    ),
    "503 with a bad Retry-After": (503, {"Retry-After": "soon"}, b"", False, Kind.RATE_LIMITED, None, "503"),
    "503 without Retry-After": (503, HTML, b"<html>down</html>", False, Kind.RETRY, None, "503"),
    "500 JSON": (
        500,
        JSON,
        b'{"error":"An unexpected error occurred"}',
        False,
        Kind.RETRY,
        None,
        "unexpected",
    ),
    "502 HTML": (502, HTML, b"<html>Bad gateway</html>", False, Kind.RETRY, None, "502"),
    "502 with Retry-After": (502, {**HTML, "Retry-After": "4"}, b"<html/>", False, Kind.RETRY, 4.0, "502"),
    "504 HTML": (504, HTML, b"<html>Gateway time-out</html>", False, Kind.RETRY, None, "504"),
    "520": (520, HTML, b"<html/>", False, Kind.RETRY, None, "520"),
    "521": (521, HTML, b"<html/>", False, Kind.RETRY, None, "521"),
    "522": (522, HTML, b"<html/>", False, Kind.RETRY, None, "522"),
    "523": (523, HTML, b"<html/>", False, Kind.RETRY, None, "523"),
    "524": (524, HTML, b"<html>A timeout occurred</html>", False, Kind.RETRY, None, "524"),
    "599": (599, TEXT, b"", False, Kind.RETRY, None, "599"),
    "408": (408, TEXT, b"timeout", False, Kind.RETRY, None, "408"),
    "403 challenge, with key": (403, HTML, CHALLENGE, True, Kind.RETRY, None, "challenge"),
    "403 challenge, no key": (403, HTML, CHALLENGE, False, Kind.RETRY, None, "challenge"),
    "401 JSON, with key": (401, JSON, b'{"error":"Unauthorized"}', True, Kind.RUN_FATAL, None, "key"),
    "403 JSON, with key": (403, JSON, b'{"error":"Forbidden"}', True, Kind.RUN_FATAL, None, "rejected"),
    "401 JSON, no key": (401, JSON, b'{"error":"Unauthorized"}', False, Kind.SHARD_FATAL, None, "no API key"),
    "403 JSON, no key": (403, JSON, b'{"error":"Forbidden"}', False, Kind.SHARD_FATAL, None, "no API key"),
    "451": (451, JSON, b'{"error":"Unavailable For Legal Reasons"}', False, Kind.RUN_FATAL, None, "region"),
    "400 zod": (400, JSON, ZOD, False, Kind.SHARD_FATAL, None, "limit: Number must be less than or equal"),
    "400 plain": (
        400,
        JSON,
        b'{"error":"Bad cursor","code":"BAD_REQUEST"}',
        False,
        Kind.SHARD_FATAL,
        None,
        "Bad cursor",
    ),
    "400 HTML": (400, HTML, b"<html>Bad Request</html>", False, Kind.SHARD_FATAL, None, "400"),
    "404": (
        404,
        JSON,
        b'{"error":"No model with id 9"}',
        False,
        Kind.SHARD_FATAL,
        None,
        "No model with id 9",
    ),
    "410": (410, JSON, b'{"error":"Gone"}', False, Kind.SHARD_FATAL, None, "410"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_classify(case: str) -> None:
    status, headers, body, has_key, kind, retry_after, words = CASES[case]
    outcome = answered(status, headers, body, has_key=has_key)
    assert (outcome.kind, outcome.retry_after) == (kind, retry_after)
    assert words in outcome.reason and "\n" not in outcome.reason
    assert outcome.status == status and outcome.key
    if kind is Kind.OK:
        assert outcome.body == orjson.loads(body)


def test_every_kind_and_status_family_is_covered() -> None:
    kinds = {CASES[c][4] for c in CASES}
    assert kinds == set(Kind)
    assert {s for s, *_ in CASES.values()} >= {
        200,
        400,
        401,
        403,
        404,
        408,
        429,
        451,
        500,
        502,
        503,
        504,
        524,
    }


def answered(status: int, headers: dict[str, str], body: bytes, *, has_key: bool) -> Outcome:
    """What the client makes of an answer: `classify`, then a 2xx body read as JSON (by its bytes)."""
    outcome = classify(status, headers, body, has_key=has_key)
    return _parsed(outcome, exactjson.loads) if outcome.kind is Kind.OK else outcome


def test_json_fallback_accepts_what_orjson_refuses() -> None:
    body = b'{"items": [{"id": 1, "n": 123456789012345678901234567890, "s": "\\ud800"}]}'
    outcome = answered(200, JSON, body, has_key=False)
    assert outcome.kind is Kind.OK and outcome.body["items"][0]["n"] == 123456789012345678901234567890


def test_timed_out_means_our_timeout_or_a_gateways() -> None:
    assert classify_exception(TimeoutError()).timed_out
    assert classify_exception(aiohttp.ServerTimeoutError("read")).timed_out
    assert classify(524, HTML, b"<html/>", has_key=False).timed_out
    assert classify(504, HTML, b"<html/>", has_key=False).timed_out
    assert not classify(502, HTML, b"<html/>", has_key=False).timed_out
    assert not classify_exception(ConnectionResetError(104, "reset")).timed_out


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("Response payload is not completed\nsecond line"),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
)
def test_transport_failures_are_retried(exc: BaseException) -> None:
    outcome = classify_exception(exc)
    assert outcome.kind is Kind.RETRY and outcome.status is None
    assert "\n" not in outcome.reason and outcome.key in ("timeout", type(exc).__name__)


# ---------------------------------------------------------------- Retry-After

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2", 2.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-1", None),
        ("soon", None),
        ("", None),
        ("²", None),  # a digit to str.isdigit, not to float
        ("1e3", None),
        (None, None),
        ("99999999999", MAX_RETRY_AFTER),
        (formatdate(NOW + 7, usegmt=True), 7.0),
        (formatdate(NOW + 7), 7.0),  # "-0000": naive, still GMT
        (formatdate(NOW - 30, usegmt=True), 0.0),  # in the past: go now
        ("Wed, 32 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def test_http_date_is_read_against_the_wall_clock_by_default() -> None:
    header = formatdate(time.time() + 60, usegmt=True)
    delay = parse_retry_after(header)
    assert delay is not None and 58 <= delay <= 60


# ---------------------------------------------------------------- backoff


def test_backoff_doubles_from_one_second_to_the_cap() -> None:
    assert [backoff_delay(n, 30, lambda: 0.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert [backoff_delay(n, 0.2, lambda: 0.0) for n in (1, 2, 3)] == [0.2, 0.2, 0.2]
    assert backoff_delay(1, 30, lambda: 0.999) == pytest.approx(1.4995)


@given(
    failures=st.integers(min_value=1, max_value=100),
    cap=st.floats(min_value=0.001, max_value=3600),
    jitter=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_never_below_nominal_never_above_the_cap(failures: int, cap: float, jitter: float) -> None:
    nominal = min(cap, 2.0 ** (failures - 1))
    delay = backoff_delay(failures, cap, lambda: jitter)
    assert nominal <= delay <= cap and delay <= 1.5 * nominal


# ---------------------------------------------------------------- AIMD


def test_aimd_first_event_only_pauses_the_second_halves() -> None:
    aimd = Aimd(8.0)
    assert (aimd.floor, aimd.step) == (0.4, 0.8)
    assert not aimd.on_rate_limited(sent_at=1.0, now=1.1) and aimd.rate == 8.0
    assert aimd.on_rate_limited(sent_at=2.0, now=2.1) and aimd.rate == 4.0
    assert aimd.on_rate_limited(sent_at=3.0, now=3.1) and aimd.rate == 2.0
    assert aimd.streak == 3


def test_aimd_answers_to_requests_in_flight_are_one_event() -> None:
    aimd = Aimd(8.0)
    aimd.on_rate_limited(sent_at=1.0, now=1.2)
    assert not aimd.on_rate_limited(sent_at=1.1, now=1.3)  # sent before 1.2: same event
    assert aimd.rate == 8.0 and aimd.streak == 1
    assert aimd.on_rate_limited(sent_at=1.2, now=1.4) and aimd.rate == 4.0


def test_aimd_floor_and_additive_recovery_up_to_the_configured_rate() -> None:
    aimd = Aimd(8.0, recover_after=3)
    for t in range(10):
        aimd.on_rate_limited(sent_at=float(t), now=float(t))
    assert aimd.rate == aimd.floor == 0.4
    rates = []
    for _ in range(3 * 12):
        aimd.on_success()
        rates.append(aimd.rate)
    steps = rates[2::3]
    assert steps[:3] == pytest.approx([1.2, 2.0, 2.8])
    assert max(rates) == 8.0 and steps[-1] == 8.0  # never above the ceiling


def test_aimd_a_calm_run_forgives_an_isolated_event() -> None:
    aimd = Aimd(10.0, recover_after=5)
    aimd.on_rate_limited(sent_at=0.0, now=0.0)
    for _ in range(5):
        aimd.on_success()
    assert aimd.streak == 0
    assert not aimd.on_rate_limited(sent_at=1.0, now=1.0) and aimd.rate == 10.0
    aimd.on_success()  # fewer than recover_after: the streak goes on
    assert aimd.on_rate_limited(sent_at=2.0, now=2.0) and aimd.rate == 5.0


@pytest.mark.parametrize(("ceiling", "floor"), [(500.0, 25.0), (2.0, 0.1), (1.0, 0.1), (0.05, 0.05)])
def test_aimd_default_floor(ceiling: float, floor: float) -> None:
    assert Aimd(ceiling).floor == pytest.approx(floor)


# ---------------------------------------------------------------- pacer and cooldown on a fake clock


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


async def test_pacer_paces_with_aiolimiter_and_swaps_it_on_a_new_rate() -> None:
    pacer = Pacer(4.0)
    first = pacer.limiter
    assert isinstance(first, AsyncLimiter) and (first.max_rate, first.time_period) == (1, 0.25)  # no burst
    pacer.rate = 4.0
    assert pacer.limiter is first  # unchanged rate: same limiter
    pacer.rate = 1.0
    assert pacer.limiter is not first and (pacer.limiter.max_rate, pacer.limiter.time_period) == (1, 1.0)


async def test_a_waiter_released_by_a_replaced_limiter_queues_again() -> None:
    pacer = Pacer(1000.0)
    await pacer.acquire()  # the first limiter's only slot
    waiter = asyncio.create_task(pacer.acquire())
    await asyncio.sleep(0)  # now waiting on the first limiter
    pacer.rate = 0.001  # one slot per 1,000 s
    await waiter
    # The waiter went through the new limiter too: its one slot is taken.
    assert not pacer.limiter.has_capacity()


async def test_cooldown_is_shared_only_grows_and_reports_growth() -> None:
    clock = FakeClock()
    cooldown = Cooldown(clock)
    assert cooldown.is_open()
    assert cooldown.extend(2.0) == 2.0
    assert cooldown.extend(1.0) == 0.0  # a shorter pause never shortens the current one
    assert cooldown.extend(3.0) == pytest.approx(1.0)
    assert not cooldown.is_open()
    await cooldown.wait()
    assert clock.t == 103.0 and cooldown.is_open()


# ---------------------------------------------------------------- page shape


# ---------------------------------------------------------------- HttpClient on a scripted transport

BASE = "http://127.0.0.1:9/api/v1"  # never contacted: the transport is scripted
GOOD = {"ids": [1, 2]}


def ids(raw: bytes) -> list[int] | None:
    """A caller's parse: the body's `ids`, or None when it is not the promised shape."""
    body = exactjson.loads(raw)
    got = body.get("ids") if isinstance(body, dict) else None
    return got if isinstance(got, list) else None


def scripted(
    clock: VirtualClock,
    *script: Response | BaseException,
    headers: dict[str, str] | None = None,
    **settings: Any,
) -> tuple[HttpClient, ScriptedTransport]:
    """A client on virtual time over a scripted transport; jitter 0, so every wait is nominal."""
    values: dict[str, Any] = {
        "base_url": BASE,
        "timeout": 5.0,
        "max_retries": 8,
        "max_backoff": 30.0,
        "requests_per_second": 100.0,
        "concurrency": 1,
        **settings,
    }
    http = HttpSettings(**values)
    gate = RateGate(http.requests_per_second, http.concurrency, max_backoff=http.max_backoff, clock=clock)
    transport = ScriptedTransport(*script)
    return HttpClient(transport, gate, http, headers, rng=lambda: 0.0), transport


def fetch(clock: VirtualClock, client: HttpClient, timeouts: int | None = None) -> list[int]:
    return run_virtual(clock, lambda: client.get("/things", [("a", "1")], ids, timeouts=timeouts))


def send_times(transport: ScriptedTransport) -> list[float]:
    return [s.at for s in transport.sent]


def test_get_sends_the_url_query_headers_and_timeout() -> None:
    clock = VirtualClock()
    client, transport = scripted(clock, reply(200, GOOD), headers={"X-Test": "1"}, timeout=7.5)
    assert fetch(clock, client) == [1, 2]
    (sent,) = transport.sent
    assert (sent.url, sent.params, dict(sent.headers), sent.timeout) == (
        BASE + "/things",
        (("a", "1"),),
        {"X-Test": "1"},
        7.5,
    )
    assert client.counters.requests == 1 and client.counters.retries == 0 and clock.slept == []


def test_every_retry_spends_the_budget_with_a_growing_backoff_between() -> None:
    clock = VirtualClock()
    client, transport = scripted(clock, *[reply(500, {"error": "boom"})] * 3, max_retries=2)
    with pytest.raises(RetriesExhaustedError, match="^/things: gave up after 3 attempts; last: HTTP 500"):
        fetch(clock, client)
    assert clock.slept == [1.0, 2.0]  # after the 1st and 2nd failure; none after the last
    first, second, third = send_times(transport)
    assert second - first == pytest.approx(1.0) and third - second == pytest.approx(2.0)
    assert client.counters.retries == 2 and client.counters.by_reason == {"500": 3}


def test_backoff_is_capped_by_max_backoff() -> None:
    clock = VirtualClock()
    client, _ = scripted(clock, *[reply(502, b"<html/>")] * 4, reply(200, GOOD), max_backoff=1.5)
    assert fetch(clock, client) == [1, 2]
    assert clock.slept == [1.0, 1.5, 1.5, 1.5]


def test_rate_limited_answers_spend_the_budget_too() -> None:
    clock = VirtualClock()
    client, transport = scripted(clock, *[reply(429, retry_after="1")] * 3, max_retries=2)
    with pytest.raises(RetriesExhaustedError, match="gave up after 3 attempts; last: HTTP 429"):
        fetch(clock, client)
    assert len(transport.sent) == 3 and client.counters.rate_limited == 3
    assert gaps_of(send_times(transport)) == [pytest.approx(1.0)] * 2  # the cooldown only, no backoff


def test_no_request_is_sent_before_a_retry_after_has_passed() -> None:
    clock = VirtualClock()
    client, transport = scripted(
        clock, reply(503, retry_after="7"), reply(429, retry_after="0.5"), reply(200, GOOD)
    )
    assert fetch(clock, client) == [1, 2]
    first, second, third = send_times(transport)
    assert second >= first + 7 and third >= second + 0.5
    assert second - first == pytest.approx(7.0) and third - second == pytest.approx(0.5)
    assert client.gate.cooldown_until == pytest.approx(second + 0.5)


def test_a_pause_longer_than_max_wait_stops_the_request_and_holds_nobody_back() -> None:
    clock = VirtualClock()
    client, transport = scripted(
        clock, reply(503, retry_after="1000000000"), reply(200, GOOD), reply(200, GOOD), concurrency=2
    )

    async def both() -> list[Any]:
        return list(
            await asyncio.gather(
                client.get("/things", [], ids), client.get("/other", [], ids), return_exceptions=True
            )
        )

    refused, other = run_virtual(clock, both)
    assert isinstance(refused, ShardError) and not isinstance(refused, RetriesExhaustedError)
    assert "/things: the server asked for a pause of 1000000000 s; rerun after 20" in str(refused)
    assert other == [1, 2] and len(transport.sent) == 2  # no retry, and the other request went on
    assert client.gate.cooldown_until == -math.inf and clock.slept == []
    assert client.counters.by_reason == {"long-pause": 1} and client.counters.cooldown_seconds == 0


def test_a_pause_up_to_max_wait_is_waited_for() -> None:
    clock = VirtualClock()
    client, transport = scripted(clock, reply(503, retry_after="60"), reply(200, GOOD), max_wait=60)
    assert fetch(clock, client) == [1, 2]
    first, second = send_times(transport)
    assert second - first == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("status", "kind"), [(503, Kind.RATE_LIMITED), (429, Kind.RATE_LIMITED), (502, Kind.RETRY)]
)
def test_refuse_long_pause_names_the_pause_and_when_to_rerun(status: int, kind: Kind) -> None:
    asked = classify(status, {"Retry-After": "3600"}, b"{}", has_key=False)
    assert asked.kind is kind and refuse_long_pause(asked, 3600, now=NOW) is asked
    refused = refuse_long_pause(asked, 900, now=NOW)
    assert refused.kind is Kind.SHARD_FATAL and refused.status == status and refused.key == "long-pause"
    assert refused.reason.startswith(
        "the server asked for a pause of 3600 s; rerun after 2023-11-14T23:13:20Z"
    ), refused.reason
    assert "max_wait" in refused.reason
    bare = classify(status, {}, b"{}", has_key=False)
    assert refuse_long_pause(bare, 0, now=NOW) is bare  # nothing demanded: nothing to refuse


def test_a_http_date_far_away_is_refused_too() -> None:
    when = formatdate(NOW + 2 * 86_400, usegmt=True)
    asked = classify(503, {"Retry-After": when}, b"{}", has_key=False, now=NOW)
    assert "pause of 172800 s" in refuse_long_pause(asked, 900, now=NOW).reason


def test_a_body_parse_refuses_is_malformed_and_retried() -> None:
    clock = VirtualClock()
    client, transport = scripted(clock, reply(200, {"ids": "nope"}), reply(200, [1]), reply(200, GOOD))
    assert fetch(clock, client) == [1, 2]
    assert len(transport.sent) == 3 and client.counters.by_reason == {"malformed": 2}
    assert clock.slept == [1.0, 2.0]


def test_the_client_retries_transport_failures() -> None:
    clock = VirtualClock()
    failures: list[BaseException] = [
        ConnectionResetError(104, "Connection reset by peer"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("Response payload is not completed"),
    ]
    client, transport = scripted(clock, *failures, reply(200, GOOD))
    assert fetch(clock, client) == [1, 2]
    assert client.counters.by_reason == {
        "ConnectionResetError": 1,
        "ServerDisconnectedError": 1,
        "ClientPayloadError": 1,
    }


def test_timed_out_attempts_raise_search_timeout_when_asked() -> None:
    clock = VirtualClock()
    client, transport = scripted(clock, TimeoutError(), reply(500, {}), reply(524, b"<html/>"))
    with pytest.raises(SearchTimeoutError, match="/things: 2 attempts timed out; last: HTTP 524"):
        fetch(clock, client, timeouts=2)
    assert len(transport.sent) == 3  # the 500 did not time out


def test_timed_out_attempts_are_plain_retries_otherwise() -> None:
    clock = VirtualClock()
    client, _ = scripted(clock, TimeoutError(), reply(504, b"<html/>"), reply(200, GOOD))
    assert fetch(clock, client) == [1, 2]
    assert client.counters.by_reason == {"timeout": 1, "504": 1}


def test_concurrent_requests_share_the_slots_and_the_pace() -> None:
    clock = VirtualClock()
    client, transport = scripted(clock, *[reply(200, GOOD)] * 6, concurrency=2, requests_per_second=10.0)
    transport.latency = 1.0

    async def six() -> list[list[int]]:
        return list(await asyncio.gather(*(client.get("/things", [], ids) for _ in range(6))))

    assert run_virtual(clock, six) == [[1, 2]] * 6
    assert transport.peak_in_flight == 2
    # Two in flight at a time, each a second long: sends at 0, 0.1, then as slots free up.
    assert [t - 100 for t in send_times(transport)] == pytest.approx([0, 0.1, 1.0, 1.1, 2.0, 2.1], abs=1e-6)


KEY = {"Authorization": "Bearer sk-test"}
FATAL: dict[str, tuple[Response, dict[str, str] | None, type[HarvestError], str]] = {
    "400": (reply(400, {"error": "Bad cursor"}), None, BadRequestError, "/things: HTTP 400 bad request"),
    "404": (reply(404, {"error": "No such thing"}), None, NotFoundError, "HTTP 404 not found"),
    "410": (reply(410, {"error": "Gone"}), None, ShardError, "/things: HTTP 410: Gone"),
    "429 page cap": (reply(429, {"error": "too many pages"}), None, ShardError, "page cap"),
    "401, no key": (reply(401, {"error": "Unauthorized"}), None, ShardError, "no API key"),
    "401, key": (reply(401, {"error": "Unauthorized"}), KEY, RunFatalError, "was rejected"),
    "403, key": (reply(403, {"error": "Forbidden"}), KEY, RunFatalError, "was rejected"),
    "451": (reply(451, {"error": "Legal"}), None, RunFatalError, "blocked in this region"),
}


@pytest.mark.parametrize("case", list(FATAL))
def test_fatal_answers_map_to_their_error_and_are_never_retried(case: str) -> None:
    response, headers, error, words = FATAL[case]
    clock = VirtualClock()
    client, transport = scripted(clock, response, headers=headers)
    with pytest.raises(error, match=words) as caught:
        fetch(clock, client)
    assert type(caught.value) is error and len(transport.sent) == 1
    assert client.counters.retries == 0 and clock.slept == []
    cause = caught.value.outcome  # the error carries the answer, not only a string
    assert cause is not None and cause.status == response.status and cause.reason in str(caught.value)


def gaps_of(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


# ---------------------------------------------------------------- CivitaiApi against the fake API

PARAMS = [("modelVersionId", "5003"), ("browsingLevel", "31"), ("limit", "50")]


@pytest.fixture(scope="module")
def small() -> Dataset:
    return make_dataset({5003: 90})


@asynccontextmanager
async def client_for(
    dataset: Dataset,
    faults: FaultSpec | FaultInjector | None = None,
    *,
    key: str | None = None,
    server_key: str | None = None,
    **api: Any,
) -> AsyncIterator[tuple[CivitaiApi, FakeServer]]:
    settings: dict[str, Any] = {
        "requests_per_second": 500.0,
        "concurrency": 1,
        "timeout": 5.0,
        "max_retries": 8,
        "max_backoff": 0.05,
        **api,
    }
    async with serve(dataset, faults, api_key=server_key) as server, aiohttp.ClientSession() as session:
        yield make_api(session, ApiConfig(base_url=server.base_url, **settings), key), server


async def test_every_transient_fault_is_retried_until_a_page_comes(small: Dataset) -> None:
    injector = FaultInjector(FaultSpec(slow_seconds=2))
    transient = ["challenge", "challenge_403", "502", "504", "524", "500", "reset", "truncated", "slow"]
    injector.queue(*transient)
    async with client_for(small, injector, timeout=0.5, max_retries=len(transient)) as (client, api):
        page = await client.images(PARAMS, None)
    assert len(page.items) > 0 and page.next_cursor is not None
    assert [r.fault for r in sorted(api.log, key=lambda r: r.mono)] == [*transient, None]
    counters = client.counters
    assert (counters.requests, counters.retries, counters.rate_limited) == (10, 9, 0)
    assert counters.by_reason["timeout"] == 1 and counters.by_reason["html-200"] == 1
    assert counters.by_reason["html-403"] == 1 and counters.by_reason["524"] == 1
    assert sum(counters.by_reason.values()) == 9


async def test_retry_after_pauses_every_worker_and_repeats_halve_the_rate(small: Dataset) -> None:
    injector = FaultInjector(FaultSpec(retry_after=1))
    injector.queue("503", "429_retry_after")
    async with client_for(small, injector, requests_per_second=50.0) as (client, api):
        pages = await asyncio.gather(*(client.images(PARAMS, c) for c in (None, "20|1", "40|1")))
    assert all(page.items for page in pages)
    records = sorted(api.log, key=lambda r: r.mono)
    limited = [r for r in records if r.status in (429, 503)]
    assert [r.fault for r in limited] == ["503", "429_retry_after"]
    for answer in limited:  # concurrency 1: nothing was in flight, so nothing may come early
        assert all(r.mono >= answer.mono + 1 for r in records if r.mono > answer.mono)
    assert client.counters.rate_limited == 2 and client.counters.rate_decreases == 1
    assert client.effective_rps == 25.0 and client.counters.lowest_rps == 25.0
    assert client.counters.cooldown_seconds >= 2.0


async def test_retry_after_as_http_date_is_honoured(small: Dataset) -> None:
    injector = FaultInjector(FaultSpec(retry_after=2, retry_after_http_date=True))
    injector.queue("429_retry_after")
    async with client_for(small, injector) as (client, api):
        await client.images(PARAMS, None)
    first, second = sorted(api.log, key=lambda r: r.mono)
    assert first.status == 429 and second.status == 200
    # The header said "not before this date" (to the second): the wall clock at arrival proves it.
    date = formatdate(first.wall + 2, usegmt=True)
    assert second.wall >= parsedate_to_datetime(date).timestamp()


async def test_bare_429_cools_everyone_down_by_the_backoff(small: Dataset) -> None:
    injector = FaultInjector()
    injector.queue("429")
    async with client_for(small, injector, max_backoff=0.3) as (client, api):
        await asyncio.gather(client.images(PARAMS, None), client.images(PARAMS, "50|1"))
    first, *rest = sorted(api.log, key=lambda r: r.mono)
    assert first.status == 429 and len(rest) == 2
    assert all(r.mono >= first.mono + 0.3 for r in rest)  # nominal 1 s, capped at 0.3, never less
    assert client.counters.rate_limited == 1 and client.counters.by_reason == {"429": 1}


async def test_retry_budget_is_max_retries_then_the_shard_stops(small: Dataset) -> None:
    async with client_for(small, FaultSpec.only("500"), max_retries=2) as (client, api):
        with pytest.raises(RetriesExhaustedError, match="gave up after 3 attempts; last: HTTP 500"):
            await client.images(PARAMS, None)
    assert len(api.log) == 3 and client.counters.retries == 2


async def test_timeouts_give_up_early_when_asked(small: Dataset) -> None:
    spec = FaultSpec.only("slow", slow_seconds=3)
    async with client_for(small, spec, timeout=0.2) as (client, api):
        with pytest.raises(SearchTimeoutError, match="2 attempts timed out"):
            await client.images(PARAMS, None, timeouts=2)
    assert client.counters.requests == 2


async def test_page_cap_is_fatal_for_the_shard_and_never_retried(small: Dataset) -> None:
    async with client_for(small) as (client, api):
        with pytest.raises(ShardError, match="page cap") as caught:
            await client.images([("limit", "200"), ("page", "6")], None)
    assert not isinstance(caught.value, RetriesExhaustedError)
    assert [r.status for r in api.log] == [429] and client.counters.rate_limited == 0
    assert client.effective_rps == 500.0


async def test_zod_400_names_the_parameter_and_is_not_retried(small: Dataset) -> None:
    async with client_for(small) as (client, api):
        with pytest.raises(BadRequestError) as caught:
            await client.images([("limit", "500"), ("sort", "newest")], None)
    message = str(caught.value)
    assert "limit: Number must be less than or equal to 200" in message
    assert "sort: Invalid enum value" in message and "\n" not in message
    assert len(api.log) == 1


async def test_missing_model_is_not_found(small: Dataset) -> None:
    async with client_for(small) as (client, api):
        with pytest.raises(NotFoundError, match="No model with id 424242"):
            await client.model_version_ids("424242")
        assert await client.model_version_ids("500") == [5003]
    assert len(api.log) == 2


async def test_blocked_region_and_rejected_key_stop_the_run(small: Dataset) -> None:
    async with client_for(small, FaultSpec.only("451")) as (client, api):
        with pytest.raises(RunFatalError, match="blocked in this region"):
            await client.images(PARAMS, None)
    assert len(api.log) == 1
    secret = "sk-live-0123456789"
    async with client_for(small, key=secret, server_key="other") as (client, api):
        with pytest.raises(RunFatalError, match="CIVITAI_API_KEY. was rejected") as caught:
            await client.images(PARAMS, None)
    assert secret not in str(caught.value) and len(api.log) == 1 and api.log[0].has_auth


def test_monotonic_clock_is_the_one_the_fake_api_logs() -> None:
    from crawler.http.clock import MonotonicClock

    before = time.monotonic()
    assert before <= MonotonicClock().now() <= time.monotonic()
    assert math.isinf(Cooldown(MonotonicClock()).until)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"message": "This cursor can no longer be continued; start again without it"}', "no longer"),
        (b'{"error": "Invalid cursor value", "code": "BAD_REQUEST"}', "Invalid cursor value"),
        (
            b'{"error": {"name": "ZodError", "message": "[{\\"path\\": [\\"limit\\"], '
            b'\\"message\\": \\"Number must be less than or equal to 200\\"}]"}}',
            "limit: Number must be less than or equal to 200",
        ),
    ],
)
def test_every_error_shape_gives_the_servers_words(body: bytes, words: str) -> None:
    outcome = classify(400, JSON, body, has_key=False)
    assert outcome.kind is Kind.SHARD_FATAL and words in outcome.reason, outcome.reason
