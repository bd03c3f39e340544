"""Cron-style reruns fetch only what is new (issue #4), through the real CLI."""

from __future__ import annotations

from pathlib import Path

from conftest import expected_ids, harvest, ids_of, make_dataset, read_items, write_config
from crawler.testing.fakeapi import ServerThread

VERSIONS = {6001: 230, 6002: 170, 6003: 90}


def _images_requests(api: object) -> int:
    return len(api.log.for_path("/api/v1/images"))  # type: ignore[attr-defined]


def _run_twice_with_new_images(tmp_path: Path, sort: str) -> tuple[int, int, set[int], list[int]]:
    dataset = make_dataset(VERSIONS)
    with ServerThread(dataset) as api:
        query = {"modelId": 500, "sort": sort, "browsingLevel": 31, "limit": 20}
        cfg = write_config(tmp_path / "c.toml", api.base_url, [query])
        assert harvest("run", cfg).code == 0
        full = _images_requests(api)
        api.log.clear()
        added = set(dataset.add_images(6002, 7))
        assert harvest("run", cfg).code == 0
        incremental = _images_requests(api)
        ids = ids_of(read_items(tmp_path / "out"))
        assert set(ids) == expected_ids(dataset, list(VERSIONS))
    return full, incremental, added, ids


def test_newest_rerun_stops_at_known_images(tmp_path: Path) -> None:
    full, incremental, added, ids = _run_twice_with_new_images(tmp_path, "Newest")
    assert len(ids) == len(set(ids)) and added <= set(ids)
    # 3 shards: each fetches its head page; 6002's holds the 7 new images and
    # needs one more page to reach an all-known one.
    assert incremental <= 3 + 1 + 1, incremental
    assert full > 20


def test_oldest_rerun_continues_from_its_tail(tmp_path: Path) -> None:
    full, incremental, added, ids = _run_twice_with_new_images(tmp_path, "Oldest")
    assert len(ids) == len(set(ids)) and added <= set(ids)
    assert incremental <= 3 * 2 + 1, incremental
    assert full > 20


def test_other_sorts_rewalk_and_dedupe(tmp_path: Path) -> None:
    full, incremental, added, ids = _run_twice_with_new_images(tmp_path, "Most Reactions")
    assert len(ids) == len(set(ids)) and added <= set(ids)
    assert incremental >= full  # no frontier to stop at: everything is walked again


def test_interrupted_pass_resumes_unfinished_shards_only(tmp_path: Path) -> None:
    dataset = make_dataset(VERSIONS)
    with ServerThread(dataset) as api:
        bad = {"name": "ghost", "modelId": 424242, "browsingLevel": 31}
        good = {"modelId": 500, "sort": "Newest", "browsingLevel": 31, "limit": 20}
        cfg = write_config(tmp_path / "c.toml", api.base_url, [good, bad])
        assert harvest("run", cfg).code == 3  # the pass stays open
        api.log.clear()
        cfg = write_config(tmp_path / "c.toml", api.base_url, [good])
        assert harvest("run", cfg).code == 0
        # Finished shards are not walked again while the pass is open.
        assert _images_requests(api) == 0
        assert "pass 1 complete" in harvest("status", cfg).stdout


def test_a_model_that_gains_a_version_gets_a_new_shard(tmp_path: Path) -> None:
    spec_versions = [{"id": 6001, "images": 120}, {"id": 6009, "images": 80, "published": False}]
    dataset = make_dataset(models={"500": {"versions": spec_versions}})
    with ServerThread(dataset) as api:
        cfg = write_config(
            tmp_path / "c.toml", api.base_url, [{"modelId": 500, "sort": "Newest", "browsingLevel": 31}]
        )
        assert harvest("run", cfg).code == 0
        assert "6009" not in harvest("status", cfg).stdout
        dataset.publish(6009)
        assert harvest("run", cfg).code == 0
    assert "modelVersionId=6009" in harvest("status", cfg).stdout
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(dataset, [6001, 6009])
