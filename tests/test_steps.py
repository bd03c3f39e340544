"""Closed-segment steps: run in order, each recorded, resumed at the right one after a crash."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import batch
from crawler.archive.checkpoint import ArchiveSpec, Checkpointer
from crawler.archive.compression import compress
from crawler.archive.reader import committed_items
from crawler.archive.state import STATE_FILE, SegmentRow, State
from crawler.archive.steps import Compress, SegmentStep
from crawler.archive.verify import verify

SEG1, SEG2, SEG3 = "images-000001.ndjson", "images-000002.ndjson", "images-000003.ndjson"


class Crash(Exception):
    """Stands for the process dying inside a step."""


@dataclass
class Recorder:
    """A step that notes each run (segment, its file then) and can die on chosen segments."""

    name: str
    crash_on: frozenset[str] = frozenset()
    runs: list[tuple[str, str]] = field(default_factory=list)

    def wanted(self, segment: SegmentRow) -> bool:
        return True

    def run(self, segment: SegmentRow, out_dir: Path, state: State) -> None:
        self.runs.append((segment.name, segment.file))
        if segment.name in self.crash_on:
            raise Crash(segment.name)


def _items(*ids: int) -> list[dict[str, Any]]:
    return [{"id": i, "meta": {"prompt": f"p{i}"}} for i in ids]


ALL = _items(*range(1, 6))


def _fill(state: State, spec: ArchiveSpec, steps: tuple[SegmentStep, ...] | None = None) -> None:
    """Five items, two per segment: SEG1 and SEG2 closed, SEG3 active."""
    state.begin_pass([("k", "q")])
    sink = Checkpointer(spec, state, steps)
    try:
        for n, page in enumerate([ALL[0:2], ALL[2:4], ALL[4:]]):
            sink.commit("k", f"c{n}", batch(page), f"c{n + 1}")
    finally:
        sink.close()


def _reopen(state: State, spec: ArchiveSpec, steps: tuple[SegmentStep, ...] | None = None) -> None:
    """What the next start does: open a Checkpointer, which completes closed segments' steps."""
    Checkpointer(spec, state, steps).close()


def test_rotation_runs_the_steps_in_order_and_records_each(tmp_path: Path) -> None:
    publish = Recorder("publish")
    with State.open(tmp_path) as state:
        _fill(state, ArchiveSpec(tmp_path, segment_items=2), (Compress("zstd"), publish))
        assert publish.runs == [(SEG1, SEG1 + ".zst"), (SEG2, SEG2 + ".zst")]  # after compression
        assert state.done_steps(SEG1) == state.done_steps(SEG2) == {"compress", "publish"}
        assert state.done_steps(SEG3) == frozenset()  # still active
        assert not (tmp_path / SEG1).exists() and (tmp_path / f"{SEG1}.zst").exists()


def test_a_crash_between_steps_resumes_at_the_next_one(tmp_path: Path) -> None:
    spec = ArchiveSpec(tmp_path, segment_items=2)
    with State.open(tmp_path) as state:
        with pytest.raises(Crash):
            _fill(state, spec, (Recorder("first"), Recorder("second", crash_on=frozenset({SEG1}))))
        assert state.done_steps(SEG1) == {"first"}
    with State.open(tmp_path) as state:
        first, second = Recorder("first"), Recorder("second")
        _reopen(state, spec, (first, second))
        assert first.runs == [] and second.runs == [(SEG1, SEG1)]
        assert state.done_steps(SEG1) == {"first", "second"}
        third = Recorder("third")  # a step added later: only it runs, on every closed segment
        _reopen(state, spec, (Recorder("first"), Recorder("second"), third))
        assert third.runs == [(SEG1, SEG1)]


@pytest.mark.parametrize("instant", ["part written", "renamed", "file recorded", "plain removed"])
def test_a_crash_anywhere_inside_compression_resumes(tmp_path: Path, instant: str) -> None:
    with State.open(tmp_path) as state:
        _fill(state, ArchiveSpec(tmp_path, segment_items=2, compress="none"))
        plain = tmp_path / SEG1
        # Compress SEG1 by hand, as far as the crash let it get.
        if instant == "part written":
            (tmp_path / f"{SEG1}.zst.part").write_bytes(b"\x28\xb5\x2f\xfd half")
        else:
            packed = compress(plain, "zstd")
            if instant != "renamed":
                state.set_segment_file(SEG1, packed.name)
            if instant == "plain removed":
                plain.unlink()
    with State.open(tmp_path) as state:
        _reopen(state, ArchiveSpec(tmp_path, segment_items=2, compress="zstd"))
        for name in (SEG1, SEG2):
            assert state.segment(name).file == name + ".zst"
            assert state.done_steps(name) == {"compress"}
            assert not (tmp_path / name).exists()
        assert sorted(p.name for p in tmp_path.glob("images-*")) == [f"{SEG1}.zst", f"{SEG2}.zst", SEG3]
        assert list(committed_items(tmp_path, state)) == ALL
        assert verify(tmp_path, state).sound


def test_with_compression_off_closed_segments_wait_for_a_run_with_it_on(tmp_path: Path) -> None:
    with State.open(tmp_path) as state:
        _fill(state, ArchiveSpec(tmp_path, segment_items=2, compress="none"))
        assert state.done_steps(SEG1) == frozenset() and state.segment(SEG1).file == SEG1
        _reopen(state, ArchiveSpec(tmp_path, compress="gzip"))
        assert state.segment(SEG1).file == SEG1 + ".gz" and state.done_steps(SEG1) == {"compress"}
        assert list(committed_items(tmp_path, state)) == ALL


def test_a_step_with_nothing_to_do_is_not_recorded_and_the_next_still_runs(tmp_path: Path) -> None:
    publish = Recorder("publish")
    with State.open(tmp_path) as state:
        _fill(state, ArchiveSpec(tmp_path, segment_items=2), (Compress("none"), publish))
        assert publish.runs == [(SEG1, SEG1), (SEG2, SEG2)]
        assert state.done_steps(SEG1) == {"publish"}


def test_a_state_from_before_steps_were_recorded_completes_them(tmp_path: Path) -> None:
    """Version 1 (no segment_steps), left by a crash between recording the file and removing the plain."""
    with State.open(tmp_path) as state:
        _fill(state, ArchiveSpec(tmp_path, segment_items=2, compress="zstd"))
        assert not (tmp_path / SEG1).exists()  # compressed and removed, as usual
    conn = sqlite3.connect(tmp_path / STATE_FILE, isolation_level=None)
    later_tables = ["segment_steps", "walks", "end_ids", "shard_levels", "media"]
    later_tables += ["first_seen", "runs", "refresh_segments", "refresh_steps", "observed", "refresh_todo"]
    later_tables += ["published"]
    for later in later_tables:  # what version 1 lacked
        conn.execute(f"DROP TABLE {later}")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    (tmp_path / SEG1).write_bytes(b'{"id":1}\n')  # the plain file version-1 code had not removed yet
    with State.open(tmp_path) as state:
        assert state.done_steps(SEG1) == frozenset()  # the new table starts empty
        _reopen(state, ArchiveSpec(tmp_path, segment_items=2, compress="zstd"))
        assert not (tmp_path / SEG1).exists()
        assert state.done_steps(SEG1) == state.done_steps(SEG2) == {"compress"}
        assert list(committed_items(tmp_path, state)) == ALL
