"""Issue 11: the whole rate budget at real latency, through the real CLI against a slow fake.

With `concurrency` unset, the run keeps about rate x p90 latency requests in flight,
more than there are shards, by walking shards from both ends at once and a shard too
big for its two walkers as halves; an explicit `concurrency` is never exceeded. Every
image comes back exactly once either way.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from conftest import HARVEST, harvest, ids_of, make_dataset, read_items, write_config
from crawler.testing.fakeapi import Dataset, FakeServer, ImageQuery, ServerOptions, ServerThread
from crawler.testing.fakeapi.server import Latency, RequestRecord

MODEL = 500
SLOW = ServerOptions(latency=Latency(median=0.03, p95=0.1, seed=3))


def everything(dataset: Dataset, versions: list[int]) -> set[int]:
    found: set[int] = set()
    for version in versions:
        q = ImageQuery(model_version_id=version, levels=1, type="image", sort="Newest")
        found |= set(dataset.walk_ids(q))
    return found


def model_query() -> list[dict[str, object]]:
    """Shards that cannot be halved (one level, one type): a second walker is their other end."""
    return [{"modelId": MODEL, "browsingLevel": 1, "type": "image", "sort": "Newest", "limit": 100}]


def test_auto_concurrency_keeps_more_requests_in_flight_than_shards(tmp_path: Path) -> None:
    dataset = make_dataset({5001: 4000, 5002: 4000})
    with ServerThread(dataset, options=SLOW) as api:
        cfg = write_config(tmp_path / "c.toml", api.base_url, model_query(), concurrency="auto")
        result = harvest("run", cfg)
        most = api.log.max_in_flight()
    assert result.code == 0, result.stderr
    assert most > 2, f"{most} requests in flight at most, with 2 shards"
    assert "walking it from its other end too" in result.stderr
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(ids) == everything(dataset, [5001, 5002])


def all_levels(dataset: Dataset, versions: list[int]) -> set[int]:
    found: set[int] = set()
    for version in versions:
        found |= set(dataset.walk_ids(ImageQuery(model_version_id=version, levels=31, sort="Newest")))
    return found


def splittable_query() -> list[dict[str, object]]:
    """Every level: a shard can be halved (PG against the rest) when it is too big for two walkers."""
    return [{"modelId": MODEL, "browsingLevel": 31, "sort": "Newest", "limit": 100}]


SKEWED = {5001: 20000, 5002: 600, 5003: 300, 5004: 200}


def test_a_skewed_models_big_shard_is_walked_as_halves_and_comes_back_exactly_once(tmp_path: Path) -> None:
    dataset = make_dataset(SKEWED, overlap=0.0)
    with ServerThread(dataset, options=SLOW) as api:
        plain_cfg = write_config(tmp_path / "p.toml", api.base_url, splittable_query(), out="plain")
        assert harvest("run", plain_cfg).code == 0  # concurrency 4, 4 shards: one walker each
        plain = len(api.log.for_path("/api/v1/images"))
        cfg = write_config(tmp_path / "c.toml", api.base_url, splittable_query(), concurrency="auto")
        result = harvest("run", cfg)
        requests = len(api.log.for_path("/api/v1/images")) - plain
        again = harvest("run", cfg)
    assert result.code == 0, result.stderr
    halved = [line for line in result.stderr.splitlines() if "walking it as 2 halves" in line]
    assert halved and all("modelVersionId=5001" in line for line in halved), result.stderr
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(ids) == all_levels(dataset, list(SKEWED))
    assert requests <= 1.1 * plain, f"{requests} requests, plain walks {plain}"
    assert again.code == 0 and "0 new images" in again.stderr, again.stderr
    assert harvest("verify", cfg).code == 0


# 3 pages of 100 at most. None is a whole number of pages: there two ends that leave no image
# between them have no image in common either, so the page that proves they met is one more.
SMALL = {5001: 290, 5002: 260, 5003: 190, 5004: 150, 5005: 90}


def test_small_shards_cost_the_requests_of_plain_walks(tmp_path: Path) -> None:
    """A second walker on a shard of 3 pages or fewer must not add its meeting page: the starting
    end waits for the other end's first page, where the two meet or are less than a page apart."""
    dataset = make_dataset(SMALL, overlap=0.0)
    with ServerThread(dataset, options=SLOW) as api:
        plain_cfg = write_config(
            tmp_path / "p.toml", api.base_url, splittable_query(), out="p", concurrency=1
        )
        assert harvest("run", plain_cfg).code == 0
        plain = len(api.log.for_path("/api/v1/images"))
        cfg = write_config(tmp_path / "c.toml", api.base_url, splittable_query(), concurrency="auto")
        result = harvest("run", cfg)
        requests = len(api.log.for_path("/api/v1/images")) - plain
    assert result.code == 0, result.stderr
    assert "halves" not in result.stderr, result.stderr
    assert requests == plain, f"{requests} requests, plain walks {plain}"
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(ids) == all_levels(dataset, list(SMALL))


