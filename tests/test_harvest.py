"""The real `harvest` CLI against the fake API on 127.0.0.1: issue #2 end to end."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson

from conftest import expected_ids, harvest, ids_of, make_dataset, read_items, write_config
from crawler.archive.lock import OutputLock
from crawler.testing.fakeapi import FakeServer, ServerOptions, ServerThread

MODEL = {"modelId": 500, "sort": "Newest", "browsingLevel": 31, "withMeta": True}
VERSIONS = [5001, 5002, 5003]


def test_model_is_walked_by_version_exactly_once(tmp_path: Path, api: FakeServer) -> None:
    cfg = write_config(tmp_path / "c.toml", api.base_url, [{**MODEL, "limit": 40}])
    result = harvest("run", cfg)
    assert result.code == 0, result.stderr
    items = read_items(tmp_path / "out")
    assert len(ids_of(items)) == len(set(ids_of(items)))
    assert set(ids_of(items)) == expected_ids(api.dataset, VERSIONS)
    images = api.log.for_path("/api/v1/images")
    assert images and all("modelId" not in r.query and "page" not in r.query for r in images)
    assert {r.query["modelVersionId"] for r in images} == {str(v) for v in VERSIONS}
    assert all(r.query["limit"] == "40" and r.query["browsingLevel"] == "31" for r in images)
    assert len(api.log.for_path("/api/v1/models/500")) == 1


def test_lines_are_the_items_exactly_as_served(tmp_path: Path, api: FakeServer) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        api.base_url,
        [{"modelVersionId": 5003, "withMeta": True, "browsingLevel": 31, "withTags": True}],
    )
    assert harvest("run", cfg).code == 0
    served = []
    # Re-fetch the same pages through a plain client and compare byte for byte.
    import urllib.request

    cursor = None
    while True:
        url = (
            api.base_url
            + "/images?browsingLevel=31&limit=200&modelVersionId=5003&withMeta=true&withTags=true"
        )
        if cursor is not None:
            url += f"&cursor={cursor}"
        body = orjson.loads(urllib.request.urlopen(url).read())
        served += body["items"]
        cursor = body["metadata"].get("nextCursor")
        if cursor is None:
            break
    written = (tmp_path / "out" / "images-000001.ndjson").read_bytes().splitlines()
    assert written == [orjson.dumps(item) for item in served]
    assert all("tags" in item and "meta" in item for item in served)


def test_short_and_empty_pages_do_not_end_a_walk(tmp_path: Path) -> None:
    dataset = make_dataset({7001: 400}, hidden_rate=0.5)
    with ServerThread(dataset) as api:
        cfg = write_config(
            tmp_path / "c.toml", api.base_url, [{"modelVersionId": 7001, "browsingLevel": 31, "limit": 10}]
        )
        assert harvest("run", cfg).code == 0
        pages = len(api.log.for_path("/api/v1/images"))
    visible = expected_ids(dataset, [7001])
    assert set(ids_of(read_items(tmp_path / "out"))) == visible
    # Half the rows are filtered after the search: a walk that stopped on a short
    # page would have ended after a handful of requests.
    assert len(visible) < 300 and pages >= 40


def test_null_end_cursor_ends_the_walk(tmp_path: Path) -> None:
    dataset = make_dataset({7001: 120})
    with ServerThread(dataset, options=ServerOptions(null_end_cursor=True)) as api:
        cfg = write_config(tmp_path / "c.toml", api.base_url, [{"modelVersionId": 7001, "browsingLevel": 31}])
        assert harvest("run", cfg).code == 0
    assert set(ids_of(read_items(tmp_path / "out"))) == expected_ids(dataset, [7001])


def test_rerun_of_finished_harvest_writes_nothing_new(tmp_path: Path, api: FakeServer) -> None:
    cfg = write_config(tmp_path / "c.toml", api.base_url, [MODEL])
    assert harvest("run", cfg).code == 0
    before = (tmp_path / "out" / "images-000001.ndjson").read_bytes()
    again = harvest("run", cfg)
    assert again.code == 0
    assert "0 new images" in again.stderr
    assert (tmp_path / "out" / "images-000001.ndjson").read_bytes() == before
    summary = orjson.loads((tmp_path / "out" / "last-run.json").read_bytes())
    assert summary["new_items"] == 0 and summary["ok"] is True


def test_new_images_are_picked_up_by_the_next_run(tmp_path: Path, api: FakeServer) -> None:
    cfg = write_config(tmp_path / "c.toml", api.base_url, [MODEL])
    assert harvest("run", cfg).code == 0
    added = api.dataset.add_images(5002, 7)
    assert harvest("run", cfg).code == 0
    items = read_items(tmp_path / "out")
    assert len(ids_of(items)) == len(set(ids_of(items)))
    assert set(added) <= set(ids_of(items))
    assert set(ids_of(items)) == expected_ids(api.dataset, VERSIONS)


def test_overlapping_queries_write_each_id_once(tmp_path: Path, api: FakeServer) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        api.base_url,
        [
            MODEL,
            {"name": "versions", "modelVersionId": [5001, 5002], "sort": "Oldest", "browsingLevel": 31},
            {"name": "posts", "postId": api.dataset.post_ids[:3], "browsingLevel": 31},
        ],
    )
    assert harvest("run", cfg).code == 0
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids))
    assert set(expected_ids(api.dataset, VERSIONS)) <= set(ids)


def test_post_list_gives_one_shard_each_and_items_match(tmp_path: Path, api: FakeServer) -> None:
    posts = api.dataset.post_ids[:3]
    cfg = write_config(tmp_path / "c.toml", api.base_url, [{"postId": posts, "browsingLevel": 31}])
    assert harvest("run", cfg).code == 0
    items = read_items(tmp_path / "out")
    assert items and {i["postId"] for i in items} <= set(posts)
    status = harvest("status", cfg)
    assert status.code == 0
    assert sum(f"postId={p}" in status.stdout for p in posts) == 3


def test_cursor_loop_stops_that_shard_only(tmp_path: Path) -> None:
    dataset = make_dataset()
    post_a, post_b = dataset.post_ids[:2]
    options = ServerOptions(cursor_loops=frozenset({("postId", str(post_a))}))
    with ServerThread(dataset, options=options) as api:
        cfg = write_config(
            tmp_path / "c.toml", api.base_url, [{"postId": [post_a, post_b], "browsingLevel": 31, "limit": 3}]
        )
        result = harvest("run", cfg)
        shards = harvest("status", cfg).stdout
        # The rerun resumes the failed shard against the same server: it loops again, and is
        # stopped again, without a traceback.
        again = harvest("run", cfg)
    assert result.code == 3, result.stderr
    assert "cursor looped" in result.stderr
    assert f"postId={post_a}" in result.stderr
    assert "done" in shards and "failed" in shards
    assert again.code == 3, again.stderr
    assert "cursor looped" in again.stderr and "Traceback" not in again.stderr


def test_foreign_items_are_refused(tmp_path: Path) -> None:
    dataset = make_dataset()
    victim = dataset.usernames[0]
    with ServerThread(dataset, options=ServerOptions(fallback_usernames=frozenset({victim.lower()}))) as api:
        cfg = write_config(tmp_path / "c.toml", api.base_url, [{"username": victim, "browsingLevel": 31}])
        result = harvest("run", cfg)
    assert result.code == 3, result.stderr
    assert "foreign" in result.stderr and "username" in result.stderr
    assert read_items(tmp_path / "out") == []


def test_unknown_model_fails_its_query_and_others_go_on(tmp_path: Path, api: FakeServer) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        api.base_url,
        [
            {"name": "ghost", "modelId": 999999, "browsingLevel": 31},
            {"name": "real", "modelVersionId": 5003, "browsingLevel": 31},
        ],
    )
    result = harvest("run", cfg)
    assert result.code == 3
    assert "ghost" in result.stderr and "No model with id 999999" in result.stderr
    assert set(ids_of(read_items(tmp_path / "out"))) == expected_ids(api.dataset, [5003])


def test_api_key_is_sent_as_bearer_and_never_leaks(tmp_path: Path) -> None:
    secret = "sk-test-7f3a9c1e5b"
    dataset = make_dataset({7001: 150})
    with ServerThread(dataset, api_key=secret) as api:
        cfg = write_config(tmp_path / "c.toml", api.base_url, [{"modelVersionId": 7001, "browsingLevel": 31}])
        good = harvest("run", cfg, "-v", env={"CIVITAI_API_KEY": secret})
        assert good.code == 0, good.stderr
        assert all(r.has_auth and "token" not in r.query for r in api.log)
        bad = harvest(
            "run",
            write_config(tmp_path / "d.toml", api.base_url, [{"modelVersionId": 7001}], out="o2"),
            env={"CIVITAI_API_KEY": secret + "-wrong"},
        )
    assert bad.code == 1
    assert "rejected" in bad.stderr and secret not in bad.stderr
    for text in (good.stdout, good.stderr, bad.stdout):
        assert secret not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_second_run_on_a_locked_output_exits_4(tmp_path: Path, api: FakeServer) -> None:
    cfg = write_config(tmp_path / "c.toml", api.base_url, [MODEL])
    lock = OutputLock(tmp_path / "out")
    try:
        result = harvest("run", cfg)
    finally:
        lock.release()
    assert result.code == 4
    assert "another harvest" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert harvest("run", cfg).code == 0  # the lock dies with its holder


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cases = {
        "limit = 500": "queries[1].limit",
        'sort = "newest"': 'did you mean "Newest"',
        "modelid = 5": 'did you mean "modelId"',
        "page = 2": "page",
    }
    for line, needle in cases.items():
        cfg = tmp_path / "bad.toml"
        cfg.write_text(f'[output]\ndir = "o"\n[[queries]]\nmodelVersionId = 1\n{line}\n')
        result = harvest("run", cfg)
        assert result.code == 2, line
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr
    missing = harvest("run", tmp_path / "nope.toml")
    assert missing.code == 2 and "no such file" in missing.stderr
    (tmp_path / "syntax.toml").write_text("[output\n")
    broken = harvest("run", tmp_path / "syntax.toml")
    assert broken.code == 2 and "line 1" in broken.stderr


def test_status_before_any_run_is_a_clean_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", "http://127.0.0.1:9/api/v1", [MODEL])
    result = harvest("status", cfg)
    assert result.code == 1 and "no harvest state" in result.stderr and "Traceback" not in result.stderr


def test_state_holds_cursor_offsets_and_ids(tmp_path: Path, api: FakeServer) -> None:
    cfg = write_config(tmp_path / "c.toml", api.base_url, [MODEL])
    assert harvest("run", cfg).code == 0
    db = sqlite3.connect(tmp_path / "out" / "harvest.sqlite")
    seen = db.execute("SELECT count(*) FROM seen").fetchone()[0]
    size = db.execute("SELECT size FROM segments").fetchone()[0]
    assert seen == len(read_items(tmp_path / "out"))
    assert size == (tmp_path / "out" / "images-000001.ndjson").stat().st_size


def test_demo_runs_offline(tmp_path: Path) -> None:
    result = harvest("demo", "--dir", tmp_path / "demo")
    assert result.code == 0, result.stderr
    assert len(read_items(tmp_path / "demo" / "data")) > 1000
    assert "pass 1 complete" in result.stdout


def test_run_help_prints_the_retry_budgets_and_exit_codes() -> None:
    result = harvest("run", "--help")
    assert result.code == 0
    for needle in ("max_retries = 8", "max_backoff = 30.0", "requests_per_second = 2.0", "130", "143"):
        assert needle in result.stdout
