"""The fake Civitai API behaves like the real one (docs/reference api-facts), over real HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
import pytest

from crawler.testing.fakeapi import (
    FAULT_KINDS,
    Dataset,
    DatasetSpec,
    FakeServer,
    FaultInjector,
    FaultSpec,
    RateLimit,
    ServerOptions,
    serve,
)
from fakeclient import get, ids_of, walk

SPEC = {
    "seed": 3,
    "models": {
        "827184": {
            "name": "Pony",
            "versions": [
                {"id": 11, "images": 400, "baseModel": "Pony"},
                {"id": 12, "images": 250},
                {"id": 13, "images": 60, "published": False},
            ],
        },
        "42": [[21, 90]],
    },
    "overlap": 0.2,
    "posts": 10,
    "users": 5,
    "hidden_rate": 0.08,
    "legacy_timeout_rows": 600,
}
ALL = {"browsingLevel": "31"}


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset(DatasetSpec.from_dict(SPEC))


@pytest.fixture
async def api(dataset: Dataset) -> AsyncIterator[FakeServer]:
    async with serve(dataset) as server:
        yield server


# ---------------------------------------------------------------- feed path


async def test_version_walk_yields_every_visible_item_once(
    api: FakeServer, http: aiohttp.ClientSession
) -> None:
    pages = await walk(http, f"{api.base_url}/images", modelVersionId=11, limit=20, sort="Newest", **ALL)
    ids = ids_of(pages)
    assert len(ids) == len(set(ids))
    assert set(ids) == set(api.dataset.version_image_ids(11))
    assert pages[-1]["metadata"] == {}
    cursored = [p for p in pages if "nextCursor" in p["metadata"]]
    assert any(len(p["items"]) < 20 for p in cursored), "hidden rows make short pages"
    offset, stamp = cursored[0]["metadata"]["nextCursor"].split("|")
    assert offset == "20" and stamp.isdigit()


@pytest.mark.parametrize(("limit", "sort"), [(3, "Most Comments"), (7, "Random"), (200, "Most Collected")])
async def test_any_limit_and_sort_walks_exactly_once(
    api: FakeServer, http: aiohttp.ClientSession, limit: int, sort: str
) -> None:
    ids = ids_of(await walk(http, f"{api.base_url}/images", modelVersionId=12, limit=limit, sort=sort, **ALL))
    assert sorted(ids) == sorted(api.dataset.version_image_ids(12))


async def test_empty_page_still_has_a_cursor(api: FakeServer, http: aiohttp.ClientSession) -> None:
    pages = await walk(http, f"{api.base_url}/images", modelVersionId=11, limit=2, sort="Oldest", **ALL)
    assert any(not p["items"] and p["metadata"].get("nextCursor") for p in pages)
    assert set(ids_of(pages)) == set(api.dataset.version_image_ids(11))


async def test_items_carry_the_documented_fields(api: FakeServer, http: aiohttp.ClientSession) -> None:
    _, body = await get(
        http, f"{api.base_url}/images", modelVersionId=11, limit=200, withMeta="true", withTags="yes", **ALL
    )
    items = body["items"]
    fields = {
        "id",
        "url",
        "hash",
        "width",
        "height",
        "nsfwLevel",
        "type",
        "nsfw",
        "browsingLevel",
        "createdAt",
        "postId",
        "stats",
        "meta",
        "username",
        "baseModel",
        "modelVersionIds",
        "tags",
    }
    assert all(set(i) == fields for i in items)
    assert all(i["browsingLevel"] in (1, 2, 4, 8, 16) for i in items)
    assert {"image", "video"} <= {i["type"] for i in items}
    assert any(11 not in i["modelVersionIds"] for i in items), "served version need not be listed"
    metas = [i["meta"] for i in items if i["meta"]]
    assert metas and all(
        {"prompt", "seed", "steps", "sampler", "cfgScale", "civitaiResources"} <= set(m) for m in metas
    )
    assert any(not m["prompt"].isascii() for m in metas)
    _, plain = await get(http, f"{api.base_url}/images", modelVersionId=11, limit=5, **ALL)
    assert all(i["meta"] is None and "tags" not in i for i in plain["items"])


async def test_sorts_and_created_at(api: FakeServer, http: aiohttp.ClientSession) -> None:
    _, newest = await get(http, f"{api.base_url}/images", modelVersionId=12, limit=50, sort="Newest", **ALL)
    ids = [i["id"] for i in newest["items"]]
    assert ids == sorted(ids, reverse=True)
    stamps = [i["createdAt"] for i in newest["items"]]
    assert stamps == sorted(stamps, reverse=True) and stamps[0].endswith("Z")
    _, top = await get(http, f"{api.base_url}/images", modelVersionId=12, limit=50, **ALL)
    reactions = [
        sum(v for k, v in i["stats"].items() if k not in ("commentCount", "dislikeCount"))
        for i in top["items"]
    ]
    assert reactions == sorted(reactions, reverse=True)


async def test_next_page_copies_every_parameter(api: FakeServer, http: aiohttp.ClientSession) -> None:
    _, body = await get(
        http, f"{api.base_url}/images", modelVersionId=11, limit=5, token="secret", bogus=1, **ALL
    )
    next_page = body["metadata"]["nextPage"]
    assert next_page.startswith(api.base_url + "/images?")
    assert "token=secret" in next_page and "bogus=1" in next_page and "cursor=5" in next_page


async def test_null_end_cursor_option(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    async with serve(dataset, options=ServerOptions(null_end_cursor=True)) as api:
        pages = await walk(http, f"{api.base_url}/images", modelVersionId=21, limit=200, **ALL)
    assert pages[-1]["metadata"] == {"nextCursor": None}


async def test_browsing_levels_partition_and_nsfw_mapping(
    api: FakeServer, http: aiohttp.ClientSession
) -> None:
    url = f"{api.base_url}/images"
    counts = {}
    for level in (1, 2, 4, 8, 16):
        pages = await walk(http, url, modelVersionId=12, limit=200, browsingLevel=level)
        counts[level] = len(ids_of(pages))
        assert all(i["browsingLevel"] == level for p in pages for i in p["items"])
    assert sum(counts.values()) == len(api.dataset.version_image_ids(12))
    _, default = await get(http, url, modelVersionId=12, limit=200)
    assert {i["browsingLevel"] for i in default["items"]} == {1}, "anonymous default is PG"
    _, nsfw_true = await get(http, url, modelVersionId=12, limit=200, nsfw="true")
    assert 1 not in {i["browsingLevel"] for i in nsfw_true["items"]}
    _, wins = await get(http, url, modelVersionId=12, limit=200, nsfw="X", browsingLevel=2)
    assert {i["browsingLevel"] for i in wins["items"]} == {2}


async def test_other_filters(api: FakeServer, http: aiohttp.ClientSession) -> None:
    url, ds = f"{api.base_url}/images", api.dataset
    name = next(n for n in ds.usernames if n != "unknown")
    _, by_user = await get(http, url, username=name.upper(), limit=200, **ALL)
    assert by_user["items"] and {i["username"] for i in by_user["items"]} == {name}
    post = ds.post_ids[2]
    _, by_post = await get(http, url, postId=post, limit=200, **ALL)
    assert by_post["items"] and {i["postId"] for i in by_post["items"]} == {post}
    _, videos = await get(http, url, type="video", limit=200, **ALL)
    assert videos["items"] and {i["type"] for i in videos["items"]} == {"video"}
    owner = ds.user_id(ds.usernames.index(name))
    _, by_id = await get(http, url, userId=owner, limit=200, bogus="dropped", **ALL)
    assert by_id["items"] == by_user["items"]
    _, one = await get(http, url, imageId=ds.cols.ids[7], **ALL)
    assert [i["id"] for i in one["items"]] == [ds.cols.ids[7]]


async def test_live_index_duplicates_and_misses(http: aiohttp.ClientSession) -> None:
    ds = Dataset(DatasetSpec.from_dict({**SPEC, "hidden_rate": 0}))
    async with serve(ds) as api:
        url, params = f"{api.base_url}/images", {"modelVersionId": 21, "sort": "Newest", "limit": 10, **ALL}
        _, first = await get(http, url, **params)
        new = ds.add_images(21, 3)
        assert min(new) > max(i["id"] for i in first["items"])
        _, second = await get(http, url, **params, cursor=first["metadata"]["nextCursor"])
        seen = {i["id"] for i in first["items"]}
        assert sum(i["id"] in seen for i in second["items"]) == 3, "offset cursors serve duplicates"
        _, head = await get(http, url, **params)
        assert [i["id"] for i in head["items"][:3]] == sorted(new, reverse=True)
        gone = [i["id"] for i in second["items"][3:5]]
        assert ds.delete_images(gone) == 2
        _, after = await get(http, url, **params)
        assert not set(gone) & {i["id"] for i in after["items"]}


# ---------------------------------------------------------------- legacy path


async def test_legacy_model_path_loses_one_row_per_page(api: FakeServer, http: aiohttp.ClientSession) -> None:
    pages = await walk(
        http, f"{api.base_url}/images", modelId=42, limit=10, sort="Newest", withMeta="true", **ALL
    )
    cursors = [p["metadata"]["nextCursor"] for p in pages[:-1]]
    assert all(isinstance(c, int) for c in cursors)
    expected = set(api.dataset.version_image_ids(21))
    served = set(ids_of(pages))
    assert expected - served == set(cursors), "the row at each cursor is never served"
    metas = [i["meta"] for p in pages for i in p["items"] if i["meta"]]
    assert all(set(m) == {"id", "meta"} for m in metas)
    assert pages[-1]["metadata"] == {}


async def test_legacy_model_path_goes_silent_when_too_big(
    api: FakeServer, http: aiohttp.ClientSession
) -> None:
    status, body = await get(http, f"{api.base_url}/images", modelId=827184, limit=100, **ALL)
    assert (status, body) == (200, {"items": [], "metadata": {}})
    _, small = await get(http, f"{api.base_url}/images", modelId=827184, limit=10, browsingLevel=16)
    assert small["items"] and isinstance(small["metadata"]["nextCursor"], int)


async def test_legacy_oldest_loses_nothing(api: FakeServer, http: aiohttp.ClientSession) -> None:
    pages = await walk(http, f"{api.base_url}/images", modelId=42, limit=10, sort="Oldest", **ALL)
    assert ids_of(pages) == sorted(api.dataset.version_image_ids(21))


# ---------------------------------------------------------------- errors


async def test_page_cap_is_429_and_page_is_ignored_on_the_feed(
    api: FakeServer, http: aiohttp.ClientSession
) -> None:
    status, body = await get(http, f"{api.base_url}/images", page=11, limit=100)
    assert status == 429
    assert body == {"error": "You've requested too many pages, please use cursors instead"}
    _, first = await get(http, f"{api.base_url}/images", modelVersionId=11, limit=10, **ALL)
    _, paged = await get(http, f"{api.base_url}/images", modelVersionId=11, limit=10, page=3, **ALL)
    assert paged["items"] == first["items"]


@pytest.mark.parametrize(
    ("params", "path", "code"),
    [
        ({"sort": "newest"}, ["sort"], "invalid_enum_value"),
        ({"period": "alltime"}, ["period"], "invalid_enum_value"),
        ({"limit": 201}, ["limit"], "too_big"),
        ({"limit": "ten"}, ["limit"], "invalid_type"),
        ({"withMeta": "maybe"}, ["withMeta"], "invalid_type"),
    ],
)
async def test_bad_parameters_answer_zod_400(
    api: FakeServer, http: aiohttp.ClientSession, params: dict[str, Any], path: list[str], code: str
) -> None:
    status, body = await get(http, f"{api.base_url}/images", **params)
    assert status == 400 and body["error"]["name"] == "ZodError"
    issues = json.loads(body["error"]["message"])
    assert [(i["path"], i["code"]) for i in issues] == [(path, code)]
    if code == "invalid_enum_value":
        assert issues[0]["message"].startswith("Invalid enum value. Expected '")


async def test_models_endpoint(api: FakeServer, http: aiohttp.ClientSession) -> None:
    status, model = await get(http, f"{api.base_url}/models/827184")
    assert status == 200 and model["id"] == 827184
    assert [v["id"] for v in model["modelVersions"]] == [11, 12], "unpublished version left out"
    assert all(v["baseModel"] and v["name"] for v in model["modelVersions"])
    assert await get(http, f"{api.base_url}/models/999") == (404, {"error": "No model with id 999"})


async def test_headers_auth_and_request_log(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    async with serve(dataset, api_key="k1") as api:
        url = f"{api.base_url}/images"
        async with http.get(url, params={"limit": "1"}) as resp:
            assert resp.status == 200 and resp.headers["Cache-Control"] == "public, s-maxage=300"
            assert resp.content_type == "application/json"
        async with http.get(url, headers={"Authorization": "Bearer k1"}) as resp:
            assert resp.status == 200
        async with http.get(url, headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401 and "error" in await resp.json()
        log = list(api.log)
    assert [(r.status, r.has_auth) for r in log] == [(200, False), (200, True), (401, True)]
    assert log[0].method == "GET" and log[0].path == "/api/v1/images" and log[0].query == {"limit": "1"}
    assert all(not r.faulted for r in log) and log[0].mono <= log[1].mono <= log[2].mono


# ---------------------------------------------------------------- faults


def _expect(kind: str) -> tuple[int, str]:
    return {
        "503": (503, "json"),
        "429": (429, "text"),
        "429_retry_after": (429, "json"),
        "challenge": (200, "html"),
        "challenge_403": (403, "html"),
        "502": (502, "html"),
        "504": (504, "html"),
        "524": (524, "html"),
        "500": (500, "json"),
        "451": (451, "json"),
    }[kind]


@pytest.mark.parametrize("kind", [k for k in FAULT_KINDS if k not in ("reset", "truncated", "slow")])
async def test_canned_faults(dataset: Dataset, http: aiohttp.ClientSession, kind: str) -> None:
    status, ctype = _expect(kind)
    async with serve(dataset, FaultSpec.only(kind)) as api, http.get(f"{api.base_url}/images") as resp:
        assert resp.status == status and ctype in resp.content_type
        retry_after = resp.headers.get("Retry-After")
        assert retry_after == ("2" if kind in ("503", "429_retry_after") else None)
        await resp.read()
    assert [(r.fault, r.status) for r in api.log] == [(kind, status)]


@pytest.mark.parametrize("kind", ["reset", "truncated"])
async def test_connection_cut_short(dataset: Dataset, http: aiohttp.ClientSession, kind: str) -> None:
    async with serve(dataset, FaultSpec.only(kind)) as api:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"{api.base_url}/images", params={"limit": "50", **ALL}) as resp:
                assert resp.status == 200
                await resp.read()
    assert [r.fault for r in api.log] == [kind]


async def test_slow_fault_outlasts_client_timeout(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    async with serve(dataset, FaultSpec.only("slow", slow_seconds=5)) as api:
        with pytest.raises(asyncio.TimeoutError):
            async with http.get(f"{api.base_url}/images", timeout=aiohttp.ClientTimeout(total=0.2)) as resp:
                await resp.read()
        for _ in range(50):  # the handler is cancelled when the client goes away
            if len(api.log):
                break
            await asyncio.sleep(0.02)
    assert [r.fault for r in api.log] == ["slow"]


async def test_retry_after_http_date_and_models_faulted(
    dataset: Dataset, http: aiohttp.ClientSession
) -> None:
    spec = FaultSpec.only("503", retry_after_http_date=True)
    async with serve(dataset, spec) as api, http.get(f"{api.base_url}/models/827184") as resp:
        assert resp.status == 503
        assert parsedate_to_datetime(resp.headers["Retry-After"]).tzinfo is not None


async def test_fault_draws_are_seeded_and_scriptable(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    spec = FaultSpec.from_dict({"seed": 9, "rates": {"503": 0.3}, "500": 0.2})
    assert spec.total_rate == pytest.approx(0.5)
    draws = [FaultInjector(spec).draw() for _ in range(1)]
    a, b = FaultInjector(spec), FaultInjector(spec)
    assert [a.draw() for _ in range(50)] == [b.draw() for _ in range(50)] and draws
    injector = FaultInjector()
    injector.queue("502", "503")
    async with serve(dataset, injector) as api:
        statuses = []
        for _ in range(3):
            async with http.get(f"{api.base_url}/images") as resp:
                statuses.append(resp.status)
    assert statuses == [502, 503, 200]
    with pytest.raises(ValueError):
        FaultSpec.from_dict({"rates": {"418": 1.0}})


@pytest.mark.parametrize("mode", ["429", "503"])
async def test_rate_limit(dataset: Dataset, http: aiohttp.ClientSession, mode: str) -> None:
    options = ServerOptions(rate_limit=RateLimit(rate=2, burst=3, mode=mode))
    async with serve(dataset, options=options) as api:
        answers = []
        for _ in range(8):
            async with http.get(f"{api.base_url}/images", params={"limit": "1"}) as resp:
                answers.append((resp.status, resp.headers.get("Retry-After")))
    assert answers[:3] == [(200, None)] * 3
    assert (int(mode), None if mode == "429" else "2") in answers[3:]
    assert any(r.fault == "rate_limit" for r in api.log)


# ---------------------------------------------------------------- misbehaviour hooks


async def test_cursor_loop_hook(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    post = str(dataset.post_ids[1])
    async with serve(dataset, options=ServerOptions(cursor_loops=frozenset({("postId", post)}))) as api:
        cursors, cursor = [], None
        for _ in range(4):
            _, body = await get(
                http,
                f"{api.base_url}/images",
                postId=post,
                limit=1,
                **({"cursor": cursor} if cursor else {}),
                **ALL,
            )
            cursor = body["metadata"]["nextCursor"]
            cursors.append(cursor)
    assert cursors[2] == cursors[0] and cursors[3] == cursors[1]


async def test_fallback_to_global_feed_hook(dataset: Dataset, http: aiohttp.ClientSession) -> None:
    name = dataset.usernames[1]
    options = ServerOptions(
        fallback_usernames=frozenset({name}), fallback_post_ids=frozenset({dataset.post_ids[0]})
    )
    async with serve(dataset, options=options) as api:
        _, by_user = await get(http, f"{api.base_url}/images", username=name, limit=100, **ALL)
        _, by_post = await get(http, f"{api.base_url}/images", postId=dataset.post_ids[0], limit=100, **ALL)
    assert {i["username"] for i in by_user["items"]} - {name}, "foreign items"
    assert {i["postId"] for i in by_post["items"]} - {dataset.post_ids[0]}, "foreign items"


# ---------------------------------------------------------------- dataset and command line


def test_spec_from_dict_and_determinism() -> None:
    spec = DatasetSpec.from_dict(SPEC)
    assert [m.id for m in spec.models] == [827184, 42] and spec.total_images == 800
    assert not spec.models[0].versions[2].published
    a, b = Dataset(spec), Dataset(spec)
    assert orjson.dumps([a.item(i, with_meta=True) for i in range(50)]) == orjson.dumps(
        [b.item(i, with_meta=True) for i in range(50)]
    )
    overlap = set(a.version_image_ids(11, visible_only=False)) & set(
        a.version_image_ids(12, visible_only=False)
    )
    assert overlap, "versions of one model share images"


async def test_command_line_serves_and_stops_on_sigterm(http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler.testing.fakeapi", "--port", "0", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert line.startswith("listening on http://127.0.0.1:") and line.rstrip().endswith("/api/v1")
        status, model = await get(http, line.split()[-1] + "/models/827184")
        assert status == 200 and len(model["modelVersions"]) >= 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