def pg_only(dataset: Dataset, versions: list[int]) -> set[int]:
    found: set[int] = set()
    for version in versions:
        found |= set(dataset.walk_ids(ImageQuery(model_version_id=version, levels=1, sort="Newest")))
    return found


def test_a_single_level_big_shard_is_split_by_type_and_comes_back_exactly_once(tmp_path: Path) -> None:
    """One browsing level cannot be halved by level; its type is not fixed, so it is split by type."""
    dataset = make_dataset(
        {5001: 24000, 5002: 600, 5003: 300, 5004: 200}, overlap=0.0, level_weights=[90, 4, 3, 2, 1]
    )
    query = [{"modelId": MODEL, "browsingLevel": 1, "sort": "Newest", "limit": 100}]
    with ServerThread(dataset, options=SLOW) as api:
        plain_cfg = write_config(tmp_path / "p.toml", api.base_url, query, out="plain")
        assert harvest("run", plain_cfg).code == 0  # concurrency 4, 4 shards: one walker each
        plain = len(api.log.for_path("/api/v1/images"))
        cfg = write_config(tmp_path / "c.toml", api.base_url, query, concurrency="auto")
        result = harvest("run", cfg)
        records = api.log.for_path("/api/v1/images")[plain:]
        again = harvest("run", cfg)
    assert result.code == 0, result.stderr
    split = [line for line in result.stderr.splitlines() if "walking it as 3 parts, one per type" in line]
    assert split and all("modelVersionId=5001" in line for line in split), result.stderr
    walked = {
        (r.query.get("type"), r.query.get("sort")) for r in records if r.query.get("modelVersionId") == "5001"
    }
    assert {(kind, sort) for kind in ("image", "video", "audio") for sort in ("Newest", "Oldest")} <= walked
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(ids) == pg_only(dataset, [5001, 5002, 5003, 5004])
    assert len(records) <= 1.1 * plain, f"{len(records)} requests, plain walks {plain}"
    assert again.code == 0 and "0 new images" in again.stderr, again.stderr
    assert harvest("verify", cfg).code == 0


def halves_answered(api: FakeServer) -> list[RequestRecord]:
    """Pages of the PG half (the other half may be halved again at once)."""
    return [r for r in api.log.for_path("/api/v1/images") if r.query.get("browsingLevel") == "1"]


def test_a_kill_while_halves_are_walked_resumes_them_and_writes_each_image_once(tmp_path: Path) -> None:
    dataset = make_dataset(SKEWED, overlap=0.0)
    with ServerThread(dataset, options=SLOW) as api:
        cfg = write_config(tmp_path / "c.toml", api.base_url, splittable_query(), concurrency="auto")
        proc = subprocess.Popen([HARVEST, "run", str(cfg)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(halves_answered(api)) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # killed while the halves are being walked
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        status = harvest("status", cfg)
        result = harvest("run", cfg)
    assert result.code == 0, result.stderr
    assert "browsingLevel=1&" in status.stdout, status.stdout  # the halves, as the state holds them
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(ids) == all_levels(dataset, list(SKEWED))
    assert harvest("verify", cfg).code == 0


def test_an_explicit_concurrency_is_never_exceeded(tmp_path: Path) -> None:
    dataset = make_dataset({5001: 1500, 5002: 1500, 5003: 600})
    with ServerThread(dataset, options=SLOW) as api:
        cfg = write_config(tmp_path / "c.toml", api.base_url, model_query(), concurrency=2)
        result = harvest("run", cfg)
        most = api.log.max_in_flight()
    assert result.code == 0, result.stderr
    assert most == 2
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(ids) == everything(dataset, [5001, 5002, 5003])


def first_pages(records: list[RequestRecord]) -> list[str]:
    """The versions in the order their walks sent their first request."""
    seen: list[str] = []
    for record in records:
        version = record.query.get("modelVersionId", "")
        if "cursor" not in record.query and version not in seen:
            seen.append(version)
    return seen


def test_walks_start_longest_first_by_the_previous_passs_sizes(tmp_path: Path) -> None:
    """Unknown sizes keep config order; a later pass starts the shards a previous one found big
    first. One request at a time, and every walker alone, so the requests go out in start order."""
    dataset = make_dataset({5001: 150, 5002: 900, 5003: 450, 5004: 20}, overlap=0.0)
    with ServerThread(dataset) as api:
        cfg = write_config(tmp_path / "c.toml", api.base_url, splittable_query(), concurrency=1)
        assert harvest("run", cfg).code == 0
        first = first_pages(api.log.for_path("/api/v1/images"))
        done = len(api.log.for_path("/api/v1/images"))
        assert harvest("run", cfg).code == 0  # a new pass: every shard walks again from its head
        again = first_pages(api.log.for_path("/api/v1/images")[done:])
    assert first == ["5001", "5002", "5003", "5004"]
    assert again == ["5002", "5003", "5001", "5004"]
