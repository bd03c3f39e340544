"""The commit point of exactly-once, driven directly: no network involved."""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import batch
from crawler.archive.checkpoint import ArchiveSpec, Checkpointer
from crawler.archive.segments import MAX_APPEND_LINES
from crawler.archive.state import STATE_FILE, ShardStatus, State
from crawler.errors import DisagreementError, StateError


def _line(item: dict[str, Any]) -> bytes:
    return batch([item]).lines[0]


def _items(*ids: int) -> list[dict[str, Any]]:
    return [{"id": i, "meta": {"prompt": f"p{i} ✓"}, "nsfw": False} for i in ids]


def _lines(out: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for f in sorted(out.glob("*.ndjson")) for line in f.read_bytes().splitlines()]


def _open(out: Path) -> tuple[State, Checkpointer]:
    state = State.open(out)
    state.begin_pass([("k", "q")])
    return state, Checkpointer(ArchiveSpec(out), state)


def test_pages_dedupe_within_page_and_across_pages(tmp_path: Path) -> None:
    state, sink = _open(tmp_path)
    assert sink.commit("k", None, batch(_items(1, 2, 2, 3)), "c1").new_items == 3
    assert sink.commit("k", "c1", batch(_items(3, 4)), None).new_items == 1
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
    sink.commit("k", None, batch(_items(1, 2)), 200)
    sink.close()
    segment = next(tmp_path.glob("*.ndjson"))
    committed = segment.read_bytes()
    with segment.open("ab") as f:  # a page written but never committed, torn mid-line
        f.write(_line(_items(3)[0]) + b'{"id": 4, "me')
    assert segment.read_bytes().endswith(b'\n{"id": 4, "me')  # really torn, before the reopen
    state.close()
    state, sink = _open(tmp_path)
    assert segment.read_bytes() == committed
    assert state.shard("k").cursor == 200  # a JSON-number cursor (legacy path) round-trips
    sink.commit("k", 200, batch(_items(3, 4)), None)
    assert [i["id"] for i in _lines(tmp_path)] == [1, 2, 3, 4]


def test_file_shorter_than_commit_is_refused(tmp_path: Path) -> None:
    state, sink = _open(tmp_path)
    sink.commit("k", None, batch(_items(1, 2)), "c")
    sink.close()
    segment = next(tmp_path.glob("*.ndjson"))
    segment.write_bytes(segment.read_bytes()[:5])
    with pytest.raises(StateError, match="truncated or replaced"):
        Checkpointer(ArchiveSpec(tmp_path), state)


def test_lines_keep_every_key_and_unicode(tmp_path: Path) -> None:
    state, sink = _open(tmp_path)
    item = {"id": 7, "meta": {"id": 7, "meta": {"x": [1, 2.5, None]}}, "username": "ünïcødé", "stats": {}}
    sink.commit("k", None, batch([item]), None)
    assert _lines(tmp_path) == [item]


def test_new_pass_restarts_finished_shards_from_head(tmp_path: Path) -> None:
    state, sink = _open(tmp_path)
    sink.commit("k", None, batch(_items(1)), None)
    assert state.finish_pass_if_complete(["k"])
    assert state.begin_pass([("k", "q")]) == 2
    assert state.shard("k").status == ShardStatus.PENDING


def test_items_orjson_refuses_are_still_written_intact(tmp_path: Path) -> None:
    import json

    state, sink = _open(tmp_path)
    odd = {"id": 9, "meta": {"prompt": "lone \ud800 surrogate", "seed": 2**70}}
    sink.commit("k", None, batch([*_items(1), odd]), None)
    lines = next(tmp_path.glob("*.ndjson")).read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == [*_items(1), odd]


def test_segments_close_by_size_when_segment_mb_is_set(tmp_path: Path) -> None:
    state = State.open(tmp_path)
    state.begin_pass([("k", "q")])
    sink = Checkpointer(ArchiveSpec(tmp_path, segment_items=0, segment_mb=100 / 2**20), state)  # 100 bytes
    for n in range(4):
        sink.commit("k", f"c{n}", batch(_items(2 * n, 2 * n + 1)), f"c{n + 1}")  # ~90 bytes a page
    sink.close()
    segments = state.segments()
    assert [(s.items, s.closed) for s in segments] == [(4, True), (4, True)]
    assert all(s.size >= 100 for s in segments)
    assert [i["id"] for i in _lines(tmp_path)] == list(range(8))
    state.close()


# -- the files must agree with the state before anything is cut (agreement.py) ---------


def _page(first: int, count: int) -> Any:
    return batch(_items(*range(first, first + count)))


def test_a_segment_is_named_in_the_state_before_its_file_is_made(tmp_path: Path) -> None:
    state = State.open(tmp_path)
    state.begin_pass([("k", "q")])
    named: list[tuple[str, bool]] = []  # each segment named, and whether its file existed then
    register = state.register_segment

    def watched(name: str) -> None:
        named.append((name, (tmp_path / name).exists()))
        register(name)

    state.register_segment = watched  # type: ignore[method-assign]
    sink = Checkpointer(ArchiveSpec(tmp_path, segment_items=2), state)
    assert not list(tmp_path.glob("images-*")) and state.segments() == []  # nothing to write yet
    sink.commit("k", None, _page(1, 2), "c1")  # fills and closes segment 1
    assert [p.name for p in tmp_path.glob("images-*")] == ["images-000001.ndjson"]  # no empty next file
    sink.commit("k", "c1", _page(3, 1), "c2")
    assert named == [("images-000001.ndjson", False), ("images-000002.ndjson", False)]
    sink.close()


