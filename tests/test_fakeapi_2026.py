"""The fake API's 2025-2026 behaviour (api-facts "What changed"), each switch over real HTTP.

Plain aiohttp requests on 127.0.0.1: no harvester code.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import sys

import aiohttp
import pytest

from crawler.testing.fakeapi import (
    FAULT_KINDS,
    FAULT_KINDS_2026,
    Dataset,
    DatasetSpec,
    FaultInjector,
    FaultSpec,
    ImageQuery,
    Latency,
    ModelSpec,
    RateLimit,
    ServerOptions,
    serve,
    skewed_versions,
)
from crawler.testing.fakeapi.cursors import EXPIRED, MISFIT
from fakeclient import get, ids_of, walk

SPEC = {
    "seed": 11,
    "models": {
        "7": {"versions": [{"id": 71, "images": 3000}, {"id": 72, "images": 400}]},
        "42": [[21, 90]],
    },
    "overlap": 0.1,
    "posts": 10,
    "users": 5,
    "hidden_rate": 0.05,
    "legacy_timeout_rows": 600,
}
ALL = {"browsingLevel": "31"}
OVERLOADED = {"error": "Image search is temporarily overloaded — please retry."}


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset(DatasetSpec.from_dict(SPEC))


# ---------------------------------------------------------------- the walk cap


@pytest.mark.parametrize("limit", [200, 7])
async def test_walk_cap_ends_a_walk_at_its_depth(
    dataset: Dataset, http: aiohttp.ClientSession, limit: int
) -> None:
    async with serve(dataset, options=ServerOptions(walk_cap=1200)) as api:
        pages = await walk(
            http, f"{api.base_url}/images", modelVersionId=71, limit=limit, sort="Newest", **ALL
        )
    assert len(pages) == -(-1200 // limit), "the page reaching the cap is the last"
    assert pages[-1]["metadata"] == {}, "it looks finished"
    q = ImageQuery(model_version_id=71, sort="Newest")
    assert ids_of(pages) == dataset.walk_ids(q, walk_cap=1200), "exactly the first 1,200 positions"
    assert len(dataset.walk_ids(q)) > len(ids_of(pages)) + 1000, "and most of the version is unseen"


async def test_walk_cap_both_ends_and_forged_cursors(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    async with serve(dataset, options=ServerOptions(walk_cap=1200)) as api:
        url = f"{api.base_url}/images"
        newest = set(ids_of(await walk(http, url, modelVersionId=71, limit=200, sort="Newest", **ALL)))
        oldest = set(ids_of(await walk(http, url, modelVersionId=71, limit=200, sort="Oldest", **ALL)))
        status, beyond = await get(http, url, modelVersionId=71, limit=200, cursor="1300|0", **ALL)
        _, straddling = await get(http, url, modelVersionId=71, limit=200, cursor="1100|0", **ALL)
    everything = set(dataset.version_image_ids(71))
    assert not newest & oldest and newest | oldest < everything, "both ends reveal more, not all"
    assert (status, beyond) == (200, {"items": [], "metadata": {}}), "no position past the cap is served"
    rows = dataset.select(ImageQuery(model_version_id=71, levels=31))[1100:1200]  # cut at the cap
    expected = [dataset.cols.ids[i] for i in rows if not dataset.is_hidden(i)]
    assert [i["id"] for i in straddling["items"]] == expected and straddling["metadata"] == {}


async def test_walk_cap_spares_the_legacy_model_path(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    async with serve(dataset, options=ServerOptions(walk_cap=50)) as api:
        url = f"{api.base_url}/images"
        by_version = ids_of(await walk(http, url, modelVersionId=21, limit=10, sort="Oldest", **ALL))
        by_model = ids_of(await walk(http, url, modelId=42, limit=10, sort="Oldest", **ALL))
    assert len(by_version) <= 50 < len(by_model) == len(dataset.version_image_ids(21))


# ---------------------------------------------------------------- feed: cursors


async def test_feed_cursors_walk_the_same_items_as_offset_cursors(
    dataset: Dataset, http: aiohttp.ClientSession
) -> None:
    params = {"modelVersionId": 72, "limit": 20, "sort": "Newest", **ALL}
    async with serve(dataset) as api:
        plain = await walk(http, f"{api.base_url}/images", **params)
    async with serve(dataset, options=ServerOptions(feed_cursors=True)) as api:
        fed = await walk(http, f"{api.base_url}/images", **params)
    assert [p["items"] for p in fed] == [p["items"] for p in plain]
    cursors = [p["metadata"]["nextCursor"] for p in fed[:-1]]
    assert all(c.startswith("feed:") and "|" not in c and not c[5:].isdigit() for c in cursors)
    assert len(set(cursors)) == len(cursors)
    assert (
        "cursor=feed%3A" in fed[0]["metadata"]["nextPage"] or "cursor=feed:" in fed[0]["metadata"]["nextPage"]
    )
    assert fed[-1]["metadata"] == {}


async def test_expire_hook_kills_stored_cursors_and_a_fresh_walk_works(
    dataset: Dataset, http: aiohttp.ClientSession
) -> None:
    params = {"modelVersionId": 72, "limit": 50, "sort": "Oldest", **ALL}
    async with serve(dataset, options=ServerOptions(feed_cursors=True)) as api:
        url = f"{api.base_url}/images"
        _, first = await get(http, url, **params)
        stored = first["metadata"]["nextCursor"]
        assert (await get(http, url, **params, cursor=stored))[0] == 200
        api.cursors.expire_all()  # the run is dead; its stored cursor dies with it
        assert await get(http, url, **params, cursor=stored) == (400, {"message": EXPIRED}), "not cached"
        again = await walk(http, url, **params)  # the cure: start again without it
    assert set(ids_of(again)) == set(dataset.version_image_ids(72))


async def test_cursor_ttl_without_sleeping(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    params = {"modelVersionId": 72, "limit": 50, **ALL}
    async with serve(dataset, options=ServerOptions(feed_cursors=True, cursor_ttl=60)) as api:
        url = f"{api.base_url}/images"
        _, first = await get(http, url, **params)
        cursor = first["metadata"]["nextCursor"]
        api.cursors.advance(50)
        status, second = await get(http, url, **params, cursor=cursor)
        assert status == 200 and second["items"]
        api.cursors.advance(11)  # 61 s old
        assert await get(http, url, **params, cursor=cursor) == (400, {"message": EXPIRED})
        fresh = second["metadata"]["nextCursor"]  # issued at +50 s: 11 s old
        assert (await get(http, url, **params, cursor=fresh))[0] == 200


async def test_a_cursor_refuses_other_filters(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    params = {"modelVersionId": 72, "limit": 20, "sort": "Newest", **ALL}
    async with serve(dataset, options=ServerOptions(feed_cursors=True)) as api:
        url = f"{api.base_url}/images"
        _, first = await get(http, url, **params)
        c = first["metadata"]["nextCursor"]
        misfit = (400, {"message": MISFIT})
        assert await get(http, url, **{**params, "sort": "Oldest"}, cursor=c) == misfit
        assert await get(http, url, **{**params, "modelVersionId": 71}, cursor=c) == misfit
        assert await get(http, url, **{**params, "browsingLevel": 1}, cursor=c) == misfit
        assert await get(http, url, modelId=42, limit=20, cursor=c, **ALL) == misfit, "the legacy path"
        status, page = await get(http, url, **{**params, "limit": 10, "withMeta": "true"}, cursor=c)
        assert status == 200 and page["items"], "limit and withMeta are not filters"
        status, body = await get(http, url, **params, cursor="feed:not-a-cursor")
        assert status == 400 and body["error"]["name"] == "ZodError"
        assert json.loads(body["error"]["message"])[0]["path"] == ["cursor"]
        status, legacy_style = await get(http, url, **params, cursor="20|0")
        assert status == 200 and legacy_style["items"], "old offset cursors still read"


async def test_cursor_epoch_outlives_restarts_or_kills_cursors(
    dataset: Dataset, http: aiohttp.ClientSession
) -> None:
    params = {"modelVersionId": 72, "limit": 20, **ALL}
    async with serve(dataset, options=ServerOptions(feed_cursors=True)) as api:
        _, first = await get(http, f"{api.base_url}/images", **params)
    cursor = first["metadata"]["nextCursor"]
    async with serve(dataset, options=ServerOptions(feed_cursors=True)) as api:
        assert (await get(http, f"{api.base_url}/images", **params, cursor=cursor))[0] == 200
    async with serve(dataset, options=ServerOptions(feed_cursors=True, cursor_epoch=1)) as api:
        assert await get(http, f"{api.base_url}/images", **params, cursor=cursor) == (
            400,
            {"message": EXPIRED},
        )


async def test_walk_cap_with_feed_cursors(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    async with serve(dataset, options=ServerOptions(walk_cap=300, feed_cursors=True)) as api:
        pages = await walk(http, f"{api.base_url}/images", modelVersionId=71, limit=100, **ALL)
    assert len(pages) == 3 and pages[-1]["metadata"] == {}
    assert ids_of(pages) == dataset.walk_ids(ImageQuery(model_version_id=71), walk_cap=300)


# ---------------------------------------------------------------- the SFW host


async def test_sfw_only_serves_pg_and_pg13_whatever_is_asked(
    dataset: Dataset, http: aiohttp.ClientSession
) -> None:
    async with serve(dataset, options=ServerOptions(sfw_only=True)) as api:
        url = f"{api.base_url}/images"
        everything = await walk(http, url, modelVersionId=72, limit=200, **ALL)
        _, nsfw_x = await get(http, url, modelVersionId=72, limit=200, nsfw="X")
        _, r_only = await get(http, url, modelVersionId=72, limit=200, browsingLevel=4)
        _, nsfw_true = await get(http, url, modelVersionId=72, limit=200, nsfw="true")
        _, pg = await get(http, url, modelVersionId=72, limit=200, browsingLevel=1)
    assert set(ids_of(everything)) == set(dataset.version_image_ids(72, levels=3))
    assert {i["browsingLevel"] for i in nsfw_x["items"]} == {1, 2}
    assert r_only == nsfw_true == {"items": [], "metadata": {}}, "silently nothing"
    assert {i["browsingLevel"] for i in pg["items"]} == {1}


# ---------------------------------------------------------------- error bodies


async def test_new_error_bodies(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    async with serve(dataset, options=ServerOptions(new_error_bodies=True)) as api:
        assert await get(http, f"{api.base_url}/models/999") == (404, {"message": "No model with id 999"})
        status, capped = await get(http, f"{api.base_url}/images", page=11, limit=100)
        assert (status, capped) == (
            429,
            {"message": "You've requested too many pages, please use cursors instead"},
        )
        status, zod = await get(http, f"{api.base_url}/images", sort="newest")
        assert status == 400 and zod["error"]["name"] == "ZodError", "zod keeps its shape"
    async with serve(dataset) as api:
        assert await get(http, f"{api.base_url}/models/999") == (404, {"error": "No model with id 999"})


async def test_overloaded_503_fault_and_rate_limit_mode(
    dataset: Dataset, http: aiohttp.ClientSession
) -> None:
    assert "503_overloaded" in FAULT_KINDS_2026 and "503_overloaded" not in FAULT_KINDS
    injector = FaultInjector()
    injector.queue("503_overloaded")
    options = ServerOptions(rate_limit=RateLimit(rate=0.001, burst=1, mode="503_overloaded"))
    async with serve(dataset, injector) as api:
        async with http.get(f"{api.base_url}/images") as resp:
            assert (resp.status, resp.headers["Retry-After"]) == (503, "2")
            assert await resp.json() == OVERLOADED
        async with http.get(f"{api.base_url}/images") as resp:
            assert resp.status == 200
    assert [r.fault for r in api.log] == ["503_overloaded", None]
    async with serve(dataset, FaultSpec.from_dict({"503_overloaded": 1.0})) as api:
        assert await get(http, f"{api.base_url}/models/7") == (503, OVERLOADED)
    async with serve(dataset, options=options) as api:
        assert (await get(http, f"{api.base_url}/images"))[0] == 200
        async with http.get(f"{api.base_url}/images") as resp:
            assert (resp.status, resp.headers["Retry-After"]) == (503, "2")
            assert await resp.json() == OVERLOADED


@pytest.mark.parametrize("new_bodies", [False, True])
async def test_numeric_cursor_beyond_32_bits_is_400(
    dataset: Dataset, http: aiohttp.ClientSession, new_bodies: bool
) -> None:
    async with serve(dataset, options=ServerOptions(new_error_bodies=new_bodies)) as api:
        url = f"{api.base_url}/images"
        legacy = await get(http, url, modelId=42, limit=10, cursor=2**31, **ALL)
        feed = await get(http, url, modelVersionId=72, limit=10, cursor=f"{2**32}|1700000000000", **ALL)
        in_range = await get(http, url, modelId=42, limit=10, cursor=2**31 - 1, **ALL)
    for (status, body), value in ((legacy, 2**31), (feed, 2**32)):
        assert status == 400
        message = body["message"] if new_bodies else body["error"]
        assert str(value) in message and "32-bit" in message
        assert new_bodies or body["code"] == "BAD_REQUEST"
    assert in_range[0] == 200 and in_range[1]["items"], "2**31 - 1 is a 32-bit integer"


# ---------------------------------------------------------------- ids=


async def test_ids_lookup_subset_order_and_limit(http: aiohttp.ClientSession) -> None:
    ds = Dataset(DatasetSpec.from_dict({**SPEC, "hidden_rate": 0}))
    pool = ds.version_image_ids(72)
    keep, hidden, deleted, rerated = pool[:6], pool[6], pool[7], pool[8]
    ds.hide_images([hidden])
    ds.delete_images([deleted])
    ds.set_browsing_level([rerated], 8)
    asked = [*keep, hidden, deleted, rerated, 999]
    random.Random(1).shuffle(asked)
    param = ",".join(map(str, asked))
    async with serve(ds) as api:
        url = f"{api.base_url}/images"
        _, newest = await get(http, url, ids=param, sort="Newest", withMeta="true", **ALL)
        _, oldest = await get(http, url, ids=param, sort="Oldest", **ALL)
        _, comments = await get(http, url, ids=param, sort="Most Comments", **ALL)
        _, short = await get(http, url, ids=param, sort="Oldest", limit=3, **ALL)
        _, pg = await get(http, url, ids=param, browsingLevel=1)
        cursor_ignored = await get(http, url, ids=param, sort="Oldest", cursor=keep[0], **ALL)
    present = [*keep, rerated]
    assert [i["id"] for i in newest["items"]] == sorted(present, reverse=True), "sort, not request order"
    assert [i["id"] for i in oldest["items"]] == sorted(present)
    counts = [i["stats"]["commentCount"] for i in comments["items"]]
    assert sorted(i["id"] for i in comments["items"]) == sorted(present) and counts == sorted(
        counts, reverse=True
    )
    assert newest["metadata"] == oldest["metadata"] == {}, "one batch, no cursor"
    assert [i["id"] for i in short["items"]] == sorted(present)[:3] and short["metadata"] == {}
    assert {i["id"]: i["browsingLevel"] for i in newest["items"]}[rerated] == 8, "the current state"
    assert all(set(i["meta"]) == {"id", "meta"} for i in newest["items"] if i["meta"]), "legacy path"
    assert rerated not in {i["id"] for i in pg["items"]}
    assert cursor_ignored == (200, oldest)


async def test_reactions_after_first_sight_are_served_and_sorted_by(http: aiohttp.ClientSession) -> None:
    ds = Dataset(DatasetSpec.from_dict({**SPEC, "hidden_rate": 0}))
    pool = ds.version_image_ids(72)[:8]
    param = ",".join(map(str, pool))
    async with serve(ds) as api:
        url = f"{api.base_url}/images"
        _, before = await get(http, url, ids=param, **ALL)
        assert ds.react([pool[-1]], like=100_000, comment=2) == 1
        _, after = await get(http, url, ids=param, **ALL)
    was = {i["id"]: i["stats"] for i in before["items"]}
    now = {i["id"]: i["stats"] for i in after["items"]}
    assert now[pool[-1]]["likeCount"] == was[pool[-1]]["likeCount"] + 100_000
    assert now[pool[-1]]["commentCount"] == was[pool[-1]]["commentCount"] + 2
    assert all(now[i] == was[i] for i in pool[:-1]), "the others are as they were"
    assert after["items"][0]["id"] == pool[-1], "the default sort (Most Reactions) follows the served counts"


async def test_ids_takes_at_most_100(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    async with serve(dataset) as api:
        url = f"{api.base_url}/images"
        hundred = ",".join(str(i) for i in dataset.version_image_ids(71)[:100])
        status, ok = await get(http, url, ids=hundred, limit=100, **ALL)
        assert status == 200 and len(ok["items"]) == 100
        status, body = await get(http, url, ids=hundred + ",1", limit=100, **ALL)
        assert status == 400 and body["error"]["name"] == "ZodError"
        [issue] = json.loads(body["error"]["message"])
        assert (issue["path"], issue["code"], issue["maximum"]) == (["ids"], "too_big", 100)
        status, bad = await get(http, url, ids="1,two", **ALL)
        assert status == 400 and json.loads(bad["error"]["message"])[0]["path"] == ["ids"]


# ---------------------------------------------------------------- latency


def test_latency_sampler_is_seeded_lognormal() -> None:
    lat = Latency(median=0.2, p95=0.8)
    draws = [lat.sample(random.Random(7)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2], "a seeded generator repeats itself"
    rng = random.Random(7)
    samples = sorted(lat.sample(rng) for _ in range(40_000))
    assert statistics.median(samples) == pytest.approx(0.2, rel=0.03)
    assert samples[int(0.95 * len(samples))] == pytest.approx(0.8, rel=0.05)
    assert min(samples) > 0 and statistics.fmean(samples) > 0.2, "right-skewed, positive"
    fixed = Latency(median=0.05, p95=0.05)
    assert all(fixed.sample(rng) == pytest.approx(0.05) for _ in range(10))
    for bad in ((0.0, 1.0), (0.5, 0.1), (-1.0, 1.0)):
        with pytest.raises(ValueError):
            Latency(*bad)


async def test_latency_applies_and_is_cancelled_with_the_client(
    dataset: Dataset, http: aiohttp.ClientSession
) -> None:
    quick = ServerOptions(latency=Latency(median=0.001, p95=0.003, seed=1))
    async with serve(dataset, options=quick) as api:
        assert (await get(http, f"{api.base_url}/images", limit=5))[0] == 200
        assert (await get(http, f"{api.base_url}/models/7"))[0] == 200
    slow = ServerOptions(latency=Latency(median=60, p95=60))
    async with serve(dataset, options=slow) as api:
        with pytest.raises(asyncio.TimeoutError):
            async with http.get(f"{api.base_url}/images", timeout=aiohttp.ClientTimeout(total=0.2)) as resp:
                await resp.read()
        for _ in range(100):  # the handler is cancelled when the client goes away
            if len(api.log):
                break
            await asyncio.sleep(0.02)
        assert [r.status for r in api.log] == [0]


# ---------------------------------------------------------------- skewed versions


def test_skewed_versions() -> None:
    versions = skewed_versions(60_000, 12, first_id=900)
    counts = [v.images for v in versions]
    assert sum(counts) == 60_000 and [v.id for v in versions] == list(range(900, 912))
    assert counts[0] == 20_000 and counts == sorted(counts, reverse=True)
    assert counts[1] > 5 * counts[-1] and min(counts) >= 1
    assert [v.images for v in skewed_versions(5, 5)] == [1, 1, 1, 1, 1]
    assert [v.images for v in skewed_versions(100, 1)] == [100]
    assert sum(v.images for v in skewed_versions(3, 5)) == 3
    with pytest.raises(ValueError):
        skewed_versions(10, 0)
    spec = DatasetSpec.from_dict({"models": {"5": {"skewed": {"total": 900, "n": 4, "share_of_first": 0.5}}}})
    assert spec.models[0].versions == skewed_versions(900, 4, 0.5)
    ds = Dataset(DatasetSpec(models=(ModelSpec(5, skewed_versions(900, 4)),), hidden_rate=0, overlap=0))
    assert [len(ds.version_image_ids(v)) for v in (1, 2, 3, 4)] == [v.images for v in skewed_versions(900, 4)]


# ---------------------------------------------------------------- command line


async def test_command_line_flags_and_sigusr1(http: aiohttp.ClientSession) -> None:
    flags = ["--walk-cap", "300", "--cursor-ttl", "3600", "--sfw-only", "--new-error-bodies"]
    flags += ["--latency-median", "0.001", "--latency-p95", "0.002"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler.testing.fakeapi", "--port", "0", *flags, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        base = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().split()[-1]
        assert await get(http, base + "/models/1") == (404, {"message": "No model with id 1"})
        params = {"modelVersionId": 1920896, "limit": 100, **ALL}
        pages = await walk(http, base + "/images", **params)
        assert len(pages) <= 3 and {i["browsingLevel"] for p in pages for i in p["items"]} <= {1, 2}
        _, first = await get(http, base + "/images", **params)
        cursor = first["metadata"]["nextCursor"]
        assert cursor.startswith("feed:"), "--cursor-ttl implies --feed-cursors"
        proc.send_signal(signal.SIGUSR1)
        for _ in range(100):
            if (await get(http, base + "/images", **params, cursor=cursor))[0] == 400:
                break
            await asyncio.sleep(0.02)
        assert await get(http, base + "/images", **params, cursor=cursor) == (400, {"message": EXPIRED})
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_command_line_refuses_a_lone_p95() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "crawler.testing.fakeapi",
        "--latency-p95",
        "0.5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2 and b"--latency-median" in err
