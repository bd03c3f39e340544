"""Segment codecs: compressing a segment file, and reading any segment back line by line.

Writes go through `fs.write_atomic`, so a compressed file exists whole or not at
all; when it replaces the plain file is `steps.Compress`'s business.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, BinaryIO

import zstandard

from crawler.archive.fs import open_nofollow, write_atomic

SUFFIXES = {"zstd": ".zst", "gzip": ".gz", "none": ""}
_CHUNK = 1 << 20

# What reading a damaged compressed file raises: zstd's own error, gzip's bad header,
# CRC or length, zlib's bad stream, a cut file's early end.
DECODE_ERRORS: tuple[type[Exception], ...] = (zstandard.ZstdError, gzip.BadGzipFile, zlib.error, EOFError)


def compressed_name(name: str, codec: str) -> str:
    return name + SUFFIXES[codec]


def compress(src: Path, codec: str) -> Path:
    """Write `src` compressed next to it, durably; return the new file. `src` is kept."""
    with open_segment(src) as plain:
        return write_atomic(src.with_name(compressed_name(src.name, codec)), _packer(plain, codec))


def _packer(plain: BinaryIO, codec: str) -> Callable[[BinaryIO], None]:
    def fill(raw: BinaryIO) -> None:
        with _compressor(codec, raw) as packed:
            shutil.copyfileobj(plain, packed, _CHUNK)

    return fill


def _compressor(codec: str, raw: IO[bytes]) -> BinaryIO:
    if codec == "zstd":
        # The checksum lets a reader tell a damaged frame from data (zstd omits it by default).
        return zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(raw, closefd=False)
    if codec == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6)  # type: ignore[return-value]
    raise ValueError(f"unknown compression {codec!r}")


def read_lines(path: Path) -> Iterator[bytes]:
    """Every line of a segment, plain or compressed, each with its newline (if it has one).

    A damaged compressed file raises one of DECODE_ERRORS part way.
    """
    with open_segment(path) as stream:
        yield from stream


def open_segment(path: Path) -> BinaryIO:
    """A segment file for reading its uncompressed bytes, whatever its codec (told by its suffix).

    Never through a symlink (an OutputError): what is read may be adopted into the archive.
    """
    return decoded(os.fdopen(open_nofollow(path, os.O_RDONLY), "rb"), path.name)


def decoded(raw: BinaryIO, name: str) -> BinaryIO:
    """The uncompressed bytes of `raw`, a segment file named `name` (its suffix tells the codec),
    from wherever it is read (a local file, an object in the store); closing it closes `raw`."""
    if name.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    if name.endswith(".gz"):
        return _GzipReader(raw)  # type: ignore[return-value]
    return raw


class _GzipReader(gzip.GzipFile):
    """A gzip stream over an open file that, unlike `GzipFile(fileobj=...)`, closes it too."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()
