"""Completeness against the server as it behaves in 2026 (issue 10), through the real CLI.

The fake API caps every walk at `walk_cap` positions (the real one at about 50,000),
hands out opaque `feed:` cursors that expire, and can play the SFW-only host.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import HARVEST, expected_ids, harvest, ids_of, make_dataset, read_items, write_config
from crawler.testing.fakeapi import Dataset, ImageQuery, ServerOptions, ServerThread

VERSION = 9001
TYPES = ("image", "video", "audio")
LEVELS = (1, 2, 4, 8, 16)
LIMIT = 20


def leaf_sizes(dataset: Dataset, version: int) -> dict[tuple[int, str], int]:
    """Images visible in each exact leaf (one level, one type) of a version."""
    sizes = {}
    for level in LEVELS:
        for kind in TYPES:
            q = ImageQuery(model_version_id=version, levels=level, type=kind, sort="Newest")
            sizes[(level, kind)] = len(dataset.walk_ids(q))
    return sizes


def reachable(dataset: Dataset, version: int, cap: int) -> set[int]:
    """What walks capped at `cap` can reach from both ends of every leaf."""
    found: set[int] = set()
    for level in LEVELS:
        for kind in TYPES:
            q = ImageQuery(model_version_id=version, levels=level, type=kind, sort="Newest")
            found |= set(dataset.walk_ids(q, walk_cap=cap))
            found |= set(dataset.walk_ids(replace(q, sort="Oldest"), walk_cap=cap))
    return found


def query(sort: str = "Newest") -> list[dict[str, object]]:
    return [{"modelVersionId": VERSION, "browsingLevel": 31, "sort": sort, "limit": LIMIT}]


# Images only, levels evenly: each level's leaf holds more than one walk reaches, less than two.
EVEN = {"level_weights": [1, 1, 1, 1, 1], "type_weights": [1, 0, 0]}


@pytest.mark.parametrize("sort", ["Newest", "Most Reactions"])
def test_a_shard_seven_times_deeper_than_the_cap_comes_back_complete(tmp_path: Path, sort: str) -> None:
    dataset = make_dataset({VERSION: 1400}, **EVEN)
    everything = expected_ids(dataset, [VERSION])
    cap = len(everything) // 7
    sizes = leaf_sizes(dataset, VERSION)
    assert max(sizes.values()) <= 2 * cap - LIMIT  # every leaf fits two walks...
    assert sum(n > cap for n in sizes.values()) >= 3  # ... and most need both
    with ServerThread(dataset, options=ServerOptions(walk_cap=cap)) as api:
        cfg = write_config(tmp_path / "c.toml", api.base_url, query(sort), walk_cap=cap)
        result = harvest("run", cfg)
        assert result.code == 0, result.stderr
        assert "walking it from" in result.stderr  # the other end, or both ends
        ids = ids_of(read_items(tmp_path / "out"))
        assert len(ids) == len(set(ids)) and set(ids) == everything
        assert harvest("verify", cfg).code == 0
        if sort != "Newest":
            return  # other sorts have no stable frontier: every pass walks them again
        # The next pass is cheap: each newest end stops at its first known page, the
        # oldest ends (nothing new arrives there) are not walked at all.
        before = len(api.log)
        added = dataset.add_images(VERSION, 5)
        again = harvest("run", cfg)
        assert again.code == 0, again.stderr
        assert len(api.log) - before <= len(sizes) + len(added)  # grows with what is new only
        assert set(added) <= set(ids_of(read_items(tmp_path / "out")))


def test_leaves_deeper_than_two_walks_end_capped_with_exit_3(tmp_path: Path) -> None:
    dataset = make_dataset({VERSION: 1400})
    sizes = leaf_sizes(dataset, VERSION)
    cap = max(sizes.values()) // 3  # the biggest leaf holds more than two walks reach
    with ServerThread(dataset, options=ServerOptions(walk_cap=cap)) as api:
        cfg = write_config(tmp_path / "c.toml", api.base_url, query("Newest"), walk_cap=cap)
        result = harvest("run", cfg)
        status = harvest("status", cfg)
    assert result.code == 3, result.stderr
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(ids) == reachable(dataset, VERSION, cap)
    capped_leaves = [leaf for leaf, n in sizes.items() if n > 2 * cap]
    capped_lines = [line for line in result.stderr.splitlines() if ": capped: holds" in line]
    assert capped_lines and len(capped_lines) >= len(capped_leaves), result.stderr
    assert "capped" in status.stdout and "more exist" in status.stdout
    summary = json.loads((tmp_path / "out" / "last-run.json").read_text())
    assert summary["exit_code"] == 3 and len(summary["capped"]) == len(capped_lines)


def test_expired_cursors_after_a_kill_are_walked_again_exactly_once(tmp_path: Path) -> None:
    dataset = make_dataset({VERSION: 900})
    options = ServerOptions(feed_cursors=True)
    with ServerThread(dataset, options=options) as api:
        cfg = write_config(
            tmp_path / "c.toml", api.base_url, query("Newest"), requests_per_second=20, concurrency=1
        )
        proc = subprocess.Popen([HARVEST, "run", str(cfg)], stderr=subprocess.PIPE, text=True, env=_env())
        deadline = time.monotonic() + 30
        while len(api.log.for_path("/api/v1/images")) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL  # killed mid-walk, its cursor stored
        api.cursors.expire_all()
        result = harvest("run", cfg)
        assert result.code == 0, result.stderr
        assert "walking it again from the head" in result.stderr
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(dataset, [VERSION])


def test_the_sfw_host_is_named_and_a_pg_query_is_not_warned(tmp_path: Path) -> None:
    dataset = make_dataset({VERSION: 3000})
    with ServerThread(dataset, options=ServerOptions(sfw_only=True)) as api:
        mature = write_config(tmp_path / "m.toml", api.base_url, query(), out="mature")
        result = harvest("run", mature)
        pg = write_config(
            tmp_path / "p.toml", api.base_url, [{"modelVersionId": VERSION, "browsingLevel": 1}], out="pg"
        )
        quiet = harvest("run", pg)
    assert result.code == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "SFW-only" in line]
    assert len(warning) == 1 and "civitai.red" in warning[0], result.stderr
    assert quiet.code == 0 and "SFW-only" not in quiet.stderr
    summary = json.loads((tmp_path / "mature" / "last-run.json").read_text())
    assert summary["warnings"] and set(next(iter(summary["levels_served"].values()))) <= {"1", "2"}


def test_a_cursor_400_in_any_error_shape_restarts_from_the_head(tmp_path: Path) -> None:
    dataset = make_dataset({VERSION: 400})
    with ServerThread(dataset, options=ServerOptions(feed_cursors=True, new_error_bodies=True)) as api:
        # One walker: with walkers to spare the Newest end would take the new images instead.
        cfg = write_config(tmp_path / "c.toml", api.base_url, query("Oldest"), concurrency=1)
        first = harvest("run", cfg)
        assert first.code == 0, first.stderr
        api.cursors.expire_all()  # the stored tail cursor of the Oldest walk dies
        added = dataset.add_images(VERSION, 30)
        again = harvest("run", cfg)
    assert again.code == 0, again.stderr
    assert "walking it again from the head" in again.stderr and "cursor" in again.stderr
    ids = ids_of(read_items(tmp_path / "out"))
    assert len(ids) == len(set(ids)) and set(added) <= set(ids)
    assert set(ids) == expected_ids(dataset, [VERSION])


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CIVITAI_API_KEY"}
