"""The fake image CDN itself (crawler/testing/fakeapi/cdn*.py), over real HTTP on loopback:
URL forms, real magic numbers behind the wrong extension, Range, gone media, faults, the
header record, holds, and that CdnFiles predicts every served byte."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from conftest import make_dataset
from crawler.testing.fakeapi import (
    CdnFaults,
    CdnInjector,
    CdnOptions,
    FakeServer,
    ServerOptions,
    serve,
    snap_width,
)
from fakeclient import get, walk

ALL = {"browsingLevel": 31, "limit": 200}
MAGIC = (  # (type, offset, bytes): what a sniffer looks for
    ("image/jpeg", 0, b"\xff\xd8\xff"),
    ("image/png", 0, b"\x89PNG\r\n\x1a\n"),
    ("image/gif", 0, b"GIF89a"),
    ("image/webp", 8, b"WEBP"),
    ("image/avif", 4, b"ftypavif"),
    ("video/mp4", 4, b"ftypisom"),
    ("video/mp4", 4, b"ftypmp42"),
    ("video/webm", 0, b"\x1a\x45\xdf\xa3"),
    ("audio/mpeg", 0, b"ID3"),
)


def sniff(body: bytes) -> str:
    found = [t for t, at, magic in MAGIC if body[at : at + len(magic)] == magic]
    assert len(found) == 1, body[:16]
    return found[0]


@pytest.fixture
async def cdn_api() -> AsyncIterator[FakeServer]:
    options = ServerOptions(cdn=CdnOptions(seed=3, gone_rate=0.05, cache_miss_rate=0.3))
    async with serve(make_dataset({5001: 160, 5002: 80}), options=options) as api:
        yield api


async def items_of(http: aiohttp.ClientSession, api: FakeServer, version: int = 5001) -> list[dict[str, Any]]:
    pages = await walk(http, api.base_url + "/images", modelVersionId=version, **ALL)
    return [item for page in pages for item in page["items"]]


async def fetch(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and headers (names as the fake sends them) of one GET."""
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


def with_form(url: str, form: str) -> str:
    head, uuid, _, name = url.rsplit("/", 3)
    return f"{head}/{uuid}/{form}/{name}"


async def test_without_the_cdn_items_point_at_civitai(api: FakeServer, http: aiohttp.ClientSession) -> None:
    items = await items_of(http, api)
    assert api.cdn is None and all(i["url"].startswith("https://image.civitai.com/") for i in items)
    with pytest.raises(RuntimeError, match="without a CDN"):
        _ = api.cdn_url


async def test_items_point_at_the_cdn_and_it_serves_what_cdnfiles_predicts(
    cdn_api: FakeServer, http: aiohttp.ClientSession
) -> None:
    assert cdn_api.cdn is not None
    cdn, files = cdn_api.cdn, cdn_api.cdn.files
    items = await items_of(http, cdn_api)
    assert cdn_api.cdn_url != cdn_api.base_url.removesuffix("/api/v1")  # another origin
    assert all(i["url"].startswith(cdn_api.cdn_url + "/xG1nkqKTMzGDvpLrqFT7WA/") for i in items)
    forms = {i["url"].rsplit("/", 2)[1].split("=")[0] for i in items}
    assert forms == {"original", "width"}, "new-style urls and a share of older width= ones"
    served = {}
    for item in items:
        status, body, headers = await fetch(http, item["url"])
        uuid = item["url"].rsplit("/", 3)[1]
        if files.gone(uuid):
            assert status == files.gone(uuid) in (404, 410)
            continue
        assert status == 200 and int(headers["Content-Length"]) == len(body)
        assert body == files.expected(item["url"]) and headers["Content-Type"] == sniff(body)
        served[item["type"], headers["Content-Type"]] = item["url"]
    kinds = {k for k, _ in served}
    assert "image" in kinds and {t for k, t in served if k == "video"} == {"image/jpeg"}, "stills"
    assert {"image/png", "image/webp"} <= {t for _, t in served}, "not what .jpeg says"
    assert all(u.endswith(".jpeg") for (k, t), u in served.items() if k == "image")
    assert len(cdn.log) == len(items)


async def test_widths_snap_to_the_ladder_and_are_smaller(
    cdn_api: FakeServer, http: aiohttp.ClientSession
) -> None:
    assert cdn_api.cdn is not None
    files = cdn_api.cdn.files
    item = next(i for i in await items_of(http, cdn_api) if i["type"] == "image" and not files.gone(_uuid(i)))
    original = await fetch(http, with_form(item["url"], "original=true"))
    assert [snap_width(w) for w in (1, 96, 97, 450, 700, 1601, 2200, 5000)] == [
        96, 96, 320, 450, 800, 1800, 1800, 1800
    ]  # fmt: skip
    bodies = {}
    for width in (96, 450, 700, 800, 2000, 2200):
        status, body, headers = await fetch(http, with_form(item["url"], f"width={width}"))
        assert status == 200 and headers["Content-Type"] == original[2]["Content-Type"] == sniff(body)
        assert len(body) < len(original[1]) and body != original[1][: len(body)]
        bodies[width] = body
    assert bodies[700] == bodies[800] and bodies[2000] == bodies[2200] and bodies[96] != bodies[450]
    assert (await fetch(http, with_form(item["url"], "width=abc")))[0] == 400


