"""The script a user would write instead of `harvest export`: the baseline of scenario 6.

Reads every segment of an output dir (plain, .zst or .gz) line by line, parses each
line with orjson, pulls the export's columns out in a Python loop (loosely typed:
no exact `meta`, no seed beyond 64 bits, no lone surrogates) and writes one
zstd Parquet file with pyarrow, 100,000 rows per row group.

    python bench/export_baseline.py OUTPUT_DIR OUT_FILE

Prints one JSON line: {"items": N}.
"""

from __future__ import annotations

import gzip
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

STATS = ("likeCount", "heartCount", "laughCount", "cryCount", "dislikeCount", "commentCount")
TOP = ("id", "url", "hash", "width", "height", "nsfwLevel", "nsfw", "browsingLevel", "type", "createdAt")
TOP2 = ("postId", "username", "baseModel", "modelVersionIds")
GEN = ("prompt", "negativePrompt", "seed", "steps", "sampler", "cfgScale", "clipSkip", "Size")


def lines(folder: Path) -> Iterator[bytes]:
    for path in sorted(folder.glob("images-*.ndjson*")):
        if path.name.endswith(".zst"):
            stream: Any = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb")))
        elif path.name.endswith(".gz"):
            stream = gzip.open(path, "rb")
        else:
            stream = path.open("rb")
        with stream:
            yield from stream


def rows(folder: Path) -> Iterator[dict[str, Any]]:
    for line in lines(folder):
        item = orjson.loads(line)
        meta = item.get("meta") or {}
        row = {k: item.get(k) for k in (*TOP, *TOP2)}
        row["stats"] = {k: (item.get("stats") or {}).get(k) for k in STATS}
        row["tags"] = item.get("tags")
        row.update({k: meta.get(k) for k in GEN})
        row["seed"] = None if row["seed"] is None else str(row["seed"])
        row["resources"] = meta.get("resources")
        row["meta"] = None if not meta else orjson.dumps(meta).decode()
        yield row


def main(folder: Path, out: Path) -> dict[str, int]:
    count, writer, batch = 0, None, []
    for row in rows(folder):
        batch.append(row)
        if len(batch) == 100_000:
            writer = flush(batch, writer, out)
            count, batch = count + len(batch), []
    if batch:
        writer = flush(batch, writer, out)
        count += len(batch)
    if writer is not None:
        writer.close()
    return {"items": count}


def flush(batch: list[dict[str, Any]], writer: pq.ParquetWriter | None, out: Path) -> pq.ParquetWriter:
    columns = {k: [r[k] for r in batch] for k in batch[0]}
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    if writer is None:
        writer = pq.ParquetWriter(out, table.schema, compression="zstd")
    writer.write_table(table.cast(writer.schema))
    return writer


if __name__ == "__main__":
    print(orjson.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))).decode())
