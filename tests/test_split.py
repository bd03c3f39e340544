"""Timing-out shards get smaller pages, then are split into exact partitions (issue #3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import expected_ids, harvest, ids_of, make_dataset, read_items, write_config
from crawler.crawl.shards import halves, make_shard, split
from crawler.testing.fakeapi import ServerOptions, ServerThread, SlowSearch

# Any: the values are keyword arguments to write_config, which also has a str parameter.
FAST: dict[str, Any] = {"timeout": 0.4, "max_backoff": 0.05, "max_retries": 6}


def test_split_partitions_by_level_bits_then_type() -> None:
    shard = make_shard("q", [("modelVersionId", "1"), ("browsingLevel", "13"), ("limit", "200")])
    children = split(shard)
    assert [c.value("browsingLevel") for c in children] == ["1", "4", "8"]
    assert all(c.value("modelVersionId") == "1" and c.value("limit") == "200" for c in children)
    by_type = split(children[0])
    assert [c.value("type") for c in by_type] == ["image", "video", "audio"]
    assert split(by_type[0]) == []
    assert split(make_shard("q", [("modelVersionId", "1")])) == []  # no explicit levels: no exact cover


def test_halves_are_pg_against_the_rest_then_the_types_of_a_single_level() -> None:
    shard = make_shard("q", [("modelVersionId", "1"), ("browsingLevel", "13")])
    assert [c.value("browsingLevel") for c in halves(shard)] == ["1", "12"]
    single = make_shard("q", [("modelVersionId", "1"), ("browsingLevel", "4")])
    assert halves(single) == split(single)  # the same partition, so the state reads it either way
    assert [(c.value("browsingLevel"), c.value("type")) for c in halves(single)] == [
        ("4", "image"),
        ("4", "video"),
        ("4", "audio"),
    ]
    assert halves(halves(single)[0]) == []  # level and type fixed: nothing left to split
    assert halves(make_shard("q", [("modelVersionId", "1")])) == []  # no explicit levels


def test_timeouts_halve_the_page_size_then_recover(tmp_path: Path) -> None:
    dataset = make_dataset({9001: 500})
    slow = SlowSearch(rows_over=0, limit_over=50, seconds=3)
    with ServerThread(dataset, options=ServerOptions(slow_search=slow)) as api:
        cfg = write_config(
            tmp_path / "c.toml", api.base_url, [{"modelVersionId": 9001, "browsingLevel": 31}], **FAST
        )
        result = harvest("run", cfg)
        limits = [r.query["limit"] for r in api.log.for_path("/api/v1/images") if r.status == 200]
    assert result.code == 0, result.stderr
    assert set(ids_of(read_items(tmp_path / "out"))) == expected_ids(dataset, [9001])
    assert limits and set(limits) == {"50"}  # 200 and 100 never answered in time
    assert "images a page" in result.stderr


def test_a_shard_that_keeps_timing_out_is_split_and_resumes_split(tmp_path: Path) -> None:
    dataset = make_dataset({9001: 500})
    slow = SlowSearch(rows_over=300, seconds=3)  # the whole version is too big; one level is not
    with ServerThread(dataset, options=ServerOptions(slow_search=slow)) as api:
        query = {"modelVersionId": 9001, "browsingLevel": 31, "sort": "Newest"}
        cfg = write_config(tmp_path / "c.toml", api.base_url, [query], **FAST)
        first = harvest("run", cfg)
        assert first.code == 0, first.stderr
        assert "splitting it into 5 shards" in first.stderr
        ids = ids_of(read_items(tmp_path / "out"))
        assert len(ids) == len(set(ids)) and set(ids) == expected_ids(dataset, [9001])
        status = harvest("status", cfg).stdout
        assert "split" in status and status.count("browsingLevel=") == 6
        api.log.clear()
        dataset.add_images(9001, 3)
        again = harvest("run", cfg)
        assert again.code == 0, again.stderr
        levels = {r.query.get("browsingLevel") for r in api.log.for_path("/api/v1/images")}
    assert "31" not in levels  # the next pass walks the children directly
    assert set(ids_of(read_items(tmp_path / "out"))) == expected_ids(dataset, [9001])