def test_one_interrupted_page_is_cut_but_more_is_refused_untouched(tmp_path: Path) -> None:
    """At most MAX_APPEND_LINES lines past the commit is an interrupted page; more is an older state."""
    state, sink = _open(tmp_path)
    sink.commit("k", None, _page(1, 2), "c1")
    sink.close()
    segment = tmp_path / "images-000001.ndjson"
    committed = segment.read_bytes()
    page = b"".join(_page(10, MAX_APPEND_LINES - 1).lines) + b'{"id": 999, "to'  # 200 lines, last torn
    segment.write_bytes(committed + page)
    Checkpointer(ArchiveSpec(tmp_path), state).close()
    assert segment.read_bytes() == committed
    longer = committed + b"".join(_page(10, MAX_APPEND_LINES).lines) + b'{"id": 999'  # 201 lines
    segment.write_bytes(longer)
    with pytest.raises(DisagreementError, match="more than 200 lines past the state's commit point"):
        Checkpointer(ArchiveSpec(tmp_path), state)
    assert segment.read_bytes() == longer


def test_an_older_copy_of_the_state_is_refused(tmp_path: Path) -> None:
    state, sink = _open(tmp_path)
    sink.commit("k", None, _page(1, 2), "c1")
    older = tmp_path / "older"
    with closing(sqlite3.connect(tmp_path / STATE_FILE)) as db, closing(sqlite3.connect(older)) as copy:
        db.backup(copy)
    for n in range(2):  # two full pages committed after the copy
        sink.commit("k", f"c{n + 1}", _page(100 + 200 * n, 200), f"c{n + 2}")
    sink.close()
    state.close()
    segment = tmp_path / "images-000001.ndjson"
    before = segment.read_bytes()
    shutil.copy(older, tmp_path / STATE_FILE)
    with State.open(tmp_path) as restored, pytest.raises(DisagreementError, match="older"):
        Checkpointer(ArchiveSpec(tmp_path), restored)
    assert segment.read_bytes() == before


def test_segment_files_a_fresh_state_does_not_name_are_refused(tmp_path: Path) -> None:
    (tmp_path / "images-000001.ndjson").write_bytes(b'{"id":1}\n')  # one line: still not ours to cut
    (tmp_path / "images-000002.ndjson").write_bytes(b"")  # empty: nothing to lose, no objection
    with State.open(tmp_path) as state:
        with pytest.raises(DisagreementError, match=r"images-000001\.ndjson: 9 bytes of images the state"):
            Checkpointer(ArchiveSpec(tmp_path), state)
    assert (tmp_path / "images-000001.ndjson").read_bytes() == b'{"id":1}\n'


@pytest.mark.parametrize("damage", ["deleted", "cut mid-line", "grown"])
def test_a_closed_or_active_segment_changed_outside_the_harvest_is_refused(
    tmp_path: Path, damage: str
) -> None:
    state = State.open(tmp_path)
    state.begin_pass([("k", "q")])
    sink = Checkpointer(ArchiveSpec(tmp_path, segment_items=2), state)
    sink.commit("k", None, _page(1, 2), "c1")  # segment 1: closed, plain
    sink.commit("k", "c1", _page(3, 1), "c2")  # segment 2: active
    sink.close()
    closed, active = tmp_path / "images-000001.ndjson", tmp_path / "images-000002.ndjson"
    if damage == "deleted":
        closed.unlink()
        words = "missing, but the state holds 2 images"
    elif damage == "cut mid-line":
        active.write_bytes(active.read_bytes()[:-5] + b"\n")  # same line count, shorter
        words = "truncated or replaced outside the harvest"
    else:
        closed.write_bytes(closed.read_bytes() + b'{"id":99}\n')
        words = "but the state closed it at"
    with pytest.raises(DisagreementError, match=words):
        Checkpointer(ArchiveSpec(tmp_path, segment_items=2), state)
    state.close()


def test_a_commit_point_inside_a_line_is_refused(tmp_path: Path) -> None:
    state, sink = _open(tmp_path)
    sink.commit("k", None, _page(1, 2), "c1")
    sink.close()
    segment = tmp_path / "images-000001.ndjson"
    data = segment.read_bytes()
    segment.write_bytes(b"x" + data[1:-1] + b"}")  # same length, the committed end is no line end
    with pytest.raises(DisagreementError, match="is not the end of a line"):
        Checkpointer(ArchiveSpec(tmp_path), state)


def test_only_the_partial_files_of_known_segments_are_removed(tmp_path: Path) -> None:
    state = State.open(tmp_path)
    state.begin_pass([("k", "q")])
    sink = Checkpointer(ArchiveSpec(tmp_path, segment_items=2), state)
    sink.commit("k", None, _page(1, 2), "c1")  # segment 1 closed, left plain (compress none)
    sink.close()
    ours = tmp_path / "images-000001.ndjson.zst.part"
    theirs = [tmp_path / n for n in ("backup.tar.part", "images-000009.ndjson.zst.part")]
    for part in (ours, *theirs):
        part.write_bytes(b"half")
    Checkpointer(ArchiveSpec(tmp_path, segment_items=2), state).close()
    assert not ours.exists() and all(p.read_bytes() == b"half" for p in theirs)


def test_a_page_larger_than_the_api_serves_is_refused(tmp_path: Path) -> None:
    state, sink = _open(tmp_path)
    with pytest.raises(ValueError, match="201 lines"):
        sink.commit("k", None, _page(1, MAX_APPEND_LINES + 1), "c1")
    assert not list(tmp_path.glob("images-*"))
