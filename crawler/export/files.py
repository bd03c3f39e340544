"""The export's files: numbered `images-NNNNNN.parquet` (or `.jsonl.gz`), each whole or absent.

A file is written as `NAME.part`, fsynced and renamed once it holds `max_bytes`
(checked after each block of rows, so a file is at most one block over) or the
export ends. Only the manifest written after them makes them part of the export:
files a crash left behind are swept by the next export (`strays`).
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar, Protocol

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crawler.archive.fs import PART_SUFFIX, fsync_dir
from crawler.errors import OutputError
from crawler.export.schema import SCHEMA

PREFIX = "images-"


@dataclass(frozen=True, slots=True)
class Written:
    """One finished file of the export."""

    name: str
    rows: int
    bytes: int


def file_name(number: int, suffix: str) -> str:
    return f"{PREFIX}{number:06d}{suffix}"


def file_number(name: str, suffix: str) -> int | None:
    """The number in one of our file names (a `.part` too), or None for any other file."""
    match = re.fullmatch(
        re.escape(PREFIX) + r"(\d{6,})" + re.escape(suffix) + f"(?:{re.escape(PART_SUFFIX)})?", name
    )
    return int(match.group(1)) if match else None


def strays(folder: Path, suffix: str, listed: set[str]) -> list[Path]:
    """Our files in `folder` that the manifest does not list: left by an interrupted export."""
    return sorted(
        p for p in folder.iterdir() if file_number(p.name, suffix) is not None and p.name not in listed
    )


class Encoder(Protocol):
    """Writes blocks of rows of `SCHEMA` into one open file."""

    def write(self, table: pa.Table) -> None: ...
    def close(self) -> None: ...


class Files:
    """Numbered files of one format, a new one whenever the current reaches `max_bytes`."""

    suffix: ClassVar[str]

    def __init__(self, folder: Path, first_number: int, max_bytes: int) -> None:
        self.folder, self.number, self.max_bytes = folder, first_number, max_bytes
        self.written: list[Written] = []
        self._raw: BinaryIO | None = None
        self._encoder: Encoder | None = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        if not len(table):
            return
        try:
            if self._encoder is None:
                self._raw = self._part().open("wb")
                self._encoder = self.encoder(self._raw)
            self._encoder.write(table)
            self._rows += len(table)
            assert self._raw is not None
            if self._raw.tell() >= self.max_bytes:
                self._finish()
        except OSError as exc:
            raise OutputError(f"{self._part()}: cannot write: {exc.strerror or exc}") from None

    def close(self) -> list[Written]:
        """Finish the open file; every file written, in order."""
        try:
            if self._encoder is not None:
                self._finish()
            if self.written:
                fsync_dir(self.folder)
        except OSError as exc:
            raise OutputError(f"{self.folder}: cannot finish the export: {exc.strerror or exc}") from None
        return self.written

    def abort(self) -> None:
        """Drop the open file (an error or a signal part way): the next export sweeps the rest."""
        if self._raw is not None:
            self._raw.close()
            self._part().unlink(missing_ok=True)
        self._raw = self._encoder = None

    def encoder(self, raw: BinaryIO) -> Encoder:
        raise NotImplementedError

    def _part(self) -> Path:
        return self.folder / (file_name(self.number, self.suffix) + PART_SUFFIX)

    def _finish(self) -> None:
        assert self._encoder is not None and self._raw is not None
        self._encoder.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        size = self._raw.tell()
        self._raw.close()
        name = file_name(self.number, self.suffix)
        os.replace(self._part(), self.folder / name)
        self.written.append(Written(name, self._rows, size))
        self.number, self._rows, self._raw, self._encoder = self.number + 1, 0, None, None


class ParquetFiles(Files):
    """Parquet, zstd-compressed; each block of rows is one row group."""

    suffix = ".parquet"

    def encoder(self, raw: BinaryIO) -> Encoder:
        return _ParquetEncoder(raw)


# Columns with few distinct values, dictionary-encoded; the others (urls, prompts, meta, ids) are not:
# a dictionary there only costs time before Parquet gives up on it.
_DICTIONARY = ["nsfwLevel", "type", "username", "baseModel", "sampler", "Size", "negativePrompt", "segment"]


class _ParquetEncoder:
    def __init__(self, raw: BinaryIO) -> None:
        self._writer = pq.ParquetWriter(
            raw, SCHEMA, compression="zstd", compression_level=1, use_dictionary=_DICTIONARY
        )

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table, row_group_size=len(table))

    def close(self) -> None:
        self._writer.close()


class JsonLinesFiles(Files):
    """The same rows as gzipped JSON lines: one object per image, every column, nulls included."""

    suffix = ".jsonl.gz"

    def __init__(
        self, folder: Path, first_number: int, max_bytes: int, con: duckdb.DuckDBPyConnection
    ) -> None:
        super().__init__(folder, first_number, max_bytes)
        self._con = con

    def encoder(self, raw: BinaryIO) -> Encoder:
        return _JsonLinesEncoder(raw, self._con)


# `createdAt` as ISO 8601 in UTC ("2024-05-01T12:00:00.123000Z"); every other column as DuckDB
# writes its type in JSON (numbers, strings, lists, objects).
_JSON_ROW = "to_json(struct_pack({}))".format(
    ", ".join(
        f'"{f.name}" := strftime("{f.name}", \'%Y-%m-%dT%H:%M:%S.%fZ\')'
        if pa.types.is_timestamp(f.type)
        else f'"{f.name}" := "{f.name}"'
        for f in SCHEMA
    )
)


class _JsonLinesEncoder:
    def __init__(self, raw: BinaryIO, con: duckdb.DuckDBPyConnection) -> None:
        self._gzip = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3, mtime=0)
        self._con = con

    def write(self, table: pa.Table) -> None:
        self._con.register("export_rows", table)
        try:
            lines = self._con.sql(f"SELECT {_JSON_ROW} AS j FROM export_rows").to_arrow_table().column("j")
        finally:
            self._con.unregister("export_rows")
        whole = lines.combine_chunks()
        one = pa.ListArray.from_arrays(pa.array([0, len(whole)], pa.int32()), whole)
        self._gzip.write(pc.binary_join(one, "\n")[0].as_buffer())
        self._gzip.write(b"\n")

    def close(self) -> None:
        self._gzip.close()
