"""The body cap (issue 9, item 5): an answer is read in chunks and dropped as soon as it is larger
than `max_page_mb`, decompressed bytes counted; that is a failed attempt, said at WARNING, never data
and never a heap the size of what the server chose to send."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from conftest import make_dataset
from crawler import exactjson
from crawler.errors import RetriesExhaustedError
from crawler.http.client import HttpClient, HttpSettings
from crawler.http.gate import RateGate
from crawler.http.outcomes import Kind, classify_exception
from crawler.http.transport import AiohttpTransport, BodyTooLarge, Response, read_capped
from crawler.testing.fakeapi import FaultSpec, ServerThread
from crawler.testing.fakehttp import ScriptedTransport, VirtualClock, reply, run_virtual

MIB = 2**20


async def chunks(*sizes: int) -> AsyncIterator[bytes]:
    for size in sizes:
        yield b" " * size


async def test_a_body_up_to_the_cap_is_read_whole() -> None:
    assert await read_capped(chunks(3, 4, 3), 10, 200) == b" " * 10
    assert await read_capped(chunks(), 10, 200) == b""
    assert len(await read_capped(chunks(MIB, MIB), None, 200)) == 2 * MIB  # None: no cap


async def test_reading_stops_at_the_first_chunk_past_the_cap() -> None:
    taken: list[int] = []

    async def counted() -> AsyncIterator[bytes]:
        for size in (4, 4, 4, 4, 4):
            taken.append(size)
            yield b" " * size

    with pytest.raises(BodyTooLarge) as raised:
        await read_capped(counted(), 10, 503)
    assert len(taken) == 3  # the rest is never asked for
    assert (raised.value.status, raised.value.limit) == (503, 10)


def test_too_large_is_a_failed_attempt_naming_the_setting() -> None:
    outcome = classify_exception(BodyTooLarge(200, 2 * MIB))
    assert outcome.kind is Kind.RETRY and outcome.key == "too-large" and outcome.status == 200
    assert "larger than max_page_mb (2 MiB)" in outcome.reason
    assert "(0.5 MiB)" in classify_exception(BodyTooLarge(200, MIB // 2)).reason


def client_over(
    clock: VirtualClock, *script: Response, max_retries: int = 8
) -> tuple[HttpClient, ScriptedTransport]:
    settings = HttpSettings("http://api.test", 5.0, max_retries, 30.0, 100.0, 1, max_page_mb=1)
    transport = ScriptedTransport(*script)
    gate = RateGate(100.0, 1, max_backoff=30.0, clock=clock)
    return HttpClient(transport, gate, settings, rng=lambda: 0.0), transport


def test_the_client_asks_for_the_cap_and_retries_a_larger_answer(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock()
    huge = reply(200, b'{"ids": [' + b" " * MIB + b"]}")
    client, transport = client_over(clock, huge, reply(200, {"ids": [1]}))
    with caplog.at_level(logging.WARNING, logger="harvest"):
        got = run_virtual(clock, lambda: client.get("/x", [], exactjson.loads))
    assert got == {"ids": [1]}
    assert [sent.max_bytes for sent in transport.sent] == [MIB, MIB]
    assert clock.slept == [1.0]  # backed off like any failed attempt
    assert client.counters.by_reason == {"too-large": 1} and client.counters.retries == 1
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        "/x: HTTP 200: the answer is larger than max_page_mb (1 MiB); the rest was not read: retry 1/8 in 1 s"
    )


def test_answers_always_too_large_spend_the_budget() -> None:
    clock = VirtualClock()
    huge = reply(200, b" " * (MIB + 1))
    client, _ = client_over(clock, huge, huge, huge, max_retries=2)
    with pytest.raises(RetriesExhaustedError, match="larger than max_page_mb"):
        run_virtual(clock, lambda: client.get("/x", [], exactjson.loads))


async def test_aiohttp_counts_the_decompressed_bytes_of_a_gzip_bomb() -> None:
    with ServerThread(make_dataset(), FaultSpec(bomb_mb=64)) as api:
        api.faults.queue("gzip_bomb")
        async with aiohttp.ClientSession() as session:
            transport = AiohttpTransport(session)
            with pytest.raises(BodyTooLarge):
                await transport.get(f"{api.base_url}/images", [("limit", "1")], {}, 30.0, MIB)
            # The bomb is about 64 KiB on the wire: only its inflated size can be past the cap.
            page = await transport.get(f"{api.base_url}/images", [("limit", "1")], {}, 30.0, MIB)
    assert page.status == 200 and len(page.body) < MIB
