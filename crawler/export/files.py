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
from typing import Any, BinaryIO, ClassVar, Protocol

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from crawler.archive.fs import PART_SUFFIX, fsync_dir
from crawler.errors import OutputError
from crawler.export.schema import SCHEMA

PREFIX = "images-"
_WHOLE_ROWS = 1 << 20  # rows per block of a whole file: a Parquet row group, a DuckDB JSON query


@dataclass(frozen=True, slots=True)
class Written:
    """One finished file of the export."""

    name: str
    rows: int
    bytes: int


def file_name(number: int, suffix: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{number:06d}{suffix}"


def file_number(name: str, suffix: str, prefix: str = PREFIX) -> int | None:
    """The number in one of our file names (a `.part` too), or None for any other file."""
    match = re.fullmatch(
        re.escape(prefix) + r"(\d{6,})" + re.escape(suffix) + f"(?:{re.escape(PART_SUFFIX)})?", name
    )
    return int(match.group(1)) if match else None


def strays(folder: Path, suffix: str, listed: set[str], prefix: str = PREFIX) -> list[Path]:
    """Our files in `folder` that the manifest does not list: left by an interrupted export."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if file_number(p.name, suffix, prefix) is not None and p.name not in listed
    )


@dataclass(frozen=True, slots=True)
class Batch:
    """A block of rows made ready for one format's file: `data` is what its encoder writes."""

    rows: int
    data: Any


class Encoder(Protocol):
    """Writes batches into one open file."""

    def write(self, data: Any) -> None: ...
    def close(self) -> None: ...


class Files:
    """Numbered files of one format, a new one whenever the current reaches `max_bytes`.

    `prepare` turns rows into a `Batch` (on the exporting thread: it may use DuckDB);
    `write` puts it in the current file (on the writing thread).
    """

    suffix: ClassVar[str]

    def __init__(
        self,
        folder: Path,
        first_number: int,
        max_bytes: int,
        schema: pa.Schema = SCHEMA,
        prefix: str = PREFIX,
    ) -> None:
        self.folder, self.number, self.max_bytes = folder, first_number, max_bytes
        self.schema, self.prefix = schema, prefix
        self.written: list[Written] = []
        self._raw: BinaryIO | None = None
        self._encoder: Encoder | None = None
        self._rows = 0

    def prepare(self, table: pa.Table) -> Batch:
        return Batch(len(table), table)

    def write(self, batch: Batch) -> None:
        if not batch.rows:
            return
        try:
            if self._encoder is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._raw = self._part().open("wb")
                self._encoder = self.encoder(self._raw)
            self._encoder.write(batch.data)
            self._rows += batch.rows
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

    def write_whole(self, name: str, table: pa.Table) -> Written:
        """`table` as the one file `name` (not numbered), whole or absent (.part, fsync, rename):
        the latest observations, which each export replaces."""
        part = self.folder / (name + PART_SUFFIX)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with part.open("wb") as raw:
                encoder = self.encoder(raw)
                for start in range(0, len(table), _WHOLE_ROWS):
                    batch = self.prepare(table.slice(start, _WHOLE_ROWS))
                    encoder.write(batch.data)
                encoder.close()
                raw.flush()
                os.fsync(raw.fileno())
                size = raw.tell()
            os.replace(part, self.folder / name)
            fsync_dir(self.folder)
        except OSError as exc:
            raise OutputError(f"{part}: cannot write: {exc.strerror or exc}") from None
        return Written(name, len(table), size)

    def encoder(self, raw: BinaryIO) -> Encoder:
        raise NotImplementedError

    def _part(self) -> Path:
        return self.folder / (file_name(self.number, self.suffix, self.prefix) + PART_SUFFIX)

    def _finish(self) -> None:
        assert self._encoder is not None and self._raw is not None
        self._encoder.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        size = self._raw.tell()
        self._raw.close()
        name = file_name(self.number, self.suffix, self.prefix)
        os.replace(self._part(), self.folder / name)
        self.written.append(Written(name, self._rows, size))
        self.number, self._rows, self._raw, self._encoder = self.number + 1, 0, None, None


class ParquetFiles(Files):
    """Parquet, zstd-compressed; each block of rows is one row group."""

    suffix = ".parquet"

    def encoder(self, raw: BinaryIO) -> Encoder:
        return _ParquetEncoder(raw, self.schema)


# Columns with few distinct values, dictionary-encoded; the others (urls, prompts, meta, ids) are not:
# a dictionary there only costs time before Parquet gives up on it.
_DICTIONARY = ["nsfwLevel", "type", "username", "baseModel", "sampler", "Size", "negativePrompt", "segment"]


class _ParquetEncoder:
    def __init__(self, raw: BinaryIO, schema: pa.Schema) -> None:
        dictionary = [name for name in _DICTIONARY if name in schema.names]
        self._writer = pq.ParquetWriter(
            raw, schema, compression="zstd", compression_level=1, use_dictionary=dictionary
        )

    def write(self, data: Any) -> None:
        self._writer.write_table(data, row_group_size=len(data))

    def close(self) -> None:
        self._writer.close()


class JsonLinesFiles(Files):
    """The same rows as gzipped JSON lines: one object per image, every column, nulls included.

    DuckDB writes the lines (`prepare`); the writing thread only compresses them.
    """

    suffix = ".jsonl.gz"

    def __init__(
        self,
        folder: Path,
        first_number: int,
        max_bytes: int,
        con: duckdb.DuckDBPyConnection,
        schema: pa.Schema = SCHEMA,
        prefix: str = PREFIX,
    ) -> None:
        super().__init__(folder, first_number, max_bytes, schema, prefix)
        self._con = con
        self._line = _json_line(schema)

    def prepare(self, table: pa.Table) -> Batch:
        self._con.register("export_rows", table)
        try:
            lines = self._con.sql(f"SELECT {self._line} AS j FROM export_rows").to_arrow_table().column("j")
        finally:
            self._con.unregister("export_rows")
        return Batch(len(table), [_characters(chunk) for chunk in lines.chunks])

    def encoder(self, raw: BinaryIO) -> Encoder:
        return _GzipEncoder(raw)


# One line per row: `createdAt` as ISO 8601 in UTC ("2024-05-01T12:00:00.123000Z"), every other
# column as DuckDB writes its type in JSON (numbers, strings, lists, objects), then a newline.
def _json_line(schema: pa.Schema) -> str:
    return "to_json(struct_pack({})) || chr(10)".format(
        ", ".join(
            f'"{f.name}" := strftime("{f.name}", \'%Y-%m-%dT%H:%M:%S.%fZ\')'
            if pa.types.is_timestamp(f.type)
            else f'"{f.name}" := "{f.name}"'
            for f in schema
        )
    )


def _characters(strings: pa.Array) -> pa.Buffer:
    """A string array's characters, every value back to back, without copying them."""
    kind = pa.int64() if pa.types.is_large_string(strings.type) else pa.int32()
    _, offsets, data = strings.buffers()
    ends = pa.Array.from_buffers(kind, len(strings) + 1, [None, offsets], offset=strings.offset)
    start, end = ends[0].as_py(), ends[len(strings)].as_py()
    return data.slice(start, end - start)


class _GzipEncoder:
    def __init__(self, raw: BinaryIO) -> None:
        self._gzip = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3, mtime=0)

    def write(self, data: Any) -> None:
        for text in data:
            self._gzip.write(text)

    def close(self) -> None:
        self._gzip.close()
