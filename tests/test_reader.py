"""Reading an archive back: committed lines of plain and compressed segments, nothing past them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import batch
from crawler.archive.checkpoint import ArchiveSpec, Checkpointer
from crawler.archive.reader import (
    Line,
    committed_blocks,
    committed_items,
    committed_lines,
    parse,
    segment_lines,
)
from crawler.archive.state import SegmentRow, State
from crawler.archive.verify import verify
from crawler.errors import StateError

SEGMENTS = ["images-000001.ndjson", "images-000002.ndjson", "images-000003.ndjson"]


def _line(item: dict[str, Any]) -> bytes:
    return batch([item]).lines[0]


def _items(*ids: int) -> list[dict[str, Any]]:
    return [{"id": i, "meta": {"prompt": f"p{i} ✓"}, "nsfw": False} for i in ids]


def _archive(out: Path, codec: str) -> State:
    """Three segments: two closed (3 lines each, compressed by `codec`), one active (1 line)."""
    state = State.open(out)
    state.begin_pass([("k", "q")])
    sink = Checkpointer(ArchiveSpec(out, segment_items=3, compress=codec), state)
    pages = [_items(1, 2, 3), _items(4), _items(5, 6), _items(7)]
    for n, page in enumerate(pages):
        sink.commit("k", f"c{n}", batch(page), f"c{n + 1}")
    sink.close()
    return state


@pytest.mark.parametrize("codec,suffix", [("none", ""), ("zstd", ".zst"), ("gzip", ".gz")])
def test_committed_lines_of_every_segment_in_order(tmp_path: Path, codec: str, suffix: str) -> None:
    with _archive(tmp_path, codec) as state:
        assert [s.file for s in state.segments()] == [SEGMENTS[0] + suffix, SEGMENTS[1] + suffix, SEGMENTS[2]]
        lines = list(committed_lines(tmp_path, state))
        assert [(line.segment, line.number) for line in lines] == [
            (SEGMENTS[0], 1),
            (SEGMENTS[0], 2),
            (SEGMENTS[0], 3),
            (SEGMENTS[1], 1),
            (SEGMENTS[1], 2),
            (SEGMENTS[1], 3),
            (SEGMENTS[2], 1),
        ]
        assert [line.data for line in lines] == [_line(i) for i in _items(*range(1, 8))]
        assert list(committed_items(tmp_path, state)) == _items(*range(1, 8))


def test_offsets_are_positions_in_the_uncompressed_segment(tmp_path: Path) -> None:
    with _archive(tmp_path, "zstd") as state:
        first = state.segments()[0]
        lines = list(segment_lines(tmp_path, first))
        sizes = [len(_line(i)) for i in _items(1, 2, 3)]
        assert [line.offset for line in lines] == [0, sizes[0], sizes[0] + sizes[1]]
        assert all(line.committed_in(first) for line in lines)


def test_the_uncommitted_tail_of_the_active_segment_is_left_out(tmp_path: Path) -> None:
    with _archive(tmp_path, "zstd") as state:
        active = state.segments()[-1]
        with (tmp_path / active.file).open("ab") as f:  # a page written, never committed, torn
            f.write(_line(_items(8)[0]) + b'{"id": 9, "me')
        assert [i["id"] for i in committed_items(tmp_path, state)] == list(range(1, 8))
        raw = list(segment_lines(tmp_path, active))  # checking tools still see what is there
        assert [line.committed_in(active) for line in raw] == [True, False, False]
        assert raw[-1].data == b'{"id": 9, "me'
        report = verify(tmp_path, state)
        assert report.sound and report.lines == 7 and "uncommitted tail" in report.notes[0]


def test_a_missing_segment_file_is_a_state_error(tmp_path: Path) -> None:
    with _archive(tmp_path, "gzip") as state:
        (tmp_path / f"{SEGMENTS[1]}.gz").unlink()
        with pytest.raises(StateError, match=r"images-000002\.ndjson\.gz: missing, but the state holds 3"):
            list(committed_lines(tmp_path, state))


def test_a_line_that_is_not_an_image_names_its_place(tmp_path: Path) -> None:
    with _archive(tmp_path, "none") as state:
        path = tmp_path / SEGMENTS[2]
        path.write_bytes(b"x" * (path.stat().st_size - 1) + b"\n")  # same committed length
        with pytest.raises(StateError, match=r"images-000003\.ndjson:1: not JSON"):
            list(committed_items(tmp_path, state))


def test_parse_reads_what_the_writer_wrote_without_orjson(tmp_path: Path) -> None:
    odd = {"id": 9, "meta": {"prompt": "lone \ud800 surrogate", "seed": 2**70}}
    with State.open(tmp_path) as state:
        state.begin_pass([("k", "q")])
        sink = Checkpointer(ArchiveSpec(tmp_path), state)
        sink.commit("k", None, batch([*_items(1), odd]), None)
        sink.close()
        assert list(committed_items(tmp_path, state)) == [*_items(1), odd]
        assert verify(tmp_path, state).sound  # not "not JSON": verify reads lines the same way


def test_parse_refuses_json_that_is_not_an_object() -> None:
    with pytest.raises(StateError, match="s:4: not a JSON object"):
        parse(Line("s", 4, 0, orjson.dumps([1, 2]) + b"\n"))


@pytest.mark.parametrize(("codec", "checksum_at"), [("zstd", -1), ("gzip", -8)])
def test_a_damaged_compressed_segment_is_a_state_error_naming_it(
    tmp_path: Path, codec: str, checksum_at: int
) -> None:
    """Every byte decodes but the checksum at the end fails (zstd frames carry one since this fix)."""
    with _archive(tmp_path, codec) as state:
        packed = tmp_path / state.segments()[0].file
        data = bytearray(packed.read_bytes())
        data[checksum_at] ^= 0xFF
        packed.write_bytes(bytes(data))
        with pytest.raises(StateError, match=rf"{packed.name}: cannot be read after line \d"):
            list(committed_lines(tmp_path, state))
        report = verify(tmp_path, state)
        assert report.problems[0].startswith(f"{packed}: cannot be read after line ")


@pytest.mark.parametrize("codec", ["none", "zstd", "gzip"])
def test_committed_blocks_hold_whole_committed_lines_from_any_line(tmp_path: Path, codec: str) -> None:
    with _archive(tmp_path, codec) as state:
        active = state.segments()[-1]
        with (tmp_path / active.file).open("ab") as f:  # an uncommitted, torn tail
            f.write(b'{"id": 9, "me')
        for segment in state.segments():
            lines = [line.data for line in segment_lines(tmp_path, segment) if line.committed_in(segment)]
            for skip in range(len(lines) + 1):
                start = sum(map(len, lines[:skip]))
                for block in (1, 7, 1 << 20):  # tiny blocks: a line spans several reads
                    got = list(committed_blocks(tmp_path, state, segment, start, block))
                    assert all(b.endswith(b"\n") for b in got)
                    assert b"".join(got) == b"".join(lines[skip:])


def test_committed_blocks_follow_a_segment_compressed_meanwhile(tmp_path: Path) -> None:
    with _archive(tmp_path, "zstd") as state:
        plain = state.segments()[0]
        # as read before the compress step: its plain file is gone since
        snapshot = SegmentRow(plain.name, plain.size, plain.items, plain.closed, plain.name)
        assert b"".join(committed_blocks(tmp_path, state, snapshot)) == b"".join(
            _line(i) for i in _items(1, 2, 3)
        )


def test_committed_bytes_that_end_inside_a_line_are_a_state_error(tmp_path: Path) -> None:
    with _archive(tmp_path, "none") as state:
        segment = state.segments()[0]
        short = SegmentRow(segment.name, segment.size - 3, segment.items, segment.closed, segment.file)
        with pytest.raises(StateError, match="end inside a line"):
            list(committed_blocks(tmp_path, state, short))
        long = SegmentRow(segment.name, segment.size + 10, segment.items, segment.closed, segment.file)
        with pytest.raises(StateError, match="ends before"):
            list(committed_blocks(tmp_path, state, long))
