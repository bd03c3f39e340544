"""Rebuilding the state from the segment files (`harvest repair`), driven directly: no network."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest

from conftest import batch
from crawler.archive import agreement
from crawler.archive.checkpoint import ArchiveSpec, Checkpointer
from crawler.archive.reader import committed_items
from crawler.archive.repair import WORK_DIR, repair
from crawler.archive.state import STATE_FILE, State
from crawler.archive.verify import verify
from crawler.errors import StateError

SEG1, SEG2, SEG3 = "images-000001.ndjson", "images-000002.ndjson", "images-000003.ndjson"


def _items(*ids: int) -> list[dict[str, Any]]:
    return [{"id": i, "meta": {"prompt": f"p{i}"}} for i in ids]


ALL = _items(*range(1, 6))


def _archive(out: Path, spec: ArchiveSpec) -> None:
    """Five images, two a segment: SEG1 and SEG2 closed (compressed as `spec` says), SEG3 active."""
    with State.open(out) as state:
        state.begin_pass([("k", "q")])
        sink = Checkpointer(spec, state)
        for n, page in enumerate([ALL[0:2], ALL[2:4], ALL[4:]]):
            sink.commit("k", f"c{n}", batch(page), f"c{n + 1}")
        sink.close()


def _state_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(STATE_FILE))


@pytest.mark.parametrize("codec", ["none", "zstd", "gzip"])
def test_a_lost_state_is_rebuilt_from_the_files_and_the_run_goes_on(tmp_path: Path, codec: str) -> None:
    spec = ArchiveSpec(tmp_path, segment_items=2, compress=codec)
    _archive(tmp_path, spec)
    with State.open(tmp_path) as state:
        before = state.segments()
    (tmp_path / STATE_FILE).unlink()
    done = repair(tmp_path, spec)
    assert done.images == 5 and done.backup is None and done.cut is None
    with State.open(tmp_path) as state:
        assert state.segments() == before  # names, sizes, items, closed flags, compressed files
        assert state.seen_count() == 5 and state.shards() == []  # cursors are not in the files
        assert list(committed_items(tmp_path, state)) == ALL
        assert verify(tmp_path, state).sound
        state.begin_pass([("k", "q")])
        sink = Checkpointer(spec, state)  # the next run: agrees, dedupes, appends
        sink.commit("k", None, batch(_items(5, 6)), None)
        sink.close()
        assert [i["id"] for i in committed_items(tmp_path, state)] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / WORK_DIR).exists()


def test_the_old_state_is_kept_and_a_torn_last_line_is_cut(tmp_path: Path) -> None:
    spec = ArchiveSpec(tmp_path, segment_items=2)
    _archive(tmp_path, spec)
    active = tmp_path / SEG3
    whole = active.read_bytes()
    active.write_bytes(whole + b'{"id": 6, "me')  # a write cut short
    done = repair(tmp_path, spec)
    assert done.cut == (SEG3, 13) and active.read_bytes() == whole
    assert done.backup is not None and done.old_images == 5
    assert _state_files(tmp_path) == [STATE_FILE, done.backup.name]
    with State.open(tmp_path) as state:
        assert state.seen_count() == 5 and not state.segment(SEG3).closed


def test_a_cut_active_segment_forgets_the_images_it_lost(tmp_path: Path) -> None:
    spec = ArchiveSpec(tmp_path)
    with State.open(tmp_path) as state:
        state.begin_pass([("k", "q")])
        sink = Checkpointer(spec, state)
        sink.commit("k", None, batch(ALL), None)
        sink.close()
    segment = tmp_path / SEG1
    data = segment.read_bytes()
    segment.write_bytes(data[: len(data) // 2])  # cut mid-line, outside the harvest
    with State.open(tmp_path) as state, pytest.raises(StateError, match="truncated"):
        Checkpointer(spec, state)
    done = repair(tmp_path, spec)
    assert done.images == 2 and done.cut is not None
    assert done.forgotten == (
        f"{SEG1}: the old state held 5 images, its file holds 2: 3 forgotten "
        "(the next run fetches them again)",
    )
    with State.open(tmp_path) as state:
        assert list(committed_items(tmp_path, state)) == ALL[:2]
        Checkpointer(spec, state).close()  # agrees now


def test_a_deleted_closed_segment_is_forgotten_and_numbering_goes_on(tmp_path: Path) -> None:
    spec = ArchiveSpec(tmp_path, segment_items=2, compress="zstd")
    _archive(tmp_path, spec)
    (tmp_path / f"{SEG1}.zst").unlink()
    done = repair(tmp_path, spec)
    assert [s.name for s in done.segments] == [SEG2, SEG3] and done.images == 3
    assert done.forgotten[0].startswith(f"{SEG1}.zst: the old state held 2 images, its file is gone")
    with State.open(tmp_path) as state:
        state.begin_pass([("k", "q")])
        sink = Checkpointer(spec, state)
        sink.commit("k", None, batch(_items(1, 2)), None)  # fetched again; SEG3 fills up and closes
        sink.commit("k", None, batch(_items(7)), None)  # the next segment after the last, not the count
        sink.close()
        assert [s.name for s in state.segments()] == [SEG2, SEG3, "images-000004.ndjson"]
        assert verify(tmp_path, state).sound


def test_a_compression_a_crash_interrupted_reads_the_plain_file(tmp_path: Path) -> None:
    spec = ArchiveSpec(tmp_path, segment_items=2, compress="gzip")
    _archive(tmp_path, spec)
    (tmp_path / SEG1).write_bytes(gzip.decompress((tmp_path / f"{SEG1}.gz").read_bytes()))  # both forms
    (tmp_path / STATE_FILE).unlink()
    done = repair(tmp_path, spec)
    assert done.ignored == (f"{SEG1}.gz",)
    with State.open(tmp_path) as state:
        first = state.segment(SEG1)
        assert first.file == SEG1 and first.closed  # compressed again by the next run
        Checkpointer(spec, state).close()
        assert state.segment(SEG1).file == f"{SEG1}.gz" and not (tmp_path / SEG1).exists()
        assert list(committed_items(tmp_path, state)) == ALL


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("corrupt", "cannot be read after line"),
        ("duplicate", "id 1 is also in an earlier segment"),
        ("not json", f"{SEG3}:1: not JSON"),
        ("torn closed", rf"{SEG1}\.gz:2: torn line"),
    ],
)
def test_a_damaged_file_stops_the_repair_with_nothing_changed(
    tmp_path: Path, damage: str, words: str
) -> None:
    spec = ArchiveSpec(tmp_path, segment_items=2, compress="gzip")
    _archive(tmp_path, spec)
    packed = tmp_path / f"{SEG1}.gz"
    if damage == "corrupt":
        data = bytearray(packed.read_bytes())
        data[-8] ^= 0xFF  # the CRC: every byte decodes, the check at the end fails
        packed.write_bytes(bytes(data))
    elif damage == "duplicate":
        (tmp_path / SEG3).write_bytes(b'{"id":1}\n')
    elif damage == "not json":
        (tmp_path / SEG3).write_bytes(b"<html>\n")
    else:
        packed.write_bytes(gzip.compress(b'{"id":1}\n{"id":2'))
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(StateError, match=words):
        repair(tmp_path, spec)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files
    assert not (tmp_path / WORK_DIR).exists()


def test_the_rebuilt_state_is_what_the_run_checks_for(tmp_path: Path) -> None:
    """A state lost mid-harvest, with an uncommitted page on disk: repair adopts every whole line."""
    spec = ArchiveSpec(tmp_path, segment_items=2)
    _archive(tmp_path, spec)
    (tmp_path / SEG3).write_bytes((tmp_path / SEG3).read_bytes() + batch(_items(6)).lines[0])
    for name in _state_files(tmp_path):
        (tmp_path / name).unlink()
    repair(tmp_path, spec)
    with State.open(tmp_path) as state:
        assert agreement.disagreements(tmp_path, state.segments()) == []
        assert state.seen_count() == 6 and state.segment(SEG3).closed  # full at 2 images
