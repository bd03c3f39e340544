"""The archive's committed lines in blocks, as Arrow strings that DuckDB's JSON reader accepts.

Lines are the items' bytes exactly as the API served them, and Node's JSON holds
lone surrogate escapes (a prompt cut inside an emoji: `"\\ud83d"`) that strict
parsers (DuckDB's among them) refuse. Such an escape is replaced, in the text
handed to DuckDB only, by `\\ufffd` (the replacement character; same length, so
offsets stay) and the line is remembered as changed, so its `meta` is taken
from the original bytes. Integers beyond 64 bits need nothing: DuckDB keeps
their digits as written.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from crawler.archive.reader import committed_blocks
from crawler.archive.state import SegmentRow, State
from crawler.errors import StateError

# A surrogate escape anywhere in a block: the rare case that needs a closer look.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# Every escape from its backslash: a surrogate pair (kept), a lone surrogate (replaced), any
# other escape (kept; `.` takes the escaped character, so `\\` never starts a false match).
_ESCAPE = re.compile(
    rb"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|u[dD][89a-fA-F][0-9a-fA-F]{2}|.)",
    re.DOTALL,
)
_REPLACEMENT = b"\\ufffd"


@dataclass(frozen=True, slots=True)
class Block:
    """Whole committed lines of one segment, ready for DuckDB."""

    segment: str  # the segment's name (as written, whatever its file is now)
    first: int  # the number of the block's first line in the segment, from 1
    text: pa.LargeStringArray  # one line each, without its newline; lone surrogates replaced
    end: int  # the byte offset in the (uncompressed) segment just after the block
    changed: dict[int, bytes] = field(default_factory=dict)  # index -> the line as stored, if changed

    def __len__(self) -> int:
        return len(self.text)

    def original(self, index: int) -> bytes:
        """The line at `index` exactly as stored, without its newline."""
        stored = self.changed.get(index)
        return stored if stored is not None else self.text[index].as_py().encode("utf-8")


def blocks(out_dir: Path, state: State, segment: SegmentRow, start: int, first: int) -> Iterator[Block]:
    """The committed lines of `segment` from byte `start` (the start of line `first`) on."""
    offset = start
    for data in committed_blocks(out_dir, state, segment, start):
        text, changed = _replace_lone_surrogates(data)
        block = Block(segment.name, first, _split(text, segment.name, first), offset + len(data), changed)
        yield block
        first += len(block)
        offset = block.end


def _split(data: bytes, segment: str, first: int) -> pa.LargeStringArray:
    # One binary value over all the block's bytes but the last newline (no copy), split at newlines.
    offsets = pa.array([0, len(data) - 1], pa.int64()).buffers()[1]
    whole = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])
    lines = pc.split_pattern(whole, pattern=b"\n").values
    try:
        return lines.cast(pa.large_string())  # checks UTF-8
    except pa.ArrowInvalid:
        bad = next(i for i, line in enumerate(lines.to_pylist()) if not _utf8(line))
        raise StateError(f"{segment}:{first + bad}: not UTF-8") from None


def _utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _replace_lone_surrogates(data: bytes) -> tuple[bytes, dict[int, bytes]]:
    """`data` with every lone surrogate escape replaced (same length), and each changed
    line's index in the block with its original bytes."""
    if _SURROGATE.search(data) is None:
        return data, {}
    text = bytearray(data)
    changed: dict[int, bytes] = {}
    index = done = 0  # `index`: the number of the line that starts at `done`
    for match in _SURROGATE.finditer(data):
        if match.start() < done:
            continue  # in a line already done
        newline = data.rfind(b"\n", done, match.start())
        start = done if newline < 0 else newline + 1
        end = data.index(b"\n", match.end())
        index += data.count(b"\n", done, start)
        line = data[start:end]
        fixed = _ESCAPE.sub(_keep_or_replace, line)
        if fixed != line:
            text[start:end] = fixed
            changed[index] = line
        done, index = end + 1, index + 1
    return bytes(text), changed


def _keep_or_replace(match: re.Match[bytes]) -> bytes:
    escape = match.group()
    if len(escape) == 6 and escape[2:3] in b"dD" and escape[3:4] in b"89abcdefABCDEF":
        return _REPLACEMENT
    return escape