async def test_a_video_is_a_still_at_original_and_itself_at_b2_or_the_fallback(
    cdn_api: FakeServer, http: aiohttp.ClientSession
) -> None:
    assert cdn_api.cdn is not None
    files = cdn_api.cdn.files
    videos = [i for i in await items_of(http, cdn_api) if i["type"] == "video" and not files.gone(_uuid(i))]
    misses = [v for v in videos if files.cache_miss(_uuid(v))]
    assert misses and len(misses) < len(videos)
    for video in videos:
        uuid, base = _uuid(video), cdn_api.cdn_url
        still = await fetch(http, with_form(video["url"], "original=true"))
        assert still[0] == 200 and sniff(still[1]) == "image/jpeg" == still[2]["Content-Type"]
        fallback = await fetch(http, with_form(video["url"], "transcode=true,original=true,quality=100"))
        b2 = await fetch(http, f"{base}/file/civitai-media-cache/{uuid}/original")
        assert fallback[0] == 200 and sniff(fallback[1]) in ("video/mp4", "video/webm")
        assert 1_000_000 <= len(fallback[1]) <= 4_000_000
        assert b2[0] == (404 if video in misses else 200)
        assert b2[0] == 404 or b2[1] == fallback[1]
        assert files.for_item(video).read() == fallback[1]  # what a harvester must store


async def test_range_requests(cdn_api: FakeServer, http: aiohttp.ClientSession) -> None:
    assert cdn_api.cdn is not None
    files = cdn_api.cdn.files
    item = next(i for i in await items_of(http, cdn_api) if not files.gone(_uuid(i)))
    whole = files.expected(item["url"])
    size, etag = len(whole), files.file(item["url"]).etag
    for spec, part in (
        ("bytes=100-", whole[100:]),
        ("bytes=10-19", whole[10:20]),
        ("bytes=-7", whole[-7:]),
        (f"bytes={size - 3}-{size + 50}", whole[-3:]),
    ):
        status, body, headers = await fetch(http, item["url"], Range=spec)
        assert (status, body) == (206, part), spec
        start = size - len(part)
        if spec == "bytes=10-19":
            start = 10
        assert headers["Content-Range"] == f"bytes {start}-{start + len(part) - 1}/{size}"
        assert headers["Accept-Ranges"] == "bytes" and int(headers["Content-Length"]) == len(part)
    status, body, headers = await fetch(http, item["url"], Range=f"bytes={size}-")
    assert (status, headers["Content-Range"]) == (416, f"bytes */{size}")
    assert (await fetch(http, item["url"], Range="bytes=5-", **{"If-Range": etag}))[:2] == (206, whole[5:])
    assert (await fetch(http, item["url"], Range="bytes=5-", **{"If-Range": '"other"'}))[:2] == (200, whole)
    async with http.head(item["url"]) as resp:
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == size


async def test_ranges_off_answers_200_whole(http: aiohttp.ClientSession) -> None:
    options = ServerOptions(cdn=CdnOptions(ranges=False, gone_rate=0))
    async with serve(make_dataset({5001: 5}), options=options) as api:
        item = (await items_of(http, api))[0]
        status, body, headers = await fetch(http, item["url"], Range="bytes=100-")
        assert api.cdn is not None and (status, body) == (200, api.cdn.files.expected(item["url"]))
        assert "Accept-Ranges" not in headers and "Content-Range" not in headers


