"""The commit point of exactly-once, driven directly: no network involved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from crawler.archive.checkpoint import Checkpointer
from crawler.archive.segments import dump_item
from crawler.archive.state import ShardStatus, State
from crawler.config import OutputConfig
from crawler.errors import StateError


def _items(*ids: int) -> list[dict[str, Any]]:
    return [{"id": i, "meta": {"prompt": f"p{i} ✓"}, "nsfw": False} for i in ids]


def _lines(out: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for f in sorted(out.glob("*.ndjson")) for line in f.read_bytes().splitlines()]


def _open(out: Path) -> tuple[State, Checkpointer]:
    state = State.open(out)
    state.begin_pass([("k", "q")])
    return state, Checkpointer(OutputConfig(out), state)


def test_pages_dedupe_within_page_and_across_pages(tmp_path: Path) -> None:
    state, sink = _open(tmp_path)
    assert sink.commit("k", None, _items(1, 2, 2, 3), "c1").new_items == 3
    assert sink.commit("k", "c1", _items(3, 4), None).new_items == 1
    assert [i["id"] for i in _lines(tmp_path)] == [1, 2, 3, 4]
    row = state.shard("k")
    assert (row.status, row.cursor, row.tail_cursor, row.items, row.pages) == (
        ShardStatus.DONE,
        None,
        "c1",
        4,
        2,
    )


def test_uncommitted_tail_is_cut_on_reopen(tmp_path: Path) -> None:
    state, sink = _open(tmp_path)
    sink.commit("k", None, _items(1, 2), 200)
    sink.close()
    segment = next(tmp_path.glob("*.ndjson"))
    committed = segment.read_bytes()
    with segment.open("ab") as f:  # a page written but never committed, torn mid-line
        f.write(dump_item(_items(3)[0]) + b'{"id": 4, "me')
    assert segment.read_bytes().endswith(b'\n{"id": 4, "me')  # really torn, before the reopen
    state.close()
    state, sink = _open(tmp_path)
    assert segment.read_bytes() == committed
    assert state.shard("k").cursor == 200  # a JSON-number cursor (legacy path) round-trips
    sink.commit("k", 200, _items(3, 4), None)
    assert [i["id"] for i in _lines(tmp_path)] == [1, 2, 3, 4]


def test_file_shorter_than_commit_is_refused(tmp_path: Path) -> None:
    state, sink = _open(tmp_path)
    sink.commit("k", None, _items(1, 2), "c")
    sink.close()
    segment = next(tmp_path.glob("*.ndjson"))
    segment.write_bytes(segment.read_bytes()[:5])
    with pytest.raises(StateError, match="truncated or replaced"):
        Checkpointer(OutputConfig(tmp_path), state)


def test_lines_keep_every_key_and_unicode(tmp_path: Path) -> None:
    state, sink = _open(tmp_path)
    item = {"id": 7, "meta": {"id": 7, "meta": {"x": [1, 2.5, None]}}, "username": "ünïcødé", "stats": {}}
    sink.commit("k", None, [item], None)
    assert _lines(tmp_path) == [item]


def test_new_pass_restarts_finished_shards_from_head(tmp_path: Path) -> None:
    state, sink = _open(tmp_path)
    sink.commit("k", None, _items(1), None)
    assert state.finish_pass_if_complete(["k"])
    assert state.begin_pass([("k", "q")]) == 2
    assert state.shard("k").status == ShardStatus.PENDING


def test_items_orjson_refuses_are_still_written_intact(tmp_path: Path) -> None:
    import json

    state, sink = _open(tmp_path)
    odd = {"id": 9, "meta": {"prompt": "lone \ud800 surrogate", "seed": 2**70}}
    sink.commit("k", None, [*_items(1), odd], None)
    lines = next(tmp_path.glob("*.ndjson")).read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == [*_items(1), odd]
