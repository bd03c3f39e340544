"""A host that cannot be reached is said so at WARNING on every retry, not only at DEBUG.

`127.0.0.1:9 unreachable (connection refused): retry 3/8 in 4 s`: what failed,
why ("connection refused", "DNS", "timed out"), how much budget is left, and how
long until the next try. Only 127.0.0.1 is ever contacted: the other hosts below
are behind a scripted transport.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from conftest import harvest, write_config
from crawler import exactjson
from crawler.errors import RetriesExhaustedError
from crawler.http.client import HttpClient, HttpSettings
from crawler.http.gate import RateGate
from crawler.http.outcomes import classify_exception
from crawler.http.transport import AiohttpTransport, Response
from crawler.testing.fakehttp import ScriptedTransport, VirtualClock, reply, run_virtual


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nothing else takes it), never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Everything the "harvest" logger says, whatever an earlier test did to its propagation."""
    logger = logging.getLogger("harvest")
    saved = logger.propagate
    logger.propagate = True  # to caplog's handler on the root logger
    with caplog.at_level(logging.DEBUG, logger="harvest"):
        yield caplog
    logger.propagate = saved


def warnings_in(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if r.levelno == logging.WARNING]


# ---------------------------------------------------------------- why no answer came


def _dns_error() -> BaseException:
    key: Any = SimpleNamespace(host="example.test", port=443, ssl=True)  # all the error reads of it
    lookup = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return aiohttp.ClientConnectorDNSError(key, lookup)


@pytest.mark.parametrize(
    ("exc", "why"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
        (OSError(errno.ECONNREFUSED, "Multiple exceptions: ..."), "connection refused"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "network unreachable"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "DNS"),
        (_dns_error(), "DNS"),
        (TimeoutError(), "timed out"),
        (aiohttp.ConnectionTimeoutError(), "timed out"),
        (aiohttp.ServerDisconnectedError(), None),  # connected, then cut off
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), None),
        (aiohttp.ClientPayloadError("Response payload is not completed"), None),
    ],
)
def test_failures_before_any_connection_say_why(exc: BaseException, why: str | None) -> None:
    assert classify_exception(exc).unreachable == why


async def test_aiohttp_reports_a_closed_port_as_connection_refused(closed_port: int) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await AiohttpTransport(session).get(f"http://127.0.0.1:{closed_port}/x", [], {}, 5.0)
    assert classify_exception(caught.value).unreachable == "connection refused"


# ---------------------------------------------------------------- the client's WARNING lines


def fetch(base_url: str, *script: Response | BaseException, max_retries: int = 8) -> list[int]:
    """GET through a scripted transport on virtual time; jitter 0, so waits are 1, 2, 4 ... s."""
    clock = VirtualClock()
    settings = HttpSettings(base_url, 5.0, max_retries, 30.0, 100.0, 1)
    gate = RateGate(100.0, 1, max_backoff=30.0, clock=clock)
    client = HttpClient(ScriptedTransport(*script), gate, settings, rng=lambda: 0.0)
    return run_virtual(clock, lambda: client.get("/x", [], exactjson.loads))


def test_each_retry_of_an_unreachable_host_is_a_warning(log: pytest.LogCaptureFixture) -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert fetch("http://127.0.0.1:9/api/v1", refused, refused, refused, reply(200, [1])) == [1]
    assert warnings_in(log) == [
        "127.0.0.1:9 unreachable (connection refused): retry 1/8 in 1 s",
        "127.0.0.1:9 unreachable (connection refused): retry 2/8 in 2 s",
        "127.0.0.1:9 unreachable (connection refused): retry 3/8 in 4 s",
    ]


def test_dns_and_timeouts_and_default_ports(log: pytest.LogCaptureFixture) -> None:
    dns = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    fetch("https://civitai.example/api/v1", dns, TimeoutError(), reply(200, [1]))
    assert warnings_in(log) == [
        "civitai.example:443 unreachable (DNS): retry 1/8 in 1 s",
        "civitai.example:443 unreachable (timed out): retry 2/8 in 2 s",
    ]


def test_the_last_attempt_is_not_announced_as_a_retry(log: pytest.LogCaptureFixture) -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    with pytest.raises(RetriesExhaustedError, match="gave up after 3 attempts"):
        fetch("http://127.0.0.1:9", refused, refused, refused, max_retries=2)
    assert [w.split(": ")[1] for w in warnings_in(log)] == ["retry 1/2 in 1 s", "retry 2/2 in 2 s"]


def test_answers_and_broken_connections_stay_at_debug(log: pytest.LogCaptureFixture) -> None:
    fetch("http://127.0.0.1:9", reply(500, {}), aiohttp.ServerDisconnectedError(), reply(200, [1]))
    assert warnings_in(log) == []
    assert [r.levelno for r in log.records] == [logging.DEBUG, logging.DEBUG]


# ---------------------------------------------------------------- through the real CLI


@pytest.mark.parametrize(
    ("query", "step"),
    [({"modelId": 500}, "/models/500"), ({"modelVersionId": 5003}, "/images")],
    ids=["plan step", "walk step"],
)
@pytest.mark.parametrize("flags", [[], ["-q"]], ids=["default", "quiet"])
def test_harvest_run_says_the_host_is_unreachable_on_every_retry(
    tmp_path: Path, closed_port: int, query: dict[str, Any], step: str, flags: list[str]
) -> None:
    base_url = f"http://127.0.0.1:{closed_port}/api/v1"
    cfg = write_config(tmp_path / "c.toml", base_url, [query], max_retries=3, max_backoff=0.01)
    result = harvest("run", cfg, *flags)
    warnings = [line.split(" WARNING ", 1)[1] for line in result.stderr.splitlines() if " WARNING " in line]
    assert warnings == [
        f"127.0.0.1:{closed_port} unreachable (connection refused): retry {n}/3 in 0.01 s" for n in (1, 2, 3)
    ]
    assert result.code == 3, result.stderr  # that shard (or plan step) failed; a rerun resumes
    assert f"{step}: gave up after 4 attempts" in result.stderr and "Traceback" not in result.stderr
