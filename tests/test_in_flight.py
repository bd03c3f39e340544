"""Issue 11: the whole rate budget at real latency, through the real CLI against a slow fake.

With `concurrency` unset, the run keeps about rate x p90 latency requests in flight,
more than there are shards, by walking big shards from both ends at once; an explicit
`concurrency` is never exceeded. Every image comes back exactly once either way.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import harvest, ids_of, make_dataset, read_items, write_config
from crawler.testing.fakeapi import Dataset, ImageQuery, ServerOptions, ServerThread
from crawler.testing.fakeapi.server import Latency

MODEL = 500
SLOW = ServerOptions(latency=Latency(median=0.03, p95=0.1, seed=3))


def everything(dataset: Dataset, versions: list[int]) -> set[int]:
    found: set[int] = set()
    for version in versions:
        q = ImageQuery(model_version_id=version, levels=1, type="image", sort="Newest")
        found |= set(dataset.walk_ids(q))
    return found


def model_query() -> list[dict[str, object]]:
    """Shards that cannot be split (one level, one type): a second walker is their other end.
    (A shard that can be split gets none: at the walk cap it would be split while its other
    end walks on, every request of that end spent twice.)"""
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


def test_a_skewed_models_big_shard_gets_more_walkers_and_comes_back_exactly_once(tmp_path: Path) -> None:
    dataset = make_dataset({5001: 4000, 5002: 600, 5003: 300, 5004: 200})
    with ServerThread(dataset, options=SLOW) as api:
        cfg = write_config(tmp_path / "c.toml", api.base_url, model_query(), concurrency="auto")
        result = harvest("run", cfg)
    assert result.code == 0, result.stderr
    big = [line for line in result.stderr.splitlines() if "other end too" in line]
    assert big and all("modelVersionId=5001" in line for line in big), result.stderr
    summary = json.loads((tmp_path / "out" / "last-run.json").read_text())
    assert summary["shards"] == 5  # four versions and the big one's other end
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(ids) == everything(dataset, [5001, 5002, 5003, 5004])
    again = harvest("verify", cfg)
    assert again.code == 0, again.stderr


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