async def test_faults_and_the_record_of_every_header(cdn_api: FakeServer) -> None:
    assert cdn_api.cdn is not None
    cdn = cdn_api.cdn
    # a fresh connection per request: aiohttp silently retries a reset on a reused one
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        item = next(i for i in await items_of(http, cdn_api) if not cdn.files.gone(_uuid(i)))
        uuid, size = _uuid(item), cdn.files.file(item["url"]).size
        cdn.faults.queue("429", "503", "500", "502", "504", "challenge", uuid=uuid)
        seen = [await fetch(http, item["url"], **{"X-Probe": str(n)}) for n in range(6)]
        assert [s for s, _, _ in seen] == [429, 503, 500, 502, 504, 200]
        assert seen[0][2]["Retry-After"] == seen[1][2]["Retry-After"] == "1"
        assert seen[5][2]["Content-Type"].startswith("text/html") and b"Just a moment" in seen[5][1]
        cdn.faults.queue("reset", "reset", "cut", uuid=uuid)  # aiohttp retries a reset GET once
        with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
            await fetch(http, item["url"])
        with pytest.raises(aiohttp.ClientPayloadError):
            await fetch(http, item["url"])
        assert (await fetch(http, item["url"]))[1] == cdn.files.expected(item["url"])
    records = cdn.log.for_uuid(uuid)
    assert [r.fault for r in records] == [
        *("429", "503", "500", "502", "504", "challenge", "reset", "reset", "cut", None)
    ]
    assert [r.header("x-probe") for r in records[:6]] == [str(n) for n in range(6)]
    reset, cut, whole = records[-3:]
    assert (reset.status, reset.sent, reset.complete) == (0, 0, False)
    assert (cut.status, cut.complete, cut.sent) == (200, False, size // 2)
    assert whole.complete and whole.sent == size and whole.header("Host") is not None
    assert cdn.log.mentioning("X-Probe") and not cdn.log.mentioning("Bearer")


async def test_slow_first_byte(http: aiohttp.ClientSession) -> None:
    faults = CdnFaults(rates=(("slow", 1.0),), slow_seconds=60)
    async with serve(make_dataset({5001: 3}), options=ServerOptions(cdn=CdnOptions(faults=faults))) as api:
        item = (await items_of(http, api))[0]
        with pytest.raises(TimeoutError):
            async with http.get(item["url"], timeout=aiohttp.ClientTimeout(total=0.3)) as resp:
                await resp.read()


def test_seeded_faults_depend_on_the_path_and_attempt_not_the_order() -> None:
    spec = CdnFaults(seed=5, rates=(("cut", 0.3), ("503", 0.2)))
    paths = [f"/k/{n:08x}-0000-4000-a000-000000000000/original=true/x.jpeg" for n in range(40)]
    one, two = CdnInjector(spec), CdnInjector(spec)
    forward = {(p, a): one.draw(p, None) for a in range(3) for p in paths}
    backward = {(p, a): two.draw(p, None) for a in range(3) for p in reversed(paths)}
    assert forward == backward and {"cut", "503", None} == set(forward.values())
    with pytest.raises(ValueError, match="unknown CDN fault"):
        CdnFaults(rates=(("teapot", 0.1),))


async def test_a_hold_pauses_a_file_at_a_byte_until_released(http: aiohttp.ClientSession) -> None:
    options = ServerOptions(cdn=CdnOptions(gone_rate=0, cache_miss_rate=0, throttle=4_000_000))
    async with serve(make_dataset({5001: 30}), options=options) as api:
        assert api.cdn is not None
        cdn = api.cdn
        video = next(i for i in await items_of(http, api) if i["type"] == "video")
        url = cdn.files.fetch_url(api.cdn_url, video)
        uuid = _uuid(video)
        cdn.transfers.hold(uuid, 300_000)
        task = asyncio.create_task(fetch(http, url))
        assert await asyncio.to_thread(cdn.transfers.wait_paused, uuid, 30)
        assert cdn.transfers.sent(uuid) == 300_000 and not cdn.log.for_uuid(uuid) and not task.done()
        assert await asyncio.to_thread(cdn.transfers.wait_sent, uuid, 300_000, 1)
        cdn.transfers.release(uuid)
        status, body, _ = await task
        assert status == 200 and body == cdn.files.expected(url)
        assert cdn.transfers.sent(uuid) == len(body) and cdn.transfers.paused(uuid) == 0
        resumed = await fetch(http, url, Range="bytes=300000-")  # starts at the hold: not held again
        assert resumed[:2] == (206, body[300_000:])


async def test_command_line_prints_the_cdn_on_a_second_line(http: aiohttp.ClientSession) -> None:
    flags = ["--cdn", "--cdn-video-mb", "0.5", "--cdn-gone-rate", "0", "--cdn-cache-miss-rate", "0"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler.testing.fakeapi", "--port", "0", *flags, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        first = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        second = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert first.startswith("listening on http://127.0.0.1:") and first.strip().endswith("/api/v1")
        assert second.startswith("cdn on http://127.0.0.1:")
        base, cdn = first.split()[-1], second.split()[-1]
        _, page = await get(http, base + "/images", modelVersionId=1920896, **ALL)
        video = next(i for i in page["items"] if i["type"] == "video")
        assert video["url"].startswith(cdn + "/")
        status, body, _ = await fetch(http, f"{cdn}/file/civitai-media-cache/{_uuid(video)}/original")
        assert status == 200 and (1 << 19) <= len(body) < (1 << 19) + 4096
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def _uuid(item: dict[str, Any]) -> str:
    return str(item["url"]).rsplit("/", 3)[1]
